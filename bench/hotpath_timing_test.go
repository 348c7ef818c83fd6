// Package bench holds edgelb's benchmarks of the whole in-process hot
// path; bench/scenario runs real processes, bench/loadgen drives load.
package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer"
)

// startOrigin serves body to every request on a loopback port.
func startOrigin(b *testing.B, body []byte) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) {
		ctx.Response.Header.Set("Cache-Control", "public, max-age=60")
		ctx.SetBody(body)
	}}
	go srv.Serve(ln)
	b.Cleanup(func() { srv.Shutdown() })
	return ln.Addr().String()
}

func startEdge(b *testing.B, origins []string, stale bool) fasthttp.RequestHandler {
	return startServer(b, origins, stale, true).Handler()
}

func startServer(b *testing.B, origins []string, stale, eventLoop bool) *balancer.Server {
	cfg, err := balancer.ParseConfig([]byte(fmt.Sprintf(`
listen: 127.0.0.1:0
admin: 127.0.0.1:0
state_dir: %s
server: {event_loop: %v}
services:
  web: {static: [%s, %s], stale: {disabled: %v}}
routes: [{service: web}]
`, b.TempDir(), eventLoop, origins[0], origins[1], !stale)))
	if err != nil {
		b.Fatal(err)
	}
	s := balancer.NewServer(cfg, slog.New(slog.DiscardHandler))
	if err := s.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
	})
	return s
}

// benchmarkProxy measures route, pick, forward over loopback keep-alive
// connections and respond, for one method, body size and store setting.
func benchmarkProxy(b *testing.B, method string, size int, stale bool) {
	body := bytes.Repeat([]byte("x"), size)
	h := startEdge(b, []string{startOrigin(b, body), startOrigin(b, body)}, stale)
	b.ReportAllocs()
	b.SetBytes(int64(size))
	b.RunParallel(func(pb *testing.PB) {
		var req fasthttp.Request
		req.Header.SetMethod(method)
		req.SetRequestURI("/static/app.js?v=1")
		req.Header.SetHost("www.example.com")
		if method == fasthttp.MethodPost {
			req.SetBody(body)
		}
		var ctx fasthttp.RequestCtx
		ctx.Init(&req, &net.TCPAddr{IP: net.IPv4(192, 0, 2, 7), Port: 40000}, nil)
		for pb.Next() {
			req.CopyTo(&ctx.Request)
			ctx.Response.Reset()
			h(&ctx)
			if ctx.Response.StatusCode() != 200 || len(ctx.Response.Body()) != size {
				b.Fatalf("status %d, %d bytes", ctx.Response.StatusCode(), len(ctx.Response.Body()))
			}
		}
	})
}

func BenchmarkGetSmall(b *testing.B)       { benchmarkProxy(b, "GET", 64, false) }
func BenchmarkGetSmallStored(b *testing.B) { benchmarkProxy(b, "GET", 64, true) }
func BenchmarkGet64K(b *testing.B)         { benchmarkProxy(b, "GET", 64<<10, false) }
func BenchmarkGet64KStored(b *testing.B)   { benchmarkProxy(b, "GET", 64<<10, true) }
func BenchmarkPostSmall(b *testing.B)      { benchmarkProxy(b, "POST", 64, false) }
func BenchmarkPost64K(b *testing.B)        { benchmarkProxy(b, "POST", 64<<10, false) }

// benchmarkSockets measures whole requests over loopback sockets: clients
// on kept-alive connections, the edge's listener, two origins. With
// eventLoop the edge's event loops serve them, without it the fasthttp
// server does. The clients' own work is in the figures too.
func benchmarkSockets(b *testing.B, size int, eventLoop bool) {
	body := bytes.Repeat([]byte("x"), size)
	s := startServer(b, []string{startOrigin(b, body), startOrigin(b, body)}, true, eventLoop)
	req := []byte("GET /static/app.js?v=1 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: bench\r\n\r\n")
	b.ReportAllocs()
	b.SetBytes(int64(size))
	b.RunParallel(func(pb *testing.PB) {
		c, err := net.Dial("tcp", s.Addr())
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		// The answer's length, from a first exchange: the Date header
		// keeps it.
		resp := make([]byte, size+4096)
		c.Write(req)
		n := 0
		for n < size || !bytes.HasSuffix(resp[:n], body) {
			m, err := c.Read(resp[n:])
			if err != nil {
				b.Fatal(err)
			}
			n += m
		}
		resp = resp[:n]
		for pb.Next() {
			if _, err := c.Write(req); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(c, resp); err != nil || !bytes.HasSuffix(resp, body) {
				b.Fatalf("%v %q", err, resp[:min(len(resp), 200)])
			}
		}
	})
}

func BenchmarkSocketGetSmallEventLoop(b *testing.B) { benchmarkSockets(b, 64, true) }
func BenchmarkSocketGetSmallFastHTTP(b *testing.B)  { benchmarkSockets(b, 64, false) }
func BenchmarkSocketGet64KEventLoop(b *testing.B)   { benchmarkSockets(b, 64<<10, true) }
func BenchmarkSocketGet64KFastHTTP(b *testing.B)    { benchmarkSockets(b, 64<<10, false) }
