package scenario

import (
	"context"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/bench/loadgen"
)

// threeOrigins starts three demo origins and edgelb in front of them.
func threeOrigins(t *testing.T, service string, args ...string) ([]*Proc, *Edge) {
	t.Helper()
	os := []*Proc{StartOrigin(t, "o1", args...), StartOrigin(t, "o2", args...), StartOrigin(t, "o3", args...)}
	cfg := "services:\n  web:\n    static: [" + os[0].Addr + ", " + os[1].Addr + ", " + os[2].Addr + "]\n" + service + "routes: [{service: web}]\n"
	return os, StartEdge(t, cfg, t.TempDir())
}

// loadFor runs closed-loop GETs through e for d in the background.
func loadFor(e *Edge, d time.Duration) chan *loadgen.Result {
	ch := make(chan *loadgen.Result, 1)
	go func() {
		res, err := loadgen.Run(context.Background(), loadgen.Options{URL: "http://" + e.Addr + "/", Concurrency: 8, Duration: d, Timeout: 5 * time.Second})
		if err != nil {
			panic(err)
		}
		ch <- res
	}()
	return ch
}

// waitState polls /status until the backend is in one of states and
// returns how long that took.
func waitState(t *testing.T, e *Edge, addr string, states ...string) time.Duration {
	t.Helper()
	start := time.Now()
	for time.Since(start) < 20*time.Second {
		st, _, _ := backendState(t, e, "web", addr)
		for _, s := range states {
			if st == s {
				return time.Since(start)
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	st, reason, _ := backendState(t, e, "web", addr)
	t.Fatalf("%s stayed %s (%s), want %v", addr, st, reason, states)
	return 0
}

func TestKillBackendUnderLoad(t *testing.T) {
	os, e := threeOrigins(t, "    health: {active: {interval: 1s}}\n")
	results := loadFor(e, 3*time.Second)
	time.Sleep(time.Second)
	killed := time.Now()
	os[1].Kill9()
	waitState(t, e, os[1].Addr, "ejected", "unhealthy")
	_, reason, since := backendState(t, e, "web", os[1].Addr)
	t.Logf("killed backend taken out %s after kill -9 (%s)", since.Sub(killed).Round(time.Microsecond), reason)
	res := <-results
	t.Logf("clients: %d requests, %d errors, p99 %.2fms, max %.2fms", res.Requests, res.Errors, res.Latency.P99, res.Latency.Max)
	if res.Errors != 0 || res.Requests == 0 {
		t.Fatalf("clients saw errors when a backend was killed: %s", res.Format())
	}
}

func TestHungBackend(t *testing.T) {
	os, e := threeOrigins(t, "    try_timeout: 300ms\n    health: {passive: {base_ejection_time: 1s}}\n")
	results := loadFor(e, 3*time.Second)
	time.Sleep(500 * time.Millisecond)
	os[1].Signal(syscall.SIGSTOP)
	d := waitState(t, e, os[1].Addr, "ejected")
	t.Logf("hung backend ejected %s after SIGSTOP", d)
	res := <-results
	t.Logf("clients: %d requests, %d errors, p99 %.2fms, p99.9 %.2fms, max %.2fms", res.Requests, res.Errors, res.Latency.P99, res.Latency.P999, res.Latency.Max)
	if res.Errors != 0 {
		t.Fatalf("clients saw errors with a hung backend: %s", res.Format())
	}
	if res.Latency.Max > 2000 {
		t.Fatalf("a hung backend cost a client %.0fms; want about one try_timeout (300ms)", res.Latency.Max)
	}
	os[1].Signal(syscall.SIGCONT)
	// Ejection ends after base_ejection_time and a request succeeds.
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		http.Get("http://" + e.Addr + "/")
		if st, _, _ := backendState(t, e, "web", os[1].Addr); st == "healthy" {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("resumed backend not readmitted")
}

func TestBrokenBackends(t *testing.T) {
	f := func(mode, wantReason string, maxErrors int64) {
		t.Run(mode, func(t *testing.T) {
			os, e := threeOrigins(t, "    health: {passive: {base_ejection_time: 30s}}\n")
			resp, err := http.Post("http://"+os[1].Addr+"/_fault?mode="+mode, "", nil)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			res := <-loadFor(e, 1500*time.Millisecond)
			st, reason, _ := backendState(t, e, "web", os[1].Addr)
			t.Logf("%s: backend %s (%s); clients %d requests, %d errors", mode, st, reason, res.Requests, res.Errors)
			if st != "ejected" || !strings.Contains(reason, wantReason) {
				t.Fatalf("%s backend: state %s, reason %q", mode, st, reason)
			}
			if res.Errors > maxErrors {
				t.Fatalf("%s backend: clients saw %d errors: %s", mode, res.Errors, res.Format())
			}
		})
	}
	f("garbage", "invalid_response", 0)
	f("reset", "gateway failures", 0)
	f("error500-app", "consecutive 5xx", 5)
}

func TestOverloadedAndSlowBackends(t *testing.T) {
	os, e := threeOrigins(t, "")
	http.Post("http://"+os[1].Addr+"/_fault?mode=overload", "", nil)
	http.Post("http://"+os[2].Addr+"/_fault?mode=slow&delay=20ms", "", nil)
	res := <-loadFor(e, 1500*time.Millisecond)
	st, _, _ := backendState(t, e, "web", os[1].Addr)
	t.Logf("overloaded backend %s; clients %d requests, %d errors, p99 %.2fms", st, res.Requests, res.Errors, res.Latency.P99)
	if res.Errors != 0 {
		t.Fatalf("clients saw errors with an overloaded backend: %s", res.Format())
	}
	if st == "ejected" || st == "unhealthy" {
		t.Fatalf("an overloaded backend is alive: state %s", st)
	}
}

// backendRequests returns how many requests edgelb sent to each backend of
// service web, from /metrics.
func backendRequests(t *testing.T, e *Edge, addrs ...string) []float64 {
	t.Helper()
	resp, err := http.Get("http://" + e.Admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	n := make([]float64, len(addrs))
	for _, line := range strings.Split(string(body), "\n") {
		for i, a := range addrs {
			if prefix := `edgelb_backend_requests_total{service="web",backend="` + a + `"} `; strings.HasPrefix(line, prefix) {
				n[i], _ = strconv.ParseFloat(strings.TrimPrefix(line, prefix), 64)
			}
		}
	}
	return n
}

// waitEjected polls /status while load runs until addr is ejected, and
// returns the reason and when it happened.
func waitEjected(t *testing.T, e *Edge, addr string, within time.Duration) (reason string, at time.Time) {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if st, reason, since := backendState(t, e, "web", addr); st == "ejected" {
			return reason, since
		}
		time.Sleep(20 * time.Millisecond)
	}
	st, reason, _ := backendState(t, e, "web", addr)
	t.Fatalf("%s stayed %s (%s)", addr, st, reason)
	return "", time.Time{}
}

func TestLatencyOutlier(t *testing.T) {
	// Delays well above scheduling noise, so that the 10x ratio holds on a
	// busy machine.
	fast := []string{"-fault", "slow", "-delay", "20ms"}
	os := []*Proc{StartOrigin(t, "o1", fast...), StartOrigin(t, "slow", "-fault", "slow", "-delay", "200ms"), StartOrigin(t, "o3", fast...)}
	cfg := "services:\n  web:\n    static: [" + os[0].Addr + ", " + os[1].Addr + ", " + os[2].Addr + "]\n" +
		"    health: {passive: {base_ejection_time: 30s}}\nroutes: [{service: web}]\n"
	e := StartEdge(t, cfg, t.TempDir())
	start := time.Now()
	results := loadFor(e, 8*time.Second)
	reason, at := waitEjected(t, e, os[1].Addr, 20*time.Second)
	n := backendRequests(t, e, os[0].Addr, os[1].Addr, os[2].Addr)
	share := n[1] / (n[0] + n[1] + n[2])
	t.Logf("slow backend ejected %s after load began, having had %.1f%% of %.0f requests: %s",
		at.Sub(start).Round(time.Millisecond), 100*share, n[0]+n[1]+n[2], reason)
	if !strings.Contains(reason, "mean latency") {
		t.Fatalf("ejected for another reason: %s", reason)
	}
	if share >= 0.2 {
		t.Fatalf("a backend 10x slower than its peers got %.1f%% of the requests", 100*share)
	}
	res := <-results
	t.Logf("clients: %d requests, %d errors, p50 %.2fms, p99 %.2fms", res.Requests, res.Errors, res.Latency.P50, res.Latency.P99)
	if res.Errors != 0 || res.Requests == 0 {
		t.Fatalf("clients saw errors with a slow backend: %s", res.Format())
	}
}

func TestErrorRateOutlier(t *testing.T) {
	// demo-origin fails all or nothing; this one fails 3 requests in 10,
	// and answers like demo-origin otherwise.
	var n atomic.Int64
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	flaky := &fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) {
		if string(ctx.Path()) != "/health" && n.Add(1)%10 < 3 {
			ctx.Error("injected error\n", fasthttp.StatusInternalServerError)
			return
		}
		ctx.Response.Header.Set("Cache-Control", "public, max-age=5")
		ctx.WriteString("flaky ok\n")
	}}
	go flaky.Serve(ln)
	t.Cleanup(func() { flaky.Shutdown(); ln.Close() })

	os := []*Proc{StartOrigin(t, "o1"), StartOrigin(t, "o3")}
	// consecutive_5xx out of reach: only the comparison with the peers
	// may eject it.
	cfg := "services:\n  web:\n    static: [" + os[0].Addr + ", " + ln.Addr().String() + ", " + os[1].Addr + "]\n" +
		"    health: {passive: {consecutive_5xx: 1000, base_ejection_time: 30s}}\nroutes: [{service: web}]\n"
	e := StartEdge(t, cfg, t.TempDir())
	// A stored copy answers the GETs that meet a 500.
	for {
		resp, err := http.Get("http://" + e.Addr + "/")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode == 200 {
			break
		}
	}
	start := time.Now()
	results := loadFor(e, 6*time.Second)
	reason, at := waitEjected(t, e, ln.Addr().String(), 20*time.Second)
	t.Logf("flaky backend ejected %s after load began: %s", at.Sub(start).Round(time.Millisecond), reason)
	if !strings.Contains(reason, "requests failed") {
		t.Fatalf("ejected for another reason: %s", reason)
	}
	for _, p := range os {
		if st, reason, _ := backendState(t, e, "web", p.Addr); st != "healthy" {
			t.Fatalf("a good backend is %s: %s", st, reason)
		}
	}
	res := <-results
	t.Logf("clients: %d requests, %d errors, %d stale", res.Requests, res.Errors, res.Stale)
	if res.Errors != 0 || res.Requests == 0 {
		t.Fatalf("clients saw errors with a backend failing 30%% of requests: %s", res.Format())
	}
}
