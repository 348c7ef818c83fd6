package balancer

import (
	"io"
	"net"
	"strconv"
	"testing"
	"time"
)

// first_byte_timeout: a try whose answer has not begun in time fails as a
// try past try_timeout does, on both engines; an answer that began has the
// rest of try_timeout.

// silentOrigin reads requests and never answers: the edge has to give up.
func silentOrigin(t *testing.T) *recOrigin {
	return startRecOrigin(t, func(c net.Conn, head string) { io.Copy(io.Discard, c) })
}

// silentAndFast starts a silent origin and one answering "fast" at once,
// and an edge on engine whose service web has both, in that order, with
// round_robin and the service keys in svc (a YAML flow-map's inside).
func silentAndFast(t *testing.T, engine, svc string) (silent, fast *recOrigin, s *Server) {
	t.Helper()
	silent = silentOrigin(t)
	fast, s = besideFast(t, engine, silent, svc)
	return silent, fast, s
}

// besideFast starts an origin answering "fast" at once, and an edge on
// engine whose service web has other and it, in that order, with
// round_robin and the service keys in svc (a YAML flow-map's inside).
func besideFast(t *testing.T, engine string, other *recOrigin, svc string) (fast *recOrigin, s *Server) {
	t.Helper()
	fast = slowOrigin(t, "fast", 0)
	s = startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+other.addr+", "+fast.addr+"], balance: round_robin, "+svc+
		"}\nroutes: [{service: web}]\n")
	return fast, s
}

// waitTimeouts waits up to 3s for addr's errors to be exactly want
// timeouts.
func waitTimeouts(t *testing.T, s *Server, addr string, want int) {
	t.Helper()
	var e map[string]int
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if e = backendErrors(t, s, addr); e["upstream_timeout"] >= want {
			break
		}
	}
	if len(e) != 1 || e["upstream_timeout"] != want {
		t.Errorf("%s's errors: %v, want %d upstream_timeout, one per try that timed out", addr, e, want)
	}
}

// Next to a silent backend, every GET is answered by the other well before
// try_timeout, and each try the silent one got is counted once, as a
// timeout, and retried.
func TestFirstByteTimeoutRetries(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		silent, fast, s := silentAndFast(t, engine, " first_byte_timeout: 100ms, try_timeout: 2s, health: {passive: {consecutive_gateway_failures: 1000}}")
		// Answered within a second: the silent tries are cut at
		// first_byte_timeout (100ms), not try_timeout.
		const n = 4
		fastWithin(t, s, "/r", n, time.Second)
		tries := len(silent.got())
		if tries == 0 || tries > n {
			t.Fatalf("the silent backend was asked %d times for %d requests", tries, n)
		}
		if e := backendErrors(t, s, silent.addr); len(e) != 1 || e["upstream_timeout"] != tries {
			t.Errorf("the silent backend's errors: %v, want %d upstream_timeout", e, tries)
		}
		if e := backendErrors(t, s, fast.addr); len(e) != 0 {
			t.Errorf("the answering backend's errors: %v", e)
		}
		if r := metricValue(t, s, `edgelb_retries_total{service="web"}`); r != tries {
			t.Errorf("%d retries counted for %d tries that timed out", r, tries)
		}
	})
}

// With a silent backend alone, the client gets what a try_timeout expiry
// gives, 504 upstream_timeout, after first_byte_timeout, not try_timeout;
// the backend is asked once.
func TestFirstByteTimeoutAlone(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		silent := silentOrigin(t)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+silent.addr+"], first_byte_timeout: 100ms, try_timeout: 2s,"+
			" stale: {disabled: true}, health: {passive: {consecutive_gateway_failures: 1000}}}\nroutes: [{service: web}]\n")
		start := time.Now()
		resp, err := rawRequest(t, s, "GET /silent HTTP/1.1\r\nHost: x\r\n\r\n")
		took := time.Since(start)
		if err != nil || resp.StatusCode() != 504 || string(resp.Header.Peek(HeaderError)) != "upstream_timeout" {
			t.Fatalf("%v %d %q", err, statusOf(resp), resp.Header.Peek(HeaderError))
		}
		if took < 100*time.Millisecond || took > time.Second {
			t.Fatalf("504 after %v; first_byte_timeout is 100ms, try_timeout 2s", took)
		}
		if n := len(silent.got()); n != 1 {
			t.Fatalf("the silent backend was asked %d times for one request", n)
		}
		if e := backendErrors(t, s, silent.addr); len(e) != 1 || e["upstream_timeout"] != 1 {
			t.Errorf("the silent backend's errors: %v, want one upstream_timeout", e)
		}
	})
}

