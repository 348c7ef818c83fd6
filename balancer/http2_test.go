package balancer

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"golang.org/x/net/http2"
)

// HTTP/2 from real clients (Go's HTTP/2 client) through edgelb, over TLS
// and over h2c: the same core as HTTP/1.1.

// h2Edge is an edge with a TLS listener serving HTTP/2, and clients for it.
type h2Edge struct {
	*Server
	pki *testPKI
}

// startH2Edge starts an edge whose config is tls (on a free port, with a
// certificate for shop.example) and server keys, plus rest.
func startH2Edge(t testing.TB, server, rest string) *h2Edge {
	t.Helper()
	pki := newTestPKI(t)
	cert, key := pki.issue("shop", "shop.example", "127.0.0.1")
	y := tlsYAML("", cert, key)
	if server != "" {
		y += "server:\n" + server
	}
	return &h2Edge{Server: startEdge(t, y+rest), pki: pki}
}

// client returns a Go HTTP/2 client of the TLS listener: one connection,
// whatever the concurrency, as ALPN "h2" gives.
func (e *h2Edge) client(t testing.TB) *http.Client {
	t.Helper()
	tr := &http2.Transport{TLSClientConfig: e.pki.client("shop.example")}
	tr.TLSClientConfig.NextProtos = []string{"h2"}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 20 * time.Second}
}

// h2cClient returns a Go HTTP/2 client that speaks h2c with prior
// knowledge to the plain listener of s.
func h2cClient(t *testing.T) *http.Client {
	t.Helper()
	tr := &http2.Transport{
		AllowHTTP: true,
		DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 20 * time.Second}
}

// h2Get sends a request and returns the response with its body read.
func h2Do(t *testing.T, c *http.Client, method, url string, body io.Reader, hdr ...string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		if strings.EqualFold(hdr[i], "Host") {
			req.Host = hdr[i+1]
			continue
		}
		req.Header.Add(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the body: %v", method, url, err)
	}
	if resp.ProtoMajor != 2 {
		t.Fatalf("%s %s: answered over %s, want HTTP/2", method, url, resp.Proto)
	}
	return resp, string(b)
}

