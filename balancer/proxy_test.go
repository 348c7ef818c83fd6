package balancer

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/health"
)

func TestProxyForwardsGet(t *testing.T) {
	o := startOrigin(t, "a", nil)
	s := startEdge(t, "services:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	resp := do(t, s, "GET", "example.com", "/x?q=1")
	if resp.StatusCode() != 200 || string(resp.Body()) != "hello from a" {
		t.Fatalf("got %d %q", resp.StatusCode(), resp.Body())
	}
	if v := resp.Header.Peek(HeaderError); len(v) != 0 {
		t.Fatalf("unexpected %s: %s", HeaderError, v)
	}
}

func TestProxyHeaders(t *testing.T) {
	var mu sync.Mutex
	var seen string
	var seenURI, seenHost string
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		mu.Lock()
		seen = ctx.Request.Header.String()
		seenURI = string(ctx.Request.Header.RequestURI())
		seenHost = string(ctx.Request.Header.Host())
		mu.Unlock()
		ctx.Response.Header.Set("Keep-Alive", "timeout=5")
		ctx.Response.Header.Set("Connection", "X-Private")
		ctx.Response.Header.Set("X-Private", "secret")
		ctx.Response.Header.Set("X-App", "kept")
		ctx.Response.SetConnectionClose()
		ctx.WriteString("ok")
	})
	s := startEdge(t, "server: {trusted_proxies: [127.0.0.0/8]}\nservices:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	resp := do(t, s, "GET", "Shop.Example.com", "/a//b/../c?x=%2F",
		"Connection", "X-Hop, keep-alive",
		"X-Hop", "should-go",
		"Keep-Alive", "timeout=5",
		"Te", "trailers",
		"Upgrade", "websocket",
		"Proxy-Authorization", "Basic Zm9v",
		"X-Forwarded-For", "10.0.0.1",
		"X-Forwarded-Proto", "https",
		"X-Keep", "yes",
	)
	if resp.StatusCode() != 200 {
		t.Fatalf("status %d", resp.StatusCode())
	}
	mu.Lock()
	defer mu.Unlock()
	for _, h := range []string{"X-Hop:", "Keep-Alive:", "Te:", "Upgrade:", "Proxy-Authorization:"} {
		if strings.Contains(seen, h) {
			t.Errorf("hop-by-hop header %s reached the origin:\n%s", h, seen)
		}
	}
	// From a trusted proxy the chain and the scheme it saw are kept.
	for _, h := range []string{"X-Forwarded-For: 10.0.0.1, 127.0.0.1\r\n", "X-Forwarded-Proto: https\r\n", "X-Forwarded-Host: Shop.Example.com\r\n", "X-Keep: yes\r\n",
		"Forwarded: for=127.0.0.1;host=\"Shop.Example.com\";proto=http\r\n"} {
		if !strings.Contains(seen, h) {
			t.Errorf("origin did not get %q:\n%s", h, seen)
		}
	}
	if seenURI != "/a//b/../c?x=%2F" {
		t.Errorf("request URI changed on the way: %q", seenURI)
	}
	if seenHost != "Shop.Example.com" {
		t.Errorf("Host changed on the way: %q", seenHost)
	}
	if v := resp.Header.Peek("X-Private"); len(v) != 0 {
		t.Errorf("header named by upstream Connection reached the client")
	}
	if v := resp.Header.Peek("Keep-Alive"); len(v) != 0 {
		t.Errorf("upstream Keep-Alive reached the client")
	}
	if string(resp.Header.Peek("X-App")) != "kept" {
		t.Errorf("end-to-end header lost")
	}
	if resp.ConnectionClose() {
		t.Errorf("upstream Connection: close must not close the client's connection")
	}
}

func TestRouting(t *testing.T) {
	a := startOrigin(t, "a", nil)
	b := startOrigin(t, "b", nil)
	c := startOrigin(t, "c", nil)
	s := startEdge(t, `
services:
  a: {static: `+staticList(a)+`}
  b: {static: `+staticList(b)+`}
  c: {static: `+staticList(c)+`}
routes:
  - {host: "*", path: /, service: a}
  - {host: "*", path: /api, service: b}
  - {host: shop.example.com, path: /, service: c}
  - {host: only.example.com, path: /x, service: c}
`)
	f := func(host, path, want string) {
		t.Helper()
		resp := do(t, s, "GET", host, path)
		got := string(resp.Body())
		if e := resp.Header.Peek(HeaderError); len(e) > 0 {
			got = "error:" + string(e)
		}
		if got != want {
			t.Errorf("%s%s: got %q, want %q", host, path, got, want)
		}
	}
	f("any.host", "/", "hello from a")
	f("any.host", "/api", "hello from b")
	f("any.host", "/api/v1", "hello from b")
	f("any.host", "/apix", "hello from a")
	f("SHOP.example.com:8080", "/api", "hello from b")
	f("shop.example.com", "/other", "hello from c")
	f("only.example.com", "/x/y", "hello from c")
	f("only.example.com", "/y", "hello from a")
}

