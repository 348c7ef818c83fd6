package balancer

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// askFrom sends raw to s from the loopback address ip and reads the
// answer.
func askFrom(t *testing.T, s *Server, ip, raw string) *fasthttp.Response {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	c, err := d.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	resp := &fasthttp.Response{}
	if err := resp.Read(bufio.NewReader(c)); err != nil {
		t.Fatalf("%q: %v", raw, err)
	}
	return resp
}

// headerValues returns every value of the header called name in a raw
// head, whatever its case.
func headerValues(head, name string) []string {
	var vs []string
	for _, l := range strings.Split(head, "\r\n")[1:] {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.EqualFold(k, name) {
			vs = append(vs, strings.TrimSpace(v))
		}
	}
	return vs
}

// A request ID from a trusted peer is kept when well-formed; from any
// other peer, or malformed, or repeated, it is replaced. Either way the
// backend gets exactly one, the client gets the same one back (never the
// backend's own), and the access log line names it.
func TestRequestIDTrust(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, func(c net.Conn, head string) {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nx-request-id: the-backend's-own\r\nContent-Length: 2\r\n\r\nok")
		})
		s, path := startLoggedEdge(t, "server: {"+engine+", trusted_proxies: [127.0.0.1]}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n", "")
		f := func(ip, hdr, want string) {
			t.Helper()
			resp := askFrom(t, s, ip, "GET /id HTTP/1.1\r\nHost: x\r\n"+hdr+"\r\n")
			if resp.StatusCode() != 200 {
				t.Fatalf("%s %q: status %d", ip, hdr, resp.StatusCode())
			}
			var got []string
			for k, v := range resp.Header.All() {
				if strings.EqualFold(string(k), "X-Request-Id") {
					got = append(got, string(v))
				}
			}
			up := headerValues(o.got()[len(o.got())-1], "X-Request-Id")
			switch {
			case len(got) != 1 || len(up) != 1 || got[0] != up[0]:
				t.Fatalf("%s %q: the client got request IDs %q, the backend %q", ip, hdr, got, up)
			case want == "" && !generatedID(got[0]):
				t.Errorf("%s %q: request ID %q, want one edgelb makes", ip, hdr, got[0])
			case want != "" && got[0] != want:
				t.Errorf("%s %q: request ID %q, want %q", ip, hdr, got[0], want)
			}
			waitLog(t, path, got[0])
		}
		f("127.0.0.1", "X-Request-Id: trace-7f3a/1\r\n", "trace-7f3a/1")
		f("127.0.0.1", "x-request-ID:  spaced-out \r\n", "spaced-out")
		f("127.0.0.1", "", "")
		f("127.0.0.2", "X-Request-Id: trace-7f3a/1\r\n", "")
		f("127.0.0.1", "X-Request-Id: "+strings.Repeat("a", maxRequestIDLen)+"\r\n", strings.Repeat("a", maxRequestIDLen))
		f("127.0.0.1", "X-Request-Id: "+strings.Repeat("a", maxRequestIDLen+1)+"\r\n", "")
		f("127.0.0.1", "X-Request-Id: two words\r\n", "")
		f("127.0.0.1", "X-Request-Id: caf\xc3\xa9\r\n", "")
		f("127.0.0.1", "X-Request-Id: a\r\nX-Request-Id: b\r\n", "")
		f("127.0.0.1", "X-Request-Id: \r\n", "")
	})
}

// request_id.header names another header; request_id: false adds none, and
// the client's goes upstream as any other header.
func TestRequestIDHeaderAndOff(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, echoPath)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\nrequest_id: {header: X-Correlation-ID}\n")
		resp := askFrom(t, s, "127.0.0.1", "GET /c HTTP/1.1\r\nHost: x\r\nX-Request-Id: passes\r\nX-Correlation-Id: replaced\r\n\r\n")
		id, head := string(resp.Header.Peek("X-Correlation-Id")), o.got()[0]
		if !generatedID(id) || headerValue(head, "X-Correlation-Id") != id || len(resp.Header.Peek("X-Request-Id")) != 0 {
			t.Errorf("X-Correlation-Id %q, upstream %q; X-Request-Id %q", id, headerValue(head, "X-Correlation-Id"), resp.Header.Peek("X-Request-Id"))
		}
		if v := headerValue(head, "X-Request-Id"); v != "passes" {
			t.Errorf("X-Request-Id upstream %q: it is an ordinary header here", v)
		}

		o2 := startRecOrigin(t, echoPath)
		s = startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o2.addr+"]}\nroutes: [{service: web}]\nrequest_id: false\n")
		resp = askFrom(t, s, "127.0.0.1", "GET /c HTTP/1.1\r\nHost: x\r\nX-Request-Id: client's\r\n\r\n")
		if v := resp.Header.Peek("X-Request-Id"); len(v) != 0 {
			t.Errorf("request_id: false, yet the answer has X-Request-Id %q", v)
		}
		if v := headerValues(o2.got()[0], "X-Request-Id"); len(v) != 1 || v[0] != "client's" {
			t.Errorf("request_id: false: upstream X-Request-Id %q, want the client's alone", v)
		}
		resp = askFrom(t, s, "127.0.0.1", "GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
		if v := headerValues(o2.got()[1], "X-Request-Id"); len(v) != 0 || len(resp.Header.Peek("X-Request-Id")) != 0 {
			t.Errorf("request_id: false: upstream %q, answer %q", v, resp.Header.Peek("X-Request-Id"))
		}
	})
}

// IDs edgelb makes differ from request to request, from engine to engine
// and from instance to instance.
func TestRequestIDsUnique(t *testing.T) {
	seen := map[string]string{}
	prefixes := map[string]bool{}
	for i := 0; i < 2; i++ {
		bothEngines(t, func(t *testing.T, engine string) {
			o := startRecOrigin(t, echoPath)
			s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
			c := dialEdge(t, s)
			defer c.Close()
			br := bufio.NewReader(c)
			for j := 0; j < 200; j++ {
				id := idOf(t, ask(t, c, br, "GET /u HTTP/1.1\r\nHost: x\r\n\r\n"))
				if !generatedID(id) {
					t.Fatalf("request ID %q", id)
				}
				where := fmt.Sprintf("instance %d %s request %d", i, engine, j)
				if prev, dup := seen[id]; dup {
					t.Fatalf("request ID %s given twice: %s and %s", id, prev, where)
				}
				seen[id] = where
				prefixes[id[:16]] = true
			}
		})
	}
	if len(prefixes) != 4 {
		t.Errorf("%d ID prefixes over 2 instances and 2 engines, want 4", len(prefixes))
	}
}

func TestValidRequestID(t *testing.T) {
	f := func(v string, want bool) {
		t.Helper()
		if got := validRequestID([]byte(v)); got != want {
			t.Errorf("%q: %v, want %v", v, got, want)
		}
	}
	f("abc", true)
	f("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", true)
	f(`!"#~`, true)
	f(strings.Repeat("x", maxRequestIDLen), true)
	f("", false)
	f(strings.Repeat("x", maxRequestIDLen+1), false)
	f("a b", false)
	f("a\tb", false)
	f("\x7f", false)
	f("é", false)
}