// TestHTTP2ServesThroughTheCore: a request over HTTP/2 reaches the backend
// as HTTP/1.1 with the client's headers, the forwarding headers edgelb
// owns (proto https over TLS, http over h2c), and nothing of HTTP/2.
func TestHTTP2ServesThroughTheCore(t *testing.T) {
	o := startRecOrigin(t, func(c net.Conn, head string) {
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Up: 1\r\nKeep-Alive: timeout=5\r\n\r\nok")
	})
	e := startH2Edge(t, "  h2c: true\n", "services:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
	check := func(c *http.Client, url, proto string) {
		t.Helper()
		resp, body := h2Do(t, c, "GET", url, nil, "Host", "shop.example", "X-Forwarded-For", "6.6.6.6", "Forwarded", "for=6.6.6.6", "Cookie", "a=1", "Accept", "*/*")
		if resp.StatusCode != 200 || body != "ok" || resp.Header.Get("X-Up") != "1" || resp.Header.Get("Keep-Alive") != "" {
			t.Fatalf("%s: %d %v %q", url, resp.StatusCode, resp.Header, body)
		}
		heads := o.got()
		head := heads[len(heads)-1]
		for _, want := range []string{"GET /p?q=1 HTTP/1.1\r\n", "\r\nHost: shop.example\r\n", "\r\nX-Forwarded-For: 127.0.0.1\r\n",
			"\r\nX-Forwarded-Proto: " + proto + "\r\n", "\r\nX-Forwarded-Host: shop.example\r\n",
			"\r\nForwarded: for=127.0.0.1;host=\"shop.example\";proto=" + proto + "\r\n", "\r\nCookie: a=1\r\n", "\r\nAccept: */*\r\n"} {
			if !strings.Contains(head, want) {
				t.Errorf("%s: the origin got no %q:\n%s", url, want, head)
			}
		}
		if strings.Contains(head, "6.6.6.6") || strings.Contains(strings.ToLower(head), "http2") || strings.Contains(head, ":authority") {
			t.Errorf("%s: the origin got:\n%s", url, head)
		}
	}
	check(e.client(t), "https://"+e.TLSAddr()+"/p?q=1", "https")
	check(h2cClient(t), "http://"+e.Addr()+"/p?q=1", "http")
}

// TestH2CPriorKnowledge: with server.h2c a client that speaks HTTP/2 from
// its first byte is served on the plain listener, whichever engine takes
// the connection, while HTTP/1.1 on it goes on as before; without it, the
// preface is a malformed request as before: 400, connection closed.
func TestH2CPriorKnowledge(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startOrigin(t, "a", nil)
		svc := "services:\n  web: {static: [" + o.addr + "]}\nroutes: [{service: web}]\n"
		on := startEdge(t, "server: {h2c: true, "+engine+"}\n"+svc)
		resp, body := h2Do(t, h2cClient(t), "GET", "http://"+on.Addr()+"/", nil)
		if resp.StatusCode != 200 || body != "hello from a" {
			t.Errorf("h2c: %d %q", resp.StatusCode, body)
		}
		if r := do(t, on, "GET", "x", "/"); r.StatusCode() != 200 || string(r.Body()) != "hello from a" {
			t.Errorf("HTTP/1.1 beside h2c: %d %q", r.StatusCode(), r.Body())
		}
		// A request that starts like the preface but is not it.
		if r, err := rawRequest(t, on, "PRI * HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil || r.StatusCode() != 400 {
			t.Errorf("a PRI request that is not the preface: %v %d", err, statusOf(r))
		}

		off := startEdge(t, "server: {"+engine+"}\n"+svc)
		c := dialEdge(t, off)
		defer c.Close()
		io.WriteString(c, http2.ClientPreface)
		got, _ := io.ReadAll(c)
		if !strings.HasPrefix(string(got), "HTTP/1.1 400 Bad Request\r\n") || !strings.HasSuffix(string(got), "\r\n\r\nedgelb: malformed request\n") {
			t.Errorf("the preface without h2c: %q", got)
		}
		if o.hits.Load() != 2 {
			t.Errorf("the origin got %d requests, want 2", o.hits.Load())
		}
	})
}

// TestHTTP2ManyStreamsOneConnection: many requests at once on one HTTP/2
// connection spread over the pool's backends, each answered.
func TestHTTP2ManyStreamsOneConnection(t *testing.T) {
	os := []*origin{startOrigin(t, "a", nil), startOrigin(t, "b", nil), startOrigin(t, "c", nil)}
	e := startH2Edge(t, "", "services:\n  web: {static: "+staticList(os...)+", balance: round_robin}\nroutes: [{service: web}]\n")
	c := e.client(t)
	conns, streams := h2Conns[transportTLS].Get(), h2Streams[transportTLS].Get()
	// 64 streams at a time, fewer than max_concurrent_streams: Go's
	// client opens another connection only past that.
	const workers, each = 64, 5
	const n = workers * each
	var wg sync.WaitGroup
	var bad atomic.Int64
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				path := fmt.Sprintf("/r%d-%d", w, i)
				resp, err := c.Get("https://" + e.TLSAddr() + path)
				if err != nil {
					t.Errorf("GET %s: %v", path, err)
					bad.Add(1)
					return
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || resp.ProtoMajor != 2 || !strings.HasPrefix(string(b), "hello from ") {
					t.Errorf("GET %s: %s %d %q", path, resp.Proto, resp.StatusCode, b)
					bad.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if bad.Load() > 0 {
		t.Fatalf("%d of %d requests failed", bad.Load(), n)
	}
	if got := h2Conns[transportTLS].Get() - conns; got != 1 {
		t.Errorf("%d HTTP/2 connections, want 1", got)
	}
	if got := h2Streams[transportTLS].Get() - streams; got != n {
		t.Errorf("%d streams counted, want %d", got, n)
	}
	for _, o := range os {
		if h := o.hits.Load(); h < n/3-1 || h > n/3+1 {
			t.Errorf("origin %s got %d requests, want about %d (round robin)", o.addr, h, n/3)
		}
	}
	assertAllHealthy(t, e.Server)
}

// killableOrigin is a backend that answers every request after delay,
// with its name as the body, until kill cuts it off mid-answer.
type killableOrigin struct {
	addr  string
	ln    net.Listener
	mu    sync.Mutex
	conns map[net.Conn]bool
	hits  atomic.Int64
}

func startKillableOrigin(t *testing.T, name string, delay time.Duration) *killableOrigin {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o := &killableOrigin{addr: ln.Addr().String(), ln: ln, conns: make(map[net.Conn]bool)}
	t.Cleanup(o.kill)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			o.mu.Lock()
			o.conns[c] = true
			o.mu.Unlock()
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					if _, err := readRequest(br); err != nil {
						return
					}
					o.hits.Add(1)
					time.Sleep(delay)
					if _, err := fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(name), name); err != nil {
						return
					}
				}
			}()
		}
	}()
	return o
}

