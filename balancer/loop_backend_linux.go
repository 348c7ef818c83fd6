//go:build linux

// The event loop's backend side: each loop's slot of connections to a
// backend, the tries a request makes on them, and how a try ends.

package balancer

import (
	"syscall"
	"time"

	"github.com/edgelb/edgelb/balancer/h1"
	"github.com/edgelb/edgelb/health"
)

// maxConns is the loop's share of b's max_conns.
func (l *loop) maxConns(b *Backend) int {
	return max(1, b.maxConns/l.nloops)
}

// startTry sends c's request to b on bc.
func (l *loop) startTry(c *lconn, b *Backend, bc *lconn) {
	c.tried.add(b)
	c.tryStart = l.now
	c.peer, bc.client = bc, c
	c.state = lcWaiting
	c.expires = l.tryDeadline(c, bc)
	if c.waitIdx < 0 {
		l.addWaiting(c)
	}
	b.target.Begin()

	out := l.appendUpstreamRequest(bc.out[:0], c)
	if bc.state == lcConnecting {
		bc.out = out
		return
	}
	l.send(bc, out)
}

// retry tries c's request on another backend after a try that failed with
// code, as the fasthttp path would: within the request's retries and
// deadline, on a backend not tried yet. It reports false when the request
// must go to the fasthttp path instead: no backend is left here, or the
// loop is stopping.
func (l *loop) retry(c *lconn, code errCode) bool {
	p := c.pool
	if l.stopping || c.tried.n > p.cfg.Retries ||
		!retryFailure(code, true, false, l.now, c.start.Add(p.cfg.Timeout)) {
		return false
	}
	b := p.pick(l.nowNs, &c.tried)
	if b == nil || !b.ap.IsValid() {
		return false
	}
	bc := l.backendConn(b)
	if bc == nil {
		return false
	}
	p.m.retries.Inc()
	l.startTry(c, b, bc)
	return true
}

// tryDeadline returns when the try of c's request on bc fails (unix nano):
// try_timeout from the try's start, at most timeout from the request's, and
// while bc connects, connect_timeout from now if that comes first.
// onConnected sets it again once bc has connected.
func (l *loop) tryDeadline(c, bc *lconn) int64 {
	cfg := c.pool.cfg
	d := min(c.tryStart.UnixNano()+int64(cfg.TryTimeout), c.start.UnixNano()+int64(cfg.Timeout))
	if bc.state == lcConnecting {
		d = min(d, l.nowNs+int64(cfg.ConnectTimeout))
	}
	return d
}

// send writes the request to a connected backend connection.
func (l *loop) send(bc *lconn, out []byte) {
	n, _ := rawWrite(bc.fd, out)
	bc.out = out[:0]
	if n == len(out) {
		return
	}
	// A backend socket that cannot take a small request at once is
	// broken or closed: a kept-alive one the backend has just closed is
	// not its failure.
	if bc.reused {
		l.redial(bc)
		return
	}
	l.backendFailed(bc, health.OutcomeConnectFailed, errConnectFailed)
}

// loopSlot is one loop's share of a backend: its idle connections to it
// and how many it has open, which count against the backend's max_conns
// with the other loops'. A loop touches only its own slot.
type loopSlot struct {
	idle []*lconn
	open int
	_    [32]byte // a cache line each
}

// slot returns the loop's slot in b's loopSlots, which the first loop to
// need them makes.
func (l *loop) slot(b *Backend) *loopSlot {
	slots := b.loopSlots.slots.Load()
	if slots == nil {
		fresh := make([]loopSlot, l.nloops)
		if b.loopSlots.slots.CompareAndSwap(nil, &fresh) {
			slots = &fresh
		} else {
			slots = b.loopSlots.slots.Load()
		}
	}
	return &(*slots)[l.idx]
}

// backendConn returns an idle connection to b, or starts a new one.
func (l *loop) backendConn(b *Backend) *lconn {
	sl := l.slot(b)
	if n := len(sl.idle); n > 0 {
		bc := sl.idle[n-1]
		sl.idle[n-1] = nil
		sl.idle = sl.idle[:n-1]
		bc.reused = true
		return bc
	}
	return l.dial(b, sl)
}

