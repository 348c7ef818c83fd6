package balancer

import (
	"net"

	"github.com/valyala/fasthttp"
)

// Accepting client connections on the fasthttp path, and telling its
// read timeouts apart.

// acceptListener is the fasthttp server's own listener when it accepts
// client connections itself.
type acceptListener struct {
	net.Listener
	s *Server
}

func newAcceptListener(s *Server, ln net.Listener) *acceptListener {
	return &acceptListener{Listener: ln, s: s}
}

// Accept implements net.Listener.
func (a *acceptListener) Accept() (net.Conn, error) {
	c, err := a.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &clientConn{Conn: c}, nil
}

// clientConn is a client connection the fasthttp server accepted itself.
type clientConn struct {
	net.Conn
	// got is set once the client sent a byte.
	got bool
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
