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
func (l *loop) startTry(c *loopClient, b *Backend, bc *loopBackend) {
	c.tried.add(b)
	bc.tryStart = l.now
	// Begun just before it is attached, so that whatever ends the try
	// from then on (a panic's cancelTries too) counts it ended.
	b.target.Begin()
	l.attach(c, bc)
	c.state = lcWaiting
	bc.due = l.tryDeadline(c, bc)
	if h := c.pool.hedge; h != nil && c.live == 1 && c.hedges < h.max {
		// A try alone: hedge it if it is slow to answer.
		if d := h.delay(l.nowNs); d > 0 {
			c.hedgeAt = l.nowNs + d
			if l.hedgeNext == 0 || c.hedgeAt < l.hedgeNext {
				l.hedgeNext = c.hedgeAt
			}
		}
	}
	l.rearm(c)
	if c.waitIdx < 0 {
		l.addWaiting(c)
	}

	out := l.appendUpstreamRequest(bc.out[:0], c)
	if bc.state == lcConnecting {
		bc.out = out
		return
	}
	l.send(bc, out)
}

// attach makes bc carry a try of c's request.
func (l *loop) attach(c *loopClient, bc *loopBackend) {
	c.peers[c.live] = bc
	c.live++
	bc.client = c
}

// detach ends bc's part in c's request.
func (l *loop) detach(c *loopClient, bc *loopBackend) {
	for i := 0; i < c.live; i++ {
		if c.peers[i] == bc {
			c.live--
			c.peers[i], c.peers[c.live] = c.peers[c.live], nil
			break
		}
	}
	bc.client = nil
	if c.live == 0 {
		c.hedgeAt = 0
	}
}

// cancelTries ends the tries of c's request still in flight, uncounted:
// their answers are not needed.
func (l *loop) cancelTries(c *loopClient) {
	for c.live > 0 {
		l.cancelTry(c.peers[0])
	}
	c.hedgeAt = 0
}

// abandonTries leaves the tries of c's request still in flight, which lost
// to another's answer: each goes on, orphaned, until its answer comes,
// which is thrown away, or its deadline, and then ends, counted only if it
// timed out (see endLostTry). Until
// then it holds its place in its backend's in-flight count, so that a
// backend that stopped answering, whose tries hedges keep beating, stops
// being picked.
func (l *loop) abandonTries(c *loopClient) {
	for c.live > 0 {
		bc := c.peers[0]
		l.detach(c, bc)
		l.addOrphan(bc)
		c.rl.addTry(bc.backend, l.nowNs, l.now.Sub(bc.tryStart), tryHedgeLost, 0)
	}
	c.hedgeAt = 0
}

// endOrphan ends an abandoned try (see endLostTry) and closes its
// connection: an answer may be coming on it still. A try past its
// deadline timed out, whether the sweep found it or its answer, or a
// close, came later: the fasthttp path's try would have ended at the
// deadline.
func (l *loop) endOrphan(bc *loopBackend) {
	l.dropOrphan(bc)
	lat, code := l.now.Sub(bc.tryStart), errNone
	if l.nowNs >= bc.due {
		// Found by the sweep after it was due, or ended by its answer
		// or a close that came later.
		lat, code = time.Duration(bc.due-bc.tryStart.UnixNano()), errTimeout
		if bc.state == lcConnecting {
			code = errConnectFailed
		}
	}
	endLostTry(bc.backend, l.nowNs, lat, code)
	l.closeBackend(bc)
}

// addOrphan marks bc's try abandoned and puts it in l.orphans.
func (l *loop) addOrphan(bc *loopBackend) {
	bc.orphan, bc.orphanIdx = true, len(l.orphans)
	l.orphans = append(l.orphans, bc)
}

// dropOrphan takes bc out of l.orphans; the last takes its place.
func (l *loop) dropOrphan(bc *loopBackend) {
	bc.orphan = false
	i, last := bc.orphanIdx, len(l.orphans)-1
	l.orphans[i] = l.orphans[last]
	l.orphans[i].orphanIdx = i
	l.orphans[last] = nil
	l.orphans = l.orphans[:last]
}

