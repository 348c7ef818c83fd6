package balancer

import (
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"

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
	before := panicsTotal.Get()

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
	if n := panicsTotal.Get() - before; n != 1 {
		t.Fatalf("edgelb_panics_total went up by %d, want 1", n)
	}
	out := logs.String()
	for _, want := range []string{`level=ERROR msg="panic while serving request" uri=/boom panic="test panic in pick" stack=`, "recover_test.go"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}

func TestPanicInBackgroundTaskIsLogged(t *testing.T) {
	var logs syncBuffer
	s := startEdgeLogging(t, "services:\n  web: {static: [127.0.0.1:1]}\nroutes: [{service: web}]\n", slog.New(slog.NewTextHandler(&logs, nil)))
	before := panicsTotal.Get()
	s.goSafe("test-task", func() { panic("test panic in task") })
	waitFor(t, "the panic in the log", func() bool { return strings.Contains(logs.String(), "panic in background task") })
	out := logs.String()
	for _, want := range []string{`level=ERROR msg="panic in background task" task=test-task panic="test panic in task" stack=`, "recover_test.go"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if n := panicsTotal.Get() - before; n != 1 {
		t.Fatalf("edgelb_panics_total went up by %d, want 1", n)
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
	var logs syncBuffer
	s := startEdgeLogging(t, "server: {event_loop: true}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n",
		slog.New(slog.NewTextHandler(&logs, nil)))
	s.mu.Lock()
	p := s.pools["web"]
	s.mu.Unlock()
	// Set before any request, never changed: the first pick panics.
	orig := p.sel
	var calls atomic.Int32
	p.sel = func(p *Pool, bs *backendSet) (*Backend, *Backend) {
		if calls.Add(1) == 1 {
			panic("test panic in the event loop")
		}
		return orig(p, bs)
	}
	// The loop loads the route table before it picks: storing it again
	// publishes sel to the loop.
	s.routes.Store(s.routes.Load())
	before := panicsTotal.Get()
	if resp, err := rawRequest(t, s, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err == nil {
		t.Fatalf("the connection whose request panicked got an answer: %d", resp.StatusCode())
	}
	if n := panicsTotal.Get() - before; n != 1 {
		t.Fatalf("edgelb_panics_total went up by %d, want 1", n)
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
	if !strings.Contains(logs.String(), "panic in event loop") {
		t.Fatalf("log:\n%s", logs.String())
	}
}
