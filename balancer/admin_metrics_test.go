package balancer

import (
	"strings"
	"testing"
)

func TestAdminMetricsHaveTypeLines(t *testing.T) {
	a, b := startOrigin(t, "a", nil), startOrigin(t, "b", nil)
	s := startEdge(t, "services:\n  web: {static: "+staticList(a, b)+"}\n  api: {static: "+staticList(a, b)+"}\n"+
		"routes: [{service: web}, {path: /api, service: api}, {host: none.example, path: /x, service: web}]\n")
	for _, path := range []string{"/", "/api", "/"} {
		if resp := do(t, s, "GET", "shop.example", path); resp.StatusCode() != 200 {
			t.Fatalf("GET %s: %d", path, resp.StatusCode())
		}
	}
	do(t, s, "GET", "none.example", "/y") // no route
	code, m := adminGet(t, s, "/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	for _, want := range []string{
		"# TYPE edgelb_requests_total counter\n",
		"# TYPE edgelb_backend_requests_total counter\n",
		"# TYPE edgelb_backend_inflight gauge\n",
		"# TYPE edgelb_panic_mode gauge\n",
		"# TYPE edgelb_request_duration_seconds histogram\n",
		"# TYPE edgelb_backend_request_duration_seconds histogram\n",
		"# TYPE edgelb_generated_errors_total counter\n",
		"# TYPE go_gc_duration_seconds summary\n",
		"# HELP edgelb_requests_total Client requests routed to the service.\n",
	} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	checkExposition(t, m)
}

// checkExposition checks the rules of the Prometheus text format that the
// metrics package alone breaks: one TYPE line per family, before its
// samples, which come in one group. It also wants a HELP text for every
// edgelb family.
func checkExposition(t *testing.T, m string) {
	t.Helper()
	types := map[string]string{}
	helps := map[string]bool{}
	done := map[string]bool{} // families whose group has ended
	cur := ""
	for _, l := range strings.Split(strings.TrimSuffix(m, "\n"), "\n") {
		if rest, ok := strings.CutPrefix(l, "# HELP "); ok {
			name, help, _ := strings.Cut(rest, " ")
			if helps[name] || help == "" {
				t.Errorf("second or empty HELP line: %q", l)
			}
			helps[name] = true
			continue
		}
		if rest, ok := strings.CutPrefix(l, "# TYPE "); ok {
			name, typ, _ := strings.Cut(rest, " ")
			if types[name] != "" {
				t.Errorf("second TYPE line for %s", name)
			}
			types[name] = typ
			if cur != "" {
				done[cur] = true
			}
			cur = name
			continue
		}
		name := l[:strings.IndexAny(l, "{ ")]
		fam := name
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(name, suffix); ok && (types[base] == "histogram" || types[base] == "summary") {
				fam = base
			}
		}
		if types[fam] == "" {
			t.Errorf("sample without a TYPE line: %q", l)
		}
		if fam != cur {
			if done[fam] {
				t.Errorf("%s samples in more than one group: %q", fam, l)
			}
			if cur != "" {
				done[cur] = true
			}
			cur = fam
		}
	}
	for name := range types {
		if strings.HasPrefix(name, "edgelb_") && !helps[name] {
			t.Errorf("%s has no HELP text: add one to metricHelp", name)
		}
	}
}

func TestWriteExposition(t *testing.T) {
	f := func(in, want string) {
		t.Helper()
		var out strings.Builder
		writeExposition(&out, []byte(in))
		if out.String() != want {
			t.Errorf("in:\n%s\ngot:\n%s\nwant:\n%s", in, out.String(), want)
		}
	}
	// One family in two sets, each with its metadata; a histogram written
	// without metadata; a family with no help text.
	f("# HELP edgelb_requests_total\n# TYPE edgelb_requests_total counter\nedgelb_requests_total{service=\"b\"} 2\n"+
		"edgelb_request_duration_seconds_bucket{service=\"b\",le=\"+Inf\"} 2\nedgelb_request_duration_seconds_sum{service=\"b\"} 0.1\nedgelb_request_duration_seconds_count{service=\"b\"} 2\n"+
		"# HELP go_goroutines\n# TYPE go_goroutines gauge\ngo_goroutines 7\n"+
		"# HELP edgelb_requests_total\n# TYPE edgelb_requests_total counter\nedgelb_requests_total{service=\"a\"} 1\n",
		"# HELP edgelb_request_duration_seconds Duration of client requests, retries included.\n# TYPE edgelb_request_duration_seconds histogram\n"+
			"edgelb_request_duration_seconds_bucket{service=\"b\",le=\"+Inf\"} 2\nedgelb_request_duration_seconds_sum{service=\"b\"} 0.1\nedgelb_request_duration_seconds_count{service=\"b\"} 2\n"+
			"# HELP edgelb_requests_total Client requests routed to the service.\n# TYPE edgelb_requests_total counter\nedgelb_requests_total{service=\"b\"} 2\nedgelb_requests_total{service=\"a\"} 1\n"+
			"# TYPE go_goroutines gauge\ngo_goroutines 7\n")
	// A summary's series stay with it; a counter named like a histogram
	// series keeps its own family.
	f("# HELP go_gc_duration_seconds\n# TYPE go_gc_duration_seconds summary\ngo_gc_duration_seconds{quantile=\"0\"} 0\ngo_gc_duration_seconds_sum 0\ngo_gc_duration_seconds_count 3\n"+
		"# HELP x_count\n# TYPE x_count counter\nx_count 1\n",
		"# TYPE go_gc_duration_seconds summary\ngo_gc_duration_seconds{quantile=\"0\"} 0\ngo_gc_duration_seconds_sum 0\ngo_gc_duration_seconds_count 3\n"+
			"# TYPE x_count counter\nx_count 1\n")
	f("", "")
}