// An answer whose head comes at once and whose body drips for longer than
// first_byte_timeout, within try_timeout, reaches the client whole.
func TestFirstByteTimeoutSpareSlowBody(t *testing.T) {
	const body = "0123456789"
	const every = 50 * time.Millisecond
	bothEngines(t, func(t *testing.T, engine string) {
		drip := startRecOrigin(t, func(c net.Conn, head string) {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: "+strconv.Itoa(len(body))+"\r\n\r\n")
			for i := range len(body) {
				time.Sleep(every)
				io.WriteString(c, body[i:i+1])
			}
		})
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+drip.addr+"], first_byte_timeout: 100ms, try_timeout: 2s,"+
			" stale: {disabled: true}}\nroutes: [{service: web}]\n")
		start := time.Now()
		resp, err := rawRequest(t, s, "GET /drip HTTP/1.1\r\nHost: x\r\n\r\n")
		took := time.Since(start)
		if err != nil || resp.StatusCode() != 200 || string(resp.Body()) != body {
			t.Fatalf("%v %d %q %q", err, statusOf(resp), resp.Header.Peek(HeaderError), bodyOf(resp))
		}
		if took < time.Duration(len(body))*every {
			t.Fatalf("answered after %v, before the body was sent", took)
		}
		if n := len(drip.got()); n != 1 {
			t.Fatalf("the backend was asked %d times for one request", n)
		}
		if e := backendErrors(t, s, drip.addr); len(e) != 0 {
			t.Errorf("the backend's errors: %v", e)
		}
	})
}

// With hedging, hedge.after still sends the hedge, and first_byte_timeout
// still ends the try: a hedge due before first_byte_timeout wins, and its
// silent rival is abandoned, then counted as the timeout it is once
// first_byte_timeout passes; a hedge due after it is never sent, as the
// silent try times out first and is retried.
func TestFirstByteTimeoutWithHedge(t *testing.T) {
	// The hedges sent: a series of the process, which other tests' edges
	// add to.
	const sentSeries = `edgelb_hedges_total{service="web",result="sent"}`
	t.Run("hedge first", func(t *testing.T) {
		bothEngines(t, func(t *testing.T, engine string) {
			silent, _, s := silentAndFast(t, engine, " first_byte_timeout: 500ms, try_timeout: 2s, hedge: {after: 30ms},"+
				" health: {passive: {consecutive_gateway_failures: 1000}}")
			sent0 := metricValue(t, s, sentSeries)
			fastWithin(t, s, "/h", 4, 2*time.Second)
			// A hedge to the silent one has reached it by the time its
			// abandoned tries end, at their first_byte_timeout.
			time.Sleep(700 * time.Millisecond)
			tries := len(silent.got())
			if tries == 0 {
				t.Fatal("the silent backend was never tried")
			}
			// Each try of the silent backend was hedged, or was a hedge.
			if sent := metricValue(t, s, sentSeries) - sent0; sent != tries {
				t.Errorf("%d hedges sent for %d tries of the silent backend", sent, tries)
			}
			// Each abandoned try is counted once, as a timeout.
			waitTimeouts(t, s, silent.addr, tries)
		})
	})
	t.Run("timeout first", func(t *testing.T) {
		bothEngines(t, func(t *testing.T, engine string) {
			silent, _, s := silentAndFast(t, engine, " first_byte_timeout: 100ms, try_timeout: 2s, hedge: {after: 1s},"+
				" health: {passive: {consecutive_gateway_failures: 1000}}")
			sent0 := metricValue(t, s, sentSeries)
			// Within a second: each silent try is cut at
			// first_byte_timeout (100ms), before hedge.after.
			fastWithin(t, s, "/h", 4, time.Second)
			tries := len(silent.got())
			if tries == 0 {
				t.Fatal("the silent backend was never tried")
			}
			if sent := metricValue(t, s, sentSeries) - sent0; sent != 0 {
				t.Errorf("%d hedges sent; each try was cut at first_byte_timeout, before hedge.after", sent)
			}
			if e := backendErrors(t, s, silent.addr); len(e) != 1 || e["upstream_timeout"] != tries {
				t.Errorf("the silent backend's errors: %v, want %d upstream_timeout", e, tries)
			}
		})
	})
}