// rearm sets when c's request next needs the sweep: its first try due, or
// its hedge.
func (l *loop) rearm(c *loopClient) {
	e := c.hedgeAt
	for _, bc := range c.peers[:c.live] {
		if e == 0 || bc.due < e {
			e = bc.due
		}
	}
	c.expires = e
}

// hedge sends c's request, whose tries have not answered in time, to one
// more backend, within the service's hedges and budget; the first answer
// wins.
func (l *loop) hedge(c *loopClient) {
	c.hedgeAt = 0
	p, h := c.pool, c.pool.hedge
	if c.live == 0 || c.hedges >= h.max || len(c.kept) > 0 || l.stopping || !l.now.Before(l.due(c)) {
		l.rearm(c)
		return
	}
	b := p.pick(l.nowNs, &c.tried)
	if b == nil || !b.ap.IsValid() {
		l.rearm(c)
		return
	}
	if !h.helps(b, l.nowNs) {
		l.hedgeIn(c, h.retry())
		return
	}
	if !h.take(c.hedgeWaited) {
		// Over budget: check again soon, as requests add to it.
		c.hedgeWaited = true
		l.hedgeIn(c, h.retry())
		return
	}
	c.hedgeWaited = false
	bc, refused := l.connTo(b)
	if bc == nil {
		if refused {
			c.tried.add(b)
			c.hedges++
			b.target.Begin()
			endTry(&c.rl, b, l.nowNs, 0, health.OutcomeConnectFailed, 0, errConnectFailed)
		}
		l.rearm(c)
		return
	}
	c.hedges++
	l.startTry(c, b, bc)
	if c.hedges < h.max {
		l.hedgeLater(c)
	}
}

// hedgeLater has c's request hedge its tries after another hedge delay.
func (l *loop) hedgeLater(c *loopClient) {
	l.hedgeIn(c, c.pool.hedge.after.Load())
}

// hedgeIn has c's request hedge its tries d from now (ns), never when d
// is 0.
func (l *loop) hedgeIn(c *loopClient, d int64) {
	if d > 0 {
		c.hedgeAt = l.nowNs + d
		if l.hedgeNext == 0 || c.hedgeAt < l.hedgeNext {
			l.hedgeNext = c.hedgeAt
		}
	}
	l.rearm(c)
}

// What nextTry did.
const (
	tryStarted  = iota // a try is under way
	tryNone            // no backend is left to try: settle the request now
	tryHandOver        // the loop cannot make the try, the fasthttp path can
)

// nextTry starts the next try of c's request, on a backend it has not
// tried, within its retries; callers check its deadline. A backend that
// refuses the connection at once is a failed try, counted as the fasthttp
// path counts a refused dial, and the next backend is tried.
func (l *loop) nextTry(c *loopClient) int {
	p := c.pool
	for c.tried.n-c.hedges <= p.cfg.Retries {
		if l.stopping {
			// The fasthttp server drains after the loops: it goes on.
			return tryHandOver
		}
		b := p.pick(l.nowNs, &c.tried)
		if b == nil {
			if c.tried.n-c.hedges == 0 {
				c.code = p.noBackendCode(l.nowNs)
			}
			return tryNone
		}
		if !b.ap.IsValid() {
			return tryHandOver
		}
		bc, refused := l.connTo(b)
		if bc == nil && !refused {
			// No connection of its own to spare: the fasthttp path
			// has its own, and its limits.
			return tryHandOver
		}
		if c.tried.n-c.hedges > 0 {
			p.m.retries.Inc()
		}
		if bc != nil {
			l.startTry(c, b, bc)
			return tryStarted
		}
		c.tried.add(b)
		b.target.Begin()
		endTry(&c.rl, b, l.nowNs, 0, health.OutcomeConnectFailed, 0, errConnectFailed)
		c.code = errConnectFailed
		if !retryFailure(errConnectFailed, true, true, l.now, l.due(c)) {
			return tryNone
		}
	}
	return tryNone
}

// goOn follows a try of c's request that failed or got an answer another
// backend may better: the next try, else the answer the request has now,
// else the fasthttp path, with the attempt.
func (l *loop) goOn(c *loopClient) {
	switch l.nextTry(c) {
	case tryNone:
		l.settle(c)
	case tryHandOver:
		c.state = lcIdle
		l.handOffWith(c, l.attemptOf(c))
	}
}

