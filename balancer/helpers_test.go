package balancer

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// origin is a real loopback HTTP server standing in for a backend.
type origin struct {
	addr  string
	ln    net.Listener
	srv   *fasthttp.Server
	hits  atomic.Int64
	reply atomic.Pointer[func(ctx *fasthttp.RequestCtx)]
}

// startOrigin starts an origin answering "hello from NAME" unless h is set.
func startOrigin(t testing.TB, name string, h func(ctx *fasthttp.RequestCtx)) *origin {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o := &origin{addr: ln.Addr().String(), ln: ln}
	if h == nil {
		h = func(ctx *fasthttp.RequestCtx) {
			ctx.SetContentType("text/plain")
			fmt.Fprintf(ctx, "hello from %s", name)
		}
	}
	o.reply.Store(&h)
	o.srv = &fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) {
		o.hits.Add(1)
		(*o.reply.Load())(ctx)
	}}
	go o.srv.Serve(ln)
	t.Cleanup(o.stop)
	return o
}

// stop stops the origin. Closing the listener too covers a Serve that has
// not started yet, which Shutdown alone would leave serving.
func (o *origin) stop() {
	o.srv.Shutdown()
	o.ln.Close()
}

// edge starts an edgelb server from a YAML config on free loopback ports.
// The config must not set listen or admin.
func startEdge(t testing.TB, yaml string) *Server {
	t.Helper()
	return startEdgeLogging(t, yaml, quietLogger())
}

// startEdgeLogging is startEdge with the server's logger.
func startEdgeLogging(t testing.TB, yaml string, logger *slog.Logger) *Server {
	t.Helper()
	if !strings.Contains(yaml, "state_dir:") {
		yaml = "state_dir: " + t.TempDir() + "\n" + yaml
	}
	cfg := mustConfig(t, "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n"+yaml)
	s := NewServer(cfg, logger)
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
	})
	return s
}

func mustConfig(t testing.TB, yaml string) *Config {
	t.Helper()
	cfg, err := ParseConfig([]byte(yaml))
	if err != nil {
		// Ports 0 are fine for tests; the listen/admin check refuses them.
		t.Fatalf("config: %v", err)
	}
	return cfg
}

func quietLogger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(discard{}, nil))
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// get sends one request through the edge and returns the response.
func do(t testing.TB, s *Server, method, host, uri string, hdr ...string) *fasthttp.Response {
	t.Helper()
	req := fasthttp.AcquireRequest()
	defer fasthttp.ReleaseRequest(req)
	req.Header.SetMethod(method)
	req.SetRequestURI("http://" + s.Addr() + uri)
	if host != "" {
		req.Header.SetHost(host)
		req.UseHostHeader = true
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp := &fasthttp.Response{}
	c := &fasthttp.Client{MaxIdemponentCallAttempts: 1, DisablePathNormalizing: true}
	if err := c.DoTimeout(req, resp, 20*time.Second); err != nil {
		t.Fatalf("%s %s: %v", method, uri, err)
	}
	return resp
}

func staticList(os ...*origin) string {
	addrs := make([]string, len(os))
	for i, o := range os {
		addrs[i] = o.addr
	}
	return "[" + strings.Join(addrs, ", ") + "]"
}

// rawRequest sends raw bytes to the edge on a new connection and reads one
// response. The write runs beside the read, so that an answer the server
// sends before reading everything (413, say) is still read.
func rawRequest(t testing.TB, s *Server, raw string) (*fasthttp.Response, error) {
	t.Helper()
	c := dialEdge(t, s)
	defer c.Close()
	go c.Write([]byte(raw))
	resp := &fasthttp.Response{}
	return resp, resp.Read(bufio.NewReader(c))
}

// dialEdge connects to the edge, with a 10 s deadline for the test's
// exchanges.
func dialEdge(t testing.TB, s *Server) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c
}

// serveRaw runs a TCP server on a free loopback port that serves each
// connection with handle, and returns its address.
func serveRaw(t testing.TB, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return ln.Addr().String()
}