func TestNoRoute(t *testing.T) {
	a := startOrigin(t, "a", nil)
	s := startEdge(t, "services:\n  a: {static: "+staticList(a)+"}\nroutes: [{host: a.example, path: /, service: a}]\n")
	resp := do(t, s, "GET", "b.example", "/")
	if resp.StatusCode() != 404 || string(resp.Header.Peek(HeaderError)) != "no_route" {
		t.Fatalf("got %d %q", resp.StatusCode(), resp.Header.Peek(HeaderError))
	}
}

// deadAddr returns a loopback address where nothing listens.
func deadAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func TestRetryOnDeadBackend(t *testing.T) {
	live := startOrigin(t, "live", nil)
	dead := deadAddr(t)
	s := startEdge(t, "services:\n  web: {static: ["+dead+", "+live.addr+"], health: {passive: {consecutive_gateway_failures: 1000}}}\nroutes: [{service: web}]\n")
	for i := 0; i < 50; i++ {
		for _, m := range []string{"GET", "POST"} {
			resp := do(t, s, m, "x", "/")
			if resp.StatusCode() != 200 {
				t.Fatalf("%s #%d: got %d %q; a dead backend must be retried on another (connect failures are safe for any method)", m, i, resp.StatusCode(), resp.Header.Peek(HeaderError))
			}
		}
	}
}

func TestAllBackendsDead(t *testing.T) {
	s := startEdge(t, "services:\n  web: {static: ["+deadAddr(t)+", "+deadAddr(t)+"]}\nroutes: [{service: web}]\n")
	resp := do(t, s, "GET", "x", "/")
	if resp.StatusCode() != 502 || string(resp.Header.Peek(HeaderError)) != "upstream_connect_failed" {
		t.Fatalf("got %d %q", resp.StatusCode(), resp.Header.Peek(HeaderError))
	}
	if strings.Contains(string(resp.Body()), "127.0.0.1") {
		t.Fatalf("response leaks a backend address: %q", resp.Body())
	}
	// After enough failures both are ejected: the answer comes at once.
	for i := 0; i < 10; i++ {
		do(t, s, "GET", "x", "/")
	}
	start := time.Now()
	resp = do(t, s, "GET", "x", "/")
	if resp.StatusCode() != 503 || string(resp.Header.Peek(HeaderError)) != "no_healthy_backend" || len(resp.Header.Peek("Retry-After")) == 0 {
		t.Fatalf("got %d %q", resp.StatusCode(), resp.Header.Peek(HeaderError))
	}
	t.Logf("no_healthy_backend answered in %s", time.Since(start))
}

// Once the ejections of a dead pool are over, the backends are tried again
// and re-ejected at their first failure: the client still gets 503
// no_healthy_backend, never a run of 502s.
func TestDeadPoolAfterEjectionTime(t *testing.T) {
	s := startEdge(t, "services:\n  web: {static: ["+deadAddr(t)+", "+deadAddr(t)+"], health: {passive: {consecutive_gateway_failures: 1, base_ejection_time: 100ms}}}\nroutes: [{service: web}]\n")
	do(t, s, "GET", "x", "/")
	for round := 0; round < 3; round++ {
		// Past every ejection: each lasts 100ms longer than the one before.
		time.Sleep(time.Duration(round+1)*100*time.Millisecond + 60*time.Millisecond)
		for i := 0; i < 5; i++ {
			resp := do(t, s, "GET", "x", "/")
			if resp.StatusCode() != 503 || string(resp.Header.Peek(HeaderError)) != "no_healthy_backend" {
				t.Fatalf("round %d, request %d: got %d %q", round, i, resp.StatusCode(), resp.Header.Peek(HeaderError))
			}
		}
	}
}

