package balancer

import (
	"net/http"
	"strings"
	"testing"
)

// TestStatusPageServed: the page and its files come from the binary at /
// and /ui, with a policy that keeps it to its own origin, and without the
// admin token, which the page asks for; everything with data still wants
// the token.
func TestStatusPageServed(t *testing.T) {
	const token = "0123456789abcdef-token"
	o := startOrigin(t, "o", nil)
	s := startEdge(t, "admin_token: "+token+"\nservices:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	admin := s.AdminAddr()
	f := func(path string, want int, wantType, wantBody string) *http.Response {
		t.Helper()
		resp, body := adminRaw(t, s, "GET "+path+" HTTP/1.1\r\nHost: "+admin+"\r\nConnection: close\r\n\r\n")
		if resp.StatusCode != want {
			t.Fatalf("GET %s: %d %q, want %d", path, resp.StatusCode, body, want)
		}
		if ct := resp.Header.Get("Content-Type"); want == 200 && ct != wantType {
			t.Fatalf("GET %s: Content-Type %q, want %q", path, ct, wantType)
		}
		if !strings.Contains(body, wantBody) {
			t.Fatalf("GET %s: body lacks %q:\n%s", path, wantBody, body)
		}
		return resp
	}
	for _, p := range []string{"/", "/ui"} {
		resp := f(p, 200, "text/html; charset=utf-8", `<script src="ui/app.js"`)
		for h, want := range map[string]string{
			"Content-Security-Policy": "connect-src 'self'",
			"X-Frame-Options":         "DENY",
			"Referrer-Policy":         "no-referrer",
			"X-Content-Type-Options":  "nosniff",
		} {
			if !strings.Contains(resp.Header.Get(h), want) {
				t.Fatalf("GET %s: %s %q, want %q in it", p, h, resp.Header.Get(h), want)
			}
		}
		if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") || !strings.Contains(csp, "frame-ancestors 'none'") {
			t.Fatalf("GET %s: Content-Security-Policy %q", p, csp)
		}
	}
	f("/ui/app.js", 200, "text/javascript; charset=utf-8", "status?rates=1")
	f("/ui/style.css", 200, "text/css; charset=utf-8", ".badge")
	// Only those paths: the rest of the admin API still wants the token,
	// and no other file is served.
	f("/status", 401, "", "missing token")
	f("/status?rates=1", 401, "", "missing token")
	f("/ui/", 401, "", "missing token")
	f("/ui/index.html", 401, "", "missing token")
	f("/ui/../status", 401, "", "missing token")
	f("/favicon.ico", 401, "", "missing token")
	// A rebinding page gets no page either.
	resp, _ := adminRaw(t, s, "GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
	if resp.StatusCode != http.StatusMisdirectedRequest {
		t.Fatalf("GET / with a foreign Host: %d", resp.StatusCode)
	}
}