// kill closes the listener and every connection, requests in flight
// included.
func (o *killableOrigin) kill() {
	o.ln.Close()
	o.mu.Lock()
	defer o.mu.Unlock()
	for c := range o.conns {
		c.Close()
	}
}

// TestHTTP2BackendKilledMidLoad: a backend dies under load, with requests
// of the HTTP/2 connection in flight on it: each stream's request is
// retried on another backend, and no client sees an error.
func TestHTTP2BackendKilledMidLoad(t *testing.T) {
	a, b, c := startKillableOrigin(t, "a", time.Millisecond), startKillableOrigin(t, "b", time.Millisecond), startKillableOrigin(t, "c", time.Millisecond)
	e := startH2Edge(t, "", fmt.Sprintf("services:\n  web: {static: [%s, %s, %s]}\nroutes: [{service: web}]\n", a.addr, b.addr, c.addr))
	client := e.client(t)
	var done, bad atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := client.Get("https://" + e.TLSAddr() + "/")
				if err != nil {
					t.Errorf("GET: %v", err)
					bad.Add(1)
					return
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || len(body) != 1 {
					t.Errorf("GET: %d %q %q", resp.StatusCode, body, resp.Header.Get(HeaderError))
					bad.Add(1)
				}
				done.Add(1)
			}
		}()
	}
	waitFor(t, "load before the kill", func() bool { return done.Load() >= 300 })
	hitsB := b.hits.Load()
	b.kill()
	at := done.Load()
	waitFor(t, "load after the kill", func() bool { return done.Load() >= at+600 })
	close(stop)
	wg.Wait()
	if bad.Load() > 0 {
		t.Fatalf("%d requests failed after backend b was killed", bad.Load())
	}
	if hitsB == 0 || a.hits.Load() == 0 || c.hits.Load() == 0 {
		t.Errorf("hits before the kill a=%d b=%d c=%d: the load did not spread", a.hits.Load(), hitsB, c.hits.Load())
	}
}