// due is when c's request is due, whatever its tries.
func (l *loop) due(c *loopClient) time.Time { return c.start.Add(c.pool.cfg.Timeout) }

// tryDeadline returns when the try of c's request on bc fails (unix nano):
// try_timeout from the try's start, at most timeout from the request's, and
// while bc connects, connect_timeout from now if that comes first.
// onConnected sets it again once bc has connected.
func (l *loop) tryDeadline(c *loopClient, bc *loopBackend) int64 {
	cfg := c.pool.cfg
	d := min(bc.tryStart.UnixNano()+int64(cfg.TryTimeout), c.start.UnixNano()+int64(cfg.Timeout))
	if bc.state == lcConnecting {
		d = min(d, l.nowNs+int64(cfg.ConnectTimeout))
	}
	return d
}

// send queues the request out, in bc.out's buffer, for a connected
// backend connection; sent goes on once it went.
func (l *loop) send(bc *loopBackend, out []byte) { l.queueRequest(bc, out) }

// sent goes on with bc once its request went whole (ok) or did not.
func (l *loop) sent(bc *loopBackend, ok bool) {
	c := bc.client
	switch {
	case ok:
		if c != nil {
			if fb := c.pool.cfg.FirstByteTimeout; fb > 0 {
				l.awaitFirstByte(bc, fb)
			}
		}
	case bc.orphan:
		l.endOrphan(bc)
	case c == nil:
		l.closeBackend(bc)
	case bc.reused:
		// A backend socket that cannot take a small request at once is
		// broken or closed: a kept-alive one the backend has just
		// closed is not its failure.
		l.redial(bc)
	default:
		l.backendFailed(bc, health.OutcomeConnectFailed, errConnectFailed)
	}
}

// awaitFirstByte gives the answer to the request just sent on bc until
// first_byte_timeout (fb) from now to begin, if that comes before the
// try's deadline; onResponseBytes gives the rest the try's deadline. Now
// is read again rather than taken from the batch's start, which a long
// batch leaves behind.
func (l *loop) awaitFirstByte(bc *loopBackend, fb time.Duration) {
	if d := time.Now().UnixNano() + int64(fb); d < bc.due {
		bc.due, bc.awaiting = d, true
		l.rearm(bc.client)
	}
}

