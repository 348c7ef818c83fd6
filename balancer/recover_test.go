package balancer

import (
	"log/slog"
	"strings"
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
