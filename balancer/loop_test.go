//go:build linux

package balancer

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// recordingOrigin is a raw TCP backend that records each request head it
// gets and answers it with reply.
func recordingOrigin(t *testing.T, reply string) (addr string, heads func() []string) {
	t.Helper()
	o := startRecOrigin(t, func(c net.Conn, _ string) { io.WriteString(c, reply) })
	return o.addr, o.got
}

// exchange writes raw to a new connection to the edge, optionally closes
// its write side, and reads n responses.
func exchange(t *testing.T, s *Server, raw string, closeWrite bool, n int) []*fasthttp.Response {
	heads := make([]bool, n)
	for i, req := range strings.SplitAfter(raw, "\r\n\r\n") {
		if i < n {
			heads[i] = strings.HasPrefix(req, "HEAD ")
		}
	}
	t.Helper()
	c := dialEdge(t, s)
	defer c.Close()
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	if closeWrite {
		c.(*net.TCPConn).CloseWrite()
	}
	br := bufio.NewReader(c)
	var out []*fasthttp.Response
	for i := 0; i < n; i++ {
		resp := &fasthttp.Response{}
		// A HEAD answer has no body, whatever its Content-Length says.
		resp.SkipBody = heads[i]
		if err := resp.Read(br); err != nil {
			t.Fatalf("response %d: %v", i, err)
		}
		out = append(out, resp)
	}
	return out
}

func TestEventLoopForwardsLikeTheFullPath(t *testing.T) {
	addr, heads := recordingOrigin(t, "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-App: 1\r\nContent-Length: 2\r\n\r\nok")
	s := startEdge(t, "services:\n  web: {static: ["+addr+"]}\nroutes: [{service: web}]\n")
	h0 := loopHandoffs.Get()
	resp := exchange(t, s, "GET /a?b=1 HTTP/1.1\r\nHost: www.example.com\r\nConnection: keep-alive\r\n"+
		"X-Forwarded-For: 198.51.100.7\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nAccept: */*\r\n\r\n", false, 1)[0]
	if loopHandoffs.Get() != h0 {
		t.Fatal("the request left the event loop")
	}
	if resp.StatusCode() != 200 || string(resp.Body()) != "ok" || string(resp.Header.Peek("X-App")) != "1" {
		t.Fatalf("response: %d %q", resp.StatusCode(), resp.Body())
	}
	if len(resp.Header.Peek("Keep-Alive")) != 0 || len(resp.Header.Peek("Date")) == 0 || resp.ConnectionClose() {
		t.Fatalf("response headers: %s", resp.Header.Header())
	}
	hs := heads()
	if len(hs) != 1 {
		t.Fatalf("origin got %d requests", len(hs))
	}
	// The peer is not a trusted proxy: its forwarding headers are
	// replaced, not extended. The request ID goes up as the client gets it.
	id := string(resp.Header.Peek("X-Request-Id"))
	want := "GET /a?b=1 HTTP/1.1\r\nHost: www.example.com\r\nAccept: */*\r\n" +
		"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: www.example.com\r\n" +
		"Forwarded: for=127.0.0.1;host=\"www.example.com\";proto=http\r\nX-Request-Id: " + id + "\r\n\r\n"
	if len(id) != requestIDLen || hs[0] != want {
		t.Fatalf("upstream request:\n%q\nwant\n%q", hs[0], want)
	}
}

func TestEventLoopPipelinedRequestsAndHalfClose(t *testing.T) {
	var n int
	var mu sync.Mutex
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		mu.Lock()
		n++
		mu.Unlock()
		ctx.WriteString(string(ctx.Path()))
	})
	s := startEdge(t, "services:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	raw := "GET /one HTTP/1.1\r\nHost: a\r\n\r\nHEAD /two HTTP/1.1\r\nHost: a\r\n\r\nGET /three HTTP/1.1\r\nHost: a\r\n\r\n"
	rs := exchange(t, s, raw, true, 3)
	if string(rs[0].Body()) != "/one" || len(rs[1].Body()) != 0 || string(rs[2].Body()) != "/three" {
		t.Fatalf("bodies %q %q %q", rs[0].Body(), rs[1].Body(), rs[2].Body())
	}
}

