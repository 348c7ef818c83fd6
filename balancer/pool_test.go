package balancer

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/discovery"
	"github.com/edgelb/edgelb/health"
)

// testPool builds a pool of the given addresses from a service config
// body, without a server.
func testPool(t testing.TB, svc string, addrs ...string) *Pool {
	t.Helper()
	cfg := mustConfig(t, "services:\n  web: "+svc+"\n")
	reg := health.NewRegistry(nil)
	checker := health.NewChecker(nil)
	st := newSeriesTable()
	p := newPool("web", cfg.Services["web"], reg, checker, nil, st)
	t.Cleanup(func() { p.close(); checker.Close(); st.close() })
	ins := make([]discovery.Instance, len(addrs))
	for i, a := range addrs {
		ins[i] = discovery.Instance{Addr: a}
	}
	p.update(discovery.NewSet("web", "static", ins, time.Now()))
	return p
}

// waitFor polls cond for up to 20 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

func serviceStatus(s *Server) *ServiceStatus { return s.Status().Services["web"] }

func TestSlowStart(t *testing.T) {
	p := testPool(t, "{static: [127.0.0.1:1], health: {slow_start: 10s, passive: {consecutive_gateway_failures: 1, base_ejection_time: 1s}}}",
		"127.0.0.1:1", "127.0.0.1:2")
	back := p.byAddr["127.0.0.1:2"]
	back.target.Begin()
	back.target.Done(time.Now().UnixNano(), health.OutcomeConnectFailed, time.Millisecond)
	readmitted := back.target.AvailableSince()
	if readmitted == 0 {
		t.Fatal("an ejection must set when the backend comes back")
	}
	// share picks at the given time after readmission and checks the
	// returning backend's share of them.
	share := func(after time.Duration, lo, hi float64) {
		t.Helper()
		now := readmitted + int64(after)
		n := 0
		for i := 0; i < 4000; i++ {
			var tr tried
			if p.pick(now, &tr) == back {
				n++
			}
		}
		if got := float64(n) / 4000; got < lo || got > hi {
			t.Errorf("%s after readmission: share %.3f, want %.2f-%.2f", after, got, lo, hi)
		}
	}
	share(-time.Millisecond, 0, 0) // still ejected
	share(0, 0, 0.01)
	share(2500*time.Millisecond, 0.08, 0.18) // a quarter of its half
	share(5*time.Second, 0.19, 0.31)
	share(10*time.Second, 0.4, 0.6)
	if pct := p.slowStartPercent(back, readmitted+int64(2500*time.Millisecond)); pct != 25 {
		t.Errorf("slow start percent %d, want 25", pct)
	}

	// A backend held back by slow start still serves when it is the only
	// one left.
	var tr tried
	tr.add(p.byAddr["127.0.0.1:1"])
	if b := p.pick(readmitted+int64(time.Millisecond), &tr); b != back {
		t.Fatalf("picked %v, want the slow-starting backend as the last resort", b)
	}

	// A backend joining a pool that already has backends starts slow too;
	// the first ones do not.
	p.update(discovery.NewSet("web", "static", []discovery.Instance{{Addr: "127.0.0.1:1"}, {Addr: "127.0.0.1:2"}, {Addr: "127.0.0.1:3"}}, time.Now()))
	if p.byAddr["127.0.0.1:3"].slowFrom == 0 || p.byAddr["127.0.0.1:1"].slowFrom != 0 {
		t.Fatal("slow start of a newly discovered backend")
	}
	if pct := p.slowStartPercent(p.byAddr["127.0.0.1:3"], time.Now().UnixNano()); pct > 10 {
		t.Fatalf("new backend at %d%% at once", pct)
	}
}

func TestSlowStartOffByDefault(t *testing.T) {
	p := testPool(t, "{static: [127.0.0.1:1], health: {passive: {consecutive_gateway_failures: 1}}}", "127.0.0.1:1", "127.0.0.1:2")
	b := p.byAddr["127.0.0.1:2"]
	b.target.Begin()
	b.target.Done(time.Now().UnixNano(), health.OutcomeConnectFailed, time.Millisecond)
	if pct := p.slowStartPercent(b, b.target.AvailableSince()); pct != 100 {
		t.Fatalf("slow start percent %d with slow start off", pct)
	}
}