func TestTimeoutAndRetry(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	hang := startOrigin(t, "hang", func(ctx *fasthttp.RequestCtx) { <-release })
	live := startOrigin(t, "live", nil)
	s := startEdge(t, "services:\n  web: {static: ["+hang.addr+"], try_timeout: 200ms}\n  both: {static: ["+hang.addr+", "+live.addr+"], try_timeout: 200ms, balance: round_robin}\nroutes: [{path: /, service: web}, {path: /both, service: both}]\n")
	start := time.Now()
	resp := do(t, s, "GET", "x", "/")
	if resp.StatusCode() != 504 || string(resp.Header.Peek(HeaderError)) != "upstream_timeout" {
		t.Fatalf("got %d %q", resp.StatusCode(), resp.Header.Peek(HeaderError))
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("timeout took %s", d)
	}
	for i := 0; i < 4; i++ {
		resp := do(t, s, "GET", "x", "/both")
		if resp.StatusCode() != 200 {
			t.Fatalf("GET #%d: got %d %q; should be retried on the live backend", i, resp.StatusCode(), resp.Header.Peek(HeaderError))
		}
	}
}

func TestInvalidResponse(t *testing.T) {
	addr := serveRaw(t, func(c net.Conn) {
		bufio.NewReader(c).ReadString('\n')
		c.Write([]byte("garbage garbage\r\n\r\n"))
	})
	s := startEdge(t, "services:\n  web: {static: ["+addr+"]}\nroutes: [{service: web}]\n")
	resp := do(t, s, "GET", "x", "/")
	if resp.StatusCode() != 502 || string(resp.Header.Peek(HeaderError)) != "upstream_invalid_response" {
		t.Fatalf("got %d %q", resp.StatusCode(), resp.Header.Peek(HeaderError))
	}
}

func TestOverloadedBackendIsAvoided(t *testing.T) {
	busy := startOrigin(t, "busy", func(ctx *fasthttp.RequestCtx) {
		ctx.Response.Header.Set("Retry-After", "1")
		ctx.SetStatusCode(503)
	})
	limited := startOrigin(t, "limited", func(ctx *fasthttp.RequestCtx) { ctx.SetStatusCode(429) })
	live := startOrigin(t, "live", nil)
	s := startEdge(t, "services:\n  web: {static: "+staticList(busy, limited, live)+"}\nroutes: [{service: web}]\n")
	for i := 0; i < 30; i++ {
		if resp := do(t, s, "GET", "x", "/"); resp.StatusCode() != 200 {
			t.Fatalf("GET #%d: got %d", i, resp.StatusCode())
		}
	}
	// A non-idempotent request gets the backend's own answer.
	only := startEdge(t, "services:\n  web: {static: "+staticList(busy)+"}\nroutes: [{service: web}]\n")
	if resp := do(t, only, "POST", "x", "/"); resp.StatusCode() != 503 || len(resp.Header.Peek(HeaderError)) != 0 {
		t.Fatalf("POST: got %d %q", resp.StatusCode(), resp.Header.Peek(HeaderError))
	}
}

func TestBadRequests(t *testing.T) {
	o := startOrigin(t, "a", nil)
	s := startEdge(t, "server: {max_request_body: 1024, max_header_bytes: 4096}\nservices:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	f := func(raw string, want int) {
		t.Helper()
		resp, err := rawRequest(t, s, raw)
		if err != nil {
			t.Fatalf("reading response to %.40q: %v", raw, err)
		}
		if resp.StatusCode() != want {
			t.Errorf("%.40q: got %d, want %d", raw, resp.StatusCode(), want)
		}
	}
	f("GARBAGE\r\n\r\n", 400)
	f("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400)
	f("GET / HTTP/1.1\r\nHost: x\r\nX-Big: "+strings.Repeat("a", 8000)+"\r\n\r\n", 431)
	f("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"+strings.Repeat("b", 5000), 413)
	f("GET / HTTP/1.1\r\nHost: x\r\n\r\n", 200)
}

// Header names are matched whatever their case, on the fast path (nothing
// to remove) and the slow one alike.
func TestProxyHeadersAnyCase(t *testing.T) {
	var mu sync.Mutex
	var seen string
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		mu.Lock()
		seen = ctx.Request.Header.String()
		mu.Unlock()
		ctx.WriteString("ok")
	})
	s := startEdge(t, "services:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	f := func(headers string, want, notWant []string) {
		t.Helper()
		resp, err := rawRequest(t, s, "GET / HTTP/1.1\r\nHost: shop.example\r\n"+headers+"\r\n")
		if err != nil || resp.StatusCode() != 200 {
			t.Fatalf("%q: %v %d", headers, err, resp.StatusCode())
		}
		mu.Lock()
		got := seen
		mu.Unlock()
		for _, w := range want {
			if strings.Count(got, w) != 1 {
				t.Errorf("%q: origin got %q %d times, want once:\n%s", headers, w, strings.Count(got, w), got)
			}
		}
		for _, w := range notWant {
			if strings.Contains(strings.ToLower(got), strings.ToLower(w)) {
				t.Errorf("%q: %q reached the origin:\n%s", headers, w, got)
			}
		}
	}
	// Fast path: forged X-Forwarded-Proto and -Host are replaced.
	f("x-forwarded-proto: https\r\nx-forwarded-host: evil.example\r\nx-app: 1\r\n",
		[]string{"X-Forwarded-For: 127.0.0.1\r\n", "X-Forwarded-Proto: http\r\n", "X-Forwarded-Host: shop.example\r\n", "X-App: 1\r\n"},
		[]string{"evil.example", "https"})
	// Slow path, lower case: hop-by-hop headers and those Connection names
	// go, and so does an untrusted peer's X-Forwarded-For.
	f("connection: x-hop, keep-alive\r\nx-hop: 1\r\nkeep-alive: timeout=5\r\nproxy-authorization: Basic Zm9v\r\nx-forwarded-for: 10.0.0.9\r\n",
		[]string{"X-Forwarded-For: 127.0.0.1\r\n"},
		[]string{"x-hop:", "keep-alive:", "proxy-authorization:", "connection:"})
}

