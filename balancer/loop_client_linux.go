//go:build linux

// The event loop's client connections: accepting them, reading and
// checking requests, answering them, and handing a connection to the
// fasthttp server.

package balancer

import (
	"bufio"
	"bytes"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"time"
	"unsafe"

	"github.com/edgelb/edgelb/balancer/h1"
	"github.com/edgelb/edgelb/balancer/stale"
	"github.com/edgelb/edgelb/internal/panics"
)

// loopFreeConns bounds the closed client connections a loop keeps for
// reuse.
const loopFreeConns = 1024

// newClient returns a client connection for fd, reusing a closed one's
// memory when there is one.
func (l *loop) newClient(fd int, remote netip.AddrPort, held bool) *loopClient {
	var c *loopClient
	if n := len(l.free); n > 0 {
		c = l.free[n-1]
		l.free[n-1] = nil
		l.free = l.free[:n-1]
		*c = loopClient{sock: sock{in: c.in[:0]}, ip: c.ip[:0], dueURL: c.dueURL[:0]}
	} else {
		c = &loopClient{sock: sock{in: make([]byte, 0, loopReadBuf)}}
	}
	c.fd, c.state, c.waitIdx = fd, lcIdle, -1
	c.lastActive, c.headSince = l.nowNs, l.nowNs
	c.remote, c.ipHeld = remote, held
	return c
}

func (l *loop) accept() {
	for {
		fd, err := l.accept4()
		if err != nil {
			switch err {
			case syscall.EAGAIN:
				return
			case syscall.ECONNABORTED, syscall.EINTR:
				continue
			}
			// Out of descriptors, say: the listening socket stays
			// readable, and polling it again at once would spin.
			loopAcceptErrors.Inc()
			l.s.acceptFailed(os.NewSyscallError("accept4", err), "event_loop", l.nowNs)
			l.pauseAccept()
			return
		}
		remote := rawSockaddrAddrPort(&l.sa)
		held := false
		if ipc := l.s.perIP; ipc != nil {
			// Slow path: a cap per client address.
			if !ipc.acquire(remote.Addr()) {
				connsOverIPLimit.Inc()
				syscall.Close(fd)
				continue
			}
			held = true
		}
		c := l.newClient(fd, remote, held)
		c.ip = appendAddrIP(c.ip, remote)
		c.trusted = l.s.trustedPeer(remote.Addr())
		if !l.add(fd, loopSock{c: c}, connEvents) {
			l.releaseIP(c)
			return
		}
	}
}

// pauseAccept stops accepting for acceptPause, as nginx does when accept
// fails for want of descriptors: the listening socket leaves the loop's
// epoll set, connections wait in the listen backlog meanwhile, and the
// loop tries again once its wait reaches acceptResume.
func (l *loop) pauseAccept() {
	if err := l.ctl(syscall.EPOLL_CTL_DEL, l.lfd, 0); err != nil {
		l.s.log.Error("event loop cannot stop accepting", "err", err)
	}
	l.acceptPaused = true
	l.acceptResume = l.nowNs + int64(acceptPause)
}

// resumeAccept accepts again after a pause; pending connections make the
// listening socket readable at the next wait.
func (l *loop) resumeAccept() {
	l.acceptPaused = false
	const epollExclusive = 1 << 28
	if err := l.ctl(syscall.EPOLL_CTL_ADD, l.lfd, syscall.EPOLLIN|epollExclusive); err != nil {
		l.s.log.Error("event loop cannot accept again; trying later", "err", err)
		l.acceptPaused = true
		l.acceptResume = l.nowNs + int64(acceptPause)
	}
}

// releaseIP uncounts c from its address's server.max_conns_per_ip.
func (l *loop) releaseIP(c *loopClient) {
	if c.ipHeld {
		c.ipHeld = false
		l.s.perIP.release(c.remote.Addr())
	}
}

