package balancer

import (
	"net"
	"net/netip"
	"sync/atomic"

	"github.com/valyala/fasthttp"
)

// Accepting client connections on the fasthttp path, and telling its
// read timeouts apart.

// acceptListener is the fasthttp server's own listener when it accepts
// client connections itself. It holds client addresses to
// server.max_conns_per_ip.
type acceptListener struct {
	net.Listener
	s *Server
}

func newAcceptListener(s *Server, ln net.Listener) *acceptListener {
	return &acceptListener{Listener: ln, s: s}
}

// Accept implements net.Listener.
func (a *acceptListener) Accept() (net.Conn, error) {
	for {
		c, err := a.Listener.Accept()
		if err != nil {
			return nil, err
		}
		cc := &clientConn{Conn: c}
		if ipc := a.s.perIP; ipc != nil {
			// Slow path: a cap per client address.
			ip := remoteAddr(c)
			if !ipc.acquire(ip) {
				connsOverIPLimit.Inc()
				c.Close()
				continue
			}
			cc.ipc, cc.ip = ipc, ip
		}
		return cc, nil
	}
}

// remoteAddr returns the client address of c, or the zero Addr.
func remoteAddr(c net.Conn) netip.Addr {
	if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return ta.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
}

// clientConn is a client connection the fasthttp server accepted itself.
type clientConn struct {
	net.Conn
	// got is set once the client sent a byte.
	got bool
	// ipc, when set, counts the connection against its address's cap
	// until it closes.
	ipc    *ipConns
	ip     netip.Addr
	closed atomic.Bool
}

func (c *clientConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.got = true
	}
	return n, err
}

// sentAny reports whether the client sent anything (see headTimedOut).
func (c *clientConn) sentAny() bool { return c.got }

// Close implements net.Conn.
func (c *clientConn) Close() error {
	if c.closed.CompareAndSwap(false, true) && c.ipc != nil {
		c.ipc.release(c.ip)
	}
	return c.Conn.Close()
}

// headTimedOut tells, of a read timeout fasthttp met, whether it was the
// head's (server.header_timeout) rather than the body's (idle_timeout).
// fasthttp wraps the error of a head it read part of, and returns a body's
// read error as the connection gave it, as it does when nothing came at
// all: then the connection tells whether the client sent anything.
func headTimedOut(ctx *fasthttp.RequestCtx, err error) bool {
	if _, bare := err.(interface{ Timeout() bool }); !bare {
		return true
	}
	c, ok := ctx.Conn().(interface{ sentAny() bool })
	return ok && !c.sentAny()
}