func TestPanicModeRoutesAroundWrongChecks(t *testing.T) {
	// The app answers but its health endpoint is broken everywhere.
	var healthStatus atomic.Int32
	healthStatus.Store(500)
	h := func(ctx *fasthttp.RequestCtx) {
		if string(ctx.Path()) == "/health" {
			ctx.SetStatusCode(int(healthStatus.Load()))
			return
		}
		ctx.WriteString("app ok")
	}
	o1, o2, o3 := startOrigin(t, "1", h), startOrigin(t, "2", h), startOrigin(t, "3", h)
	f := func(panicThreshold string, wantStatus int, wantPanic bool) {
		t.Helper()
		s := startEdge(t, "services:\n  web: {static: "+staticList(o1, o2, o3)+", health: {active: {interval: 20ms}"+panicThreshold+"}}\nroutes: [{service: web}]\n")
		waitFor(t, "every backend unhealthy", func() bool { return serviceStatus(s).Available == 0 })
		waitFor(t, "panic mode in /status", func() bool { return serviceStatus(s).Panic == wantPanic })
		for i := 0; i < 20; i++ {
			if resp := do(t, s, "GET", "x", "/"); resp.StatusCode() != wantStatus {
				t.Fatalf("GET #%d: %d %q, want %d", i, resp.StatusCode(), resp.Header.Peek(HeaderError), wantStatus)
			}
		}
	}
	f("", 200, true)
	f(", panic_threshold: -1", 503, false)

	// Leaving panic mode when the checks pass again.
	s := startEdge(t, "services:\n  web: {static: "+staticList(o1, o2, o3)+", health: {active: {interval: 20ms}}}\nroutes: [{service: web}]\n")
	waitFor(t, "panic mode", func() bool { return serviceStatus(s).Panic })
	if st := serviceStatus(s); st.PanicSince.IsZero() {
		t.Fatalf("panic_since missing: %+v", st)
	}
	healthStatus.Store(200)
	waitFor(t, "panic mode over", func() bool { st := serviceStatus(s); return !st.Panic && st.Available == 3 })
	_, body := adminGet(t, s, "/metrics")
	if !strings.Contains(body, `edgelb_panic_mode_entries_total{service="web"} 1`) || !strings.Contains(body, `edgelb_panic_mode{service="web"} 0`) {
		t.Fatalf("panic metrics missing:\n%s", grepLines(body, "panic"))
	}
}

func TestPanicModeNeverTurnsStaleInto502(t *testing.T) {
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		if string(ctx.Path()) == "/cached" {
			ctx.Response.Header.Set("Cache-Control", "max-age=1")
		}
		ctx.WriteString("stored")
	})
	dead := deadAddr(t)
	// Checks are TCP connects; no passive ejection gets in the way.
	s := startEdge(t, "services:\n  web: {static: ["+o.addr+", "+dead+"], health: {active: {type: tcp, interval: 20ms}, passive: {consecutive_gateway_failures: 1000}}}\nroutes: [{service: web}]\n")
	waitFor(t, "the dead backend unhealthy", func() bool { return serviceStatus(s).Available == 1 })
	if resp := do(t, s, "GET", "x", "/cached"); resp.StatusCode() != 200 {
		t.Fatalf("priming: %d", resp.StatusCode())
	}
	o.stop()
	waitFor(t, "panic mode", func() bool { st := serviceStatus(s); return st.Panic && st.Available == 0 })
	for i := 0; i < 10; i++ {
		resp := do(t, s, "GET", "x", "/cached")
		if resp.StatusCode() != 200 || string(resp.Body()) != "stored" || len(resp.Header.Peek("Cache-Status")) == 0 {
			t.Fatalf("stored URL in panic mode: %d %q %q", resp.StatusCode(), resp.Header.Peek(HeaderError), resp.Body())
		}
		resp = do(t, s, "GET", "x", "/never-stored")
		if resp.StatusCode() != 503 || string(resp.Header.Peek(HeaderError)) != "no_healthy_backend" {
			t.Fatalf("in panic mode with every backend down: %d %q, want 503 no_healthy_backend", resp.StatusCode(), resp.Header.Peek(HeaderError))
		}
	}
}

func TestOutlierEjectedFromLiveTraffic(t *testing.T) {
	var n atomic.Int64
	flaky := startOrigin(t, "flaky", func(ctx *fasthttp.RequestCtx) {
		if n.Add(1)%10 < 3 {
			ctx.SetStatusCode(500)
			return
		}
		ctx.WriteString("ok")
	})
	good1, good2 := startOrigin(t, "1", nil), startOrigin(t, "2", nil)
	s := startEdge(t, "services:\n  web: {static: "+staticList(good1, flaky, good2)+
		", health: {passive: {consecutive_5xx: 1000, interval: 100ms, min_requests: 20, base_ejection_time: 1m}}}\nroutes: [{service: web}]\n")
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		do(t, s, "GET", "x", "/")
		var st BackendStatus
		for _, b := range serviceStatus(s).Backends {
			if b.Addr == flaky.addr {
				st = b
			}
		}
		if st.State == "ejected" {
			if !strings.Contains(st.Reason, "requests failed") || !strings.Contains(st.Reason, "failure_percentage 20") {
				t.Fatalf("reason: %q", st.Reason)
			}
			_, body := adminGet(t, s, "/metrics")
			if !strings.Contains(body, `edgelb_outlier_ejections_total{service="web",rule="failure_percentage"} 1`) {
				t.Fatalf("ejection not counted:\n%s", grepLines(body, "outlier"))
			}
			for _, b := range serviceStatus(s).Backends {
				if b.Addr != flaky.addr && b.State != "healthy" {
					t.Fatalf("a good backend was ejected too: %+v", b)
				}
			}
			return
		}
	}
	t.Fatal("a backend failing 30% of requests was not ejected")
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return fmt.Sprint(out)
}