// TestHTTP2AnswersAsHTTP1: over HTTP/2 a client gets what it gets over
// HTTP/1.1 on the same listener: a backend's answer, HEAD, a POST's body,
// a stale copy with Cache-Status, and edgelb's own answers with
// Edgelb-Error, refusals and 413 included.
func TestHTTP2AnswersAsHTTP1(t *testing.T) {
	var down atomic.Bool
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		if down.Load() {
			ctx.SetStatusCode(503)
			ctx.SetBodyString("origin down")
			return
		}
		ctx.Response.Header.Set("X-Method", string(ctx.Method()))
		ctx.Response.Header.Set("X-Got-Length", string(ctx.Request.Header.Peek("Content-Length")))
		ctx.Response.Header.Set("X-Proto", string(ctx.Request.Header.Peek("X-Forwarded-Proto")))
		if string(ctx.Path()) == "/cookie" {
			// Never stored: a response with cookies is private.
			ctx.Response.Header.Add("Set-Cookie", "a=1")
			ctx.Response.Header.Add("Set-Cookie", "b=2")
		}
		ctx.SetContentType("text/x-test")
		if ctx.IsPost() {
			ctx.Write(ctx.PostBody())
			return
		}
		fmt.Fprintf(ctx, "path %s", ctx.Path())
	})
	dead := deadAddr(t)
	e := startH2Edge(t, "  max_request_body: 1000\n", "services:\n  web: {static: ["+o.addr+"]}\n  gone: {static: ["+dead+"]}\n"+
		"routes: [{host: shop.example, service: web}, {host: shop.example, path: /gone, service: gone}]\n")
	h2 := e.client(t)
	h1 := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{
		TLSClientConfig: e.pki.client("shop.example"),
		// No HTTP/2: an empty TLSNextProto keeps it to HTTP/1.1.
		TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{},
	}}
	t.Cleanup(h1.CloseIdleConnections)
	base := "https://" + e.TLSAddr()
	type answer struct {
		status int
		body   string
		hdr    http.Header
	}
	send := func(c *http.Client, method, path string, body func() io.Reader, hdr ...string) answer {
		t.Helper()
		var r io.Reader
		if body != nil {
			r = body()
		}
		req, err := http.NewRequest(method, base+path, r)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = "shop.example"
		for i := 0; i+1 < len(hdr); i += 2 {
			if hdr[i] == "Host" {
				req.Host = hdr[i+1]
				continue
			}
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		want := 1
		if c == h2 {
			want = 2
		}
		if resp.ProtoMajor != want {
			t.Fatalf("%s %s: answered over %s", method, path, resp.Proto)
		}
		return answer{resp.StatusCode, string(b), resp.Header}
	}
	same := func(what, method, path string, body func() io.Reader, wantStatus int, hdr ...string) answer {
		t.Helper()
		a1 := send(h1, method, path, body, hdr...)
		a2 := send(h2, method, path, body, hdr...)
		if a1.status != wantStatus || a2.status != wantStatus || a1.body != a2.body {
			t.Errorf("%s: HTTP/1.1 %d %q, HTTP/2 %d %q, want %d alike", what, a1.status, a1.body, a2.status, a2.body, wantStatus)
		}
		for _, k := range []string{HeaderError, "Content-Type", "Content-Length", "Set-Cookie", "X-Method", "X-Got-Length", "X-Proto",
			"Cache-Status", "Retry-After", "Allow", "Server", "Connection", "Transfer-Encoding"} {
			v1, v2 := a1.hdr.Values(k), a2.hdr.Values(k)
			if k == "Cache-Status" && len(v1) == 1 && len(v2) == 1 {
				// ttl=-N counts seconds since storing; the two may fall apart.
				v1, v2 = []string{strings.Split(v1[0], "ttl=")[0]}, []string{strings.Split(v2[0], "ttl=")[0]}
			}
			if strings.Join(v1, "|") != strings.Join(v2, "|") {
				t.Errorf("%s: %s over HTTP/1.1 %q, over HTTP/2 %q", what, k, v1, v2)
			}
		}
		if a2.hdr.Get("Date") == "" {
			t.Errorf("%s: no Date over HTTP/2", what)
		}
		return a2
	}
	a := same("GET", "GET", "/x?y=1", nil, 200)
	if a.body != "path /x" || a.hdr.Get("X-Proto") != "https" || a.hdr.Get("Content-Type") != "text/x-test" {
		t.Errorf("GET over HTTP/2: %q %v", a.body, a.hdr)
	}
	if a = same("GET with cookies", "GET", "/cookie", nil, 200); strings.Join(a.hdr.Values("Set-Cookie"), ",") != "a=1,b=2" {
		t.Errorf("Set-Cookie over HTTP/2: %q", a.hdr.Values("Set-Cookie"))
	}
	a = same("HEAD", "HEAD", "/x", nil, 200)
	if a.body != "" || a.hdr.Get("Content-Length") != "7" || a.hdr.Get("X-Method") != "HEAD" {
		t.Errorf("HEAD over HTTP/2: %q %v", a.body, a.hdr)
	}
	post := func() io.Reader { return strings.NewReader(strings.Repeat("p", 600)) }
	a = same("POST with a body", "POST", "/post", post, 200)
	if a.body != strings.Repeat("p", 600) || a.hdr.Get("X-Got-Length") != "600" {
		t.Errorf("POST over HTTP/2: the origin got %s bytes: %q", a.hdr.Get("X-Got-Length"), a.body)
	}
	// A body of unknown length: no Content-Length over HTTP/2, chunked
	// over HTTP/1.1; the origin gets its length either way.
	unknown := func() io.Reader {
		return io.MultiReader(strings.NewReader(strings.Repeat("u", 300)), strings.NewReader("!"))
	}
	if a = same("POST of unknown length", "POST", "/post", unknown, 200); a.hdr.Get("X-Got-Length") != "301" {
		t.Errorf("POST of unknown length over HTTP/2: the origin got Content-Length %q", a.hdr.Get("X-Got-Length"))
	}
	big := func() io.Reader { return strings.NewReader(strings.Repeat("b", 1001)) }
	same("POST over max_request_body", "POST", "/post", big, 413)
	bigUnknown := func() io.Reader { return io.MultiReader(strings.NewReader(strings.Repeat("b", 1001))) }
	same("POST of unknown length over max_request_body", "POST", "/post", bigUnknown, 413)
	same("no route", "GET", "/", nil, 404, "Host", "other.example")
	same("dead service", "GET", "/gone", nil, 502)
	same("TRACE", "TRACE", "/x", nil, 405)
	same("Expect other than 100-continue", "GET", "/x", nil, 417, "Expect", "something")
	same("Expect: 100-continue", "POST", "/post", post, 200, "Expect", "100-continue")

	// Stale: a copy stored over HTTPS is served when the origin fails.
	down.Store(true)
	a = same("stale GET", "GET", "/x?y=1", nil, 200)
	if a.body != "path /x" || !strings.HasPrefix(a.hdr.Get("Cache-Status"), "edgelb; hit; ttl=-") || a.hdr.Get("Age") == "" {
		t.Errorf("stale over HTTP/2: %q Cache-Status %q Age %q", a.body, a.hdr.Get("Cache-Status"), a.hdr.Get("Age"))
	}
	assertAllHealthy(t, e.Server)
}

