package balancer

import (
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

func TestPanicWhileServingAnswers500AndCloses(t *testing.T) {
	var logs syncBuffer
	s := startEdgeLogging(t, "server: {event_loop: false}\nservices:\n  web: {static: [127.0.0.1:1]}\nroutes: [{service: web}]\n",
		slog.New(slog.NewTextHandler(&logs, nil)))
	s.mu.Lock()
	p := s.pools["web"]
	s.mu.Unlock()
	// The selection policy is the one indirect call a request makes: a
	// bug in it must cost that request only.
	p.sel = func(*Pool, *backendSet) (*Backend, *Backend) { panic("test panic in pick") }
	before := panicCount(t, s, "balancer")

	var req fasthttp.Request
	req.SetRequestURI("/boom")
	req.Header.SetHost("www.example.com")
	ctx := newBenchCtx(&req)
	s.Handler()(ctx)
	if st, body := ctx.Response.StatusCode(), string(ctx.Response.Body()); st != 500 || body != "edgelb: internal error\n" {
		t.Fatalf("got %d %q, want 500 %q", st, body, "edgelb: internal error\n")
	}
	if !ctx.Response.ConnectionClose() {
		t.Fatal("the connection is kept open after a panic")
	}
	if n := panicCount(t, s, "balancer") - before; n != 1 {
		t.Fatalf(`edgelb_panics_total{component="balancer"} went up by %d, want 1`, n)
	}
	// The log line names the request by the ID its answer carries.
	id := string(ctx.Response.Header.Peek("X-Request-Id"))
	if len(id) != requestIDLen {
		t.Fatalf("the 500 has request ID %q", id)
	}
	out := logs.String()
	for _, want := range []string{`level=ERROR msg="panic while serving request" component=balancer uri=/boom request_id=` + id + ` panic="test panic in pick" stack=`, "recover_test.go"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}

func TestPanicInBackgroundTaskIsLogged(t *testing.T) {
	var logs syncBuffer
	s := startEdgeLogging(t, "services:\n  web: {static: [127.0.0.1:1]}\nroutes: [{service: web}]\n", slog.New(slog.NewTextHandler(&logs, nil)))
	before := panicCount(t, s, "balancer")
	s.goSafe("test-task", func() { panic("test panic in task") })
	waitFor(t, "the panic in the log", func() bool { return strings.Contains(logs.String(), "panic in background task") })
	out := logs.String()
	for _, want := range []string{`level=ERROR msg="panic in background task" component=balancer task=test-task panic="test panic in task" stack=`, "recover_test.go"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if n := panicCount(t, s, "balancer") - before; n != 1 {
		t.Fatalf(`edgelb_panics_total{component="balancer"} went up by %d, want 1`, n)
	}
	// The server still serves.
	if resp := do(t, s, "GET", "x", "/"); resp.StatusCode() != 502 && resp.StatusCode() != 503 {
		t.Fatalf("after a background panic: %d", resp.StatusCode())
	}
}

// A panic while the event loop serves a request costs that connection
// only: the loop goes on serving the others.
func TestPanicInEventLoopCostsOneConnection(t *testing.T) {
	o := startOrigin(t, "a", nil)
	// The first pick panics.
	loopPanicCostsOneConnection(t, "services:\n  web: {static: ["+o.addr+"]}\n", 1, o.addr,
		`msg="panic in event loop; its connection is closed" component=balancer loop=`)
}

// A panic while the event loop sweeps its requests in flight (a hedge
// due, here) costs the connection whose request it swept only: the loop
// goes on serving, and the backend the abandoned try was on is not left
// with it in flight.
func TestPanicInEventLoopSweepCostsOneConnection(t *testing.T) {
	var first atomic.Bool
	slow := startOrigin(t, "slow", func(ctx *fasthttp.RequestCtx) {
		if first.CompareAndSwap(false, true) {
			time.Sleep(300 * time.Millisecond)
		}
		ctx.SetBodyString("slow")
	})
	// The second pick, the hedge's, which the loop makes in its sweep,
	// panics.
	loopPanicCostsOneConnection(t, "services:\n  web: {static: ["+slow.addr+"], hedge: {after: 20ms}}\n", 2, slow.addr,
		`msg="panic in event loop sweep; the connection swept is closed" component=balancer loop=`)
}

// loopPanicCostsOneConnection starts an edge on the event loop with the
// services in yaml and a route to web, has web's panicAt-th pick panic,
// and checks that the first request's connection is closed unanswered,
// the panic counted once and logged with logged, and that the loops go on
// answering with nothing left in flight on addr.
func loopPanicCostsOneConnection(t *testing.T, yaml string, panicAt int32, addr, logged string) {
	t.Helper()
	var logs syncBuffer
	s := startEdgeLogging(t, "server: {event_loop: true}\n"+yaml+"routes: [{service: web}]\n", slog.New(slog.NewTextHandler(&logs, nil)))
	s.mu.Lock()
	p := s.pools["web"]
	s.mu.Unlock()
	// Set before any request, never changed.
	orig := p.sel
	var calls atomic.Int32
	p.sel = func(p *Pool, bs *backendSet) (*Backend, *Backend) {
		if calls.Add(1) == panicAt {
			panic("test panic in the event loop")
		}
		return orig(p, bs)
	}
	// The loop loads the route table before it picks: storing it again
	// publishes sel to the loop.
	s.routes.Store(s.routes.Load())
	before := panicCount(t, s, "balancer")
	if resp, err := rawRequest(t, s, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err == nil {
		t.Fatalf("the connection whose request panicked got an answer: %d", resp.StatusCode())
	}
	if n := panicCount(t, s, "balancer") - before; n != 1 {
		t.Fatalf(`edgelb_panics_total{component="balancer"} went up by %d, want 1`, n)
	}
	for i := 0; i < 20; i++ {
		resp, err := rawRequest(t, s, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		if err != nil || resp.StatusCode() != 200 {
			t.Fatalf("request %d after the panic: %v %d", i, err, statusOf(resp))
		}
	}
	for i, l := range s.loops {
		select {
		case <-l.done:
			t.Fatalf("event loop %d stopped after the panic", i)
		default:
		}
	}
	if n := inflightOf(p, addr); n != 0 {
		t.Errorf("the backend has %d tries in flight after the requests, want 0", n)
	}
	if !strings.Contains(logs.String(), logged) {
		t.Fatalf("log:\n%s", logs.String())
	}
}

// A panicking admin handler costs its connection only, as in net/http,
// and is counted and logged once, by edgelb rather than by net/http.
func TestPanicInAdminHandlerIsCounted(t *testing.T) {
	var logs syncBuffer
	s := startEdgeLogging(t, "services:\n  web: {static: [127.0.0.1:1]}\nroutes: [{service: web}]\n", slog.New(slog.NewTextHandler(&logs, nil)))
	s.admin.mux.HandleFunc("GET /test-panic", func(http.ResponseWriter, *http.Request) { panic("test panic in admin") })
	before := panicCount(t, s, "admin")
	// A fresh connection: net/http's client sends a GET again when a
	// reused connection breaks, and that would panic twice.
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	if resp, err := client.Get("http://" + s.AdminAddr() + "/test-panic"); err == nil {
		resp.Body.Close()
		t.Fatalf("the panicking handler's connection answered %d", resp.StatusCode)
	}
	if n := panicCount(t, s, "admin") - before; n != 1 {
		t.Fatalf(`edgelb_panics_total{component="admin"} went up by %d, want 1`, n)
	}
	out := logs.String()
	want := `level=ERROR msg="panic in admin handler" component=admin server=admin method=GET path=/test-panic panic="test panic in admin" stack=`
	if !strings.Contains(out, want) || !strings.Contains(out, "recover_test.go") || strings.Contains(out, "http: panic serving") {
		t.Fatalf("log, want one line with %q and the panicking frame:\n%s", want, out)
	}
	if code, _ := adminGet(t, s, "/healthz"); code != 200 {
		t.Fatalf("/healthz after the panic: %d", code)
	}
}

// panicCount reads edgelb_panics_total{component} from the admin API's
// /metrics, where every component has a series from the start.
func panicCount(t *testing.T, s *Server, component string) uint64 {
	t.Helper()
	resp, err := http.Get("http://" + s.AdminAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	series := `edgelb_panics_total{component="` + component + `"} `
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, series); ok {
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				t.Fatalf("%q: %v", l, err)
			}
			return n
		}
	}
	t.Fatalf("/metrics has no %s series", series)
	return 0
}

// inflightOf returns the tries in flight on p's backend at addr.
func inflightOf(p *Pool, addr string) int32 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.byAddr[addr].target.Inflight()
}