func (l *loop) dial(b *Backend, sl *loopSlot) *lconn {
	if sl.open >= l.maxConns(b) {
		// The full path's HostClient enforces the limit and answers
		// overloaded.
		return nil
	}
	sa := sockaddr(b.ap)
	domain := syscall.AF_INET
	if _, ok := sa.(*syscall.SockaddrInet6); ok {
		domain = syscall.AF_INET6
	}
	fd, err := syscall.Socket(domain, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		// Out of descriptors, say: the full path's dial fails the same
		// way and answers overloaded, never blaming the backend.
		return nil
	}
	syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	bc := &lconn{fd: fd, state: lcBackend, backend: b, waitIdx: -1, lastActive: l.nowNs}
	err = syscall.Connect(fd, sa)
	switch err {
	case nil:
	case syscall.EINPROGRESS:
		bc.state = lcConnecting
	default:
		// Refused at once: the full path tries it and reports it.
		syscall.Close(fd)
		return nil
	}
	if !l.add(bc, connEvents) {
		return nil
	}
	sl.open++
	return bc
}

func (l *loop) onConnected(bc *lconn) {
	if errno, err := syscall.GetsockoptInt(bc.fd, syscall.SOL_SOCKET, syscall.SO_ERROR); err != nil || errno != 0 {
		l.backendFailed(bc, health.OutcomeConnectFailed, errConnectFailed)
		return
	}
	bc.state = lcBackend
	if c := bc.client; c != nil {
		// Connected: the answer has until the try's deadline.
		c.expires = l.tryDeadline(c, bc)
		l.send(bc, bc.out)
	}
}

// onBackend reads a backend's response and answers the client once it is
// complete; ev are the events that woke the loop for it.
func (l *loop) onBackend(bc *lconn, ev uint32) {
	// Edge-triggered, a close that comes with the last bytes is reported
	// with them, and never again: then the socket is read to its end.
	// Otherwise a short read drained it, and a close still to come is
	// reported when it comes.
	closing := ev&(syscall.EPOLLRDHUP|syscall.EPOLLHUP|syscall.EPOLLERR) != 0
	for {
		if bc.in == nil {
			bc.in = make([]byte, 0, loopBackendBuf)
		}
		if len(bc.in) == cap(bc.in) {
			if cap(bc.in) >= loopMaxResponse+fasthttpHeadLimit {
				// More than the loop ever forwards: what is read already
				// says that the full path takes it.
				break
			}
			bc.in = append(bc.in[:cap(bc.in)], 0)[:len(bc.in)]
		}
		space := cap(bc.in) - len(bc.in)
		n, errno := rawRead(bc.fd, bc.in[len(bc.in):cap(bc.in)])
		if n < 0 && errno == syscall.EAGAIN {
			break
		}
		if n <= 0 {
			bc.eof, bc.reset = true, n < 0
			break
		}
		bc.in = bc.in[:len(bc.in)+n]
		if n < space && !closing {
			break
		}
	}
	if len(bc.in) > 0 {
		// A response the close completes is still forwarded.
		l.onResponseBytes(bc)
	}
	if bc.eof && bc.fd >= 0 {
		l.backendClosed(bc)
	}
}

// backendClosed handles a backend connection the backend closed or reset,
// with no whole response read from it.
func (l *loop) backendClosed(bc *lconn) {
	c := bc.client
	switch {
	case c == nil:
		l.dropIdle(bc)
	case bc.reused && len(bc.in) == 0:
		// A kept-alive connection the backend had just closed: not the
		// backend's failure. Resend on a new connection.
		l.redial(bc)
	case len(bc.in) == 0 || bc.reset:
		// Closed with no answer, or reset: as the fasthttp path counts
		// them.
		l.backendFailed(bc, health.OutcomeConnectFailed, errConnectFailed)
	default:
		// An answer cut short.
		l.backendFailed(bc, health.OutcomeInvalidResponse, errInvalidResponse)
	}
}

