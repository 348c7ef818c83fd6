package balancer

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

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
func startH2Edge(t *testing.T, server, rest string) *h2Edge {
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
func (e *h2Edge) client(t *testing.T) *http.Client {
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
