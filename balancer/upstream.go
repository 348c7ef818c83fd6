package balancer

import (
	"bufio"
	"errors"
	"io"
	"net"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"
)

// errInterimResponse is a 1xx answer (101 Switching Protocols included)
// to a request that asked for none: the backend broke the exchange.
var errInterimResponse = errors.New("edgelb: backend sent an unsolicited interim (1xx) response")

// Backend connections closed before reuse because the backend had closed
// them or left bytes on them, and after a response followed by bytes.
var (
	staleConnsClosed      = metrics.NewCounter(`edgelb_backend_conns_discarded_total{reason="stale"}`)
	surplusResponsesTotal = metrics.NewCounter(`edgelb_backend_conns_discarded_total{reason="surplus"}`)
)

// errTooManyStaleConns is returned when every idle connection to a backend
// that forwardOnce looked at had to be thrown away, and so did a new one.
var errTooManyStaleConns = errors.New("edgelb: backend connections keep closing before use")

// maxStaleConns bounds how many idle connections one forwardOnce discards
// before it gives up: each is closed, so the next try finds fewer.
const maxStaleConns = 16

// forwardOnce sends req to the backend of hc and reads the response into
// resp by deadline; when firstByte is set, the response's first byte must
// come within firstByte of the request's sending. It does what
// HostClient.DoDeadline does, with two rules the client lacks, so that one
// backend's misbehaviour cannot reach another client:
//   - a kept-alive connection is checked before it is reused: one that the
//     backend closed, or that holds bytes nobody asked for (a body sent
//     after a HEAD answer, bytes past Content-Length), is closed, never
//     used, as the event loop does;
//   - a connection that holds unread bytes after a response is closed, not
//     returned to the pool.
//
// The balancer owns retries, so exchange never retries a request.
func forwardOnce(hc *fasthttp.HostClient, req *fasthttp.Request, resp *fasthttp.Response, deadline time.Time, firstByte time.Duration, maxBody int) error {
	resp.Reset()
	resp.Header.SetNoDefaultContentType(true)
	resp.Header.DisableNormalizing()
	resp.SkipBody = req.Header.IsHead()
	req.URI().DisablePathNormalizing = true
	for range maxStaleConns {
		timeout := time.Until(deadline)
		if timeout <= 0 {
			return fasthttp.ErrTimeout
		}
		cc, err := hc.AcquireConn(timeout, false)
		if err != nil {
			return err
		}
		conn := cc.Conn()
		if !cc.LastUseTime().IsZero() && !idleConnClean(conn) {
			staleConnsClosed.Inc()
			hc.CloseConn(cc)
			continue
		}
		if err := conn.SetDeadline(deadline); err != nil {
			hc.CloseConn(cc)
			return err
		}
		bw := hc.AcquireWriter(conn)
		err = req.Write(bw)
		if err == nil {
			err = bw.Flush()
		}
		hc.ReleaseWriter(bw)
		if err != nil {
			hc.CloseConn(cc)
			return timeoutErr(err)
		}
		br := hc.AcquireReader(conn)
		err = awaitFirstByte(conn, br, firstByte, deadline)
		if err == nil {
			err = resp.ReadLimitBody(br, maxBody)
		}
		surplus := br.Buffered() > 0
		hc.ReleaseReader(br)
		switch {
		case err != nil:
			hc.CloseConn(cc)
			if err == io.EOF {
				return fasthttp.ErrConnectionClosed
			}
			return timeoutErr(err)
		case resp.StatusCode() < 200:
			hc.CloseConn(cc)
			return errInterimResponse
		case surplus:
			surplusResponsesTotal.Inc()
			hc.CloseConn(cc)
		case resp.ConnectionClose() || req.ConnectionClose():
			hc.CloseConn(cc)
		default:
			hc.ReleaseConn(cc)
		}
		return nil
	}
	return errTooManyStaleConns
}

// awaitFirstByte waits, on a connection whose request just went, up to
// firstByte for the first byte of the answer to come into br, then leaves
// the rest of the answer until deadline. It does nothing when firstByte is
// 0 or would end at or after deadline. It fails as reading the response
// head would have: fasthttp.ErrTimeout on a timeout, io.EOF on any other
// error.
func awaitFirstByte(conn net.Conn, br *bufio.Reader, firstByte time.Duration, deadline time.Time) error {
	if firstByte <= 0 {
		return nil
	}
	// The wait starts when the request went, not when the try began: a
	// clock read of its own, made only when first_byte_timeout is set.
	fb := time.Now().Add(firstByte)
	if !fb.Before(deadline) {
		return nil
	}
	if err := conn.SetReadDeadline(fb); err != nil {
		return err
	}
	if _, err := br.Peek(1); err != nil {
		if err = timeoutErr(err); err != fasthttp.ErrTimeout {
			// As fasthttp takes any error on a response's first byte.
			err = io.EOF
		}
		return err
	}
	return conn.SetReadDeadline(deadline)
}

// timeoutErr maps any timeout to fasthttp.ErrTimeout, as the client does.
func timeoutErr(err error) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fasthttp.ErrTimeout
	}
	return err
}

// peekConn is a backend connection that can tell, without blocking and
// without allocating, whether it holds unread bytes or was closed.
type peekConn struct {
	net.Conn
	rc syscall.RawConn
	// peekFn is made once per connection so that checking allocates
	// nothing; it sets clean.
	peekFn func(fd uintptr)
	clean  bool
	buf    [1]byte
}

// newPeekConn wraps c, which must be a *net.TCPConn for checks to work;
// any other connection is taken as clean.
func newPeekConn(c net.Conn) net.Conn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return c
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return c
	}
	p := &peekConn{Conn: c, rc: rc}
	p.peekFn = func(fd uintptr) { p.clean = peekClean(fd, p.buf[:]) }
	return p
}

// idleConnClean reports whether an idle backend connection may carry a new
// request: the backend has not closed it and sent nothing since the last
// response.
func idleConnClean(c net.Conn) bool {
	p, ok := c.(*peekConn)
	if !ok {
		return true
	}
	if err := p.rc.Control(p.peekFn); err != nil {
		return false
	}
	return p.clean
}