// onResponseBytes goes on with the response bytes in bc.in.
func (l *loop) onResponseBytes(bc *lconn) {
	bc.lastActive = l.nowNs
	c := bc.client
	if c == nil {
		// Bytes from an idle connection: nothing may come there.
		l.dropIdle(bc)
		return
	}
	if !bc.parsed {
		switch h1.ParseResponse(bc.in, c.req.Head, &bc.resp) {
		case h1.Incomplete:
			if len(bc.in) >= fasthttpHeadLimit {
				l.abandon(bc)
			}
			return
		case h1.HandOff:
			if !h1.HasStatusLinePrefix(bc.in) {
				// Not HTTP at all: a failed try, as the fasthttp
				// path would find it, not one to make again there.
				l.backendFailed(bc, health.OutcomeInvalidResponse, errInvalidResponse)
				return
			}
			l.abandon(bc)
			return
		}
		bc.parsed = true
		p, r := c.pool, &bc.resp
		o, retryable := classifyStatus(r.Status, r.RetryAfter)
		bc.outcome = o
		// Another backend or a stored answer may do better: the
		// fasthttp path decides, with this answer in hand once whole.
		bc.elsewhere = retryable ||
			(r.Status >= 500 && r.Status <= 504 && p.store != nil && p.staleOnStatus[r.Status-500])
		if r.HeadLen+r.BodyLen > loopMaxResponse || r.BodyLen > p.cfg.MaxResponseBody {
			// Large bodies stream on the full path.
			l.abandon(bc)
			return
		}
	}
	r := &bc.resp
	if r.Chunked {
		limit := min(loopMaxResponse, c.pool.cfg.MaxResponseBody)
		bodyLen, n, v := h1.ScanChunked(bc.in[r.HeadLen:], limit)
		switch v {
		case h1.Incomplete:
			return
		case h1.HandOff:
			l.abandon(bc)
			return
		}
		if len(bc.in) > r.HeadLen+n {
			r.KeepAlive = false
		}
		if bc.elsewhere {
			l.tryElsewhere(bc, bc.in[:r.HeadLen+n])
			return
		}
		l.body = h1.AppendDechunked(l.body[:0], bc.in[r.HeadLen:r.HeadLen+n])
		bc.in = bc.in[:r.HeadLen+n]
		if len(l.body) != bodyLen {
			panic("BUG: chunked body decoded to another length than scanned")
		}
		l.respond(c, bc, l.body, true)
		return
	}
	total := bc.resp.HeadLen + bc.resp.BodyLen
	if len(bc.in) < total {
		if cap(bc.in) < total {
			grown := make([]byte, len(bc.in), total)
			copy(grown, bc.in)
			bc.in = grown
		}
		return
	}
	if len(bc.in) > total {
		// More than the response: the connection is out of step.
		bc.resp.KeepAlive = false
	}
	if bc.elsewhere {
		l.tryElsewhere(bc, bc.in[:total])
		return
	}
	l.respond(c, bc, bc.in[r.HeadLen:total], false)
}

// fasthttpHeadLimit bounds a backend's response head, as the HostClient's
// read buffer does on the full path.
const fasthttpHeadLimit = DefaultMaxHeaderBytes

// releaseBackend returns bc to the idle list of its backend, or closes it.
func (l *loop) releaseBackend(bc *lconn) {
	keep := bc.resp.KeepAlive && !bc.eof && !l.stopping
	bc.parsed, bc.elsewhere = false, false
	if cap(bc.in) > loopKeepBuf {
		bc.in = nil
	} else {
		bc.in = bc.in[:0]
	}
	if !keep {
		l.close(bc)
		return
	}
	bc.lastActive = l.nowNs
	sl := l.slot(bc.backend)
	sl.idle = append(sl.idle, bc)
}

// dropIdle closes an idle backend connection the backend closed.
func (l *loop) dropIdle(bc *lconn) {
	sl := l.slot(bc.backend)
	for i, x := range sl.idle {
		if x == bc {
			last := len(sl.idle) - 1
			sl.idle[i], sl.idle[last] = sl.idle[last], nil
			sl.idle = sl.idle[:last]
			break
		}
	}
	l.close(bc)
}

