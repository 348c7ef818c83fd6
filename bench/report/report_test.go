package report

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgelb/edgelb/bench/loadgen"
)

// sample is a report of one scenario run through edgelb and nginx, with an
// event and errors in its second second.
func sample() *Report {
	result := func(rps float64, p99 float64, errs int64) *loadgen.Result {
		res := &loadgen.Result{Target: "http://127.0.0.1:1/", Concurrency: 4, Start: time.Unix(0, 0), Elapsed: 3 * time.Second, RPS: rps}
		res.Requests = int64(rps * 3)
		res.Errors = errs
		res.Latency.P99 = p99
		res.ByStatus = map[int]int64{200: res.Requests - errs, 503: errs}
		res.ByEdgelbError = map[string]int64{"no_healthy_backend": errs}
		for i := 0; i < 3; i++ {
			sec := loadgen.Second{T: i, RPS: rps}
			sec.Requests = int64(rps)
			sec.Latency = loadgen.Percentiles{P50: 1, P90: 2, P99: p99, P999: 2 * p99, Max: 3 * p99}
			if i == 1 {
				sec.Errors = errs
				sec.ByStatus = map[int]int64{503: errs}
				sec.ByEdgelbError = map[string]int64{"no_healthy_backend": errs}
				sec.ByTransport = map[string]int64{"refused": 1}
				sec.Stale = 7
			}
			res.Seconds = append(res.Seconds, sec)
		}
		return res
	}
	r := &Report{
		Start:    time.Unix(1700000000, 0).UTC(),
		Host:     Host{CPUs: 2, GoVersion: "go1.x", Pinned: true, ProxyCPUs: "0", Peers: map[string]string{"nginx": "nginx version: nginx/1.22.1"}},
		Settings: Settings{DurationS: 3, Concurrency: 4},
		Scenarios: []Scenario{{
			Name: "kill", Title: "kill -9 a backend", Description: "a backend dies",
			Runs: []Run{
				{Proxy: Edgelb, Events: []Event{{T: 1.25, Name: "kill -9 o2"}}, CPUSeconds: 1, CPUPerRequestUS: 30, Result: result(1000, 4, 2)},
				{Proxy: "nginx", Events: []Event{{T: 1.3, Name: "kill -9 o2"}}, CPUSeconds: 1, CPUPerRequestUS: 20, Result: result(500, 8, 10)},
				{Proxy: "haproxy", Error: "haproxy did not start"},
			},
			Propagation: &Propagation{RegisterMS: []float64{30, 10}, DeregisterMS: []float64{20}},
		}},
	}
	r.Scenarios[0].Propagation.Summarize()
	r.Scenarios[0].Compare()
	return r
}

func TestCompare(t *testing.T) {
	s := sample().Scenarios[0]
	if len(s.Comparisons) != 1 {
		t.Fatalf("comparisons: %+v, want one (nginx; haproxy has no result)", s.Comparisons)
	}
	c := s.Comparisons[0]
	f := func(name string, got, want float64) {
		if got != want {
			t.Errorf("%s: got %v, want %v", name, got, want)
		}
	}
	f("rps ratio", c.RPSRatio, 2)
	f("cpu per request ratio", c.CPUPerRequestRatio, 1.5)
	f("p99 ratio", c.P99Ratio, 0.5)
	if c.Peer != "nginx" || c.Errors != 2 || c.PeerErrors != 10 {
		t.Errorf("comparison %+v", c)
	}
	p := s.Propagation
	f("propagation p50", p.P50MS, 20)
	f("propagation max", p.MaxMS, 30)
}

func TestJSONShape(t *testing.T) {
	dir := t.TempDir()
	jsonPath, _, err := sample().WriteFiles(dir, HTMLOptions{})
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(jsonPath)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(data, &doc); err != nil {
		t.Fatal(err)
	}
	// get walks doc along a path of keys and indexes.
	get := func(path ...any) any {
		t.Helper()
		var cur any = doc
		for _, p := range path {
			switch k := p.(type) {
			case string:
				m, ok := cur.(map[string]any)
				if !ok {
					t.Fatalf("%v: %v is not an object", path, cur)
				}
				if cur, ok = m[k]; !ok {
					t.Fatalf("%v: no key %q in %v", path, k, m)
				}
			case int:
				a, ok := cur.([]any)
				if !ok || k >= len(a) {
					t.Fatalf("%v: no index %d in %v", path, k, cur)
				}
				cur = a[k]
			}
		}
		return cur
	}
	f := func(want any, path ...any) {
		t.Helper()
		if got := get(path...); got != want {
			t.Errorf("%v: got %v (%T), want %v", path, got, got, want)
		}
	}
	f(2.0, "host", "cpus")
	f(3.0, "settings", "duration_s")
	f("kill", "scenarios", 0, "name")
	f("edgelb", "scenarios", 0, "runs", 0, "proxy")
	f(30.0, "scenarios", 0, "runs", 0, "cpu_per_request_us")
	f(1.25, "scenarios", 0, "runs", 0, "events", 0, "t_s")
	f("kill -9 o2", "scenarios", 0, "runs", 0, "events", 0, "name")
	f(3000.0, "scenarios", 0, "runs", 0, "result", "requests")
	f(1000.0, "scenarios", 0, "runs", 0, "result", "rps")
	f(4.0, "scenarios", 0, "runs", 0, "result", "latency", "p99_ms")
	f(2.0, "scenarios", 0, "runs", 0, "result", "by_edgelb_error", "no_healthy_backend")
	f(2.0, "scenarios", 0, "runs", 0, "result", "by_status", "503")
	f(1.0, "scenarios", 0, "runs", 0, "result", "seconds", 1, "by_transport", "refused")
	f(7.0, "scenarios", 0, "runs", 0, "result", "seconds", 1, "stale")
	f("haproxy did not start", "scenarios", 0, "runs", 2, "error")
	f("nginx", "scenarios", 0, "comparisons", 0, "peer")
	f(2.0, "scenarios", 0, "comparisons", 0, "rps_ratio")
	f(1.5, "scenarios", 0, "comparisons", 0, "cpu_per_request_ratio")
	f(0.5, "scenarios", 0, "comparisons", 0, "p99_ratio")
	f(20.0, "scenarios", 0, "propagation", "p50_ms")
}

