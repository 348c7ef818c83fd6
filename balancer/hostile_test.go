package balancer

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/discovery"
)

// Hostile client input, sent as raw bytes to both engines: what the client
// gets, what the origin receives, and that no backend's health changes
// when the backend did nothing wrong.

// bothEngines runs f once with the event loop on and once with it off;
// engine is the server key that says which, for the config's server map.
func bothEngines(t *testing.T, f func(t *testing.T, engine string)) {
	for _, on := range []bool{true, false} {
		name := "event_loop"
		if !on {
			name = "fasthttp"
		}
		t.Run(name, func(t *testing.T) {
			f(t, fmt.Sprintf("event_loop: %v", on))
		})
	}
}

// recOrigin is a TCP origin that records every request head it receives
// and answers with reply(head), which may write anything.
type recOrigin struct {
	addr  string
	mu    sync.Mutex
	heads []string
}

func startRecOrigin(t *testing.T, reply func(c net.Conn, head string)) *recOrigin {
	t.Helper()
	o := &recOrigin{}
	o.addr = serveRaw(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		for {
			h, err := readRequest(br)
			if err != nil {
				return
			}
			o.mu.Lock()
			o.heads = append(o.heads, h)
			o.mu.Unlock()
			reply(c, h)
		}
	})
	return o
}

// readRequest reads one request from br and returns its head; a body with
// a Content-Length is read and dropped.
func readRequest(br *bufio.Reader) (string, error) {
	var head strings.Builder
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return "", err
		}
		head.WriteString(line)
		if line == "\r\n" {
			break
		}
	}
	h := head.String()
	if cl := headerValue(h, "Content-Length"); cl != "" {
		n, _ := strconv.Atoi(cl)
		if _, err := io.CopyN(io.Discard, br, int64(n)); err != nil {
			return "", err
		}
	}
	return h, nil
}

func (o *recOrigin) got() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]string(nil), o.heads...)
}

