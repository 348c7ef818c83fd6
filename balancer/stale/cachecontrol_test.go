package stale

import (
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

func TestParseCacheControl(t *testing.T) {
	f := func(v string, want cacheControl) {
		t.Helper()
		var cc cacheControl
		cc.reset()
		cc.parse([]byte(v))
		if cc != want {
			t.Errorf("%q: got %+v, want %+v", v, cc, want)
		}
	}
	none := func(set func(*cacheControl)) cacheControl {
		var cc cacheControl
		cc.reset()
		set(&cc)
		return cc
	}
	f("", none(func(*cacheControl) {}))
	f("no-store", none(func(cc *cacheControl) { cc.noStore = true }))
	f("Public, MAX-AGE=60", none(func(cc *cacheControl) { cc.public, cc.maxAge = true, 60 }))
	f(`max-age="30", s-maxage=5`, none(func(cc *cacheControl) { cc.maxAge, cc.sMaxAge = 30, 5 }))
	f("max-age=10, max-age=20", none(func(cc *cacheControl) { cc.maxAge = 10 }))
	f("max-age=abc", none(func(cc *cacheControl) { cc.maxAge = 0 }))
	f("max-age=99999999999999999999", none(func(cc *cacheControl) { cc.maxAge = maxDeltaSeconds }))
	f(`private="Set-Cookie, X-Id", max-age=9`, none(func(cc *cacheControl) { cc.private, cc.maxAge = true, 9 }))
	f(`no-cache="a,b"`, none(func(cc *cacheControl) { cc.noCache = true }))
	f("must-revalidate,proxy-revalidate", none(func(cc *cacheControl) { cc.mustRevalidate, cc.proxyRevalidate = true, true }))
	f(" stale-if-error = 600 , stale-while-revalidate=5", none(func(cc *cacheControl) { cc.staleIfError = 600 }))
	f(`x-ext="unterminated, no-store`, none(func(*cacheControl) {}))
	f(",,,", none(func(*cacheControl) {}))
}

func TestFreshness(t *testing.T) {
	now := t0
	in := func(d time.Duration) string { return string(fasthttp.AppendHTTPDate(nil, now.Add(d))) }
	date := in(0)
	f := func(want int64, hdr ...string) {
		t.Helper()
		// Parsed, since fasthttp drops a Date set by hand.
		raw := "HTTP/1.1 200 OK\r\n"
		for i := 0; i+1 < len(hdr); i += 2 {
			raw += hdr[i] + ": " + hdr[i+1] + "\r\n"
		}
		resp := parseResp(t, raw+"Content-Length: 0\r\n\r\n")
		var ri respInfo
		ri.scan(&resp.Header, nil)
		ri.parseCacheControl(&resp.Header)
		if got := ri.freshness(now); got != want {
			t.Errorf("%q: freshness %d, want %d", hdr, got, want)
		}
	}
	f(0)
	f(60, "Cache-Control", "max-age=60")
	f(10, "Cache-Control", "max-age=60, s-maxage=10")
	f(30, "Cache-Control", "public", "cache-control", "max-age=30", "Cache-Control", "max-age=90")
	f(60, "Cache-Control", "max-age=60", "Expires", in(time.Hour))
	f(3600, "Date", date, "Expires", in(time.Hour))
	f(300, "Date", in(-5*time.Minute), "Expires", date) // Date-relative, not clock-relative
	f(0, "Expires", in(-time.Hour))
	f(0, "Expires", "0")
	f(3600, "Date", now.UTC().Format(time.RFC850), "Expires", now.Add(time.Hour).UTC().Format(time.ANSIC)) // obsolete formats
	f(120, "Expires", in(2*time.Minute))                                                                   // no Date: now
}

func TestStorable(t *testing.T) {
	s := newStore(Config{})
	f := func(req, resp string, want bool) {
		t.Helper()
		rq := parseReq(t, req)
		rs := parseResp(t, resp)
		if got := s.Storable(rq, rs); got != want {
			t.Errorf("Storable(%q, %q) = %v, want %v", req, resp, got, want)
		}
		// Save agrees.
		s2 := newStore(Config{})
		s2.Save(t0, schemeHTTP, rq, rs)
		rq.Header.SetMethod("GET")
		got, _ := serve(s2, t0, rq, Policy{MaxStale: time.Hour, IgnoreRevalidate: true})
		if (got != "miss") != want {
			t.Errorf("Save(%q, %q): stored=%v, want %v", req, resp, got != "miss", want)
		}
	}
	const get = "GET / HTTP/1.1\r\nHost: a\r\n\r\n"
	ok := func(hdr string) string { return "HTTP/1.1 200 OK\r\n" + hdr + "Content-Length: 1\r\n\r\nx" }
	f(get, ok(""), true)
	f(get, ok("Cache-Control: max-age=60\r\n"), true)
	f(get, "HTTP/1.1 404 Not Found\r\nContent-Length: 1\r\n\r\nx", true)
	f(get, "HTTP/1.1 410 Gone\r\nContent-Length: 1\r\n\r\nx", true)
	f(get, "HTTP/1.1 301 Moved\r\nLocation: /b\r\nContent-Length: 0\r\n\r\n", true)
	f(get, "HTTP/1.1 204 No Content\r\n\r\n", true)
	f(get, "HTTP/1.1 500 Oops\r\nContent-Length: 1\r\n\r\nx", false)
	f(get, "HTTP/1.1 503 Busy\r\nContent-Length: 1\r\n\r\nx", false)
	f(get, "HTTP/1.1 206 Partial\r\nContent-Range: bytes 0-0/2\r\nContent-Length: 1\r\n\r\nx", false)
	f(get, "HTTP/1.1 302 Found\r\nLocation: /b\r\nContent-Length: 0\r\n\r\n", false)
	f("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", ok(""), false)
	f("HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", ok(""), false)
	f(get, ok("Cache-Control: no-store\r\n"), false)
	f(get, ok("Cache-Control: max-age=60\r\nCache-Control: no-store\r\n"), false)
	f(get, ok("cache-control: NO-STORE\r\n"), false)
	f(get, ok("Cache-Control: private, max-age=60\r\n"), false)
	f(get, ok(`Cache-Control: private="Set-Cookie"`+"\r\n"), false)
	f(get, ok("Set-Cookie: sid=1\r\n"), false)
	f(get, ok("Vary: *\r\n"), false)
	f(get, ok("Vary: Accept, *\r\n"), false)
	f(get, ok("Vary: Accept\r\nVary: *\r\n"), false)
	f(get, ok("Vary: Accept-Encoding\r\n"), true)
	f("GET / HTTP/1.1\r\nHost: a\r\nCache-Control: no-store\r\n\r\n", ok(""), false)
	f("GET / HTTP/1.1\r\nHost: a\r\nCache-Control: no-cache\r\n\r\n", ok(""), true)
	const authz = "GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\n\r\n"
	f(authz, ok(""), false)
	f(authz, ok("Cache-Control: max-age=60\r\n"), false)
	f(authz, ok("Cache-Control: public\r\n"), true)
	f(authz, ok("Cache-Control: s-maxage=10\r\n"), true)
	f(authz, ok("Cache-Control: must-revalidate\r\n"), true)
	f(authz, ok("Cache-Control: proxy-revalidate\r\n"), false)
}