func TestEventLoopBodiesOfEverySize(t *testing.T) {
	for _, size := range []int{0, 100, 5000, 200 << 10, 3 << 20} {
		body := bytes.Repeat([]byte("0123456789abcdef"), size/16+1)[:size]
		o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) { ctx.SetBody(body) })
		s := startEdge(t, "services:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
		for i := 0; i < 3; i++ {
			resp := do(t, s, "GET", "a", "/")
			if resp.StatusCode() != 200 || !bytes.Equal(resp.Body(), body) {
				t.Fatalf("%d bytes: got %d, %d bytes", size, resp.StatusCode(), len(resp.Body()))
			}
		}
	}
}

func TestEventLoopSlowReader(t *testing.T) {
	body := bytes.Repeat([]byte("z"), 4<<20)
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		if string(ctx.Path()) == "/big" {
			ctx.SetBody(body[:900<<10])
			return
		}
		ctx.WriteString("small")
	})
	s := startEdge(t, "services:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	// Small socket buffers on both sides, set before connecting (accepted
	// sockets inherit the listener's), make the edge's writes partial.
	rc, err := s.ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, 8192) })
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 8192) })
	}}
	c, err := d.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	io.WriteString(c, "GET /big HTTP/1.1\r\nHost: a\r\n\r\nGET /small HTTP/1.1\r\nHost: a\r\n\r\n")
	time.Sleep(300 * time.Millisecond) // the edge fills the socket and waits
	br := bufio.NewReaderSize(c, 1024)
	var big, small fasthttp.Response
	if err := big.Read(br); err != nil || len(big.Body()) != 900<<10 {
		t.Fatalf("big: %v, %d bytes", err, len(big.Body()))
	}
	if err := small.Read(br); err != nil || string(small.Body()) != "small" {
		t.Fatalf("small after big: %v %q", err, small.Body())
	}
}

func TestEventLoopHandsOffWhatItDoesNotServe(t *testing.T) {
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		fmt.Fprintf(ctx, "%s %s %s", ctx.Method(), ctx.Path(), ctx.PostBody())
	})
	s := startEdge(t, "services:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	f := func(method, path, body, want string) {
		t.Helper()
		h0 := loopHandoffs.Get()
		raw := method + " " + path + " HTTP/1.1\r\nHost: a\r\n"
		if body != "" {
			raw += fmt.Sprintf("Content-Length: %d\r\n", len(body))
		}
		resp := exchange(t, s, raw+"\r\n"+body, false, 1)[0]
		if resp.StatusCode() != 200 || string(resp.Body()) != want {
			t.Fatalf("%s %s: %d %q, want %q", method, path, resp.StatusCode(), resp.Body(), want)
		}
		if loopHandoffs.Get() == h0 {
			t.Fatalf("%s %s: not handed to the full path", method, path)
		}
	}
	f("POST", "/form", "a=1", "POST /form a=1")
	f("DELETE", "/x", "", "DELETE /x ")
	f("GET", "/a/../b", "", "GET /b ")
}

