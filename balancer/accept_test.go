//go:build linux

package balancer

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/health"
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
		// A connection that sends nothing gets the same, counted from its
		// accept: on Linux, the kernel hands it over about
		// deferAcceptSeconds after the handshake.
		f("1s", "", "", time.Second+silentAcceptDelay)
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

func TestMaxConnsPerIP(t *testing.T) {
	engines(t, func(t *testing.T, server string) {
		o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) { ctx.Write(ctx.Method()) })
		s := startEdge(t, "server: {max_conns_per_ip: 3, "+server+"}\nservices:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
		type conn struct {
			net.Conn
			br *bufio.Reader
		}
		open := func() *conn {
			c := dialEdge(t, s)
			return &conn{c, bufio.NewReader(c)}
		}
		get := func(c *conn, method string) error {
			if _, err := io.WriteString(c, method+" / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"); err != nil {
				return err
			}
			var r fasthttp.Response
			if err := r.Read(c.br); err != nil {
				return err
			}
			if r.StatusCode() != 200 || string(r.Body()) != method {
				t.Fatalf("%s: %d %q", method, r.StatusCode(), r.Body())
			}
			return nil
		}
		refused := func(what string) {
			t.Helper()
			r0 := connsOverIPLimit.Get()
			c := open()
			defer c.Close()
			if _, err := c.br.ReadByte(); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("%s: connection over max_conns_per_ip not closed at once: %v", what, err)
			}
			if n := connsOverIPLimit.Get() - r0; n != 1 {
				t.Fatalf("%s: edgelb_client_conns_rejected_total went up by %d, want 1", what, n)
			}
		}
		var cs []*conn
		for i := 0; i < 3; i++ {
			c := open()
			defer c.Close()
			// A POST goes from the event loop to the fasthttp server: the
			// connection must still count once.
			method := "GET"
			if i == 0 {
				method = "POST"
			}
			if err := get(c, method); err != nil {
				t.Fatalf("connection %d: %v", i+1, err)
			}
			cs = append(cs, c)
		}
		refused("4th connection")
		for i, c := range cs {
			if err := get(c, "GET"); err != nil {
				t.Fatalf("connection %d after the 4th was refused: %v", i+1, err)
			}
		}
		// Closing one frees its place, once the edge has seen it close.
		cs[0].Close()
		var d *conn
		deadline := time.Now().Add(10 * time.Second)
		for {
			d = open()
			defer d.Close()
			if get(d, "GET") == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("a closed connection's place was never freed")
			}
			time.Sleep(20 * time.Millisecond)
		}
		refused("connection after the freed place was taken")
		for _, c := range append(cs[1:], d) {
			c.Close()
		}
		for s.perIP.size() != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("addresses still counted after every connection closed: %d", s.perIP.size())
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

func TestIPConns(t *testing.T) {
	if newIPConns(0) != nil {
		t.Fatal("no cap must mean no table")
	}
	ipc := newIPConns(2)
	a, b := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")
	f := func(ip netip.Addr, want bool) {
		t.Helper()
		if got := ipc.acquire(ip); got != want {
			t.Fatalf("acquire %s with %d open: %v, want %v", ip, ipc.open(ip), got, want)
		}
	}
	f(a, true)
	f(a, true)
	f(a, false)
	f(b, true)
	f(netip.Addr{}, true) // no address: never capped
	ipc.release(a)
	f(a, true)
	ipc.release(a)
	ipc.release(a)
	ipc.release(b)
	if n := ipc.size(); n != 0 {
		t.Fatalf("%d addresses left with no connection open", n)
	}
}

func TestRepeatLog(t *testing.T) {
	var r repeatLog
	now := int64(1e18)
	f := func(at time.Duration, wantOK bool, wantHeld int64) {
		t.Helper()
		ok, held := r.allow(now + int64(at))
		if ok != wantOK || held != wantHeld {
			t.Fatalf("at +%v: %v %d, want %v %d", at, ok, held, wantOK, wantHeld)
		}
	}
	f(0, true, 0)
	f(time.Millisecond, false, 0)
	f(9*time.Second, false, 0)
	f(10*time.Second, true, 2)
	f(11*time.Second, false, 0)
	f(25*time.Second, true, 1)
}

func TestClassifyLocalResourceErrors(t *testing.T) {
	f := func(err error) {
		t.Helper()
		o, c := classifyErr(err)
		if o != health.OutcomeLocalOverload || c != errOverloaded {
			t.Fatalf("%v: %v %v, want local_overload and overloaded", err, o, c)
		}
	}
	f(&net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("socket", syscall.EMFILE)})
	f(&net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("socket", syscall.ENFILE)})
}

// stubListener returns errs from Accept, then conns, then blocks until
// closed.
type stubListener struct {
	mu     sync.Mutex
	errs   []error
	conns  []net.Conn
	calls  int
	closed chan struct{}
}

func (l *stubListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	l.calls++
	if len(l.errs) > 0 {
		err := l.errs[0]
		l.errs = l.errs[1:]
		l.mu.Unlock()
		return nil, err
	}
	if len(l.conns) > 0 {
		c := l.conns[0]
		l.conns = l.conns[1:]
		l.mu.Unlock()
		return c, nil
	}
	l.mu.Unlock()
	<-l.closed
	return nil, net.ErrClosed
}

func (l *stubListener) Close() error   { return nil }
func (l *stubListener) Addr() net.Addr { return &net.TCPAddr{} }

func TestAcceptListenerPausesOnResourceErrors(t *testing.T) {
	s := NewServer(mustConfig(t, "services:\n  web: {static: [127.0.0.1:1]}\n"), quietLogger())
	s.ready.Store(true)
	s.routes.Store(newRouteTable([]route{{host: "*", path: "/", service: "web"}}))
	emfile := &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	stub := &stubListener{errs: []error{emfile, emfile, emfile}, conns: []net.Conn{c1}, closed: make(chan struct{})}
	a := newAcceptListener(s, stub, "fasthttp")
	e0 := acceptErrEMFILE.Get()
	start := time.Now()
	c, err := a.Accept()
	if cc, ok := c.(*clientConn); err != nil || !ok || cc.Conn != c1 {
		t.Fatalf("Accept after EMFILE: %v %v", c, err)
	}
	if took := time.Since(start); took < 3*acceptPause {
		t.Errorf("three EMFILE errors retried within %v: the listener does not pause", took)
	}
	if n := acceptErrEMFILE.Get() - e0; n != 3 {
		t.Errorf("edgelb_accept_errors_total{cause=\"emfile\"} went up by %d, want 3", n)
	}
	if ok, why := s.Ready(); ok || !strings.Contains(why, "too many open files") {
		t.Errorf("Ready after EMFILE: %v %q", ok, why)
	}
	// A close ends a pause at once.
	stub.mu.Lock()
	stub.errs = []error{emfile}
	stub.mu.Unlock()
	done := make(chan error, 1)
	go func() {
		_, err := a.Accept()
		done <- err
	}()
	time.Sleep(acceptPause / 4)
	a.Close()
	close(stub.closed)
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v", err)
	}
}
