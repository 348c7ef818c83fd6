package balancer

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// adminRaw writes raw to the admin listener on a new connection and reads
// one response.
func adminRaw(t *testing.T, s *Server, raw string) (*http.Response, string) {
	t.Helper()
	c, err := net.Dial("tcp", s.AdminAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(raw)); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("%q: %v", raw, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

// staleEdge starts an edge whose only origin has gone after one response
// was stored, so that GET /page is served from the stale store until the
// store is purged. stillStored reports whether it still is.
func staleEdge(t *testing.T, yaml string) (s *Server, stillStored func() bool) {
	t.Helper()
	o := startOrigin(t, "o", nil)
	s = startEdge(t, yaml+"services:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	if resp := do(t, s, "GET", "shop.example", "/page"); resp.StatusCode() != 200 {
		t.Fatalf("priming: %d", resp.StatusCode())
	}
	o.stop()
	stillStored = func() bool {
		resp := do(t, s, "GET", "shop.example", "/page")
		return resp.StatusCode() == 200 && strings.HasPrefix(string(resp.Header.Peek("Cache-Status")), "edgelb; hit")
	}
	if !stillStored() {
		t.Fatal("the stored copy is not served during the outage")
	}
	return s, stillStored
}

func TestAdminRefusesForeignHost(t *testing.T) {
	s, stillStored := staleEdge(t, "admin_hosts: [Edge-1.Internal]\n")
	port := s.AdminAddr()[strings.LastIndexByte(s.AdminAddr(), ':')+1:]
	f := func(host string, want int) {
		t.Helper()
		resp, body := adminRaw(t, s, "GET /status HTTP/1.1\r\nHost: "+host+"\r\nConnection: close\r\n\r\n")
		if resp.StatusCode != want {
			t.Fatalf("Host %q: %d %q, want %d", host, resp.StatusCode, body, want)
		}
		if want == http.StatusMisdirectedRequest && (!strings.Contains(body, fmt.Sprintf("%q", host)) || !strings.Contains(body, "admin_hosts")) {
			t.Fatalf("Host %q: the answer does not say what is wrong: %q", host, body)
		}
	}
	// DNS rebinding: the attacker's name now resolves to this machine.
	f("evil.example", 421)
	f("evil.example:"+port, 421)
	f("127.0.0.1.evil.example:"+port, 421)
	f("localhost.evil.example", 421)
	// The admin address, loopback names and IP addresses, with or without
	// a port, and names listed in admin_hosts.
	f(s.AdminAddr(), 200)
	f("127.0.0.1", 200)
	f("localhost:"+port, 200)
	f("LOCALHOST", 200)
	f("[::1]:"+port, 200)
	f("[::1]", 200)
	f("10.1.2.3:"+port, 200)
	f("edge-1.internal:"+port, 200)
	f("EDGE-1.internal", 200)

	// A rebinding page cannot purge either, with or without a body.
	resp, body := adminRaw(t, s, "POST /cache/purge HTTP/1.1\r\nHost: evil.example:"+port+"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
	if resp.StatusCode != 421 {
		t.Fatalf("purge from a rebinding page: %d %q", resp.StatusCode, body)
	}
	resp, body = adminRaw(t, s, "POST /cache/purge HTTP/1.1\r\nHost: evil.example:"+port+"\r\nOrigin: http://evil.example:"+port+
		"\r\nSec-Fetch-Site: same-origin\r\nContent-Type: text/plain\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")
	if resp.StatusCode != 421 {
		t.Fatalf("same-origin purge from a rebinding page: %d %q", resp.StatusCode, body)
	}
	if !stillStored() {
		t.Fatal("a refused purge purged the stale store")
	}
	_, m := adminGet(t, s, "/metrics")
	if !strings.Contains(m, `edgelb_admin_requests_refused_total{reason="host"}`) {
		t.Fatal("/metrics lacks the refused requests")
	}
}

func TestAdminRefusesCrossOriginWrites(t *testing.T) {
	s, stillStored := staleEdge(t, "")
	admin := s.AdminAddr()
	f := func(raw string, want int, wantBody string) {
		t.Helper()
		resp, body := adminRaw(t, s, raw)
		if resp.StatusCode != want || !strings.Contains(body, wantBody) {
			t.Fatalf("%q:\ngot %d %q, want %d %q", raw, resp.StatusCode, body, want, wantBody)
		}
	}
	// A page on another site posts text/plain (fetch with mode no-cors).
	f("POST /cache/purge HTTP/1.1\r\nHost: "+admin+"\r\nOrigin: http://evil.example\r\nContent-Type: text/plain;charset=UTF-8\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
		403, `Origin "http://evil.example"`)
	// Its form, in a browser that sends no Origin.
	f("POST /cache/purge HTTP/1.1\r\nHost: "+admin+"\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 3\r\nConnection: close\r\n\r\na=1",
		403, "X-Edgelb-Admin")
	f("POST /cache/purge HTTP/1.1\r\nHost: "+admin+"\r\nContent-Type: Multipart/Form-Data; boundary=x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
		403, "X-Edgelb-Admin")
	// Credentials a browser attaches by itself prove nothing.
	f("POST /cache/purge HTTP/1.1\r\nHost: "+admin+"\r\nAuthorization: Basic YTpi\r\nContent-Type: text/plain\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
		403, "X-Edgelb-Admin")
	// A page on the client-facing listener: same site, another origin.
	f("POST /cache/purge HTTP/1.1\r\nHost: "+admin+"\r\nOrigin: http://"+s.Addr()+"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
		403, "cross-origin")
	f("POST /cache/purge HTTP/1.1\r\nHost: "+admin+"\r\nSec-Fetch-Site: cross-site\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
		403, "Sec-Fetch-Site")
	f("POST /cache/purge HTTP/1.1\r\nHost: "+admin+"\r\nOrigin: null\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
		403, "cross-origin")
	// Profiles are not made for pages of other sites, whatever the method.
	f("GET /debug/pprof/profile?seconds=1 HTTP/1.1\r\nHost: "+admin+"\r\nSec-Fetch-Site: cross-site\r\nConnection: close\r\n\r\n",
		403, "profiles")
	if !stillStored() {
		t.Fatal("a refused purge purged the stale store")
	}

	// Purges of a URL that is not stored: accepted, the stored copy stays.
	other := "/cache/purge?url=http://other.example/"
	f("POST "+other+" HTTP/1.1\r\nHost: "+admin+"\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\nConnection: close\r\n\r\n", 200, "purged")
	f("POST "+other+" HTTP/1.1\r\nHost: "+admin+"\r\nContent-Type: application/x-www-form-urlencoded\r\nX-Edgelb-Admin: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 200, "purged")
	f("POST "+other+" HTTP/1.1\r\nHost: "+admin+"\r\nAuthorization: Bearer anything\r\nContent-Type: text/plain\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 200, "purged")
	f("POST "+other+" HTTP/1.1\r\nHost: "+admin+"\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}", 200, "purged")
	f("POST "+other+" HTTP/1.1\r\nHost: "+admin+"\r\nOrigin: http://"+admin+"\r\nContent-Type: text/plain\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 200, "purged")
	f("POST "+other+" HTTP/1.1\r\nHost: localhost\r\nSec-Fetch-Site: same-origin\r\nOrigin: http://localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 200, "purged")
	if !stillStored() {
		t.Fatal("a purge of another URL purged the stored copy")
	}

	// curl -X POST http://ADMIN/cache/purge, byte for byte.
	f("POST /cache/purge HTTP/1.1\r\nHost: "+admin+"\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n", 200, "purged all")
	if stillStored() {
		t.Fatal("still served after the purge")
	}
	_, m := adminGet(t, s, "/metrics")
	if !strings.Contains(m, `edgelb_admin_requests_refused_total{reason="cross_origin"}`) {
		t.Fatal("/metrics lacks the refused requests")
	}
}

func TestAdminToken(t *testing.T) {
	const token = "0123456789abcdef-token"
	s, stillStored := staleEdge(t, "admin_token: "+token+"\n")
	admin := s.AdminAddr()
	f := func(method, path, auth string, want int) *http.Response {
		t.Helper()
		raw := method + " " + path + " HTTP/1.1\r\nHost: " + admin + "\r\n"
		if auth != "" {
			raw += "Authorization: " + auth + "\r\n"
		}
		resp, body := adminRaw(t, s, raw+"Connection: close\r\n\r\n")
		if resp.StatusCode != want {
			t.Fatalf("%s %s with %q: %d %q, want %d", method, path, auth, resp.StatusCode, body, want)
		}
		if want == 401 && !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer ") {
			t.Fatalf("%s %s: 401 without WWW-Authenticate: Bearer: %q", method, path, resp.Header)
		}
		return resp
	}
	f("GET", "/healthz", "", 200)
	for _, p := range []string{"/metrics", "/status", "/readyz", "/debug/pprof/", "/debug/pprof/heap"} {
		f("GET", p, "", 401)
		f("GET", p, "Basic "+token, 401)
		if resp := f("GET", p, "Bearer wrong-0123456789abcdef", 401); !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) {
			t.Fatalf("wrong token: WWW-Authenticate %q", resp.Header.Get("WWW-Authenticate"))
		}
		f("GET", p, "Bearer "+token+"x", 401)
		f("GET", p, "Bearer "+token, 200)
	}
	f("GET", "/status", "bearer "+token, 200)
	f("POST", "/cache/purge", "", 401)
	f("POST", "/cache/purge", "Bearer "+token[:len(token)-1], 401)
	if !stillStored() {
		t.Fatal("a purge without the token purged the stale store")
	}
	f("POST", "/cache/purge", "Bearer "+token, 200)
	if stillStored() {
		t.Fatal("still served after a purge with the token")
	}
}

func TestAdminTokenReload(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "token")
	o := startOrigin(t, "o", nil)
	yaml := "state_dir: " + dir + "\nadmin_token_file: " + file + "\nservices:\n  web: {static: " + staticList(o) + "}\nroutes: [{service: web}]\n"
	writeToken := func(tok string) {
		if err := os.WriteFile(file, []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeToken("first-token-0123456789")
	s := startEdge(t, yaml)
	status := func(tok string) int {
		t.Helper()
		resp, _ := adminRaw(t, s, "GET /status HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "+tok+"\r\nConnection: close\r\n\r\n")
		return resp.StatusCode
	}
	if a, b := status("first-token-0123456789"), status("second-token-0123456789"); a != 200 || b != 401 {
		t.Fatalf("first token: %d, second: %d", a, b)
	}
	writeToken("second-token-0123456789")
	if err := s.Reload(mustConfig(t, "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n"+yaml)); err != nil {
		t.Fatal(err)
	}
	if a, b := status("first-token-0123456789"), status("second-token-0123456789"); a != 401 || b != 200 {
		t.Fatalf("after the reload, first token: %d, second: %d", a, b)
	}
}