func TestEventLoopDecodesChunkedResponses(t *testing.T) {
	big := strings.Repeat("0123456789", 30000)
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		ctx.SetBodyStreamWriter(func(w *bufio.Writer) {
			w.WriteString("part1,")
			w.Flush()
			if string(ctx.Path()) == "/big" {
				w.WriteString(big)
				w.Flush()
			}
			w.WriteString("part2")
		})
	})
	s := startEdge(t, "services:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	h0, hits0 := loopHandoffs.Get(), o.hits.Load()
	for _, c := range []struct{ path, want string }{{"/", "part1,part2"}, {"/big", "part1," + big + "part2"}} {
		rs := exchange(t, s, "GET "+c.path+" HTTP/1.1\r\nHost: a\r\n\r\nGET "+c.path+" HTTP/1.1\r\nHost: a\r\n\r\n", false, 2)
		for _, resp := range rs {
			if resp.StatusCode() != 200 || string(resp.Body()) != c.want || resp.Header.ContentLength() != len(c.want) {
				t.Fatalf("%s: %d, %d bytes, Content-Length %d", c.path, resp.StatusCode(), len(resp.Body()), resp.Header.ContentLength())
			}
		}
	}
	if loopHandoffs.Get() != h0 {
		t.Fatal("chunked responses left the event loop")
	}
	if n := o.hits.Load() - hits0; n != 4 {
		t.Fatalf("the origin got %d requests for 4", n)
	}
	// A malformed chunked body is the full path's, which says so.
	bad := rawOrigin(t, func() string {
		return "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
	})
	s = startEdge(t, "services:\n  web: {static: ["+bad+"]}\nroutes: [{service: web}]\n")
	if resp := do(t, s, "GET", "a", "/"); resp.StatusCode() != 502 || string(resp.Header.Peek(HeaderError)) != "upstream_invalid_response" {
		t.Fatalf("malformed chunked body: %d %q", resp.StatusCode(), resp.Header.Peek(HeaderError))
	}
}

func TestEventLoopBackendClosingKeptAliveConnections(t *testing.T) {
	// The backend closes every connection after one answer without saying
	// so, as one whose idle timeout is shorter than edgelb's does.
	addr := serveRaw(t, func(c net.Conn) {
		var req fasthttp.Request
		if req.Read(bufio.NewReader(c)) == nil {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
		time.Sleep(20 * time.Millisecond)
	})
	s := startEdge(t, "services:\n  web: {static: ["+addr+"], health: {passive: {consecutive_gateway_failures: 1}}}\nroutes: [{service: web}]\n")
	c := dialEdge(t, s)
	defer c.Close()
	br := bufio.NewReader(c)
	for i := 0; i < 20; i++ {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: a\r\n\r\n")
		var resp fasthttp.Response
		if err := resp.Read(br); err != nil || resp.StatusCode() != 200 {
			t.Fatalf("request %d: %v %d %q", i, err, resp.StatusCode(), resp.Header.Peek(HeaderError))
		}
		time.Sleep(30 * time.Millisecond)
	}
	if st := serviceStatus(s); st.Available != 1 {
		t.Fatalf("the backend was taken out of rotation: %+v", st)
	}
}

func TestEventLoopFailuresGoToAnotherBackend(t *testing.T) {
	bad := rawOrigin(t, func() string {
		return "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nbad"
	})
	good := startOrigin(t, "good", nil)
	hang, err := net.Listen("tcp", "127.0.0.1:0") // accepts, never answers
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hang.Close() })
	dead := deadAddr(t)
	s := startEdge(t, "services:\n  web: {static: ["+bad+", "+good.addr+", "+hang.Addr().String()+", "+dead+
		"], try_timeout: 200ms, retries: 3, health: {passive: {consecutive_gateway_failures: 1000, consecutive_5xx: 1000}}}\nroutes: [{service: web}]\n")
	for i := 0; i < 30; i++ {
		resp := do(t, s, "GET", "a", fmt.Sprintf("/%d", i))
		if resp.StatusCode() != 200 || string(resp.Body()) != "hello from good" {
			t.Fatalf("request %d: %d %q %q", i, resp.StatusCode(), resp.Header.Peek(HeaderError), resp.Body())
		}
	}
}

func TestEventLoopOff(t *testing.T) {
	o := startOrigin(t, "a", nil)
	s := startEdge(t, "server: {event_loop: false}\nservices:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	if len(s.loops) != 0 {
		t.Fatal("event loops started with event_loop: false")
	}
	if resp := do(t, s, "GET", "a", "/"); resp.StatusCode() != 200 || string(resp.Body()) != "hello from a" {
		t.Fatalf("%d %q", resp.StatusCode(), resp.Body())
	}
}

