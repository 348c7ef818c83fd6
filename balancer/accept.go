package balancer

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"
)

// Accepting client connections, on both engines: what happens when the
// process runs out of file descriptors (or kernel memory), and the limits a
// client address is held to.

const (
	// acceptPause is how long accepting stops after it failed for want
	// of a resource, as nginx stops accepting for accept_mutex_delay: the
	// pending connections wait in the listen backlog instead of every
	// accept failing at once.
	acceptPause = 100 * time.Millisecond
	// acceptTroubleWindow is how long after the last such failure
	// /readyz still reports it.
	acceptTroubleWindow = 5 * time.Second
	// repeatLogEvery is how often an error that may repeat many times a
	// second is logged.
	repeatLogEvery = 10 * time.Second
)

// Accept errors by cause: the process's descriptor limit (EMFILE), the
// system's (ENFILE), kernel memory (ENOBUFS, ENOMEM), anything else.
var (
	acceptErrEMFILE  = metrics.NewCounter(`edgelb_accept_errors_total{cause="emfile"}`)
	acceptErrENFILE  = metrics.NewCounter(`edgelb_accept_errors_total{cause="enfile"}`)
	acceptErrENOBUFS = metrics.NewCounter(`edgelb_accept_errors_total{cause="enobufs"}`)
	acceptErrENOMEM  = metrics.NewCounter(`edgelb_accept_errors_total{cause="enomem"}`)
	acceptErrOther   = metrics.NewCounter(`edgelb_accept_errors_total{cause="other"}`)
)

// isLocalResourceErr reports whether err is edgelb running out of file
// descriptors or kernel memory: never the fault of a client or a backend.
func isLocalResourceErr(err error) bool {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return false
	}
	switch errno {
	case syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM:
		return true
	}
	return false
}

// acceptFailed counts and logs an accept error, at most once per
// repeatLogEvery, and records a resource shortage for /readyz. Slow path.
func (s *Server) acceptFailed(err error, engine string, now int64) {
	var errno syscall.Errno
	errors.As(err, &errno)
	switch errno {
	case syscall.EMFILE:
		acceptErrEMFILE.Inc()
	case syscall.ENFILE:
		acceptErrENFILE.Inc()
	case syscall.ENOBUFS:
		acceptErrENOBUFS.Inc()
	case syscall.ENOMEM:
		acceptErrENOMEM.Inc()
	default:
		acceptErrOther.Inc()
	}
	if isLocalResourceErr(err) {
		s.acceptTrouble.record(now, errno)
	}
	if ok, held := s.acceptLog.allow(now); ok {
		s.log.Error("cannot accept connections; pausing accept", "err", err, "engine", engine,
			"pause", acceptPause, "repeats_not_logged", held)
	}
}

// acceptTrouble remembers the latest run of accept failures for want of a
// resource. Loops and the accepting goroutine write it concurrently; a
// lost race only moves the start of a run by a few milliseconds.
type acceptTrouble struct {
	since atomic.Int64 // first failure of the run (unix nano)
	last  atomic.Int64 // latest failure (unix nano)
	errno atomic.Uintptr
}

func (a *acceptTrouble) record(now int64, errno syscall.Errno) {
	if now-a.last.Load() > int64(acceptTroubleWindow) {
		a.since.Store(now)
	}
	a.last.Store(now)
	a.errno.Store(uintptr(errno))
}

// describe returns why accepting fails, for /readyz, or "" when it has
// not failed for want of a resource within acceptTroubleWindow.
func (a *acceptTrouble) describe(now time.Time) string {
	last := a.last.Load()
	if last == 0 || now.UnixNano()-last > int64(acceptTroubleWindow) {
		return ""
	}
	return fmt.Sprintf("accept: %v since %s (last %s ago); new connections wait in the listen backlog",
		syscall.Errno(a.errno.Load()), time.Unix(0, a.since.Load()).UTC().Format(time.RFC3339Nano),
		now.Sub(time.Unix(0, last)).Round(time.Millisecond))
}

// repeatLog lets an error that may repeat many times a second be logged at
// most once per repeatLogEvery, and counts the repeats not logged. It is
// safe for concurrent use; a repeat not logged costs two atomic adds.
type repeatLog struct {
	next atomic.Int64 // unix nano before which repeats are not logged
	held atomic.Int64
}

// allow reports whether an occurrence at now is to be logged, and how many
// were not since the last one that was.
func (r *repeatLog) allow(now int64) (ok bool, held int64) {
	next := r.next.Load()
	if now < next || !r.next.CompareAndSwap(next, now+int64(repeatLogEvery)) {
		r.held.Add(1)
		return false, 0
	}
	return true, r.held.Swap(0)
}

// acceptListener is the fasthttp server's own listener when it accepts
// client connections itself. fasthttp stops serving at the first accept
// error that is not a timeout; this listener never returns one but for a
// closed listener: it pauses and tries again, as the event loops do. It
// also holds client addresses to server.max_conns_per_ip.
type acceptListener struct {
	net.Listener
	s *Server
	// engine names the listener in logs: "fasthttp" or "tls".
	engine string
	// h2c, when set, serves the connections that open with HTTP/2's
	// preface (server.h2c).
	h2c    *h2Server
	closed chan struct{}
	once   sync.Once
}

func newAcceptListener(s *Server, ln net.Listener, engine string) *acceptListener {
	return &acceptListener{Listener: ln, s: s, engine: engine, closed: make(chan struct{})}
}

// Accept implements net.Listener.
func (a *acceptListener) Accept() (net.Conn, error) {
	for {
		c, err := a.Listener.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil, err
			}
			a.s.acceptFailed(err, a.engine, time.Now().UnixNano())
			t := time.NewTimer(acceptPause)
			select {
			case <-t.C:
			case <-a.closed:
				t.Stop()
				return nil, net.ErrClosed
			}
			continue
		}
		cc := &clientConn{Conn: c, open: &a.s.fastConns}
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
		cc.open.Add(1)
		if a.h2c != nil {
			return &sniffConn{Conn: cc, h: a.h2c}, nil
		}
		return cc, nil
	}
}

// Close implements net.Listener.
func (a *acceptListener) Close() error {
	a.once.Do(func() { close(a.closed) })
	return a.Listener.Close()
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
	// open counts the connection among the server's fastConns until it
	// closes.
	open *atomic.Int64
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
	if c.closed.CompareAndSwap(false, true) {
		c.open.Add(-1)
		if c.ipc != nil {
			c.ipc.release(c.ip)
		}
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
