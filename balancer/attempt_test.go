package balancer

import (
	"io"
	"net"
	"strconv"
	"testing"
	"time"
)

// A GET answered 500, with stale-on-500 on and nothing stored: the origin
// is asked once per request on both engines, the 500 reaches the client,
// and consecutive_5xx ejects after the same number of requests.
func TestLoopAnswerCarriedNotAskedAgain(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, func(c net.Conn, head string) {
			io.WriteString(c, "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nX-App: 1\r\n\r\nboom")
		})
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"], health: {panic_threshold: -1, passive: {consecutive_5xx: 3}}}\nroutes: [{service: web}]\n")
		for i := 1; i <= 3; i++ {
			resp, err := rawRequest(t, s, "GET /e HTTP/1.1\r\nHost: x\r\n\r\n")
			if err != nil || resp.StatusCode() != 500 || string(resp.Body()) != "boom" || string(resp.Header.Peek("X-App")) != "1" {
				t.Fatalf("request %d: %v %d %q", i, err, statusOf(resp), bodyOf(resp))
			}
			if n := len(o.got()); n != i {
				t.Fatalf("after %d requests the origin was asked %d times", i, n)
			}
		}
		// Ejected after exactly 3: the next gets 503 at once.
		resp, err := rawRequest(t, s, "GET /e HTTP/1.1\r\nHost: x\r\n\r\n")
		if err != nil || resp.StatusCode() != 503 || len(o.got()) != 3 {
			t.Fatalf("4th request: %v %d, origin asked %d times", err, statusOf(resp), len(o.got()))
		}
	})
}

// A try that times out in the loop is not tried again on the same backend,
// nor given a new deadline: with one slow backend the 504 comes after one
// try_timeout, and the origin is asked once.
func TestLoopTimeoutCarriesDeadline(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, func(c net.Conn, head string) {
			time.Sleep(2 * time.Second)
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		})
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"], try_timeout: 400ms, stale: {disabled: true},"+
			" health: {passive: {consecutive_gateway_failures: 100}}}\nroutes: [{service: web}]\n")
		start := time.Now()
		resp, err := rawRequest(t, s, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
		took := time.Since(start)
		if err != nil || resp.StatusCode() != 504 {
			t.Fatalf("%v %d", err, statusOf(resp))
		}
		// A second try_timeout would make it 800ms or more.
		if took > 750*time.Millisecond {
			t.Fatalf("504 after %s; the request's deadline started again", took)
		}
		time.Sleep(100 * time.Millisecond)
		if n := len(o.got()); n != 1 {
			t.Fatalf("origin asked %d times for one request", n)
		}
	})
	// Two backends, one slow: each request tries the slow one at most
	// once, and the retry is counted.
	bothEngines(t, func(t *testing.T, engine string) {
		slow := startRecOrigin(t, func(c net.Conn, head string) {
			time.Sleep(time.Second)
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
		})
		fast := startRecOrigin(t, echoPath)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+slow.addr+", "+fast.addr+"], balance: round_robin, try_timeout: 200ms,"+
			" health: {passive: {consecutive_gateway_failures: 1000}}}\nroutes: [{service: web}]\n")
		const n = 8
		for i := 0; i < n; i++ {
			p := "/r" + strconv.Itoa(i)
			resp, err := rawRequest(t, s, "GET "+p+" HTTP/1.1\r\nHost: x\r\n\r\n")
			if err != nil || resp.StatusCode() != 200 || string(resp.Body()) != p {
				t.Fatalf("%s: %v %d %q", p, err, statusOf(resp), bodyOf(resp))
			}
		}
		if got := len(slow.got()); got > n {
			t.Fatalf("slow backend asked %d times for %d requests", got, n)
		}
		retries := metricValue(t, s, `edgelb_retries_total{service="web"}`)
		if retries != len(slow.got()) {
			t.Fatalf("%v retries counted for %d tries that timed out", retries, len(slow.got()))
		}
	})
}

// A 503 with Retry-After next to a dead backend: the client gets a
// backend's answer on both engines, never a generated 502.
func TestOverloadedAnswerNextToDeadBackend(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		busy := startRecOrigin(t, func(c net.Conn, head string) {
			io.WriteString(c, "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3\r\nContent-Length: 4\r\n\r\nbusy")
		})
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+busy.addr+", "+deadAddr(t)+"], balance: round_robin, stale: {disabled: true}}\nroutes: [{service: web}]\n")
		for i := 0; i < 4; i++ {
			resp, err := rawRequest(t, s, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			if err != nil || resp.StatusCode() != 503 || len(resp.Header.Peek(HeaderError)) != 0 || string(resp.Body()) != "busy" {
				t.Fatalf("request %d: %v %d %q %q", i, err, statusOf(resp), resp.Header.Peek(HeaderError), bodyOf(resp))
			}
		}
		if n := len(busy.got()); n != 4 {
			t.Fatalf("the busy backend was asked %d times for 4 requests", n)
		}
	})
}