func TestEventLoopDrainsOnShutdown(t *testing.T) {
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		switch string(ctx.Path()) {
		case "/slow":
			time.Sleep(150 * time.Millisecond)
		case "/hang":
			time.Sleep(time.Second)
		}
		ctx.WriteString("done")
	})
	cfg := mustConfig(t, "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nstate_dir: "+t.TempDir()+
		"\nservices:\n  web: {static: "+staticList(o)+", try_timeout: 300ms, retries: 0}\nroutes: [{service: web}]\n")
	s := NewServer(cfg, quietLogger())
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	type result struct {
		resp *fasthttp.Response
		err  error
	}
	get := func(path string) chan result {
		ch := make(chan result, 1)
		go func() {
			c, err := net.Dial("tcp", s.Addr())
			if err != nil {
				ch <- result{nil, err}
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: a\r\n\r\n")
			resp := &fasthttp.Response{}
			ch <- result{resp, resp.Read(bufio.NewReader(c))}
		}()
		return ch
	}
	slow, hang := get("/slow"), get("/hang")
	time.Sleep(100 * time.Millisecond) // both in flight
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	r := <-slow
	if r.err != nil || r.resp.StatusCode() != 200 || string(r.resp.Body()) != "done" || !r.resp.ConnectionClose() {
		t.Fatalf("in-flight request during shutdown: %v %+v", r.err, r.resp)
	}
	r = <-hang
	if r.err != nil || r.resp.StatusCode() != 504 || string(r.resp.Header.Peek(HeaderError)) != "upstream_timeout" {
		t.Fatalf("request timing out during shutdown: %v %+v", r.err, r.resp)
	}
}

// loadEdge keeps conns connections to s asking for d, each a request every
// pace (0: as fast as they are answered), checking each answer is "hello
// from a". It returns how many were answered.
func loadEdge(t *testing.T, s *Server, d time.Duration, conns int, pace time.Duration) uint64 {
	t.Helper()
	start := time.Now()
	var wg sync.WaitGroup
	var answered atomic.Uint64
	errs := make(chan string, conns)
	for w := 0; w < conns; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dialEdge(t, s)
			defer c.Close()
			br := bufio.NewReader(c)
			for i := 0; time.Since(start) < d; i++ {
				time.Sleep(time.Until(start.Add(time.Duration(i) * pace)))
				io.WriteString(c, "GET / HTTP/1.1\r\nHost: a\r\n\r\n")
				resp := &fasthttp.Response{}
				if err := resp.Read(br); err != nil || resp.StatusCode() != 200 || string(resp.Body()) != "hello from a" {
					errs <- fmt.Sprintf("request %d: %v %d %q", i, err, resp.StatusCode(), resp.Body())
					return
				}
				answered.Add(1)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
	return answered.Load()
}

func TestEventLoopBatchesWaitsOnlyUnderLoad(t *testing.T) {
	o := startOrigin(t, "a", nil)
	// A long wait makes "one event per wait" a thousand events a second,
	// which any test machine reaches.
	s := startEdge(t, "server: {batch_wait: 1ms}\nservices:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	// 300ms of load makes several sweeps, which decide on batching,
	// however fast the machine.
	load := func() { loadEdge(t, s, 300*time.Millisecond, 32, 0) }

	if got := s.loops[0].batchSleep; got != syscall.NsecToTimespec(int64(time.Millisecond)) {
		t.Fatalf("sleep %v", got)
	}

	// One request at a time, 20ms apart: never batched, answered at once.
	w0 := loopBatchWaits.Get()
	for i := 0; i < 10; i++ {
		if resp := do(t, s, "GET", "a", "/"); resp.StatusCode() != 200 {
			t.Fatalf("request %d: %d", i, resp.StatusCode())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := loopBatchWaits.Get() - w0; n != 0 {
		t.Fatalf("%d batched waits under light load", n)
	}

	// Under load, many connections with a request in flight, the loops
	// batch, and every answer is right.
	load()
	if loopBatchWaits.Get() == w0 {
		t.Fatal("no batched wait under load")
	}

	// While the fasthttp server serves a connection, the loops do not
	// hold their threads: that connection's goroutine needs them.
	h := dialEdge(t, s)
	io.WriteString(h, "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx")
	resp := &fasthttp.Response{}
	if err := resp.Read(bufio.NewReader(h)); err != nil || resp.StatusCode() != 200 {
		t.Fatalf("POST: %v %d", err, resp.StatusCode())
	}
	if n := s.fastConns.Load(); n != 1 {
		t.Fatalf("%d connections counted handed over, want 1", n)
	}
	time.Sleep(20 * time.Millisecond) // a wait begun before ends
	w1 := loopBatchWaits.Get()
	load()
	if n := loopBatchWaits.Get() - w1; n != 0 {
		t.Fatalf("%d batched waits while the fasthttp server had a connection", n)
	}

	// Once it is closed, the loops batch again.
	h.Close()
	waitNoFastConns(t, s)
	load()
	if loopBatchWaits.Get() == w1 {
		t.Fatal("no batched wait under load after the handed-over connection closed")
	}

}

// waitNoFastConns waits until s counts no connection served by
// goroutines, the last one having closed.
func waitNoFastConns(t *testing.T, s *Server) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); s.fastConns.Load() != 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections still counted as served by goroutines after the last closed", s.fastConns.Load())
		}
	}
}

