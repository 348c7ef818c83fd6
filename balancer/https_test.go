package balancer

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"

	"github.com/valyala/fasthttp"
)

// TestHTTPSRedirect: on an https_redirect route a plain request of any
// method gets 308 to the same URL on the TLS listener's port and never
// reaches a backend, from either engine; over TLS, on other routes, and
// from a trusted proxy that terminated TLS it is forwarded.
func TestHTTPSRedirect(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startOrigin(t, "a", nil)
		pki := newTestPKI(t)
		cert, key := pki.issue("shop", "shop.example")
		s := startEdge(t, "server: {"+engine+"}\n"+tlsYAML("", cert, key)+"services:\n  web: {static: ["+o.addr+"]}\n"+
			"routes: [{host: shop.example, service: web, https_redirect: true}, {host: shop.example, path: /open, service: web}]\n")
		_, port, _ := net.SplitHostPort(s.TLSAddr())
		redirects := httpsRedirects.Get()
		f := func(raw, wantLocation string) {
			t.Helper()
			c := dialEdge(t, s)
			defer c.Close()
			io.WriteString(c, raw)
			resp := &fasthttp.Response{SkipBody: strings.HasPrefix(raw, "HEAD ")}
			if err := resp.Read(bufio.NewReader(c)); err != nil {
				t.Fatalf("%q: %v", raw, err)
			}
			if resp.StatusCode() != 308 || string(resp.Header.Peek("Location")) != wantLocation {
				t.Errorf("%q: %d Location %q, want 308 %q", raw, resp.StatusCode(), resp.Header.Peek("Location"), wantLocation)
			}
		}
		f("GET /a/b?x=1&y=%20 HTTP/1.1\r\nHost: Shop.Example:8080\r\n\r\n", "https://shop.example:"+port+"/a/b?x=1&y=%20")
		f("HEAD / HTTP/1.1\r\nHost: shop.example\r\n\r\n", "https://shop.example:"+port+"/")
		f("POST /form HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 3\r\n\r\nabc", "https://shop.example:"+port+"/form")
		f("GET http://shop.example/abs?q HTTP/1.1\r\nHost: shop.example\r\n\r\n", "https://shop.example:"+port+"/abs?q")
		// A client's X-Forwarded-Proto is not believed from an untrusted peer.
		f("GET /x HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-Proto: https\r\n\r\n", "https://shop.example:"+port+"/x")
		if got := httpsRedirects.Get() - redirects; got != 5 {
			t.Errorf("edgelb_https_redirects_total +%d, want +5", got)
		}
		if o.hits.Load() != 0 {
			t.Fatalf("redirected requests reached the origin %d times", o.hits.Load())
		}
		if resp := do(t, s, "GET", "shop.example", "/open/x"); resp.StatusCode() != 200 {
			t.Errorf("a route without https_redirect: %d", resp.StatusCode())
		}
		c := mustDialTLS(t, s, pki.client("shop.example"))
		if resp := c.get(t, "shop.example", "/a"); resp.StatusCode() != 200 || string(resp.Body()) != "hello from a" {
			t.Errorf("over TLS: %d %q", resp.StatusCode(), resp.Body())
		}

		// Behind a trusted proxy that terminated TLS, its
		// X-Forwarded-Proto: https stops the redirect, which would loop.
		tr := startEdge(t, "server: {"+engine+", trusted_proxies: [127.0.0.1]}\n"+tlsYAML("", cert, key)+"services:\n  web: {static: ["+o.addr+"]}\n"+
			"routes: [{host: shop.example, service: web, https_redirect: true}]\n")
		if resp := do(t, tr, "GET", "shop.example", "/p", "X-Forwarded-Proto", "https"); resp.StatusCode() != 200 {
			t.Errorf("trusted proxy, X-Forwarded-Proto https: %d, want 200", resp.StatusCode())
		}
		if resp := do(t, tr, "GET", "shop.example", "/p", "X-Forwarded-Proto", "http"); resp.StatusCode() != 308 {
			t.Errorf("trusted proxy, X-Forwarded-Proto http: %d, want 308", resp.StatusCode())
		}
	})
}

// TestHTTPSRedirectPort443: the default HTTPS port is left out of Location.
func TestHTTPSRedirectPort443(t *testing.T) {
	s := &Server{tls: &tlsState{}}
	ctx := &fasthttp.RequestCtx{}
	ctx.Request.SetRequestURI("/p?q=1")
	s.redirectHTTPS(ctx, []byte("shop.example"))
	if got := string(ctx.Response.Header.Peek("Location")); got != "https://shop.example/p?q=1" {
		t.Errorf("Location %q", got)
	}
	ctx.Response.Reset()
	s.redirectHTTPS(ctx, []byte("[::1]"))
	if got := string(ctx.Response.Header.Peek("Location")); got != "https://[::1]/p?q=1" {
		t.Errorf("Location %q", got)
	}
}

// TestHSTS: a route's hsts goes on its responses over TLS only, in place
// of a Strict-Transport-Security the backend sent in any case, also on
// answers edgelb makes; plain responses get none from either engine.
func TestHSTS(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, func(c net.Conn, head string) {
			body := "ok"
			io.WriteString(c, "HTTP/1.1 200 OK\r\nstrict-transport-security: max-age=5\r\nContent-Length: "+fmt.Sprint(len(body))+"\r\n\r\n"+body)
		})
		pki := newTestPKI(t)
		cert, key := pki.issue("shop", "shop.example", "other.example")
		s := startEdge(t, "server: {"+engine+"}\n"+tlsYAML("", cert, key)+"services:\n  web: {static: ["+o.addr+"]}\n  dead: {static: ["+deadAddr(t)+"], retries: -1}\n"+
			"routes: [{host: shop.example, service: web, hsts: {max_age: 1y, include_subdomains: true}}, {host: other.example, service: web},"+
			" {host: shop.example, path: /down, service: dead, hsts: {max_age: 1d}}]\n")
		sts := func(resp *fasthttp.Response) []string {
			var v []string
			for k, val := range resp.Header.All() {
				if strings.EqualFold(string(k), "Strict-Transport-Security") {
					v = append(v, string(val))
				}
			}
			return v
		}
		check := func(what string, resp *fasthttp.Response, want ...string) {
			t.Helper()
			if got := sts(resp); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("%s: Strict-Transport-Security %q, want %q", what, got, want)
			}
		}
		plain, err := rawRequest(t, s, "GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")
		if err != nil || plain.StatusCode() != 200 {
			t.Fatalf("plain: %v %d", err, plain.StatusCode())
		}
		check("plain HTTP, hsts route", plain, "max-age=5")
		c := mustDialTLS(t, s, pki.client("shop.example"))
		check("TLS, hsts route", c.get(t, "shop.example", "/"), "max-age=31536000; includeSubDomains")
		check("TLS, route without hsts", c.get(t, "other.example", "/"), "max-age=5")
		down := c.get(t, "shop.example", "/down")
		if down.StatusCode() != 502 {
			t.Fatalf("TLS, dead backend: %d", down.StatusCode())
		}
		check("TLS, an error edgelb made", down, "max-age=86400")
	})
}
