//go:build linux

package balancer

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/valyala/fasthttp"
)

// Backend faults and shutdown, served with the event loop on and off: the
// client must see the same either way, and a backend's health must count
// what happened to it once.

// forEachEngine runs f with the event loop and with the fasthttp server
// alone; server is the config's server block that selects each.
func forEachEngine(t *testing.T, f func(t *testing.T, server string)) {
	t.Helper()
	for _, e := range []struct{ name, server string }{
		{"event_loop", "server: {event_loop: true}\n"},
		{"fasthttp", "server: {event_loop: false}\n"},
	} {
		t.Run(e.name, func(t *testing.T) { f(t, e.server) })
	}
}

// answer is what a client got for one request.
type answer struct {
	status int
	code   string // Edgelb-Error
	body   string
	took   time.Duration
	err    error
}

func (a answer) String() string {
	return fmt.Sprintf("%d %q %q after %v (err %v)", a.status, a.code, a.body, a.took.Round(time.Millisecond), a.err)
}

// getOn sends a GET for path on c and reads the answer.
func getOn(c net.Conn, br *bufio.Reader, path string) answer {
	start := time.Now()
	c.SetDeadline(start.Add(20 * time.Second))
	if _, err := io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: a\r\n\r\n"); err != nil {
		return answer{err: err}
	}
	var resp fasthttp.Response
	err := resp.Read(br)
	return answer{resp.StatusCode(), string(resp.Header.Peek(HeaderError)), string(resp.Body()), time.Since(start), err}
}

// getNew sends a GET for path on a new connection.
func getNew(s *Server, path string) answer {
	c, err := net.Dial("tcp", s.Addr())
	if err != nil {
		return answer{err: err}
	}
	defer c.Close()
	return getOn(c, bufio.NewReader(c), path)
}

// metricValue returns the value of one series in /metrics, which must be
// there.
func metricValue(t *testing.T, s *Server, series string) int {
	t.Helper()
	_, body := adminGet(t, s, "/metrics")
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			n, err := strconv.Atoi(v)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return n
		}
	}
	t.Fatalf("no series %s in /metrics", series)
	return 0
}

// backendErrors returns a backend's error counts by cause, the causes
// with none left out.
func backendErrors(t *testing.T, s *Server, addr string) map[string]int {
	t.Helper()
	m := make(map[string]int)
	for c := errCode(1); c < numErrCodes; c++ {
		if !c.backendCause() {
			continue
		}
		if n := metricValue(t, s, fmt.Sprintf(`edgelb_backend_errors_total{service="web",backend=%q,cause=%q}`, addr, c)); n > 0 {
			m[c.String()] = n
		}
	}
	return m
}

// A backend slower than connect_timeout but within try_timeout answers on
// a new connection as on a kept-alive one: once, and without a mark
// against its health.
func TestSlowAnswerOnNewConnectionIsNoTimeout(t *testing.T) {
	forEachEngine(t, func(t *testing.T, server string) {
		const delay = 600 * time.Millisecond
		var origins []*origin
		for i := 0; i < 3; i++ {
			origins = append(origins, startOrigin(t, "", func(ctx *fasthttp.RequestCtx) {
				time.Sleep(delay)
				// Closing makes every request connect anew.
				ctx.SetConnectionClose()
				ctx.WriteString("slow")
			}))
		}
		s := startEdge(t, server+"services:\n  web: {static: "+staticList(origins...)+", connect_timeout: 200ms}\nroutes: [{service: web}]\n")
		// Rounds of one request per backend: three timeouts in a row
		// would eject each.
		const rounds, per = 4, 3
		var slowest time.Duration
		for r := 0; r < rounds; r++ {
			got := make([]answer, per)
			var wg sync.WaitGroup
			for i := range got {
				wg.Add(1)
				go func() {
					defer wg.Done()
					got[i] = getNew(s, "/")
				}()
			}
			wg.Wait()
			for _, a := range got {
				if a.err != nil || a.status != 200 || a.body != "slow" {
					t.Fatalf("round %d: %v", r, a)
				}
				slowest = max(slowest, a.took)
			}
		}
		hits := int64(0)
		for _, o := range origins {
			hits += o.hits.Load()
			if errs := backendErrors(t, s, o.addr); len(errs) != 0 {
				t.Errorf("backend %s: errors %v", o.addr, errs)
			}
		}
		if hits != rounds*per {
			t.Errorf("the origins got %d requests for %d", hits, rounds*per)
		}
		st := serviceStatus(s)
		for _, b := range st.Backends {
			if b.State != "healthy" {
				t.Errorf("backend %s: %s (%s)", b.Addr, b.State, b.Reason)
			}
		}
		if st.Panic {
			t.Error("the service is in panic mode")
		}
		t.Logf("slowest answer %v, origins saw %d requests for %d", slowest.Round(time.Millisecond), hits, rounds*per)
	})
}

// hungListener returns the address of a listener whose accept queue is
// full: connecting to it hangs until the caller gives up.
func hungListener(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	// A backlog of 0 queues one connection; later SYNs are dropped.
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
	filler, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { filler.Close() })
	// The dialer is connected before the listener has queued it.
	waitFor(t, "a full accept queue", func() bool { return acceptQueueLen(fd) == 1 })
	return addr
}

// acceptQueueLen returns how many connections wait in a listening socket's
// accept queue: TCP_INFO's unacked field, on a listener.
func acceptQueueLen(fd int) int {
	var info syscall.TCPInfo
	n := uint32(unsafe.Sizeof(info))
	syscall.Syscall6(syscall.SYS_GETSOCKOPT, uintptr(fd), syscall.IPPROTO_TCP, syscall.TCP_INFO,
		uintptr(unsafe.Pointer(&info)), uintptr(unsafe.Pointer(&n)), 0)
	return int(info.Unacked)
}