// headerValue returns the value of the first header called name in a raw
// head, whatever its case.
func headerValue(head, name string) string {
	for _, l := range strings.Split(head, "\r\n")[1:] {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.EqualFold(k, name) {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// pathOf returns the request target of a raw head.
func pathOf(head string) string {
	f := strings.Fields(strings.SplitN(head, "\r\n", 2)[0])
	if len(f) < 2 {
		return ""
	}
	return f[1]
}

// echoPath answers every request with its target as the body.
func echoPath(c net.Conn, head string) {
	p := pathOf(head)
	fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nCache-Control: max-age=0\r\n\r\n%s", len(p), p)
}

// assertAllHealthy fails unless every backend in /status is healthy.
func assertAllHealthy(t *testing.T, s *Server) {
	t.Helper()
	code, body := adminGet(t, s, "/status")
	if code != 200 {
		t.Fatalf("/status: %d", code)
	}
	for _, bad := range []string{`"ejected"`, `"unhealthy"`, `"panic":true`} {
		if strings.Contains(body, bad) {
			t.Fatalf("a client's request changed backend health: /status has %s:\n%s", bad, body)
		}
	}
}

// Requests edgelb cannot send are the client's fault: 400, never a
// backend's failure. Before, three of them ejected every backend.
func TestUnsendableRequestsEjectNobody(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		var origins []*recOrigin
		var addrs []string
		for range 3 {
			o := startRecOrigin(t, echoPath)
			origins = append(origins, o)
			addrs = append(addrs, o.addr)
		}
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+strings.Join(addrs, ", ")+"]}\nroutes: [{service: web}]\n")
		seen := func() int {
			n := 0
			for _, o := range origins {
				n += len(o.got())
			}
			return n
		}
		for i := 0; i < 10; i++ {
			resp, err := rawRequest(t, s, "GET / HTTP/1.0\r\n\r\n")
			if err != nil || resp.StatusCode() != 400 {
				t.Fatalf("no Host: %v %d, want 400", err, statusOf(resp))
			}
		}
		if n := seen(); n != 0 {
			t.Fatalf("origins got %d requests without a Host", n)
		}
		// An absolute-form target with the https scheme on a plain
		// listener is forwarded, in origin form, with its authority.
		for i := 0; i < 10; i++ {
			resp, err := rawRequest(t, s, "GET https://x/p HTTP/1.1\r\nHost: x\r\n\r\n")
			if err != nil || resp.StatusCode() != 200 || string(resp.Body()) != "/p" {
				t.Fatalf("absolute https target: %v %d %q", err, statusOf(resp), bodyOf(resp))
			}
		}
		assertAllHealthy(t, s)
		resp, err := rawRequest(t, s, "GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
		if err != nil || resp.StatusCode() != 200 {
			t.Fatalf("after: %v %d", err, statusOf(resp))
		}
	})
}

// A response over max_response_body is edgelb's own limit: 502 with its
// own code, asked once, and no health failure.
func TestOversizedResponseIsNoHealthFailure(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		big := strings.Repeat("x", 64<<10)
		o := startRecOrigin(t, func(c net.Conn, head string) {
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(big), big)
		})
		o2 := startRecOrigin(t, func(c net.Conn, head string) {
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(big), big)
		})
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+", "+o2.addr+"], max_response_body: 1024, stale: {disabled: true},"+
			" health: {passive: {consecutive_gateway_failures: 1}}}\nroutes: [{service: web}]\n")
		for i := 0; i < 6; i++ {
			resp, err := rawRequest(t, s, "POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
			if err != nil || resp.StatusCode() != 502 || string(resp.Header.Peek(HeaderError)) != "upstream_response_too_large" {
				t.Fatalf("POST: %v %d %q", err, statusOf(resp), resp.Header.Peek(HeaderError))
			}
		}
		if n := len(o.got()) + len(o2.got()); n != 6 {
			t.Fatalf("origins were asked %d times for 6 requests; an oversized answer is not retried", n)
		}
		assertAllHealthy(t, s)
	})
	// A backend that echoes a long URL into its head (a redirect's
	// Location) past edgelb's head buffer is not ejected for it.
	bothEngines(t, func(t *testing.T, engine string) {
		var addrs []string
		var origins []*recOrigin
		for range 3 {
			o := startRecOrigin(t, func(c net.Conn, head string) {
				fmt.Fprintf(c, "HTTP/1.1 301 Moved\r\nLocation: https://x%s/\r\nX-Pad: %s\r\nContent-Length: 0\r\n\r\n", pathOf(head), strings.Repeat("p", 1500))
			})
			origins = append(origins, o)
			addrs = append(addrs, o.addr)
		}
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+strings.Join(addrs, ", ")+"], stale: {disabled: true}}\nroutes: [{service: web}]\n")
		long := "/redir/" + strings.Repeat("a", 15000)
		for i := 0; i < 6; i++ {
			resp, err := rawRequest(t, s, "GET "+long+" HTTP/1.1\r\nHost: x\r\n\r\n")
			if err != nil || resp.StatusCode() != 502 || string(resp.Header.Peek(HeaderError)) != "upstream_response_too_large" {
				t.Fatalf("long redirect: %v %d %q", err, statusOf(resp), resp.Header.Peek(HeaderError))
			}
		}
		assertAllHealthy(t, s)
		resp, err := rawRequest(t, s, "GET /redir/short HTTP/1.1\r\nHost: x\r\n\r\n")
		if err != nil || resp.StatusCode() != 301 {
			t.Fatalf("short redirect: %v %d", err, statusOf(resp))
		}
	})
}

// A backend that writes past its response (a HEAD body sent later, bytes
// past Content-Length) must never answer the next, unrelated client.
func TestResponseQueuePoisoning(t *testing.T) {
	const poison = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, func(c net.Conn, head string) {
			switch pathOf(head) {
			case "/head-later":
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 46\r\n\r\n")
				time.Sleep(30 * time.Millisecond)
				io.WriteString(c, poison)
			case "/surplus":
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"+poison)
			default:
				echoPath(c, head)
			}
		})
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"], stale: {disabled: true}}\nroutes: [{service: web}]\n")
		for _, attack := range []string{
			"HEAD /head-later HTTP/1.1\r\nHost: x\r\n\r\n",
			"POST /head-later HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
			"GET /surplus HTTP/1.1\r\nHost: x\r\n\r\n",
			"POST /surplus HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
		} {
			exchange(t, s, attack, false, 1)
			time.Sleep(60 * time.Millisecond) // the late bytes arrive
			for i := 0; i < 5; i++ {
				for _, m := range []string{"GET", "POST"} {
					p := fmt.Sprintf("/victim-%s-%d", m, i)
					resp, err := rawRequest(t, s, m+" "+p+" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
					if err != nil || resp.StatusCode() != 200 || string(resp.Body()) != p {
						t.Fatalf("after %q, %s %s got %v %d %q", attack, m, p, err, statusOf(resp), bodyOf(resp))
					}
				}
			}
		}
		assertAllHealthy(t, s)
	})
}

