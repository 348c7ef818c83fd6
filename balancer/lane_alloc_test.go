//go:build linux && !race

package balancer

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// TestEventLoopGetAllocatesNothing drives the event loop over real sockets:
// a client on a kept-alive connection, a fasthttp origin. Neither the
// client's loop nor the origin allocates in steady state, so what is
// counted is the edge's.
func TestEventLoopGetAllocatesNothing(t *testing.T) {
	t.Run("plain", func(t *testing.T) { testEventLoopAllocs(t, false) })
	// A Vary answer has the stale store check the request's variant.
	t.Run("vary", func(t *testing.T) { testEventLoopAllocs(t, true) })
}

func testEventLoopAllocs(t *testing.T, vary bool) {
	body := bytes.Repeat([]byte("x"), 64)
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		if vary {
			ctx.Response.Header.Set("Vary", "Accept-Encoding, Accept-Language")
		}
		ctx.SetBody(body)
	})
	s := startEdge(t, "services:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	c, err := net.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := []byte("GET /static/app.js?v=1 HTTP/1.1\r\nHost: www.example.com\r\nX-Forwarded-For: 198.51.100.1\r\n" +
		"Accept-Encoding: gzip, br\r\nConnection: keep-alive\r\n\r\n")
	// The answer's length, from a first exchange.
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write(req)
	first := make([]byte, 4096)
	n, err := c.Read(first)
	if err != nil || !bytes.HasSuffix(first[:n], body) {
		t.Fatalf("first answer: %v %q", err, first[:n])
	}
	buf := make([]byte, n)
	h0 := laneHandoffs.Get()
	serve := func() {
		if _, err := c.Write(req); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil || !bytes.HasSuffix(buf, body) {
			t.Fatalf("answer: %v %q", err, buf)
		}
	}
	for i := 0; i < 100; i++ {
		serve()
	}
	if n := testing.AllocsPerRun(2000, serve); n != 0 {
		t.Fatalf("a GET through the event loop allocates %.2f times per request, want 0", n)
	}
	if laneHandoffs.Get() != h0 {
		t.Fatal("requests left the event loop")
	}
}