// prepareResponse removes hop-by-hop headers whatever their case, whether
// or not the header's names were normalized, and keeps the rest.
func TestPrepareResponse(t *testing.T) {
	f := func(headers string, clientClose bool, want, notWant []string) {
		t.Helper()
		for _, normalize := range []bool{true, false} {
			var resp fasthttp.Response
			// As the server's response: no default Content-Type.
			resp.Header.SetNoDefaultContentType(true)
			if !normalize {
				resp.Header.DisableNormalizing()
			}
			raw := "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + headers + "\r\nok"
			if err := resp.Read(bufio.NewReader(strings.NewReader(raw))); err != nil {
				t.Fatalf("%q: %v", headers, err)
			}
			prepareResponse(&resp, clientClose)
			got := strings.ToLower(resp.Header.String())
			for _, w := range want {
				if strings.Count(got, strings.ToLower(w)) != 1 {
					t.Errorf("%q (normalize %v): got %q %d times, want once:\n%s", headers, normalize, w, strings.Count(got, w), got)
				}
			}
			for _, w := range notWant {
				if strings.Contains(got, strings.ToLower(w)) {
					t.Errorf("%q (normalize %v): %q still there:\n%s", headers, normalize, w, got)
				}
			}
			if resp.ConnectionClose() != clientClose {
				t.Errorf("%q (normalize %v): ConnectionClose %v, want %v", headers, normalize, resp.ConnectionClose(), clientClose)
			}
		}
	}
	// Nothing to remove.
	f("X-App: 1\r\n", false, []string{"X-App: 1\r\n"}, []string{"connection:"})
	// Fast path: a lone Connection: keep-alive or close goes alone.
	f("Server: nginx\r\nConnection: keep-alive\r\nX-App: 1\r\n", false,
		[]string{"Server: nginx\r\n", "X-App: 1\r\n"}, []string{"connection:", "keep-alive"})
	f("connection: Keep-Alive\r\nx-app: 1\r\n", false, nil, []string{"connection:", "keep-alive"})
	f("Connection: close\r\nX-App: 1\r\n", false, []string{"X-App: 1\r\n"}, []string{"connection:"})
	f("Connection: keep-alive\r\n", true, []string{"Connection: close\r\n"}, []string{"keep-alive"})
	// Slow path: hop-by-hop headers and those Connection names go, in any
	// case; Connection itself goes last.
	f("connection: x-foo, keep-alive\r\nx-foo: 1\r\nkeep-alive: timeout=5\r\nX-Bar: 2\r\nproxy-connection: keep-alive\r\n", false,
		[]string{"X-Bar: 2\r\n"}, []string{"connection:", "x-foo:", "keep-alive:"})
	f("Connection: X-Foo\r\nx-foo: 1\r\nX-FOO: 2\r\nupgrade: h2c\r\nPROXY-AUTHENTICATE: Basic\r\nx-kept: 3\r\n", false,
		[]string{"x-kept: 3\r\n"}, []string{"connection:", "x-foo:", "upgrade:", "proxy-authenticate:"})
	f("Connection: close, x-foo\r\nx-foo: 1\r\nx-kept: 3\r\n", true,
		[]string{"x-kept: 3\r\n", "Connection: close\r\n"}, []string{"x-foo"})
	// A header that Connection names may be one fasthttp keeps apart.
	f("Connection: content-type\r\nContent-Type: text/plain\r\nx-kept: 3\r\n", false,
		[]string{"x-kept: 3\r\n"}, []string{"content-type:", "connection:"})
}