// X-Forwarded-* and Forwarded are edgelb's: an untrusted client's copies
// and '_' look-alikes never reach the backend; a trusted proxy's chain is
// extended.
func TestForwardingHeadersCannotBeSpoofed(t *testing.T) {
	const spoof = "X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Proto: https\r\n" +
		"X-Forwarded-Host: evil.example\r\nX_Forwarded_For: 6.6.6.6\r\nX_Forwarded_Host: evil.example\r\nX-Forwarded_Proto: https\r\n" +
		"Forwarded: for=6.6.6.6;host=evil.example;proto=https\r\n" +
		"X-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /admin\r\nX-Forwarded-Ssl: on\r\nX-Real-IP: 6.6.6.6\r\nx_forwarded_port: 443\r\n"
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, echoPath)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
		// Connection cannot remove Host from what edgelb forwards.
		resp, err := rawRequest(t, s, "GET /ch HTTP/1.1\r\nHost: shop.example\r\nConnection: Host, Content-Length\r\n\r\n")
		if err != nil || resp.StatusCode() != 200 {
			t.Fatalf("Connection: Host: %v %d", err, statusOf(resp))
		}
		if h := o.got()[0]; headerValue(h, "Host") != "shop.example" || headerValue(h, "X-Forwarded-Host") != "shop.example" ||
			!strings.Contains(h, `host="shop.example"`) {
			t.Fatalf("Connection: Host: origin got\n%s", h)
		}
		for _, m := range []string{"GET", "POST"} {
			resp, err := rawRequest(t, s, m+" /f HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 0\r\n"+spoof+"\r\n")
			if err != nil || resp.StatusCode() != 200 {
				t.Fatalf("%s: %v %d", m, err, statusOf(resp))
			}
			hs := o.got()
			h := hs[len(hs)-1]
			for _, bad := range []string{"6.6.6.6", "10.0.0.1", "evil.example", "https", "X_", "_Proto"} {
				if strings.Contains(h, bad) {
					t.Errorf("%s: %q reached the origin:\n%s", m, bad, h)
				}
			}
			for _, want := range []string{"X-Forwarded-For: 127.0.0.1\r\n", "X-Forwarded-Proto: http\r\n",
				"X-Forwarded-Host: shop.example\r\n", "Forwarded: for=127.0.0.1;host=\"shop.example\";proto=http\r\n"} {
				if strings.Count(h, want) != 1 {
					t.Errorf("%s: origin got %q %d times, want once:\n%s", m, want, strings.Count(h, want), h)
				}
			}
			for name, want := range map[string]int{"X-Forwarded-For:": 1, "X-Forwarded-Proto:": 1, "X-Forwarded-Host:": 1, "Forwarded:": 1,
				"X-Forwarded-Port:": 0, "X-Forwarded-Prefix:": 0, "X-Forwarded-Ssl:": 0, "X-Real-Ip:": 0, "x_forwarded_port:": 0} {
				if n := strings.Count(strings.ToLower(h), "\n"+strings.ToLower(name)); n != want {
					t.Errorf("%s: %d %s headers reached the origin, want %d:\n%s", m, n, name, want, h)
				}
			}
		}
	})
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, echoPath)
		s := startEdge(t, "server: {"+engine+", trusted_proxies: [127.0.0.1]}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
		for _, tc := range []struct{ extra, want string }{
			{"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n",
				"X-Forwarded-For: 203.0.113.9, 127.0.0.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: shop.example\r\n"},
			{"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 203.0.113.9\r\nForwarded: for=10.0.0.1\r\n",
				"X-Forwarded-For: 10.0.0.1, 203.0.113.9, 127.0.0.1\r\n"},
			{"X-Forwarded-Port: 443\r\n", "X-Forwarded-Port: 443\r\n"},
		} {
			resp, err := rawRequest(t, s, "GET /t HTTP/1.1\r\nHost: shop.example\r\n"+tc.extra+"X_Forwarded_For: 6.6.6.6\r\n\r\n")
			if err != nil || resp.StatusCode() != 200 {
				t.Fatalf("%v %d", err, statusOf(resp))
			}
			hs := o.got()
			h := hs[len(hs)-1]
			if !strings.Contains(h, tc.want) || strings.Contains(h, "6.6.6.6") {
				t.Errorf("trusted peer: origin got\n%s\nwant it to hold\n%s", h, tc.want)
			}
		}
	})
}

