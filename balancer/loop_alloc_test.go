//go:build linux && !race

package balancer

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// TestEventLoopGetAllocatesNothing drives the event loop over real sockets:
// a client on a kept-alive connection, a fasthttp origin. Neither the
// client's loop nor the origin allocates in steady state, so what is
// counted is the edge's.
func TestEventLoopGetAllocatesNothing(t *testing.T) {
	t.Run("plain", func(t *testing.T) { testEventLoopAllocs(t, false, "", "") })
	// A Vary answer has the stale store check the request's variant.
	t.Run("vary", func(t *testing.T) { testEventLoopAllocs(t, true, "", "") })
	t.Run("json log", func(t *testing.T) { testEventLoopAllocs(t, false, "", accessLogYAML(t, "json", 1)) })
	t.Run("combined log", func(t *testing.T) { testEventLoopAllocs(t, false, "", accessLogYAML(t, "combined", 1)) })
	t.Run("sampled log", func(t *testing.T) { testEventLoopAllocs(t, false, "", accessLogYAML(t, "json", 0.5)) })
	t.Run("no request ids", func(t *testing.T) { testEventLoopAllocs(t, false, "", "request_id: false\n") })
	// Every try waits for its first byte by a deadline of its own.
	t.Run("first byte timeout", func(t *testing.T) { testEventLoopAllocs(t, false, ", first_byte_timeout: 1s", "") })
}

// testEventLoopAllocs serves GETs with the service's keys svc (each after a
// comma) and the top-level keys extra.
func testEventLoopAllocs(t *testing.T, vary bool, svc, extra string) {
	body := bytes.Repeat([]byte("x"), 64)
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		if vary {
			ctx.Response.Header.Set("Vary", "Accept-Encoding, Accept-Language")
		}
		ctx.SetBody(body)
	})
	s := startEdge(t, "services:\n  web: {static: "+staticList(o)+svc+"}\nroutes: [{service: web}]\n"+extra)
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
	h0 := loopHandoffs.Get()
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
	lines := accessLogLines.Get()
	if n := testing.AllocsPerRun(2000, serve); n != 0 {
		t.Fatalf("a GET through the event loop allocates %.2f times per request, want 0", n)
	}
	if strings.Contains(extra, "access_log") {
		waitFor(t, "the requests' lines written", func() bool { return accessLogLines.Get() >= lines+100 })
	}
	if loopHandoffs.Get() != h0 {
		t.Fatal("requests left the event loop")
	}
}

// TestEventLoopCloseAllocatesNothing is TestEventLoopGetAllocatesNothing
// for one request per connection, Connection: close: the client speaks
// through raw system calls, which allocate nothing, so accepting, serving
// and closing the connection are the edge's to do without allocating.
func TestEventLoopCloseAllocatesNothing(t *testing.T) {
	body := bytes.Repeat([]byte("x"), 64)
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) { ctx.SetBody(body) })
	s := startEdge(t, "services:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n"+accessLogYAML(t, "json", 1))
	ap := netip.MustParseAddrPort(s.Addr())
	sa := &syscall.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	req := []byte("GET /static/app.js?v=1 HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n")
	buf := make([]byte, 4096)
	tv := syscall.NsecToTimeval(int64(10 * time.Second))
	serve := func() {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer syscall.Close(fd)
		syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv)
		if err := syscall.Connect(fd, sa); err != nil {
			t.Fatal(err)
		}
		if _, err := syscall.Write(fd, req); err != nil {
			t.Fatal(err)
		}
		// The answer, then the end of file: the edge closed.
		n := 0
		for {
			m, err := syscall.Read(fd, buf[n:])
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			if m == 0 {
				break
			}
			n += m
		}
		if !bytes.HasSuffix(buf[:n], body) || !bytes.Contains(buf[:n], []byte("\r\nConnection: close\r\n")) {
			t.Fatalf("answer: %q", buf[:n])
		}
	}
	h0 := loopHandoffs.Get()
	for i := 0; i < 100; i++ {
		serve()
	}
	if n := testing.AllocsPerRun(1000, serve); n != 0 {
		t.Fatalf("a Connection: close GET through the event loop allocates %.2f times per request, want 0", n)
	}
	if loopHandoffs.Get() != h0 {
		t.Fatal("requests left the event loop")
	}
}

// TestEventLoopOutageAllocatesNothing is TestEventLoopGetAllocatesNothing
// during an outage, when every request is answered by the loop itself:
// with a stored copy, or with the error edgelb makes up. Every such answer
// is logged.
func TestEventLoopOutageAllocatesNothing(t *testing.T) {
	for _, tc := range []struct {
		name, stale string
		want        []byte
	}{
		{"stored copy", "", []byte("stored copy")},
		{"generated error", ", stale: {disabled: true}", errNoHealthyBackend.body()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := startDiffOrigin(t, "127.0.0.1", cacheable)
			s := startEdge(t, "services:\n  web: {static: ["+o.addr+"]"+tc.stale+
				", health: {panic_threshold: -1, passive: {consecutive_gateway_failures: 1}}}\nroutes: [{service: web}]\n"+accessLogYAML(t, "json", 0))
			c := dialEdge(t, s)
			defer c.Close()
			req := []byte("GET /static/app.js?v=1 HTTP/1.1\r\nHost: www.example.com\r\nAccept-Encoding: gzip\r\n\r\n")
			buf := make([]byte, 4096)
			serve := func() {
				if _, err := c.Write(req); err != nil {
					t.Fatal(err)
				}
				// Age and Cache-Status change length: read up to the body.
				n := 0
				for !bytes.HasSuffix(buf[:n], tc.want) {
					m, err := c.Read(buf[n:])
					if err != nil {
						t.Fatalf("answer: %v %q", err, buf[:n])
					}
					n += m
				}
			}
			if tc.stale == "" {
				serve() // stores the copy
			}
			o.stop()
			// The first request after the stop ejects the backend.
			for i := 0; i < 100; i++ {
				serve()
			}
			h0 := loopHandoffs.Get()
			if n := testing.AllocsPerRun(2000, serve); n != 0 {
				t.Fatalf("an answer the loop makes itself allocates %.2f times per request, want 0", n)
			}
			if loopHandoffs.Get() != h0 {
				t.Fatal("requests left the event loop")
			}
		})
	}
}
