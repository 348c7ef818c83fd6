//go:build linux

package balancer

import (
	"bufio"
	"errors"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// engines runs f with the event loops on and off.
func engines(t *testing.T, f func(t *testing.T, server string)) {
	for _, on := range []string{"true", "false"} {
		t.Run("event_loop="+on, func(t *testing.T) { f(t, "event_loop: "+on) })
	}
}

// dribble connects to the edge and sends head one byte every step until
// the edge answers or closes. It returns the response (nil if the edge
// closed without one) and how long after connecting the edge answered.
func dribble(t *testing.T, s *Server, first, head string, step time.Duration) (*fasthttp.Response, time.Duration) {
	t.Helper()
	c := dialEdge(t, s)
	defer c.Close()
	br := bufio.NewReader(c)
	if first != "" {
		io.WriteString(c, first)
		var r fasthttp.Response
		if err := r.Read(br); err != nil || r.StatusCode() != 200 {
			t.Fatalf("request before the slow one: %v %d", err, r.StatusCode())
		}
		// Longer idle than header_timeout: idle_timeout applies between
		// requests, and the next head's time starts at its first byte.
		time.Sleep(1500 * time.Millisecond)
	}
	start := time.Now()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < len(head); i++ {
			if _, err := c.Write([]byte{head[i]}); err != nil {
				return
			}
			select {
			case <-stop:
				return
			case <-time.After(step):
			}
		}
	}()
	defer wg.Wait()
	defer close(stop)
	resp := &fasthttp.Response{}
	if err := resp.Read(br); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("the edge neither answered nor closed a slow head in 10s")
		}
		return nil, time.Since(start)
	}
	took := time.Since(start)
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("connection not closed after %d: %v", resp.StatusCode(), err)
	}
	return resp, took
}

func TestHeaderTimeout(t *testing.T) {
	engines(t, func(t *testing.T, server string) {
		o := startOrigin(t, "a", nil)
		f := func(timeout string, first, head string, want time.Duration) {
			t.Helper()
			s := startEdge(t, "server: {header_timeout: "+timeout+", "+server+"}\nservices:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
			h0 := clientHeadTimeouts.Get()
			resp, took := dribble(t, s, first, head, 300*time.Millisecond)
			if resp == nil || resp.StatusCode() != 408 || !resp.ConnectionClose() {
				t.Fatalf("header_timeout %s: got %v, want 408 and Connection: close", timeout, resp)
			}
			// Loose bounds: a busy machine delays timers, never advances them.
			if took < want-100*time.Millisecond || took > want+900*time.Millisecond {
				t.Errorf("header_timeout %s: answered after %v, want about %v", timeout, took.Round(time.Millisecond), want)
			}
			if n := clientHeadTimeouts.Get() - h0; n != 1 {
				t.Errorf("edgelb_client_timeouts_total{phase=\"head\"} went up by %d, want 1", n)
			}
		}
		endless := "GET /" + strings.Repeat("a", 200) + " HTTP/1.1\r\nHost: a\r\n\r\n"
		// The first head counts from the connection's opening.
		f("1s", "", endless, time.Second)
		// A connection that sends nothing gets the same.
		f("1s", "", "", time.Second)
		// Later heads count from their first byte, not from the end of
		// an idle wait longer than the timeout.
		f("1s", "GET / HTTP/1.1\r\nHost: a\r\n\r\n", endless, time.Second)
		// The event loop hands a slow head to the fasthttp server after
		// 1s; its time goes on, it does not start again.
		f("2500ms", "", endless, 2500*time.Millisecond)
		// A head that comes whole in time is served.
		s := startEdge(t, "server: {header_timeout: 1s, "+server+"}\nservices:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
		c := dialEdge(t, s)
		defer c.Close()
		for _, part := range []string{"GET / HTTP/1.1\r\n", "Host: a\r\n", "\r\n"} {
			io.WriteString(c, part)
			time.Sleep(200 * time.Millisecond)
		}
		var r fasthttp.Response
		if err := r.Read(bufio.NewReader(c)); err != nil || r.StatusCode() != 200 {
			t.Fatalf("a head sent in 600ms: %v %d", err, r.StatusCode())
		}
	})
}

func TestBodyTimeout(t *testing.T) {
	engines(t, func(t *testing.T, server string) {
		o := startOrigin(t, "a", nil)
		s := startEdge(t, "server: {header_timeout: 1s, idle_timeout: 1500ms, "+server+"}\nservices:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
		h0, b0 := clientHeadTimeouts.Get(), clientBodyTimeouts.Get()
		// The head comes in time; the body gets idle_timeout from then.
		resp, took := dribble(t, s, "", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789", 5*time.Millisecond)
		if resp == nil || resp.StatusCode() != 408 {
			t.Fatalf("a body that does not come: %v", resp)
		}
		// The head takes about 300ms at 5ms a byte; the body then has
		// 1.5s.
		if took < 1500*time.Millisecond || took > 4*time.Second {
			t.Errorf("answered after %v", took.Round(time.Millisecond))
		}
		if h, b := clientHeadTimeouts.Get()-h0, clientBodyTimeouts.Get()-b0; h != 0 || b != 1 {
			t.Errorf("timeouts counted: head %d, body %d; want 0 and 1", h, b)
		}
		if o.hits.Load() != 0 {
			t.Errorf("a request whose body did not come reached the backend")
		}
	})
}