// An absolute-form target's authority replaces Host for routing, the
// upstream Host, X-Forwarded-Host and the stale store: another virtual
// host's stored copy can never be served for it.
func TestAbsoluteFormAuthorityWins(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		internal := startRecOrigin(t, func(c net.Conn, head string) {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nCache-Control: max-age=0\r\n\r\nSECRET")
		})
		public := startRecOrigin(t, func(c net.Conn, head string) {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nCache-Control: max-age=0\r\n\r\npublic")
		})
		cfg := "server: {" + engine + "}\nservices:\n  internal: {static: [" + internal.addr + "]}\n  public: {static: [" + public.addr + "]}\n" +
			"routes: [{host: internal.example, service: internal}, {host: public.example, service: public}]\n"
		s := startEdge(t, cfg)
		resp, err := rawRequest(t, s, "GET http://internal.example/r/cacheable HTTP/1.1\r\nHost: public.example\r\n\r\n")
		if err != nil || resp.StatusCode() != 200 || string(resp.Body()) != "SECRET" {
			t.Fatalf("absolute form: %v %d %q", err, statusOf(resp), bodyOf(resp))
		}
		h := internal.got()[0]
		if pathOf(h) != "/r/cacheable" || headerValue(h, "Host") != "internal.example" ||
			headerValue(h, "X-Forwarded-Host") != "internal.example" || strings.Contains(h, "public.example") {
			t.Fatalf("upstream head:\n%s", h)
		}
		// public.example's origin now fails: its users get an error or
		// its own copy, never internal.example's.
		s.mu.Lock()
		s.pools["public"].update(discovery.NewSet("public", "static", []discovery.Instance{{Addr: deadAddr(t)}}, time.Now()))
		s.mu.Unlock()
		resp, err = rawRequest(t, s, "GET /r/cacheable HTTP/1.1\r\nHost: public.example\r\n\r\n")
		if err != nil || strings.Contains(string(resp.Body()), "SECRET") {
			t.Fatalf("public.example got internal.example's stored copy: %v %d %q", err, statusOf(resp), bodyOf(resp))
		}
	})
}

// One Host parser for both engines: what is not host[:port] is 400 and
// reaches no backend; case and one trailing dot do not matter.
func TestHostValidation(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		internal := startRecOrigin(t, echoPath)
		other := startRecOrigin(t, echoPath)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  internal: {static: ["+internal.addr+"]}\n  other: {static: ["+other.addr+"]}\n"+
			"routes: [{host: internal.example, service: internal}, {host: '*', service: other}]\n")
		for _, bad := range []string{"a b", "a/b", "a,b", "x@internal.example", "internal.example:abc", "internal.example:",
			"internal.example:99999", "[::1", "[zz::1]", "a%2eb", ".", "..", "a..b", ".a", "internal.example..", "-", "-a.example", "a\\b", "a;b"} {
			resp, err := rawRequest(t, s, "GET /h HTTP/1.1\r\nHost: "+bad+"\r\n\r\n")
			if err != nil || resp.StatusCode() != 400 {
				t.Errorf("Host %q: %v %d, want 400", bad, err, statusOf(resp))
			}
		}
		if n := len(internal.got()) + len(other.got()); n != 0 {
			t.Fatalf("origins got %d requests with invalid Hosts", n)
		}
		for _, good := range []string{"internal.example", "INTERNAL.Example", "internal.example.", "internal.example:8080", "Internal.Example.:80"} {
			resp, err := rawRequest(t, s, "GET /h HTTP/1.1\r\nHost: "+good+"\r\n\r\n")
			if err != nil || resp.StatusCode() != 200 {
				t.Errorf("Host %q: %v %d", good, err, statusOf(resp))
			}
		}
		if n := len(internal.got()); n != 5 {
			t.Fatalf("internal.example got %d of the 5 requests for it (other got %d)", n, len(other.got()))
		}
		for _, good := range []string{"[::1]", "[::1]:8080", "192.0.2.1", "under_score.example"} {
			resp, err := rawRequest(t, s, "GET /h HTTP/1.1\r\nHost: "+good+"\r\n\r\n")
			if err != nil || resp.StatusCode() != 200 {
				t.Errorf("Host %q: %v %d", good, err, statusOf(resp))
			}
		}
		assertAllHealthy(t, s)
	})
}

