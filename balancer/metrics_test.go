package balancer

import (
	"strings"
	"testing"
	"time"
)

// metricLines returns the lines of /metrics that start with name.
func metricLines(t *testing.T, s *Server, name string) []string {
	t.Helper()
	_, body := adminGet(t, s, "/metrics")
	var out []string
	for _, line := range strings.Split(body, "\n") {
		if strings.HasPrefix(line, name) {
			out = append(out, line)
		}
	}
	return out
}

// TestReloadKeepsCounters reloads a config that changes a service, which
// rebuilds its pool: the service's and its backends' counters carry on,
// during the rebuild and after the old pool is gone, and never show twice.
func TestReloadKeepsCounters(t *testing.T) {
	o := startOrigin(t, "a", nil)
	yaml := "services:\n  web: {static: " + staticList(o) + ", timeout: 1s, try_timeout: 1s}\nroutes: [{service: web}]\n"
	s := startEdge(t, yaml)
	f := func(name, want string) {
		t.Helper()
		if got := strings.Join(metricLines(t, s, name), "\n"); got != name+" "+want {
			t.Fatalf("/metrics: %q, want %q", got, name+" "+want)
		}
	}
	get := func(n int) {
		t.Helper()
		for i := 0; i < n; i++ {
			if resp := do(t, s, "GET", "x", "/"); resp.StatusCode() != 200 {
				t.Fatalf("GET /: %d", resp.StatusCode())
			}
		}
	}
	requests := `edgelb_requests_total{service="web"}`
	backendRequests := `edgelb_backend_requests_total{service="web",backend="` + o.addr + `"}`
	get(50)
	f(requests, "50")
	f(backendRequests, "50")

	cfg := mustConfig(t, "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n"+strings.Replace(yaml, "timeout: 1s,", "timeout: 1s, retries: 1,", 1))
	cfg.Listen, cfg.Admin, cfg.StateDir = s.cfg.Listen, s.cfg.Admin, s.cfg.StateDir
	if err := s.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	get(10)
	f(requests, "60")
	f(backendRequests, "60")
	// The old pool is closed timeout+1s after the reload.
	time.Sleep(2500 * time.Millisecond)
	get(10)
	f(requests, "70")
	f(backendRequests, "70")
	f(`edgelb_backend_inflight{service="web",backend="`+o.addr+`"}`, "0")
}

func TestBackendSeriesRetention(t *testing.T) {
	st := newSeriesTable()
	defer st.close()
	m := st.acquireBackend("web", "10.0.0.1:80", nil)
	m.requests.Add(5)
	m.release()
	// A backend back within the retention carries on counting.
	if again := st.acquireBackend("web", "10.0.0.1:80", nil); again != m || again.requests.Get() != 5 {
		t.Fatal("the series of a backend back within the retention were replaced")
	}
	m.release()
	defer func(r time.Duration) { backendSeriesRetention = r }(backendSeriesRetention)
	backendSeriesRetention = 0
	st.lastPrune = time.Time{}
	other := st.acquireBackend("web", "10.0.0.2:80", nil)
	defer other.release()
	if _, kept := st.backends[[2]string{"web", "10.0.0.1:80"}]; kept {
		t.Fatal("the series of a backend gone for longer than the retention were kept")
	}
}