// TestHTTP2ShutdownDrains: on shutdown a request in flight on an HTTP/2
// connection, over TLS and h2c, is answered, its connection gets GOAWAY
// and closes, and Shutdown returns within the drain.
func TestHTTP2ShutdownDrains(t *testing.T) {
	o := startOrigin(t, "slow", func(ctx *fasthttp.RequestCtx) {
		time.Sleep(500 * time.Millisecond)
		ctx.WriteString("slow")
	})
	e := startH2Edge(t, "  h2c: true\n", "services:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
	type result struct {
		status int
		err    error
	}
	results := make(chan result, 2)
	for _, u := range []struct {
		c   *http.Client
		url string
	}{{e.client(t), "https://" + e.TLSAddr() + "/"}, {h2cClient(t), "http://" + e.Addr() + "/"}} {
		go func() {
			resp, err := u.c.Get(u.url)
			if err != nil {
				results <- result{0, err}
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			results <- result{resp.StatusCode, nil}
		}()
	}
	waitFor(t, "both requests at the origin", func() bool { return o.hits.Load() == 2 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	if err := e.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Shutdown took %v", d)
	}
	for range 2 {
		if r := <-results; r.err != nil || r.status != 200 {
			t.Errorf("a request in flight at shutdown: %d %v", r.status, r.err)
		}
	}
	if n := h2Open.Load(); n != 0 {
		t.Errorf("%d HTTP/2 connections open after shutdown", n)
	}
}

// TestHTTP2Timeouts: a TLS client that negotiated h2 but sends no preface
// is closed at server.header_timeout; a connection with no stream gets
// GOAWAY at server.http2.idle_timeout; a body that does not come within
// server.idle_timeout gets 408; a client that takes none of a response
// (its flow-control window shut) loses the stream after idle_timeout.
func TestHTTP2Timeouts(t *testing.T) {
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		ctx.Write(bytes.Repeat([]byte("x"), 100<<10))
	})
	e := startH2Edge(t, "  header_timeout: 300ms\n  idle_timeout: 500ms\n  http2: {idle_timeout: 400ms}\n",
		"services:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")

	conf := e.pki.client("shop.example")
	conf.NextProtos = []string{"h2"}
	tc, err := tls.Dial("tcp", e.TLSAddr(), conf)
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	start := time.Now()
	tc.SetDeadline(time.Now().Add(10 * time.Second))
	io.Copy(io.Discard, tc) // the server's SETTINGS, then the close
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("no preface: closed after %v, want about header_timeout (300ms)", d)
	}

	a := dialRawH2(t, e, "tls")
	start = time.Now()
	end := a.readToEnd(true)
	if end.goAway == nil || end.goAway.ErrCode != http2.ErrCodeNo || time.Since(start) > 5*time.Second {
		t.Errorf("idle connection: GOAWAY %v after %v", end.goAway, time.Since(start))
	}

	a = dialRawH2(t, e, "tls")
	a.write(func(fr *http2.Framer) error {
		return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: a.block("POST", "/", "content-length", "10"), EndHeaders: true})
	})
	end = a.readUntil(true, func(e *h2End) bool { return e.streams[1] != nil && e.streams[1].body != "" })
	if s := end.streams[1]; s.status != 408 || s.body != "edgelb: request timeout\n" {
		t.Errorf("a body that never came: %+v", s)
	}

	// A window of 0: the response cannot move.
	a = dialRawH2(t, e, "tls")
	a.write(func(fr *http2.Framer) error {
		return fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
	})
	a.get(1, "/big")
	start = time.Now()
	end = a.readUntil(true, func(e *h2End) bool { return e.streams[1] != nil && e.streams[1].wasRST })
	if s := end.streams[1]; s.status != 200 || time.Since(start) > 5*time.Second {
		t.Errorf("a response the client never takes: %+v after %v", s, time.Since(start))
	}
	assertAllHealthy(t, e.Server)
}

// TestHTTP2Hedges: an HTTP/2 request whose try is slow is hedged to
// another backend, as over HTTP/1.1: the fast answer wins.
func TestHTTP2Hedges(t *testing.T) {
	slow := startOrigin(t, "slow", func(ctx *fasthttp.RequestCtx) {
		time.Sleep(2 * time.Second)
		ctx.WriteString("slow")
	})
	fast := startOrigin(t, "fast", func(ctx *fasthttp.RequestCtx) { ctx.WriteString("fast") })
	e := startH2Edge(t, "", "services:\n  web: {static: "+staticList(slow, fast)+", balance: round_robin, hedge: {after: 50ms, budget: 100}}\nroutes: [{service: web}]\n")
	c := e.client(t)
	for i := range 4 {
		start := time.Now()
		resp, body := h2Do(t, c, "GET", "https://"+e.TLSAddr()+"/h", nil)
		if d := time.Since(start); resp.StatusCode != 200 || body != "fast" || d > time.Second {
			t.Errorf("request %d: %d %q after %v", i, resp.StatusCode, body, d)
		}
	}
	if slow.hits.Load() == 0 {
		t.Error("no request went to the slow backend first: nothing was hedged")
	}
}