// cancelTry ends the try on bc without counting it, as nobody waits for
// its answer or another engine makes it, and closes bc.
func (l *loop) cancelTry(bc *lconn) {
	if c := bc.client; c != nil {
		c.peer, bc.client = nil, nil
	}
	bc.backend.target.Done(l.nowNs, health.OutcomeCanceled, 0)
	l.close(bc)
}

// backendFailed records a failed try on bc's backend and tries another
// backend; when none is left here, it hands the client, with the attempt,
// to the fasthttp path, which serves stale or answers with the error. Only
// requests safe to repeat take the loop.
func (l *loop) backendFailed(bc *lconn, o health.Outcome, code errCode) {
	c := bc.client
	lat := time.Duration(0)
	if c != nil {
		lat = l.now.Sub(c.tryStart)
		c.peer, bc.client = nil, nil
	}
	endTry(bc.backend, l.nowNs, lat, o, 0, code)
	l.close(bc)
	if c == nil || l.retry(c, code) {
		return
	}
	loopFallbacks.Inc()
	c.state = lcIdle
	l.handOffTried(c, code, nil)
}

// tryElsewhere records a backend's whole answer, raw, that another backend
// or a stored copy may better, and hands the client to the fasthttp path
// with it: the path retries elsewhere, serves stale, or answers with it,
// and asks this backend nothing again.
func (l *loop) tryElsewhere(bc *lconn, raw []byte) {
	c := bc.client
	endTry(bc.backend, l.nowNs, l.now.Sub(c.tryStart), bc.outcome, bc.resp.Status, errNone)
	loopFallbacks.Inc()
	att := l.attemptOf(c, errNone, raw)
	c.peer, bc.client = nil, nil
	l.unwait(c)
	l.releaseBackend(bc)
	c.state = lcIdle
	l.handOffWith(c, att)
}

// attemptOf makes the attempt a hand-over of c carries after its tries;
// raw, if set, is copied.
func (l *loop) attemptOf(c *lconn, code errCode, raw []byte) *attempt {
	a := &attempt{start: c.start, deadline: c.start.Add(c.pool.cfg.Timeout), tried: c.tried, tries: c.tried.n, code: code,
		head: c.req.Head}
	if raw != nil {
		a.resp = append([]byte(nil), raw...)
	}
	return a
}

// handOffTried hands c over with the attempt of its request, whose last
// try failed with code.
func (l *loop) handOffTried(c *lconn, code errCode, raw []byte) {
	l.handOffWith(c, l.attemptOf(c, code, raw))
}

// abandon gives up on a response the loop does not forward itself: the
// full path asks again and handles it, and the try counts for nothing.
func (l *loop) abandon(bc *lconn) {
	c := bc.client
	loopFallbacks.Inc()
	l.cancelTry(bc)
	if c != nil {
		c.state = lcIdle
		l.handOff(c)
	}
}

// redial resends the request of a kept-alive connection that turned out
// closed on a new connection.
func (l *loop) redial(bc *lconn) {
	c := bc.client
	b := bc.backend
	c.peer, bc.client = nil, nil
	l.close(bc)
	nb := l.dial(b, l.slot(b))
	if nb == nil {
		b.target.Done(l.nowNs, health.OutcomeCanceled, 0)
		c.state = lcIdle
		l.handOffTried(c, errNone, nil)
		return
	}
	c.peer, nb.client = nb, c
	c.expires = l.tryDeadline(c, nb)
	out := l.appendUpstreamRequest(nb.out[:0], c)
	if nb.state == lcConnecting {
		nb.out = out
		return
	}
	l.send(nb, out)
}

// sweepTimeouts fails the requests past their try deadline.
func (l *loop) sweepTimeouts() {
	for i := 0; i < len(l.waiting); {
		c := l.waiting[i]
		if l.nowNs < c.expires || c.peer == nil {
			i++
			continue
		}
		bc := c.peer
		if bc.state == lcConnecting {
			l.backendFailed(bc, health.OutcomeConnectFailed, errConnectFailed)
		} else {
			l.backendFailed(bc, health.OutcomeTimeout, errTimeout)
		}
		// backendFailed took c off the list: look at index i again.
	}
}