// accept4 accepts a connection into l.sa: syscall.Accept4 allocates the
// address it returns.
func (l *loop) accept4() (int, error) {
	l.sa = syscall.RawSockaddrAny{}
	size := uint32(unsafe.Sizeof(l.sa))
	fd, _, e := syscall.RawSyscall6(syscall.SYS_ACCEPT4, uintptr(l.lfd), uintptr(unsafe.Pointer(&l.sa)),
		uintptr(unsafe.Pointer(&size)), syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(fd), nil
}

// rawSockaddrAddrPort returns the address accept4 stored in sa.
func rawSockaddrAddrPort(sa *syscall.RawSockaddrAny) netip.AddrPort {
	switch sa.Addr.Family {
	case syscall.AF_INET:
		a := (*syscall.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), ntohs(a.Port))
	case syscall.AF_INET6:
		a := (*syscall.RawSockaddrInet6)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), ntohs(a.Port))
	}
	return netip.AddrPort{}
}

// ntohs turns a port in network byte order into a number.
func ntohs(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}

// appendAddrIP appends a client's IP as X-Forwarded-For carries it.
func appendAddrIP(dst []byte, ap netip.AddrPort) []byte {
	if !ap.IsValid() {
		return append(dst, "unknown"...)
	}
	return ap.Addr().AppendTo(dst)
}

// connEvents is what every connection waits for, edge-triggered: a
// connection is read until a short read, and a write that could not
// finish waits for EPOLLOUT, so no epoll_ctl follows the first.
const connEvents uint32 = syscall.EPOLLIN | syscall.EPOLLOUT | syscall.EPOLLRDHUP | epollET

const readEvents uint32 = syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLHUP | syscall.EPOLLERR

// epollET is EPOLLET, which package syscall declares as a negative int.
const epollET = 1 << 31

// dispatch handles the events ev of the socket s. A panic while doing so
// is counted and logged, and costs that connection (and a backend
// connection serving it, or the client it serves) only: the loop and its
// other connections go on.
func (l *loop) dispatch(s loopSock, ev uint32) {
	defer func() {
		if r := recover(); r != nil {
			c, bc := s.c, s.bc
			if bc != nil && bc.client != nil {
				c = bc.client
			}
			l.recovered(r, "panic in event loop; its connection is closed", c)
			if bc != nil && bc.fd >= 0 {
				l.closeBackend(bc)
			}
		}
	}()
	switch {
	case s.c != nil:
		l.onEvent(s.c, ev)
	case s.bc != nil:
		l.onBackendEvent(s.bc, ev)
	}
}

// recovered counts and logs r, a panic recovered in the loop, and closes
// c, if any, with its tries: the client connection it happened for.
func (l *loop) recovered(r any, msg string, c *loopClient) {
	id := ""
	if c != nil && c.state == lcWaiting {
		id = c.rl.id.String()
	}
	panics.Balancer.Recovered(l.s.log, r, msg, "loop", l.idx, "request_id", id)
	if c != nil {
		l.cancelTries(c)
		if c.fd >= 0 {
			l.close(c)
		}
	}
}

// onBackendEvent handles the events ev of a backend connection.
func (l *loop) onBackendEvent(bc *loopBackend, ev uint32) {
	switch bc.state {
	case lcConnecting:
		l.onConnected(bc)
	case lcBackend:
		if ev&readEvents != 0 {
			l.onBackend(bc, ev)
		}
	}
}

// onEvent handles the events ev of a client connection.
func (l *loop) onEvent(c *loopClient, ev uint32) {
	if ev&readEvents != 0 {
		c.readable = true
	}
	if ev&(syscall.EPOLLRDHUP|syscall.EPOLLHUP) != 0 {
		// Edge-triggered: the end of the client's sending side is
		// signalled once, maybe with its last bytes; remember it so
		// that the read after them sees the end of file.
		c.rdhup = true
	}
	switch c.state {
	case lcWriting:
		if ev&(syscall.EPOLLOUT|syscall.EPOLLHUP|syscall.EPOLLERR) != 0 {
			l.flush(c)
		}
	case lcIdle:
		if c.readable {
			l.onClient(c)
		}
	}
	// Nothing is read while a request is in flight, as on the full path:
	// a client that half-closes after its request still gets the answer.
	// next reads what came meanwhile.
}