// connect_timeout still bounds connecting: a backend that never completes
// the handshake fails the try at connect_timeout, not at try_timeout.
func TestConnectTimeoutBoundsConnecting(t *testing.T) {
	forEachEngine(t, func(t *testing.T, server string) {
		addr := hungListener(t)
		s := startEdge(t, server+"services:\n  web: {static: ["+addr+"], connect_timeout: 200ms, try_timeout: 10s, retries: 0}\nroutes: [{service: web}]\n")
		a := getNew(s, "/")
		if a.err != nil || a.status != 502 || a.code != "upstream_connect_failed" {
			t.Fatalf("got %v", a)
		}
		if a.took > 5*time.Second {
			t.Fatalf("answered after %v: connect_timeout is 200ms", a.took)
		}
		t.Logf("answered after %v", a.took.Round(time.Millisecond))
	})
}

// A backend that closes its connection before the response is whole
// fails the try at once, as an invalid response counted once, on a new
// connection as on a kept-alive one; the client gets the same answer from
// either engine.
func TestCutResponseFailsAtOnce(t *testing.T) {
	const (
		okResp    = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
		shortBody = "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"
		cutChunks = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nwor"
	)
	f := func(name, cut, wantCode string) {
		t.Run(name, func(t *testing.T) {
			forEachEngine(t, func(t *testing.T, server string) {
				// /ok is answered and the connection kept; anything
				// else gets cut, and the connection closed.
				var hits atomic.Int64
				var cutAfterOK atomic.Bool
				addr := serveRaw(t, func(c net.Conn) {
					br := bufio.NewReader(c)
					for n := 0; ; n++ {
						var req fasthttp.Request
						if err := req.Read(br); err != nil {
							return
						}
						hits.Add(1)
						if string(req.URI().Path()) != "/ok" {
							cutAfterOK.Store(cutAfterOK.Load() || n > 0)
							io.WriteString(c, cut)
							return
						}
						io.WriteString(c, okResp)
					}
				})
				// Long timeouts, so that a fault noticed only by a
				// timeout shows.
				s := startEdge(t, server+"services:\n  web: {static: ["+addr+"], connect_timeout: 5s, try_timeout: 10s}\nroutes: [{service: web}]\n")
				cut := func(c net.Conn, br *bufio.Reader, what string, wantErrors int) {
					t.Helper()
					a := getOn(c, br, "/cut")
					if a.err != nil || a.status != 502 || a.code != wantCode {
						t.Fatalf("%s: %v, want 502 %s", what, a, wantCode)
					}
					if a.took > 2*time.Second {
						t.Errorf("%s: answered after %v", what, a.took)
					}
					if errs := backendErrors(t, s, addr); len(errs) != 1 || errs[wantCode] != wantErrors {
						t.Errorf("%s: backend errors %v, want %s: %d", what, errs, wantCode, wantErrors)
					}
					t.Logf("%s: %v", what, a)
				}
				// A failure hands the client's connection to the fasthttp
				// server for good: each case gets a connection of its own.
				c := dialEdge(t, s)
				defer c.Close()
				cut(c, bufio.NewReader(c), "new backend connection", 1)

				// The backend connection that answered /ok is reused.
				c = dialEdge(t, s)
				defer c.Close()
				br := bufio.NewReader(c)
				if a := getOn(c, br, "/ok"); a.err != nil || a.status != 200 || a.body != "ok" {
					t.Fatalf("/ok: %v", a)
				}
				cut(c, br, "kept-alive backend connection", 2)
				if !cutAfterOK.Load() {
					t.Error("no request was cut on a kept-alive connection")
				}
				t.Logf("the origin got %d requests for 3", hits.Load())
			})
		})
	}
	f("short body", shortBody, "upstream_invalid_response")
	f("cut chunked body", cutChunks, "upstream_invalid_response")
	f("no answer", "", "upstream_connect_failed")
}

// Once shutting down, the server refuses new connections at once, and
// still answers the request in flight.
func TestShutdownRefusesNewConnections(t *testing.T) {
	forEachEngine(t, func(t *testing.T, server string) {
		o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
			time.Sleep(time.Second)
			ctx.WriteString("done")
		})
		cfg := mustConfig(t, "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nstate_dir: "+t.TempDir()+"\n"+
			server+"services:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
		s := NewServer(cfg, quietLogger())
		if err := s.Start(); err != nil {
			t.Fatal(err)
		}
		inflight := make(chan answer, 1)
		go func() { inflight <- getNew(s, "/") }()
		waitFor(t, "the request at the origin", func() bool { return o.hits.Load() == 1 })

		stopped := make(chan error, 1)
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			stopped <- s.Shutdown(ctx)
		}()
		waitFor(t, "shutdown to begin", func() bool { return !s.ready.Load() })
		time.Sleep(100 * time.Millisecond)

		start := time.Now()
		c, err := net.DialTimeout("tcp", s.Addr(), 5*time.Second)
		if err == nil {
			a := getOn(c, bufio.NewReader(c), "/")
			c.Close()
			t.Errorf("a connection opened while draining was accepted; then: %v", a)
		} else if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("connecting while draining: %v after %v, want connection refused", err, time.Since(start))
		} else {
			t.Logf("connecting while draining: %v after %v", err, time.Since(start).Round(time.Microsecond))
		}

		if a := <-inflight; a.err != nil || a.status != 200 || a.body != "done" {
			t.Errorf("request in flight: %v", a)
		}
		if err := <-stopped; err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
}
