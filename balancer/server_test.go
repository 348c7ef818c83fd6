package balancer

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

func adminGet(t *testing.T, s *Server, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + s.AdminAddr() + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestAdminAPI(t *testing.T) {
	o := startOrigin(t, "a", nil)
	dead := deadAddr(t)
	s := startEdge(t, "services:\n  web: {static: ["+o.addr+", "+dead+"], health: {passive: {consecutive_gateway_failures: 1}}}\nroutes: [{host: shop.example, path: /, service: web}]\n")
	for i := 0; i < 10; i++ {
		do(t, s, "GET", "shop.example", "/")
	}
	if code, body := adminGet(t, s, "/healthz"); code != 200 {
		t.Fatalf("/healthz: %d %s", code, body)
	}
	if code, body := adminGet(t, s, "/readyz"); code != 200 {
		t.Fatalf("/readyz: %d %s", code, body)
	}
	code, body := adminGet(t, s, "/status")
	if code != 200 {
		t.Fatalf("/status: %d", code)
	}
	var st Status
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatalf("/status is not JSON: %v\n%s", err, body)
	}
	web := st.Services["web"]
	if web == nil || len(web.Backends) != 2 || web.Source != "static" {
		t.Fatalf("/status services: %s", body)
	}
	states := map[string]BackendStatus{}
	for _, b := range web.Backends {
		states[b.Addr] = b
	}
	if states[o.addr].State != "healthy" || states[dead].State != "ejected" || !strings.Contains(states[dead].Reason, "connect_failed") {
		t.Fatalf("backend states: %+v", states)
	}
	if len(st.Routes) != 1 || st.Routes[0].Host != "shop.example" {
		t.Fatalf("routes: %+v", st.Routes)
	}
	_, m := adminGet(t, s, "/metrics")
	for _, want := range []string{
		`edgelb_backend_requests_total{service="web",backend="` + o.addr + `"}`,
		`edgelb_backend_errors_total{service="web",backend="` + dead + `",cause="upstream_connect_failed"} 1`,
		`edgelb_backend_request_duration_seconds_bucket{service="web",backend="` + o.addr + `",le="+Inf"}`,
		`edgelb_backend_inflight{service="web",backend="` + o.addr + `"} 0`,
		`edgelb_requests_total{service="web"} 10`,
	} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// load sends GETs from n goroutines until stop is closed and counts the
// responses that were not 200.
func load(t *testing.T, s *Server, n int, stop chan struct{}) (ok, failed *atomic.Int64, wait func()) {
	ok, failed = &atomic.Int64{}, &atomic.Int64{}
	var wg sync.WaitGroup
	c := &fasthttp.HostClient{Addr: s.Addr(), MaxIdemponentCallAttempts: 1}
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
			defer fasthttp.ReleaseRequest(req)
			defer fasthttp.ReleaseResponse(resp)
			for {
				select {
				case <-stop:
					return
				default:
				}
				req.SetRequestURI("http://x/")
				if err := c.DoTimeout(req, resp, 10*time.Second); err != nil || resp.StatusCode() != 200 {
					if failed.Add(1) < 5 {
						t.Logf("failed request: err=%v status=%d %s", err, resp.StatusCode(), resp.Header.Peek(HeaderError))
					}
					continue
				}
				ok.Add(1)
			}
		}()
	}
	return ok, failed, wg.Wait
}

func TestReloadUnderLoad(t *testing.T) {
	a := startOrigin(t, "a", nil)
	b := startOrigin(t, "b", nil)
	s := startEdge(t, "services:\n  web: {static: "+staticList(a)+"}\nroutes: [{service: web}]\n")
	stop := make(chan struct{})
	ok, failed, wait := load(t, s, 8, stop)
	for i := 0; i < 6; i++ {
		time.Sleep(50 * time.Millisecond)
		list := staticList(a, b)
		if i%2 == 1 {
			list = staticList(b)
		}
		cfg := mustConfig(t, "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  web: {static: "+list+", try_timeout: 2s}\nroutes: [{service: web}]\n")
		cfg.Listen, cfg.Admin = s.cfg.Listen, s.cfg.Admin
		if err := s.Reload(cfg); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wait()
	if failed.Load() != 0 || ok.Load() == 0 {
		t.Fatalf("reloads under load: %d ok, %d failed", ok.Load(), failed.Load())
	}
	if resp := do(t, s, "GET", "x", "/"); string(resp.Body()) != "hello from b" {
		t.Fatalf("after reload: %q", resp.Body())
	}
	bad := mustConfig(t, "listen: 127.0.0.1:1\nadmin: 127.0.0.1:0\nservices:\n  web: {static: "+staticList(a)+"}\nroutes: [{service: web}]\n")
	if err := s.Reload(bad); err == nil || !strings.Contains(err.Error(), "restart") {
		t.Fatalf("changing listen must be refused: %v", err)
	}
}

func TestShutdownDrainsInflight(t *testing.T) {
	started := make(chan struct{}, 1)
	slow := startOrigin(t, "slow", func(ctx *fasthttp.RequestCtx) {
		started <- struct{}{}
		time.Sleep(300 * time.Millisecond)
		ctx.WriteString("finished")
	})
	cfg := mustConfig(t, "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  web: {static: "+staticList(slow)+"}\nroutes: [{service: web}]\n")
	s := NewServer(cfg, quietLogger())
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 1)
	go func() {
		var resp fasthttp.Response
		req := fasthttp.AcquireRequest()
		req.SetRequestURI("http://" + s.Addr() + "/")
		if err := fasthttp.DoTimeout(req, &resp, 5*time.Second); err != nil {
			got <- "error: " + err.Error()
			return
		}
		got <- string(resp.Body())
	}()
	<-started
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if body := <-got; body != "finished" {
		t.Fatalf("in-flight request during shutdown got %q", body)
	}
}

func TestSelectionPolicies(t *testing.T) {
	a := startOrigin(t, "a", nil)
	b := startOrigin(t, "b", nil)
	f := func(balance string, wa, wb int, minShareA, maxShareA float64) {
		t.Helper()
		a.hits.Store(0)
		b.hits.Store(0)
		s := startEdge(t, "services:\n  web: {balance: "+balance+", static: [{addr: "+a.addr+", weight: "+strconv.Itoa(wa)+"}, {addr: "+b.addr+", weight: "+strconv.Itoa(wb)+"}]}\nroutes: [{service: web}]\n")
		for i := 0; i < 400; i++ {
			do(t, s, "GET", "x", "/")
		}
		share := float64(a.hits.Load()) / 400
		if share < minShareA || share > maxShareA {
			t.Errorf("%s %d:%d: backend a got %.2f of requests, want %.2f-%.2f", balance, wa, wb, share, minShareA, maxShareA)
		}
	}
	f("round_robin", 1, 1, 0.5, 0.5)
	f("round_robin", 3, 1, 0.75, 0.75)
	f("random", 1, 1, 0.35, 0.65)
	f("random", 3, 1, 0.6, 0.9)
	f("p2c", 1, 1, 0.3, 0.7)
}