// onClient reads from a client connection and forwards what it can.
func (l *loop) onClient(c *loopClient) {
	if space := cap(c.in) - len(c.in); space > 0 && !c.eof {
		n, errno := l.recv(c, nil, c.fd, c.in[len(c.in):cap(c.in)])
		// A short read drained the socket; a full one may have left more.
		c.readable = n == space || c.rdhup
		switch {
		case n > 0:
			if c.headSince == 0 {
				c.headSince = l.nowNs
			}
			c.in = c.in[:len(c.in)+n]
			c.lastActive = l.nowNs
		case errno == syscall.EAGAIN:
		case n == 0:
			// The client is done sending; what it sent is still
			// answered.
			c.eof = true
		default:
			l.close(c)
			return
		}
	}
	if len(c.in) == 0 {
		if c.eof || l.stopping {
			l.close(c)
		}
		return
	}
	l.serve(c)
}

// serve forwards the request at the start of c.in, or hands c over.
func (l *loop) serve(c *loopClient) {
	ids := l.s.ids.Load()
	var idName []byte
	if ids != nil {
		idName = ids.lower
	}
	switch h1.ParseRequest(c.in, idName, &c.req) {
	case h1.Incomplete:
		switch {
		case len(c.in) >= l.maxHead:
			l.handOff(c)
		case c.eof:
			l.close(c)
		}
		return
	case h1.HandOff:
		l.handOff(c)
		return
	}
	if l.stopping || c.req.HeadLen > l.maxHead {
		l.handOff(c)
		return
	}
	r := &c.req
	host, ok := h1.HostKey(l.hb[:0], r.Host)
	if !ok || (r.DupForwarded || r.OtherForwarded) && c.trusted {
		// The fasthttp path refuses the Host with a 400, or joins a
		// trusted proxy's repeated forwarding headers.
		l.handOff(c)
		return
	}
	if l.s.tls != nil && bytes.HasPrefix(r.Path, acmeChallengePath) && l.s.tls.acme.Load() != nil {
		// Maybe the ACME CA checking a domain (HTTP-01): the fasthttp
		// path answers it.
		l.handOff(c)
		return
	}
	rl := &c.rl
	rl.begin(l.nowNs, ids)
	c.hedges = 0
	rl.bytesIn, rl.http10 = int64(r.HeadLen), r.HTTP10
	if ids != nil {
		if c.trusted && !r.DupID && validRequestID(r.ID) {
			rl.id.set(r.ID)
		} else {
			l.ids.next(&rl.id)
		}
	}
	rt := l.s.routes.Load().match(host, r.Path)
	if rt != nil && rt.httpsRedirect && !(c.trusted && bytes.EqualFold(bytes.TrimSpace(r.XFP), strHTTPS)) {
		// To HTTPS, unless a trusted proxy in front says the client
		// came over it.
		resp := &l.aresp
		resp.Reset()
		l.s.fillRedirect(resp, host, r.URI, false)
		rl.source, rl.reason = srcEdgelb, reasonHTTPSRedirect
		l.writeAnswer(c, resp)
		return
	}
	if rt == nil || rt.pool == nil {
		if !l.s.routesKnown() {
			// Maybe a tag route not known yet: the fasthttp path
			// decides.
			l.handOff(c)
			return
		}
		noRouteTotal.Inc()
		resp := &l.aresp
		resp.Reset()
		writeError(resp, errNoRoute, false)
		rl.source, rl.code = srcError, errNoRoute
		l.writeAnswer(c, resp)
		return
	}
	c.pool, c.start = rt.pool, l.now
	rl.service = rt.pool.name
	c.tried, c.code = tried{}, errNoHealthyBackend
	c.hedges, c.hedgeAt, c.hedgeWaited = 0, 0, false
	switch l.nextTry(c) {
	case tryNone:
		l.settle(c)
	case tryHandOver:
		if c.tried.n == 0 {
			// Nothing tried: the fasthttp path serves it whole.
			c.pool = nil
			l.handOff(c)
			return
		}
		l.handOffWith(c, l.attemptOf(c))
	}
}