// rawOrigin is a backend written on raw TCP, so that its header names are
// exactly as a test writes them. It answers every request on a keep-alive
// connection with whatever reply returns.
func rawOrigin(t *testing.T, reply func() string) string {
	t.Helper()
	return serveRaw(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		for {
			var req fasthttp.Request
			if err := req.Read(br); err != nil {
				return
			}
			if _, err := c.Write([]byte(reply())); err != nil {
				return
			}
		}
	})
}

// A backend's header names reach the client as the backend sent them, and
// edgelb finds the headers it acts on whatever their case: hop-by-hop ones,
// those Connection names, Date, Retry-After and Cache-Control.
func TestBackendHeaderNamesAsSent(t *testing.T) {
	var busy atomic.Bool
	addr := rawOrigin(t, func() string {
		if busy.Load() {
			return "HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 4\r\n\r\nbusy"
		}
		return "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n" +
			"connection: keep-alive, x-foo\r\nkeep-alive: timeout=5\r\nx-foo: secret\r\nproxy-connection: keep-alive\r\n" +
			"X-Odd-CASE: kept\r\ncache-control: public, max-age=0\r\ndate: Wed, 25 Nov 2026 12:00:00 GMT\r\n\r\nok"
	})
	s := startEdge(t, "services:\n  web: {static: ["+addr+"]}\nroutes: [{service: web}]\n")
	c, err := net.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	get := func() (*fasthttp.Response, string) {
		t.Helper()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "GET /page HTTP/1.1\r\nHost: shop.example\r\n\r\n")
		resp := &fasthttp.Response{}
		resp.Header.DisableNormalizing()
		if err := resp.Read(br); err != nil {
			t.Fatal(err)
		}
		return resp, resp.Header.String()
	}

	resp, hdr := get()
	if resp.StatusCode() != 200 || string(resp.Body()) != "ok" {
		t.Fatalf("got %d %q", resp.StatusCode(), resp.Body())
	}
	if !strings.Contains(hdr, "\r\nX-Odd-CASE: kept\r\n") {
		t.Errorf("header name not as the backend sent it:\n%s", hdr)
	}
	lower := strings.ToLower(hdr)
	for _, h := range []string{"\nx-foo:", "\nkeep-alive:", "\nproxy-connection:", "\nconnection:"} {
		if strings.Contains(lower, h) {
			t.Errorf("%q reached the client:\n%s", h[1:], hdr)
		}
	}
	if n := strings.Count(lower, "\ndate:"); n != 1 {
		t.Errorf("%d Date headers, want 1:\n%s", n, hdr)
	}

	// The backend is overloaded: its lower-case retry-after counts, and the
	// copy stored by its lower-case cache-control is served.
	busy.Store(true)
	resp, hdr = get()
	if resp.StatusCode() != 200 || string(resp.Body()) != "ok" || !strings.Contains(string(resp.Header.Peek("Cache-Status")), "detail=upstream_status_503") {
		t.Fatalf("want the stored copy, got %d %q:\n%s", resp.StatusCode(), resp.Body(), hdr)
	}
	if lower := strings.ToLower(hdr); strings.Contains(lower, "\nx-foo:") || strings.Count(lower, "\ndate:") != 1 {
		t.Errorf("stored copy kept what it must not:\n%s", hdr)
	}
	_, m := adminGet(t, s, "/metrics")
	if !strings.Contains(m, `edgelb_backend_errors_total{service="web",backend="`+addr+`",cause="overloaded"} 1`) {
		t.Errorf("a 503 with retry-after was not counted as overloaded:\n%s", m)
	}
}

func TestClassifyResponseAnyCase(t *testing.T) {
	f := func(raw string, want health.Outcome, wantRetry bool) {
		t.Helper()
		var resp fasthttp.Response
		resp.Header.DisableNormalizing()
		if err := resp.Read(bufio.NewReader(strings.NewReader(raw))); err != nil {
			t.Fatal(err)
		}
		if o, retry := classifyResponse(&resp); o != want || retry != wantRetry {
			t.Errorf("%q: got %v %v, want %v %v", raw, o, retry, want, wantRetry)
		}
	}
	f("HTTP/1.1 503 x\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n", health.OutcomeOverloaded, true)
	f("HTTP/1.1 503 x\r\nRETRY-AFTER: 1\r\ncontent-length: 0\r\n\r\n", health.OutcomeOverloaded, true)
	f("HTTP/1.1 503 x\r\ncontent-length: 0\r\n\r\n", health.OutcomeServerError, true)
	f("HTTP/1.1 200 x\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n", health.OutcomeSuccess, false)
}