// Malformed or unforwardable heads are answered by edgelb and never reach a
// backend.
func TestMalformedHeadsAreRefused(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, echoPath)
		s := startEdge(t, "server: {"+engine+", max_request_body: 1000}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
		for _, tc := range []struct {
			raw  string
			want int
		}{
			{"GET / HTTP/1.1\r\nHost: x\r\nTransfer Encoding: chunked\r\n\r\n", 400},
			{"GET / HTTP/1.1\r\nHost: x\r\nX-Invalid Y: 1\r\n\r\n", 400},
			{"GET / HTTP/1.1\r\nHost: x\r\nX-Bad[: 1\r\n\r\n", 400},
			{"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n", 400},
			{"get / HTTP/1.1\r\nHost: x\r\n\r\n", 400},
			{"GeT / HTTP/1.1\r\nHost: x\r\n\r\n", 400},
			{"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505},
			{"GET / HTTP/1.2\r\nHost: x\r\n\r\n", 505},
			{"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 405},
			{"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n", 405},
			{"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 200},
			{"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400},
			{"POST / HTTP/1.1\r\nHost: x\r\nExpect: fly\r\nContent-Length: 1\r\n\r\nx", 417},
			{"GET / HTTP/1.1\r\nHost: x\r\nExpect: fly\r\n\r\n", 417},
			{"GET ftp://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400},
			{"GET http://u@x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400},
		} {
			resp, err := rawRequest(t, s, tc.raw)
			if err != nil || resp.StatusCode() != tc.want {
				t.Errorf("%q: %v %d, want %d", tc.raw, err, statusOf(resp), tc.want)
			}
		}
		if hs := o.got(); len(hs) != 0 {
			t.Fatalf("origin got %d refused requests:\n%s", len(hs), strings.Join(hs, "\n"))
		}
		assertAllHealthy(t, s)
	})
}

// Expect: 100-continue: a body over the limit is refused before "100
// Continue" is sent, and Expect never goes upstream, since edgelb answered
// it.
func TestExpectContinue(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, echoPath)
		s := startEdge(t, "server: {"+engine+", max_request_body: 1000}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
		c := dialEdge(t, s)
		defer c.Close()
		io.WriteString(c, "POST /big HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || !strings.HasPrefix(line, "HTTP/1.1 413") {
			t.Fatalf("first line %q %v, want 413 before any 100 Continue", line, err)
		}
		c2 := dialEdge(t, s)
		defer c2.Close()
		io.WriteString(c2, "POST /small HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
		br := bufio.NewReader(c2)
		line, _ = br.ReadString('\n')
		if !strings.HasPrefix(line, "HTTP/1.1 100") {
			t.Fatalf("first line %q, want 100 Continue", line)
		}
		br.ReadString('\n')
		io.WriteString(c2, "ok")
		resp := &fasthttp.Response{}
		if err := resp.Read(br); err != nil || resp.StatusCode() != 200 {
			t.Fatalf("%v %d", err, resp.StatusCode())
		}
		hs := o.got()
		if len(hs) != 1 || headerValue(hs[0], "Expect") != "" {
			t.Fatalf("origin got:\n%s", strings.Join(hs, "\n"))
		}
	})
}

// A 101 the request did not ask for is the backend breaking the exchange:
// never forwarded.
func TestUnsolicitedSwitchingProtocols(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, func(c net.Conn, head string) {
			io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nRAW")
		})
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"], stale: {disabled: true}}\nroutes: [{service: web}]\n")
		for _, m := range []string{"GET", "POST"} {
			resp, err := rawRequest(t, s, m+" / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
			if err != nil || resp.StatusCode() != 502 || string(resp.Header.Peek(HeaderError)) != "upstream_invalid_response" {
				t.Fatalf("%s: %v %d %q", m, err, statusOf(resp), resp.Header.Peek(HeaderError))
			}
		}
	})
}

func statusOf(r *fasthttp.Response) int {
	if r == nil {
		return 0
	}
	return r.StatusCode()
}

func bodyOf(r *fasthttp.Response) string {
	if r == nil {
		return ""
	}
	return string(r.Body())
}

// A client that half-closes right after its request gets its answer and
// then the end of the connection at once, on both engines.
func TestHalfCloseAfterRequestClosesAtOnce(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, echoPath)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
		for i := 0; i < 5; i++ {
			c := dialEdge(t, s)
			io.WriteString(c, "GET /hc HTTP/1.1\r\nHost: x\r\n\r\n")
			c.(*net.TCPConn).CloseWrite()
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			start := time.Now()
			all, err := io.ReadAll(c)
			c.Close()
			if err != nil || !strings.HasPrefix(string(all), "HTTP/1.1 200") || !strings.HasSuffix(string(all), "/hc") {
				t.Fatalf("got %q %v after %s; want the answer, then the end of the connection", all, err, time.Since(start))
			}
		}
	})
}