// appendUpstreamRequest appends the request as it goes to the backend: the
// client's head minus the dropped lines, then X-Forwarded-*. It goes as
// HTTP/1.1 whatever the client spoke, on a connection kept alive.
func (l *loop) appendUpstreamRequest(dst []byte, c *loopClient) []byte {
	r := &c.req
	head := c.in[:r.HeadLen-2]
	start, from := len(dst), 0
	for _, d := range r.Drop[:r.NDrop] {
		dst = append(dst, head[from:d[0]]...)
		from = d[1]
	}
	dst = append(dst, head[from:]...)
	if r.HTTP10 {
		// The request line, which no dropped line precedes, ends in
		// "HTTP/1.0\r\n".
		dst[start+bytes.IndexByte(head, '\r')-1] = '1'
	}
	dst = appendForwarding(dst, c.ip, r.Host, strHTTP, c.trusted, r.XFF, r.XFP, r.XFH, r.Fwd)
	if ids := c.rl.ids; ids != nil {
		dst = append(dst, strCRLF...)
		dst = appendIDLine(dst, ids, c.rl.id.bytes())
	}
	return append(dst, strCRLFCRLF...)
}

// appendIDLine appends the request-ID header line, without its CRLF.
func appendIDLine(dst []byte, ids *requestIDs, id []byte) []byte {
	dst = append(dst, ids.name...)
	dst = append(dst, ':', ' ')
	return append(dst, id...)
}

var (
	strConnectionClose     = []byte("Connection: close\r\n")
	strConnectionKeepAlive = []byte("Connection: keep-alive\r\n")
)

// respond answers c with the response whose head is in bc.in and whose
// body is body; withLength adds the Content-Length the head lacks (a
// decoded chunked body). The try is counted already.
func (l *loop) respond(c *loopClient, bc *loopBackend, body []byte, withLength bool) {
	l.detach(c, bc)
	l.abandonTries(c)
	l.unwait(c)
	c.rl.source = srcBackend
	l.answer(c, bc.in, &bc.resp, body, withLength, bc)
}

// answer sends c a backend's answer, whose head r describes in raw, with
// body; bc, if set, is the backend connection it came on, released once
// what must outlive it is copied.
func (l *loop) answer(c *loopClient, raw []byte, r *h1.Response, body []byte, withLength bool, bc *loopBackend) {
	p := c.pool
	l.settled(c)

	out := l.out[:0]
	for _, k := range r.Keep[:r.NKeep] {
		out = append(out, raw[k[0]:k[1]]...)
	}
	if !r.HasDate {
		out = append(out, strHeadDate...)
		out = append(out, l.httpDate()...)
		out = append(out, strCRLF...)
	}
	if ids := c.rl.ids; ids != nil {
		out = appendIDLine(out, ids, c.rl.id.bytes())
		out = append(out, strCRLF...)
	}
	if withLength {
		out = append(out, strHeadContentLen...)
		out = strconv.AppendInt(out, int64(len(body)), 10)
		out = append(out, strCRLF...)
	}
	// As the fasthttp server does: close when the client asked to (or
	// spoke HTTP/1.0 without keep-alive), and tell an HTTP/1.0 client
	// that its connection stays open.
	switch {
	case l.stopping || c.req.Close:
		out = append(out, strConnectionClose...)
		c.closing = true
	case c.req.HTTP10:
		out = append(out, strConnectionKeepAlive...)
	}
	out = append(out, strCRLF...)

	if p.store != nil && !c.req.Head && l.storeWants(p, c, raw, r) {
		l.save(p, c, out, body)
	}
	l.logAnswer(c, r.Status, len(body), nil)
	l.write(c, out, body, bc)
}

// settled counts c's request as answered, whatever answered it.
func (l *loop) settled(c *loopClient) {
	p := c.pool
	p.m.requests.Inc()
	p.m.latency.Update(l.now.Sub(c.start))
	if cap(c.kept) > loopKeepBuf {
		c.kept = nil
	}
	c.kept = c.kept[:0]
}