// loopSlot is one loop's share of a backend: its idle connections to it
// and how many it has open, which count against the backend's max_conns
// with the other loops'. A loop touches only its own slot.
type loopSlot struct {
	idle []*loopBackend
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

// connTo returns an idle connection to b, or starts a new one. It
// returns nil when it cannot, with refused set when b refused the
// connection at once.
func (l *loop) connTo(b *Backend) (bc *loopBackend, refused bool) {
	sl := l.slot(b)
	if n := len(sl.idle); n > 0 {
		bc := sl.idle[n-1]
		sl.idle[n-1] = nil
		sl.idle = sl.idle[:n-1]
		bc.reused = true
		return bc, false
	}
	return l.dial(b, sl)
}

func (l *loop) dial(b *Backend, sl *loopSlot) (*loopBackend, bool) {
	if sl.open >= l.maxConns(b) {
		// The full path's HostClient enforces the limit and answers
		// overloaded.
		return nil, false
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
		return nil, false
	}
	syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	bc := &loopBackend{sock: sock{fd: fd, state: lcBackend, lastActive: l.nowNs}, backend: b}
	err = syscall.Connect(fd, sa)
	switch err {
	case nil:
	case syscall.EINPROGRESS:
		bc.state = lcConnecting
	default:
		// Refused at once (on loopback, say).
		syscall.Close(fd)
		return nil, true
	}
	if !l.add(fd, loopSock{bc: bc}, connEvents) {
		return nil, false
	}
	sl.open++
	return bc, false
}

func (l *loop) onConnected(bc *loopBackend) {
	if bc.orphan {
		// Abandoned before its request went.
		l.endOrphan(bc)
		return
	}
	if errno, err := syscall.GetsockoptInt(bc.fd, syscall.SOL_SOCKET, syscall.SO_ERROR); err != nil || errno != 0 {
		l.backendFailed(bc, health.OutcomeConnectFailed, errConnectFailed)
		return
	}
	bc.state = lcBackend
	if c := bc.client; c != nil {
		// Connected: the answer has until the try's deadline.
		bc.due = l.tryDeadline(c, bc)
		l.rearm(c)
		l.send(bc, bc.out)
	}
}

// onBackend reads a backend's response and answers the client once it is
// complete; ev are the events that woke the loop for it.
func (l *loop) onBackend(bc *loopBackend, ev uint32) {
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
		n, errno := l.recv(nil, bc, bc.fd, bc.in[len(bc.in):cap(bc.in)])
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
func (l *loop) backendClosed(bc *loopBackend) {
	c := bc.client
	switch {
	case bc.orphan:
		l.endOrphan(bc)
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
func (l *loop) onResponseBytes(bc *loopBackend) {
	bc.lastActive = l.nowNs
	c := bc.client
	if c == nil {
		if bc.orphan {
			// The answer to an abandoned try: thrown away.
			l.endOrphan(bc)
			return
		}
		// Bytes from an idle connection: nothing may come there.
		l.dropIdle(bc)
		return
	}
	if bc.awaiting {
		// The answer began: first_byte_timeout is met, and the rest
		// has until the try's deadline.
		bc.awaiting = false
		bc.due = l.tryDeadline(c, bc)
		l.rearm(c)
	}
	if !bc.parsed {
		switch h1.ParseResponse(bc.in, c.req.Head, c.rl.idName(), &bc.resp) {
		case h1.Incomplete:
			if len(bc.in) >= fasthttpHeadLimit {
				l.carry(bc)
			}
			return
		case h1.HandOff:
			if !h1.HasStatusLinePrefix(bc.in) {
				// Not HTTP at all: a failed try, as the fasthttp
				// path would find it.
				l.backendFailed(bc, health.OutcomeInvalidResponse, errInvalidResponse)
				return
			}
			l.carry(bc)
			return
		}
		bc.parsed = true
		p, r := c.pool, &bc.resp
		bc.outcome, bc.retryable = classifyStatus(r.Status, r.RetryAfter)
		// Another backend or a stored answer may do better: decided
		// once the answer is whole.
		bc.elsewhere = bc.retryable || p.staleOnAnswer(r.Status)
		if r.HeadLen+r.BodyLen > loopMaxResponse || r.BodyLen > p.cfg.MaxResponseBody {
			// Large bodies: the fasthttp path reads the rest.
			l.carry(bc)
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
			l.carry(bc)
			return
		}
		if len(bc.in) > r.HeadLen+n {
			r.KeepAlive = false
		}
		l.countAnswer(bc)
		if bc.elsewhere && l.replaced(bc, bc.in[:r.HeadLen+n]) {
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
	l.countAnswer(bc)
	if bc.elsewhere && l.replaced(bc, bc.in[:total]) {
		return
	}
	l.respond(c, bc, bc.in[r.HeadLen:total], false)
}

// countAnswer counts the try on bc, whose whole answer is in.
func (l *loop) countAnswer(bc *loopBackend) {
	endTry(&bc.client.rl, bc.backend, l.nowNs, l.now.Sub(bc.tryStart), bc.outcome, bc.resp.Status, errNone)
}

// replaced goes on with a whole answer, raw, that another backend or a
// stored copy may better, as the fasthttp path does: a retryable answer is
// kept while another backend is tried; a final one gives way to a stored
// copy on a status the service serves stale on. It reports false when the
// answer is the one to send.
func (l *loop) replaced(bc *loopBackend, raw []byte) bool {
	c := bc.client
	if bc.retryable && retryAnswer(true, true, l.now, l.due(c)) && (c.live > 1 || c.tried.n-c.hedges <= c.pool.cfg.Retries) {
		c.kept = append(c.kept[:0], raw...)
		l.detach(c, bc)
		l.releaseBackend(bc)
		if c.live > 0 {
			// A hedge is still out: its answer may do better.
			l.rearm(c)
			return true
		}
		l.unwait(c)
		l.goOn(c)
		return true
	}
	if !c.pool.staleOnAnswer(bc.resp.Status) {
		return false
	}
	l.detach(c, bc)
	l.abandonTries(c)
	l.unwait(c)
	if l.serveStale(c, upstreamStatusDetail[bc.resp.Status-500]) {
		l.releaseBackend(bc)
		return true
	}
	if l.s.fill.wanted() {
		// Slow path: the answer goes with the request, for the
		// fasthttp path to send if no peer has a copy.
		c.kept = append(c.kept[:0], raw...)
		l.releaseBackend(bc)
		l.handOverForFill(c)
		return true
	}
	l.attach(c, bc)
	return false
}

// fasthttpHeadLimit bounds a backend's response head, as the HostClient's
// read buffer does on the full path.
const fasthttpHeadLimit = DefaultMaxHeaderBytes

// releaseBackend returns bc to the idle list of its backend, or closes it.
func (l *loop) releaseBackend(bc *loopBackend) {
	// A connection whose request is still queued answered before it was
	// asked: it is not reused.
	keep := bc.resp.KeepAlive && !bc.eof && !l.stopping && !bc.sending
	bc.parsed, bc.elsewhere = false, false
	if cap(bc.in) > loopKeepBuf {
		bc.in = nil
	} else {
		bc.in = bc.in[:0]
	}
	if !keep {
		l.closeBackend(bc)
		return
	}
	bc.lastActive = l.nowNs
	sl := l.slot(bc.backend)
	sl.idle = append(sl.idle, bc)
}

// dropIdle closes an idle backend connection the backend closed.
func (l *loop) dropIdle(bc *loopBackend) {
	sl := l.slot(bc.backend)
	for i, x := range sl.idle {
		if x == bc {
			last := len(sl.idle) - 1
			sl.idle[i], sl.idle[last] = sl.idle[last], nil
			sl.idle = sl.idle[:last]
			break
		}
	}
	l.closeBackend(bc)
}

// cancelTry ends the try on bc without counting it, as nobody waits for
// its answer or another engine makes it, and closes bc.
func (l *loop) cancelTry(bc *loopBackend) {
	if c := bc.client; c != nil {
		l.detach(c, bc)
		c.rl.addTry(bc.backend, l.nowNs, l.now.Sub(bc.tryStart), tryCanceled, 0)
	}
	bc.backend.target.Done(l.nowNs, health.OutcomeCanceled, 0)
	l.closeBackend(bc)
}

// backendFailed records a failed try on bc's backend and goes on with
// its request: another backend, else a stored copy or an error.
func (l *loop) backendFailed(bc *loopBackend, o health.Outcome, code errCode) {
	c := bc.client
	lat := time.Duration(0)
	var rl *reqLog
	if c != nil {
		lat = l.now.Sub(bc.tryStart)
		l.detach(c, bc)
		rl = &c.rl
	}
	endTry(rl, bc.backend, l.nowNs, lat, o, 0, code)
	l.closeBackend(bc)
	switch {
	case c == nil:
	case c.live > 0:
		// A hedge is still out: wait for it.
		c.code = code
		l.rearm(c)
	default:
		l.tryFailed(c, code)
	}
}

// tryFailed goes on with c's request after a try that failed with code.
func (l *loop) tryFailed(c *loopClient, code errCode) {
	l.unwait(c)
	c.code = code
	if !retryFailure(code, true, false, l.now, l.due(c)) {
		l.settle(c)
		return
	}
	l.goOn(c)
}

// attemptOf makes the attempt a hand-over of c carries after its tries:
// the answer kept, if any, or the last try's failure.
func (l *loop) attemptOf(c *loopClient) *attempt {
	c.rl.hedges = uint8(c.hedges)
	a := &attempt{start: c.start, deadline: l.due(c), tried: c.tried, tries: c.tried.n - c.hedges, code: c.code,
		head: c.req.Head, rl: c.rl}
	if len(c.kept) > 0 {
		a.code = errNone
		a.resp = append([]byte(nil), c.kept...)
	}
	return a
}

// carry hands c over with the try on bc under way: the fasthttp path reads
// the rest of bc's answer from its connection, which goes with it, and
// counts the try. For answers the loop does not buffer: too large, or
// framed in a way it leaves to fasthttp.
func (l *loop) carry(bc *loopBackend) {
	c := bc.client
	loopFallbacks.Inc()
	l.detach(c, bc)
	l.abandonTries(c)
	l.unwait(c)
	a := l.attemptOf(c)
	a.code, a.pre = errNone, append([]byte(nil), bc.in...)
	a.backend, a.tryStart = bc.backend, bc.tryStart
	l.forget(bc.fd)
	l.slot(bc.backend).open--
	a.conn = newFDConn(bc.fd, bc.backend.ap, nil)
	bc.fd = -1
	c.state = lcIdle
	l.handOffWith(c, a)
}

// redial resends the request of a kept-alive connection that turned out
// closed on a new connection.
func (l *loop) redial(bc *loopBackend) {
	c := bc.client
	b := bc.backend
	l.detach(c, bc)
	l.closeBackend(bc)
	nb, refused := l.dial(b, l.slot(b))
	if nb == nil {
		if refused {
			endTry(&c.rl, b, l.nowNs, l.now.Sub(bc.tryStart), health.OutcomeConnectFailed, 0, errConnectFailed)
		} else {
			// The fasthttp path makes the try again.
			c.rl.addTry(b, l.nowNs, l.now.Sub(bc.tryStart), tryCanceled, 0)
			b.target.Done(l.nowNs, health.OutcomeCanceled, 0)
		}
		switch {
		case c.live > 0:
			l.rearm(c)
		case refused:
			l.tryFailed(c, errConnectFailed)
		default:
			l.unwait(c)
			c.state = lcIdle
			l.handOffWith(c, l.attemptOf(c))
		}
		return
	}
	nb.tryStart = bc.tryStart
	l.attach(c, nb)
	nb.due = l.tryDeadline(c, nb)
	l.rearm(c)
	out := l.appendUpstreamRequest(nb.out[:0], c)
	if nb.state == lcConnecting {
		nb.out = out
		return
	}
	l.send(nb, out)
}

// sweepTimeouts fails the tries past their deadline and sends the hedges
// that are due, and ends the abandoned tries past theirs (endOrphan).
func (l *loop) sweepTimeouts() {
	for i := 0; i < len(l.waiting); {
		c := l.waiting[i]
		if l.nowNs < c.expires || c.live == 0 {
			i++
			continue
		}
		l.sweeping = c
		l.expire(c)
		l.sweeping = nil
		if i < len(l.waiting) && l.waiting[i] == c {
			i++
		}
		// Otherwise c left the list, and another took its place.
	}
	for i := 0; i < len(l.orphans); {
		if bc := l.orphans[i]; l.nowNs >= bc.due {
			// Out of the list: the last takes place i.
			l.endOrphan(bc)
			continue
		}
		i++
	}
}

// expire fails c's tries that are due, and hedges them if it is time.
func (l *loop) expire(c *loopClient) {
	for i := 0; i < c.live; {
		bc := c.peers[i]
		if l.nowNs < bc.due {
			i++
			continue
		}
		last := c.live == 1
		if bc.state == lcConnecting {
			l.backendFailed(bc, health.OutcomeConnectFailed, errConnectFailed)
		} else {
			l.backendFailed(bc, health.OutcomeTimeout, errTimeout)
		}
		if last {
			// The request went on: retried, or answered.
			return
		}
	}
	if c.hedgeAt != 0 && l.nowNs >= c.hedgeAt {
		l.hedge(c)
	}
}

// sweepHedges sends the hedges that are due, and finds when the next is.
func (l *loop) sweepHedges() {
	l.hedgeNext = 0
	for i := 0; i < len(l.waiting); i++ {
		c := l.waiting[i]
		if c.hedgeAt != 0 && l.nowNs >= c.hedgeAt {
			l.sweeping = c
			l.hedge(c)
			l.sweeping = nil
			if i >= len(l.waiting) || l.waiting[i] != c {
				// c left the list, and another took its place.
				i--
				continue
			}
		}
		if c.hedgeAt != 0 && (l.hedgeNext == 0 || c.hedgeAt < l.hedgeNext) {
			l.hedgeNext = c.hedgeAt
		}
	}
}
