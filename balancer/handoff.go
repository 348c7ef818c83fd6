package balancer

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/health"
)

var errNoLoop = errors.New("edgelb: the event loop needs a TCP listener")

// prefixConn is a client connection handed from an event loop to the
// fasthttp server: pre holds the bytes the loop had already read. open
// counts the handed-over connections not closed yet.
// att, when set, is the state of the tries made for the first request in
// pre (see attempt).
type prefixConn struct {
	net.Conn
	pre    []byte
	open   *atomic.Int64
	closed atomic.Bool
	// headBy, when set, is when the head the loop started reading is
	// due (server.header_timeout): it bounds the first read deadline the
	// server sets, which it sets for the head, so that the head's time
	// does not start again at the handoff.
	headBy time.Time
	// ipc, when set, counts the connection against its address's cap
	// until it closes: the loop counted it at accept.
	ipc *ipConns
	ip  netip.Addr
	// got is set once the client sent a byte.
	got bool
	att atomic.Pointer[attempt]
}

// peekAttempt returns the tries the loop made for the request the server
// is about to serve on ctx's connection, if any, leaving them for
// takeAttempt.
func peekAttempt(ctx *fasthttp.RequestCtx) *attempt {
	pc, ok := ctx.Conn().(*prefixConn)
	if !ok {
		return nil
	}
	return pc.att.Load()
}

// takeAttempt returns the tries the loop made for the request the server
// is about to serve on ctx's connection, if any, once.
func takeAttempt(ctx *fasthttp.RequestCtx) *attempt {
	c := ctx.Conn()
	if sc, ok := c.(*sniffConn); ok {
		// Slow path: server.h2c is on.
		c = sc.Conn
	}
	pc, ok := c.(*prefixConn)
	if !ok {
		return nil
	}
	return pc.att.Swap(nil)
}

func newPrefixConn(c net.Conn, pre []byte, open *atomic.Int64) *prefixConn {
	open.Add(1)
	return &prefixConn{Conn: c, pre: pre, open: open}
}

// Close implements net.Conn.
func (c *prefixConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		if a := c.att.Swap(nil); a != nil && a.conn != nil {
			// Closed before its request was served: the try the
			// loop began ends uncounted.
			a.conn.Close()
			a.backend.target.Done(time.Now().UnixNano(), health.OutcomeCanceled, 0)
		}
		c.open.Add(-1)
		if c.ipc != nil {
			c.ipc.release(c.ip)
		}
	}
	return c.Conn.Close()
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.pre) > 0 {
		n := copy(p, c.pre)
		c.pre = c.pre[n:]
		c.got = true
		return n, nil
	}
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.got = true
	}
	return n, err
}

// sentAny reports whether the client sent anything (see headTimedOut).
func (c *prefixConn) sentAny() bool { return c.got }

// SetReadDeadline implements net.Conn.
func (c *prefixConn) SetReadDeadline(t time.Time) error {
	if !c.headBy.IsZero() {
		if t.IsZero() || c.headBy.Before(t) {
			t = c.headBy
		}
		c.headBy = time.Time{}
	}
	return c.Conn.SetReadDeadline(t)
}

// handoffListener is the fasthttp server's listener when event loops
// accept: it yields the connections the loops hand over.
type handoffListener struct {
	addr net.Addr
	// h2c, when set, serves the connections that open with HTTP/2's
	// preface (server.h2c).
	h2c    *h2Server
	conns  chan net.Conn
	mu     sync.Mutex
	closed chan struct{}
	done   bool
}

func newHandoffListener(addr net.Addr) *handoffListener {
	return &handoffListener{addr: addr, conns: make(chan net.Conn, 1024), closed: make(chan struct{})}
}

// push queues c for the server; it closes c if the listener is closed or
// the queue is full (the server is stuck), never blocking the loop.
func (h *handoffListener) push(c net.Conn) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.done {
		c.Close()
		return
	}
	select {
	case h.conns <- c:
	default:
		loopHandoffDrops.Inc()
		c.Close()
	}
}

// Accept implements net.Listener.
func (h *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-h.conns:
		if h.h2c != nil {
			return &sniffConn{Conn: c, h: h.h2c}, nil
		}
		return c, nil
	case <-h.closed:
		return nil, net.ErrClosed
	}
}

// Close implements net.Listener; queued connections are closed.
func (h *handoffListener) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.done {
		return nil
	}
	h.done = true
	close(h.closed)
	for {
		select {
		case c := <-h.conns:
			c.Close()
		default:
			return nil
		}
	}
}

// waitTaken waits until the server has accepted every queued connection,
// so that closing the listener cuts none: the server drains what it took.
func (h *handoffListener) waitTaken(ctx context.Context) {
	for len(h.conns) > 0 {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Millisecond):
		}
	}
}

// Addr implements net.Listener.
func (h *handoffListener) Addr() net.Addr { return h.addr }