// write sends c the head out and body of its answer, and releases bc, if
// set, the backend connection body may be in.
func (l *loop) write(c *loopClient, out, body []byte, bc *loopBackend) {
	reqLen := c.req.HeadLen
	if len(body) <= 4096 {
		// Fast path: one send of head and body, with the loop's others.
		out = append(out, body...)
		if bc != nil {
			l.releaseBackend(bc)
		}
		l.queueAnswer(c, out, reqLen)
		return
	}
	l.out = out
	n, errno := rawWritev(c.fd, &l.iov, out, body)
	var rest []byte
	if n < len(out) {
		rest = append(append(rest, out[max(n, 0):]...), body...)
	} else if n < len(out)+len(body) {
		rest = append(rest, body[n-len(out):]...)
	}
	if bc != nil {
		l.releaseBackend(bc)
	}
	if n < 0 && errno != syscall.EAGAIN {
		l.afterWrite(c, rest, -1, errno, reqLen)
		return
	}
	l.afterWrite(c, rest, 0, 0, reqLen)
}

// afterWrite follows a write of w to the client, n bytes of which went
// (-1 and errno on an error): it keeps the rest for EPOLLOUT, or goes on
// to the next request.
func (l *loop) afterWrite(c *loopClient, w []byte, n int, errno syscall.Errno, reqLen int) {
	c.in = c.in[:copy(c.in, c.in[reqLen:])]
	if n < 0 {
		if errno != syscall.EAGAIN {
			l.close(c)
			return
		}
		n = 0
	}
	if n < len(w) {
		c.pending = append(c.pending[:0], w[n:]...)
		c.state = lcWriting
		l.setNoDelay(c)
		return
	}
	l.next(c)
}