func TestHTMLHasChartsEventsAndTables(t *testing.T) {
	var b bytes.Buffer
	if err := sample().WriteHTML(&b, HTMLOptions{}); err != nil {
		t.Fatal(err)
	}
	html := b.String()
	// One requests/s chart for the scenario, and a latency and an errors
	// chart per run with results.
	if n := strings.Count(html, "echarts.init("); n != 5 {
		t.Errorf("%d charts, want 5", n)
	}
	for _, want := range []string{
		`<script src="https://go-echarts.github.io/go-echarts-assets/assets/echarts.min.js"></script>`,
		"kill -9 a backend: requests/s", "kill -9 a backend: latency through edgelb", "kill -9 a backend: errors through nginx",
		`"markLine"`, `kill -9 o2 (1.25s)`, `"xAxis":"1"`, // the event, marked at its second
		`"type":"log"`, `"stack":"errors"`, "Edgelb-Error: no_healthy_backend", "served stale", "transport: refused", "status 503",
		"<td class=\"l\">edgelb / nginx</td><td>2.00x</td><td>1.50x</td><td>0.50x</td><td>2 vs 10</td>",
		"haproxy did not start",
		"503: 2, no_healthy_backend: 2",
		"register: 30 10",
	} {
		if !strings.Contains(html, want) {
			t.Errorf("HTML lacks %q", want)
		}
	}
}

func TestHTMLInlinesLocalEcharts(t *testing.T) {
	js := filepath.Join(t.TempDir(), "echarts.min.js")
	if err := os.WriteFile(js, []byte("var echarts = {init: function() {}};"), 0o644); err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := sample().WriteHTML(&b, HTMLOptions{EchartsJS: js}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "<script>var echarts = {init: function() {}};</script>") || strings.Contains(b.String(), "go-echarts-assets") {
		t.Error("the local echarts.min.js is not inlined in place of the remote one")
	}
	if err := sample().WriteHTML(&b, HTMLOptions{EchartsJS: filepath.Join(t.TempDir(), "missing.js")}); err == nil {
		t.Error("a missing -echarts-js is not an error")
	}
}

func TestHTMLFailoverTable(t *testing.T) {
	r := sample()
	run := &r.Scenarios[0].Runs[0]
	run.Failover = &Failover{
		Backup: "backup", KillMS: 0.5, FirstBackupMS: 1.5, AllBackupMS: 2.25, OutageMaxMS: 3, FirstPrimaryMS: 1200, AllPrimaryMS: -1, LastSecondPrimaryPercent: 100,
		Before: map[string]int64{"o1": 10}, Outage: map[string]int64{"backup": 20, "": 1}, After: map[string]int64{"o1": 5},
		BySecond: []map[string]int64{{"o1": 10}, {"backup": 20, "": 1}, {"o1": 5}},
	}
	var b bytes.Buffer
	if err := r.WriteHTML(&b, HTMLOptions{}); err != nil {
		t.Fatal(err)
	}
	html := b.String()
	for _, want := range []string{
		"kill to first backup answer ms",
		"<td class=\"l\">edgelb</td><td>0.5</td><td>1.5</td><td>2.2</td><td>0</td><td>3.0</td><td>1200.0</td><td>never</td><td>100.0%</td>",
		"o1 10 / no answer 1, backup 20 / o1 5",
		"kill -9 a backend: who answered through edgelb", `"stack":"origins"`,
	} {
		if !strings.Contains(html, want) {
			t.Errorf("HTML lacks %q", want)
		}
	}
	if n := strings.Count(html, "echarts.init("); n != 6 {
		t.Errorf("%d charts, want 6 (the origins chart of the run with a failover)", n)
	}
}