// TestEventLoopDoesNotBatchWhileTLSConnectionsAreOpen: a connection the
// TLS listener accepted is served by goroutines, as a handed-over one is,
// so the loops do not hold their threads in batched waits while one is
// open, and batch again once it closes.
func TestEventLoopDoesNotBatchWhileTLSConnectionsAreOpen(t *testing.T) {
	o := startOrigin(t, "a", nil)
	pki := newTestPKI(t)
	cert, key := pki.issue("a", "a")
	s := startEdge(t, tlsYAML("", cert, key)+"server: {batch_wait: 1ms}\nservices:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	load := func() { loadEdge(t, s, 300*time.Millisecond, 32, 0) }

	c := mustDialTLS(t, s, pki.client("a"))
	if resp := c.get(t, "a", "/"); resp.StatusCode() != 200 {
		t.Fatalf("GET over TLS: %d", resp.StatusCode())
	}
	if n := s.fastConns.Load(); n != 1 {
		t.Fatalf("%d connections counted as served by goroutines, want 1 (the TLS one)", n)
	}
	time.Sleep(20 * time.Millisecond) // a wait begun before ends
	w0 := loopBatchWaits.Get()
	load()
	if n := loopBatchWaits.Get() - w0; n != 0 {
		t.Fatalf("%d batched waits while a TLS connection was open", n)
	}
	if resp := c.get(t, "a", "/"); resp.StatusCode() != 200 {
		t.Fatalf("GET over TLS after the load: %d", resp.StatusCode())
	}

	c.Close()
	waitNoFastConns(t, s)
	load()
	if loopBatchWaits.Get() == w0 {
		t.Fatal("no batched wait under load once the TLS connection closed")
	}
}

func TestEventLoopDoesNotBatchAModerateRate(t *testing.T) {
	o := startOrigin(t, "a", nil)
	s := startEdge(t, "server: {batch_wait: 200us}\nservices:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	// Six connections, each a request a millisecond: thousands of
	// events a second, more than one per wait, but fewer connections
	// than a full batch, so no wait can gather one, and each would delay
	// the few it gathers to save little. The loops try, see that, and
	// answer at once, trying again 100ms later, then 200ms after that:
	// three tries of a sweep interval in 600ms. Waiting whenever a wait
	// gathers two events would take about a wait per request.
	w0 := loopBatchWaits.Get()
	if n, waits := loadEdge(t, s, 600*time.Millisecond, 6, time.Millisecond), loopBatchWaits.Get()-w0; waits > n/10 {
		t.Fatalf("%d batched waits for %d requests at a moderate rate", waits, n)
	}
}

func TestDecideBatching(t *testing.T) {
	const ms = int64(time.Millisecond)
	l := &loop{batchWait: int64(20 * time.Microsecond)}
	// Each step is one 10ms interval: its events, its batched waits and
	// the events the polls after them gathered.
	step := func(now int64, events, waits, gathered int, want bool) {
		t.Helper()
		l.nowNs, l.swept = now, events
		l.waits += waits
		l.gathered += gathered
		w, g := l.waits, l.gathered
		l.decideBatching(10 * ms)
		if l.batching != want {
			t.Fatalf("at %dms, %d events, %d waits gathering %d: batching %v, want %v", now/ms, events, waits, gathered, l.batching, want)
		}
		if l.swept != 0 {
			t.Fatal("events not reset")
		}
		// Waits too few to judge count on into the next interval.
		if w >= loopBatchJudge || !l.batching {
			w, g = 0, 0
		}
		if l.waits != w || l.gathered != g {
			t.Fatalf("at %dms: %d waits gathering %d kept, want %d gathering %d", now/ms, l.waits, l.gathered, w, g)
		}
	}
	step(0, 499, 0, 0, false) // fewer than one event per 20µs
	step(10*ms, 500, 0, 0, true)
	step(20*ms, 5000, 3, 30, true)  // too few waits to judge: they count on
	step(30*ms, 5000, 5, 33, false) // 63 in 8, under a full batch each: off for 100ms
	step(40*ms, 5000, 0, 0, false)
	step(120*ms, 5000, 0, 0, false)
	step(130*ms, 5000, 0, 0, true) // tried again
	step(140*ms, 5000, 10, 10, false)
	step(330*ms, 5000, 0, 0, false) // then 200ms
	step(340*ms, 5000, 0, 0, true)
	step(350*ms, 5000, 10, 120, true) // a full batch a wait and more: the pause starts over
	// Waits that paid and fall short once: tried again at the next sweep.
	step(360*ms, 5000, 10, 10, false)
	step(370*ms, 5000, 0, 0, true)
	step(380*ms, 5000, 10, 10, false) // short again: 100ms
	step(470*ms, 5000, 0, 0, false)
	step(480*ms, 5000, 0, 0, true)
	// Waits that slow one connection down to a few events: judged
	// on what they gathered, not on the load they left.
	step(490*ms, 9, 9, 5, false)
	step(500*ms, 5000, 0, 0, false) // off until 690ms
	step(700*ms, 5000, 0, 0, true)
	step(710*ms, 100, 0, 0, false) // load gone
	// A moderate rate: each wait gathers the few events that came in it,
	// three here, and delays them all to save little.
	step(720*ms, 1000, 0, 0, true)
	step(730*ms, 1000, 300, 900, false)
	step(1120*ms, 1000, 0, 0, false) // the third failed try in a row: 400ms
	step(1130*ms, 1000, 0, 0, true)
	// Waits judged over two intervals, both ways.
	step(1140*ms, 5000, 7, 56, true)
	step(1150*ms, 5000, 1, 8, true) // 64 in 8
	step(1160*ms, 5000, 4, 31, true)
	step(1170*ms, 5000, 4, 0, false) // 31 in 8
	step(1180*ms, 5000, 0, 0, true)
	l.stopping = true
	step(1190*ms, 5000, 0, 0, false)
	l.stopping, l.batchWait = false, 0
	step(1200*ms, 1e6, 0, 0, false)
}

func TestEventLoopSavesEveryURLOfAConnection(t *testing.T) {
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) { ctx.WriteString("at " + string(ctx.RequestURI())) })
	s := startEdge(t, "services:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	// One connection, URLs that change and come back: the loop keeps
	// the store key of the last one, and must not keep it too long.
	uris := []string{"/a", "/b", "/a", "/b?x=1", "/c", "/c"}
	var raw strings.Builder
	for _, u := range uris {
		fmt.Fprintf(&raw, "GET %s HTTP/1.1\r\nHost: shop\r\n\r\n", u)
	}
	for i, resp := range exchange(t, s, raw.String(), false, len(uris)) {
		if resp.StatusCode() != 200 || string(resp.Body()) != "at "+uris[i] {
			t.Fatalf("GET %s: %d %q", uris[i], resp.StatusCode(), resp.Body())
		}
	}
	o.stop()
	for _, u := range []string{"/a", "/b", "/b?x=1", "/c"} {
		resp := do(t, s, "GET", "SHOP", u)
		if resp.StatusCode() != 200 || string(resp.Body()) != "at "+u || !strings.HasPrefix(string(resp.Header.Peek("Cache-Status")), "edgelb; hit") {
			t.Fatalf("GET %s with the origin down: %d %q %q", u, resp.StatusCode(), resp.Body(), resp.Header.Peek("Cache-Status"))
		}
	}
}

func TestEventLoopStopsBatchingWhatWaitingDoesNotGather(t *testing.T) {
	o := startOrigin(t, "a", nil)
	s := startEdge(t, "server: {batch_wait: 1ms}\nservices:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	// One connection, one request after another, as fast as they go:
	// enough events for batching, but each wait can only gather the
	// one event that comes next. The loop tries, sees that, and stops.
	c := dialEdge(t, s)
	defer c.Close()
	br := bufio.NewReader(c)
	w0 := loopBatchWaits.Get()
	n := 0
	for start := time.Now(); time.Since(start) < 500*time.Millisecond; n++ {
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: a\r\n\r\n")
		resp := &fasthttp.Response{}
		if err := resp.Read(br); err != nil || resp.StatusCode() != 200 {
			t.Fatalf("request %d: %v %d", n, err, resp.StatusCode())
		}
	}
	// Tries at 0, 100ms and 300ms later, each waiting after every
	// event until the next sweep 10ms on: about 30 waits, where
	// batching on load alone waits every other event of one sweep in two.
	if waits := loopBatchWaits.Get() - w0; waits > 60 {
		t.Fatalf("%d batched waits for %d requests on one connection", waits, n)
	}
}

// Chunked bodies that fasthttp refuses, or whose trailers it judges, get
// the same answer with the event loop on and off: the loop hands them to
// the fasthttp path rather than decode them itself.
func TestChunkedBodiesFasthttpJudgesAnswerTheSameOnBothEngines(t *testing.T) {
	for _, c := range []struct {
		name, body string
		status     int
		errValue   string
	}{
		{"bare CR in a chunk-size line", "5;\r\r\nhello\r\n0\r\n\r\n", 502, "upstream_invalid_response"},
		{"space before a chunk extension", "5 ;x=1\r\nhello\r\n0\r\n\r\n", 502, "upstream_invalid_response"},
		{"forbidden trailer", "5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n", 502, "upstream_invalid_response"},
		{"allowed trailer", "5\r\nhello\r\n0\r\nX-Checksum: 1\r\n\r\n", 200, ""},
	} {
		for _, loop := range []bool{true, false} {
			origin := rawOrigin(t, func() string {
				return "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + c.body
			})
			s := startEdge(t, "server: {event_loop: "+strconv.FormatBool(loop)+"}\nservices:\n  web: {static: ["+origin+"]}\nroutes: [{service: web}]\n")
			resp := do(t, s, "GET", "a", "/")
			if resp.StatusCode() != c.status || string(resp.Header.Peek(HeaderError)) != c.errValue ||
				c.status == 200 && string(resp.Body()) != "hello" {
				t.Fatalf("%s, event loop %v: %d %q %q; want %d %q", c.name, loop, resp.StatusCode(),
					resp.Header.Peek(HeaderError), resp.Body(), c.status, c.errValue)
			}
		}
	}
}