// setNoDelay turns TCP_NODELAY on for c, once.
func (l *loop) setNoDelay(c *loopClient) {
	if !c.nodelay {
		c.nodelay = true
		syscall.SetsockoptInt(c.fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	}
}

// next makes c ready for its next request.
func (l *loop) next(c *loopClient) {
	c.state = lcIdle
	c.pool = nil
	if c.closing {
		l.close(c)
		return
	}
	l.setNoDelay(c)
	c.lastActive = l.nowNs
	// A pipelined head is already coming; otherwise the next head's time
	// starts at its first byte.
	c.headSince = 0
	if len(c.in) > 0 {
		c.headSince = l.nowNs
	}
	switch {
	case c.readable:
		l.onClient(c)
	case len(c.in) > 0:
		l.serve(c)
	case c.eof || l.stopping:
		// A stopping loop keeps no idle connection (beginStop): one
		// answered since, its answer queued or written in part when the
		// stop came, closes now.
		l.close(c)
	}
}

func (l *loop) flush(c *loopClient) {
	n, errno := rawWrite(c.fd, c.pending)
	if n < 0 {
		if errno != syscall.EAGAIN {
			l.close(c)
		}
		return
	}
	c.pending = c.pending[n:]
	c.lastActive = l.nowNs
	if len(c.pending) > 0 {
		return
	}
	c.pending = nil
	l.next(c)
}

// sweepIdle closes idle connections past their time and hands slow heads
// to the full path, which holds them to what is left of
// server.header_timeout and answers 408 once it is over.
func (l *loop) sweepIdle() {
	idleClient := l.idleTimeout
	slowHead := min(int64(loopSlowHead), l.headerTimeout)
	for _, s := range l.conns {
		if bc := s.bc; bc != nil {
			// An abandoned try, with no client either, is not idle:
			// sweepTimeouts ends it at its deadline.
			if bc.state == lcBackend && bc.client == nil && !bc.orphan && l.nowNs-bc.lastActive > int64(bc.backend.idleFor) {
				l.dropIdle(bc)
			}
			continue
		}
		c := s.c
		if c == nil {
			continue
		}
		switch c.state {
		case lcIdle:
			switch {
			case len(c.in) > 0 && l.nowNs-c.headSince >= slowHead:
				l.handOff(c)
			case len(c.in) == 0 && c.headSince != 0 && l.nowNs-c.headSince >= l.headerTimeout:
				// A new connection that never sent a request.
				l.handOff(c)
			case len(c.in) == 0 && c.headSince == 0 && l.nowNs-c.lastActive > idleClient:
				l.close(c)
			}
		case lcWriting:
			if l.nowNs-c.lastActive > idleClient {
				l.close(c)
			}
		}
	}
}

// httpDate returns the current time as an HTTP Date, formatted once a
// second.
func (l *loop) httpDate() []byte {
	if sec := l.nowNs / int64(time.Second); sec != l.dateSec || l.date == nil {
		l.dateSec = sec
		l.date = l.now.UTC().AppendFormat(l.date[:0], time.RFC1123)
		l.date = append(l.date[:len(l.date)-3], "GMT"...)
	}
	return l.date
}

// handOff gives c, with the bytes read from it so far, to the fasthttp
// server.
func (l *loop) handOff(c *loopClient) { l.handOffWith(c, nil) }

// handOffWith hands c to the fasthttp server with att, the tries made for
// its first request, if any.
func (l *loop) handOffWith(c *loopClient, att *attempt) {
	loopHandoffs.Inc()
	l.forget(c.fd)
	l.unwait(c)
	fd := c.fd
	c.fd = -1
	// While the loops drain, the fasthttp server still runs: it takes
	// what they hand over and drains it in turn.
	var pre []byte
	if len(c.in) > 0 {
		pre = append(pre, c.in...)
	}
	pc := newPrefixConn(newFDConn(fd, c.remote, l.s.ln.Addr()), pre, &l.s.fastConns)
	pc.att.Store(att)
	if c.headSince != 0 {
		pc.headBy = time.Unix(0, c.headSince+l.headerTimeout)
	}
	if c.ipHeld {
		// The handed connection counts against its address until the
		// server closes it.
		c.ipHeld = false
		pc.ipc, pc.ip = l.s.perIP, c.remote.Addr()
	}
	l.s.handoff.push(pc)
}

// storeWants reports whether the stale store is due a copy of the answer
// r describes in raw to c's request; the store rate-limits its writes per
// URL.
func (l *loop) storeWants(p *Pool, c *loopClient, raw []byte, r *h1.Response) bool {
	if !r.Vary {
		q := &c.req
		if n := len(q.Host); len(c.dueURL) != n+1+len(q.URI) || !bytes.Equal(c.dueURL[:n], q.Host) || !bytes.Equal(c.dueURL[n+1:], q.URI) {
			// Not the URL of the connection's last request: hash its key.
			c.dueURL = append(append(append(c.dueURL[:0], q.Host...), 0), q.URI...)
			c.dueKey, c.dueOK, l.keyBuf = stale.URLKey(l.keyBuf, strHTTP, q.Host, q.URI)
		}
		return c.dueOK && p.store.DueKey(c.dueKey, l.now)
	}
	l.vary, l.reqHeaders = l.vary[:0], l.reqHeaders[:0]
	for k, v := range h1.EachHeader(raw[:r.HeadLen]) {
		if h1.KindOf(k) == h1.KindVary {
			l.vary = append(l.vary, v)
		}
	}
	for k, v := range h1.EachHeader(c.in[:c.req.HeadLen]) {
		l.reqHeaders = append(l.reqHeaders, [2][]byte{k, v})
	}
	return p.store.Due(l.now, strHTTP, c.req.Host, c.req.URI, l.vary, l.reqHeaders)
}

// save stores the response in the stale store (slow path: at most once per
// URL and refresh interval).
func (l *loop) save(p *Pool, c *loopClient, head, body []byte) {
	req, resp := l.storeRequest(c), &l.sresp
	if req == nil {
		return
	}
	resp.Reset()
	resp.Header.DisableNormalizing()
	if err := resp.Header.Read(l.reader(head)); err != nil {
		return
	}
	resp.SetBodyRaw(body)
	p.store.Save(l.now, strHTTP, req, resp)
}

// reader returns a reader of b, reused.
func (l *loop) reader(b []byte) *bufio.Reader {
	l.br.Reset(b)
	if l.bufr == nil {
		l.bufr = bufio.NewReaderSize(&l.br, loopReadBuf)
	} else {
		l.bufr.Reset(&l.br)
	}
	return l.bufr
}
