//go:build linux

package balancer

import (
	"bufio"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/valyala/fasthttp"
)

// One kept-alive client connection meets a stored copy served for a 500,
// a retry after a 503 with Retry-After onto a dead backend, an error edgelb
// makes up, and no route: the event loop answers each itself, the
// connection stays with it, and each origin is asked once per request.
func TestLoopFinishesWhatItStarts(t *testing.T) {
	var broken atomic.Bool
	o := startRecOrigin(t, func(c net.Conn, head string) {
		switch p := pathOf(head); {
		case p == "/s" && broken.Load():
			io.WriteString(c, "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom")
		case p == "/s":
			io.WriteString(c, "HTTP/1.1 200 OK\r\nCache-Control: max-age=0\r\nContent-Length: 6\r\n\r\nstored")
		case p == "/busy":
			io.WriteString(c, "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 4\r\n\r\nbusy")
		default:
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		}
	})
	dead := deadAddr(t)
	s := startEdge(t, "server: {event_loop: true}\nservices:\n"+
		"  web: {static: ["+o.addr+", "+dead+"], balance: round_robin, health: {panic_threshold: -1, passive: {consecutive_gateway_failures: 100, consecutive_5xx: 100}}}\n"+
		"  gone: {static: ["+dead+"], stale: {disabled: true}, health: {panic_threshold: -1, passive: {consecutive_gateway_failures: 100}}}\n"+
		"routes: [{host: gone.example, service: gone}, {host: web.example, service: web}]\n")
	handoffs, fallbacks := loopHandoffs.Get(), loopFallbacks.Get()

	c := dialEdge(t, s)
	defer c.Close()
	br := bufio.NewReader(c)
	ask := func(host, path string) *fasthttp.Response {
		t.Helper()
		if _, err := io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: "+host+"\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		resp := &fasthttp.Response{}
		if err := resp.Read(br); err != nil {
			t.Fatalf("GET %s%s: %v", host, path, err)
		}
		return resp
	}
	// Round robin starts at the second backend: the dead one first, so
	// that every request below meets it.
	for _, step := range []struct {
		host, path string
		status     int
		body, hdr  string
		do         func()
	}{
		{host: "web.example", path: "/s", status: 200, body: "stored"},
		{host: "web.example", path: "/s", status: 200, body: "stored", hdr: "upstream_status_500", do: func() { broken.Store(true) }},
		{host: "web.example", path: "/busy", status: 503, body: "busy"},
		{host: "gone.example", path: "/x", status: 502, hdr: "upstream_connect_failed"},
		{host: "nowhere.example", path: "/x", status: 404, hdr: "no_route"},
		{host: "web.example", path: "/ok", status: 200, body: "ok"},
	} {
		if step.do != nil {
			step.do()
		}
		resp := ask(step.host, step.path)
		got := string(resp.Header.Peek("Cache-Status")) + string(resp.Header.Peek(HeaderError))
		if resp.StatusCode() != step.status || step.body != "" && string(resp.Body()) != step.body || !strings.Contains(got, step.hdr) {
			t.Fatalf("GET %s%s: %d %q (%s), want %d %q (%s)", step.host, step.path, resp.StatusCode(), resp.Body(), got, step.status, step.body, step.hdr)
		}
	}
	if n := len(o.got()); n != 4 {
		t.Errorf("the origin was asked %d times for 4 requests that reach it", n)
	}
	if h, f := loopHandoffs.Get()-handoffs, loopFallbacks.Get()-fallbacks; h != 0 || f != 0 {
		t.Errorf("the event loop handed over %d connections and %d tries; it should finish them all", h, f)
	}
}
