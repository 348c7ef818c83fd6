//go:build linux

package balancer

import (
	"bufio"
	"bytes"
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"time"
	"unsafe"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/stale"
	"github.com/edgelb/edgelb/health"
)

// An event loop serves the common request, a GET or HEAD answered with a
// Content-Length body or a chunked one (which it decodes), without a
// goroutine per connection: one epoll instance per loop, non-blocking
// sockets read and written with raw system calls, and backend connections
// of its own. That is what nginx and HAProxy do, and what forwarding at
// their CPU cost per request takes.
//
// Anything else (other methods, bodies, upgrades, odd heads, large or
// close-delimited responses, backend failures) is handed with the bytes
// read so far to the fasthttp server, which does the full job for the
// rest of the connection's life: retries, stale answers, generated errors.

const (
	// laneReadBuf is a client connection's read buffer; a longer head goes
	// to the full path.
	laneReadBuf = 4 << 10
	// laneBackendBuf is a backend connection's first read buffer.
	laneBackendBuf = 16 << 10
	// laneKeepBuf is the largest read buffer an idle backend connection
	// keeps for its next response.
	laneKeepBuf = 256 << 10
	// laneMaxResponse is the largest response (head and body) the loop
	// buffers; a larger one goes to the full path, which streams it.
	laneMaxResponse = 1 << 20
	// laneSweep is how often in-flight requests are checked for timeouts.
	laneSweep = 10 * time.Millisecond
	// laneSlowHead is how long a client may take to send a head before
	// its connection goes to the full path and its read timeout.
	laneSlowHead = time.Second
)

// Client connection states.
const (
	lcIdle       = iota // waiting for a request
	lcWaiting           // its request is with a backend
	lcWriting           // a response is partly written
	lcBackend           // a backend connection
	lcConnecting        // a backend connection being established
)

// lconn is a socket the loop owns: a client's or a backend's.
type lconn struct {
	fd    int
	state uint8
	in    []byte
	// lastActive is when the connection last moved (unix nano).
	lastActive int64
	// headSince is when the head being read started to count against
	// server.header_timeout: the connection's opening for its first
	// request, the head's first byte for the next ones; 0 while a kept
	// alive connection waits for a request.
	headSince int64

	// Client side.
	// remote is the client's address; ipHeld is set when the connection
	// counts against its server.max_conns_per_ip.
	remote netip.AddrPort
	ipHeld bool

	ip []byte // remote IP, as X-Forwarded-For carries it
	// trusted is set when the peer is in server.trusted_proxies.
	trusted bool
	// tried holds the backend of the request in flight, for the
	// attempt a hand-over carries.
	tried tried
	req   laneRequest
	pool  *Pool
	peer  *lconn // the backend connection serving the request
	start time.Time
	// tryStart is when the try in flight began.
	tryStart time.Time
	expires  int64 // try deadline (unix nano)
	pending  []byte
	waitIdx  int // index in loop.waiting, -1 if none
	// dueURL is the host and URI, NUL-separated, of the last request
	// the stale store was asked about, dueKey and dueOK what
	// stale.URLKey said of it.
	dueURL  []byte
	dueKey  uint64
	dueOK   bool
	closing bool
	// readable is set when the socket may hold bytes not read yet.
	readable bool
	// nodelay is set once TCP_NODELAY is on: from the connection's
	// second request or first partial write, as nginx does. A first
	// answer written at once is never held by Nagle's algorithm, and a
	// connection that closes after it is spared the system call.
	nodelay bool
	// eof is set once the client has shut its sending side, or the
	// backend has closed or reset its connection.
	eof bool
	// rdhup is set once epoll said the client shut its sending side,
	// before the end of file is read.
	rdhup bool

	// Backend side.
	backend *Backend
	client  *lconn
	out     []byte // request to write once connected
	reused  bool
	resp    laneResponse
	parsed  bool
	// reset is set when the backend reset the connection.
	reset bool
	// elsewhere is set when the response, once whole, goes to the
	// fasthttp path to be retried elsewhere or replaced by a stored copy.
	elsewhere bool
	outcome   health.Outcome // how resp counts for the backend's health
}

// loop is one event loop.
type loop struct {
	s    *Server
	epfd int
	ep   *os.File
	rc   syscall.RawConn
	// deadline is the ep read deadline set last (unix nano).
	deadline int64
	pollFn   func(uintptr) bool
	polled   int
	pollErr  syscall.Errno
	lfd      int
	wake     [2]int // pipe: a byte written wakes the loop
	conns    []*lconn
	// idx is the loop's index among the nloops loops, and of its slot
	// in each backend's lanes.
	idx    int
	nloops int
	// waiting holds the client connections with a request in flight.
	waiting []*lconn
	// free holds closed client connections, reused by accept.
	free []*lconn
	// sa is accept's scratch for the client's address.
	sa     syscall.RawSockaddrAny
	events [256]syscall.EpollEvent
	now    time.Time
	nowNs  int64
	out    []byte
	body   []byte // a decoded chunked body
	// For the stale store's Vary check.
	vary       [][]byte
	reqHeaders [][2][]byte
	iov        [2]syscall.Iovec
	keyBuf     []byte // scratch for stale.URLKey
	date       []byte
	dateSec    int64
	hb         [128]byte

	maxHead     int
	idleTimeout int64
	br          bytes.Reader
	bufr        *bufio.Reader

	lastSweep int64
	lastIdle  int64
	stopping  bool
	// idleEvery is how often idle connections and slow heads are
	// checked; headerTimeout is server.header_timeout.
	idleEvery     int64
	headerTimeout int64
	// acceptPaused is set while the loop does not accept, after accept
	// failed for want of a resource, until acceptResume (unix nano).
	acceptPaused bool
	acceptResume int64

	// Batched waits: see ServerConfig.BatchWait and decideBatching.
	// batchWait is 0 when off. swept counts the events since the last
	// sweep; waits the batched waits not yet judged and gathered the
	// events the polls after them returned; slept marks a poll that
	// follows one.
	batchWait  int64
	batching   bool
	swept      int
	waits      int
	gathered   int
	slept      bool
	batchSleep syscall.Timespec
	// batchRetry is when batching may be tried again after waits that
	// gathered too little (unix nano); batchBackoff the next pause.
	// batchPaid marks waits last judged to have gathered full batches.
	batchRetry   int64
	batchBackoff int64
	batchPaid    bool
	// Scratch for the stale store, which takes fasthttp types.
	sreq  fasthttp.Request
	sresp fasthttp.Response

	// deaf is closed once the loop no longer accepts, done once it has
	// exited.
	deaf chan struct{}
	done chan struct{}
}

// laneSupported reports whether this platform has the event loop.
const laneSupported = true

// startLoops starts n event loops accepting on ln's socket.
func (s *Server) startLoops(ln net.Listener, n int) error {
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return errNoLane
	}
	f, err := tl.File()
	if err != nil {
		return err
	}
	lfd := int(f.Fd())
	// f keeps the duplicate open for as long as the loops run.
	s.laneFile = f
	if err := syscall.SetNonblock(lfd, true); err != nil {
		return err
	}
	for i := 0; i < n; i++ {
		l, err := newLoop(s, lfd, i, n)
		if err != nil {
			return err
		}
		s.loops = append(s.loops, l)
		s.goSafe("event-loop", l.run)
	}
	return nil
}

func newLoop(s *Server, lfd, idx, nloops int) (*loop, error) {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	l := &loop{
		s: s, epfd: epfd, lfd: lfd,
		idx:         idx,
		nloops:      nloops,
		maxHead:     min(laneReadBuf, s.cfg.Server.MaxHeaderBytes),
		idleTimeout: int64(s.cfg.Server.IdleTimeout),
		batchWait:   int64(s.cfg.Server.batchWait()),
		batchSleep:  syscall.NsecToTimespec(int64(s.cfg.Server.batchWait())),
		deaf:        make(chan struct{}),
		done:        make(chan struct{}),
	}
	l.headerTimeout = int64(s.cfg.Server.HeaderTimeout)
	// Heads are checked a few times per header_timeout, so that a slow
	// one is cut close to its time.
	l.idleEvery = min(int64(time.Second), l.headerTimeout/4)
	if err := syscall.SetNonblock(epfd, true); err != nil {
		syscall.Close(epfd)
		return nil, err
	}
	// A non-blocking descriptor makes a pollable file.
	l.ep = os.NewFile(uintptr(epfd), "edgelb-epoll")
	rc, err := l.ep.SyscallConn()
	if err != nil {
		l.ep.Close()
		return nil, err
	}
	l.rc = rc
	l.pollFn = l.poll
	if err := syscall.Pipe2(l.wake[:], syscall.O_NONBLOCK|syscall.O_CLOEXEC); err != nil {
		l.ep.Close()
		return nil, err
	}
	const epollExclusive = 1 << 28
	if err := l.ctl(syscall.EPOLL_CTL_ADD, lfd, syscall.EPOLLIN|epollExclusive); err != nil {
		return nil, err
	}
	if err := l.ctl(syscall.EPOLL_CTL_ADD, l.wake[0], syscall.EPOLLIN); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *loop) ctl(op, fd int, events uint32) error {
	ev := syscall.EpollEvent{Events: events, Fd: int32(fd)}
	return syscall.EpollCtl(l.epfd, op, fd, &ev)
}

// stop asks the loop to finish the requests in flight and exit.
func (l *loop) stop() {
	syscall.Write(l.wake[1], []byte{1})
}

func (l *loop) run() {
	defer close(l.done)
	defer l.closeAll()
	for {
		n, err := l.wait()
		if err != nil {
			l.s.log.Error("event loop stopped", "err", err)
			return
		}
		l.now = time.Now()
		l.nowNs = l.now.UnixNano()
		l.swept += n
		for i := 0; i < n; i++ {
			ev := &l.events[i]
			fd := int(ev.Fd)
			switch {
			case fd == l.lfd:
				l.accept()
			case fd == l.wake[0]:
				var b [8]byte
				rawRead(l.wake[0], b[:])
				l.beginStop()
			default:
				if fd < len(l.conns) && l.conns[fd] != nil {
					l.onEvent(l.conns[fd], ev.Events)
				}
			}
		}
		if l.stopping && l.lfd >= 0 {
			// This batch held the listener's last events. The server
			// closes it once no loop accepts, so that new connections are
			// refused while these drain, and its descriptor number may
			// then be reused: it must not look like the listener.
			l.lfd = -1
			close(l.deaf)
		}
		if l.nowNs-l.lastSweep >= int64(laneSweep) {
			l.decideBatching(l.nowNs - l.lastSweep)
			l.lastSweep = l.nowNs
			l.sweepTimeouts()
			if l.nowNs-l.lastIdle >= l.idleEvery {
				l.lastIdle = l.nowNs
				l.sweepIdle()
			}
		}
		if l.acceptPaused && l.nowNs >= l.acceptResume && !l.stopping {
			l.resumeAccept()
		}
		if l.stopping && len(l.waiting) == 0 && l.busy() == 0 {
			return
		}
	}
}

// wait returns the number of events in l.events, waiting for some or for
// the next sweep; under load, after a short batch, it first sleeps for
// the batch wait. The loop's epoll descriptor is itself in Go's network
// poller: when nothing is ready the goroutine parks as any network
// goroutine does, instead of blocking its thread in a system call, which
// would have the runtime take the thread's P away and hand it back at
// every idle moment.
func (l *loop) wait() (int, error) {
	next := l.lastSweep + int64(laneSweep)
	if len(l.waiting) == 0 {
		next = l.lastIdle + l.idleEvery
	}
	if l.acceptPaused && l.acceptResume < next {
		next = l.acceptResume
	}
	if next != l.deadline {
		l.deadline = next
		l.ep.SetReadDeadline(time.Unix(0, next))
	}
	if l.batching && l.polled > 0 && l.polled < laneBatchFull && l.s.handedOver.Load() == 0 {
		// A short batch under load: let the next events gather, so
		// that one poll returns several. The sleep is a raw system
		// call: the thread keeps its P and nothing else runs on it
		// meanwhile, which is why the loops do not batch while the
		// fasthttp server, whose goroutines need a P, has a connection.
		syscall.RawSyscall(syscall.SYS_NANOSLEEP, uintptr(unsafe.Pointer(&l.batchSleep)), 0, 0)
		laneBatchWaits.Inc()
		l.waits++
		l.slept = true
	}
	err := l.rc.Read(l.pollFn)
	n, errno := l.polled, l.pollErr
	switch {
	case errno != 0 && errno != syscall.EINTR:
		return 0, errno
	case err != nil && !errors.Is(err, os.ErrDeadlineExceeded):
		return 0, err
	}
	return max(n, 0), nil
}

// laneBatchFull is the batch of events after which a loop polls again at
// once: it is busy enough that waiting gathers nothing more.
const laneBatchFull = 8

// decideBatching turns batched waits on or off for the next sweep
// interval, from what happened in the one that elapsed.
//
// A loop tries batching while it handles at least one event per batch
// wait: a lightly loaded loop answers at once. Load alone does not say that
// waiting pays, though. A wait delays every event it gathers, and pays when
// the poll after it returns a full batch, as when many connections have a
// request in flight. At a moderate rate it gathers only a few, each of them
// delayed to save little, and the events of a few busy connections come one
// after another. So the loop checks what its waits gathered, once it has
// made enough of them, over as many intervals as that takes; when the polls
// after them returned fewer than a full batch each on average, it stops
// batching for a while, 100ms at first, twice as long after each new try
// that fails, up to 5s. When waits that paid until then fall short once,
// as the batches of a saturated loop vary around full, it tries again
// after one interval only.
func (l *loop) decideBatching(elapsed int64) {
	was := l.batching
	loaded := l.batchWait > 0 && !l.stopping && int64(l.swept)*l.batchWait >= elapsed
	judged := l.waits >= laneBatchJudge
	switch {
	case was && judged && l.gathered < laneBatchFull*l.waits:
		l.batching = false
		if l.batchPaid {
			l.batchPaid = false
			l.batchRetry = l.nowNs
			break
		}
		l.batchBackoff = min(max(2*l.batchBackoff, int64(laneBatchBackoff)), int64(laneBatchMaxBackoff))
		l.batchRetry = l.nowNs + l.batchBackoff
	case !loaded:
		l.batching = false
	case was:
		if judged {
			l.batchBackoff = 0
			l.batchPaid = true
		}
	default:
		l.batching = l.nowNs >= l.batchRetry
	}
	l.swept = 0
	if judged || !l.batching {
		l.waits, l.gathered = 0, 0
	}
	if l.batching {
		// The kernel stretches a sleep by the thread's timer slack,
		// 50µs by default: more than the wait itself. The loop's
		// goroutine may have moved to another thread since the last
		// sweep, so this is set again at every one.
		syscall.RawSyscall(syscall.SYS_PRCTL, prSetTimerSlack, uintptr(max(l.batchWait/10, 1000)), 0)
	}
}

// Batching feedback: how many waits it takes to judge what they gathered,
// and the pauses after waits that gathered too little.
const (
	laneBatchJudge      = 8
	laneBatchBackoff    = 100 * time.Millisecond
	laneBatchMaxBackoff = 5 * time.Second
)

// prSetTimerSlack is PR_SET_TIMERSLACK.
const prSetTimerSlack = 29

// poll is the RawConn.Read callback of wait, made once as l.pollFn so that
// waiting allocates nothing.
func (l *loop) poll(uintptr) bool {
	l.polled, l.pollErr = rawEpollWait(l.epfd, l.events[:])
	if l.slept {
		l.slept = false
		l.gathered += max(l.polled, 0)
	}
	return l.polled != 0 || (l.pollErr != 0 && l.pollErr != syscall.EINTR)
}

// rawEpollWait polls the epoll descriptor without blocking.
func rawEpollWait(epfd int, events []syscall.EpollEvent) (int, syscall.Errno) {
	n, _, e := syscall.RawSyscall6(syscall.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(n), 0
}

// beginStop stops accepting and closes the client connections that have
// no request in progress; the others close once answered.
func (l *loop) beginStop() {
	if l.stopping {
		return
	}
	l.stopping = true
	l.batching = false
	l.ctl(syscall.EPOLL_CTL_DEL, l.lfd, 0)
	for _, c := range l.conns {
		if c != nil && c.state == lcIdle && len(c.in) == 0 {
			l.close(c)
		}
	}
}

// busy counts client connections still being served.
func (l *loop) busy() int {
	n := 0
	for _, c := range l.conns {
		if c != nil && c.state != lcBackend && c.state != lcConnecting {
			n++
		}
	}
	return n
}

func (l *loop) closeAll() {
	for _, c := range l.conns {
		if c != nil {
			l.close(c)
		}
	}
	syscall.Close(l.wake[0])
	syscall.Close(l.wake[1])
	l.ep.Close()
}

func (l *loop) add(c *lconn, events uint32) bool {
	for c.fd >= len(l.conns) {
		l.conns = append(l.conns, nil)
	}
	l.conns[c.fd] = c
	if err := l.ctl(syscall.EPOLL_CTL_ADD, c.fd, events); err != nil {
		l.conns[c.fd] = nil
		syscall.Close(c.fd)
		return false
	}
	return true
}

// forget takes c out of the loop without closing its socket.
func (l *loop) forget(c *lconn) {
	l.ctl(syscall.EPOLL_CTL_DEL, c.fd, 0)
	l.conns[c.fd] = nil
	l.unwait(c)
}

func (l *loop) close(c *lconn) {
	if c.fd < 0 {
		return
	}
	// Closing the descriptor, which nothing duplicates, takes it out of
	// the epoll set: no EPOLL_CTL_DEL.
	l.conns[c.fd] = nil
	l.unwait(c)
	if c.peer != nil {
		// A client gone while its request is with a backend: the
		// backend connection carries an answer nobody reads.
		b := c.peer
		c.peer, b.client = nil, nil
		l.finishBackend(b, health.OutcomeCanceled, false)
	}
	if cl := c.client; cl != nil {
		// Not expected: every path frees the client first. Do not leave
		// it waiting.
		c.client, cl.peer = nil, nil
		c.backend.target.Done(l.nowNs, health.OutcomeCanceled, 0)
		cl.state = lcIdle
		l.handOff(cl)
	}
	if c.backend != nil {
		l.slot(c.backend).open--
	}
	l.releaseIP(c)
	syscall.Close(c.fd)
	c.fd = -1
	if c.backend == nil && len(l.free) < laneFreeConns {
		// Only accept takes it back, between events: nothing refers to
		// a closed client connection by then.
		l.free = append(l.free, c)
	}
}

// laneFreeConns bounds the closed client connections a loop keeps for
// reuse.
const laneFreeConns = 1024

// newClient returns a client connection for fd, reusing a closed one's
// memory when there is one.
func (l *loop) newClient(fd int, remote netip.AddrPort, held bool) *lconn {
	var c *lconn
	if n := len(l.free); n > 0 {
		c = l.free[n-1]
		l.free[n-1] = nil
		l.free = l.free[:n-1]
		*c = lconn{in: c.in[:0], ip: c.ip[:0], dueURL: c.dueURL[:0]}
	} else {
		c = &lconn{in: make([]byte, 0, laneReadBuf)}
	}
	c.fd, c.state, c.waitIdx = fd, lcIdle, -1
	c.lastActive, c.headSince = l.nowNs, l.nowNs
	c.remote, c.ipHeld = remote, held
	return c
}

// maxConns is the loop's share of b's max_conns.
func (l *loop) maxConns(b *Backend) int {
	return max(1, b.maxConns/l.nloops)
}

func (l *loop) addWaiting(c *lconn) {
	c.waitIdx = len(l.waiting)
	l.waiting = append(l.waiting, c)
}

func (l *loop) unwait(c *lconn) {
	i := c.waitIdx
	if i < 0 || i >= len(l.waiting) || l.waiting[i] != c {
		return
	}
	last := l.waiting[len(l.waiting)-1]
	l.waiting[i] = last
	last.waitIdx = i
	l.waiting = l.waiting[:len(l.waiting)-1]
	c.waitIdx = -1
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
			laneAcceptErrors.Inc()
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
		if !l.add(c, connEvents) {
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
func (l *loop) releaseIP(c *lconn) {
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

func (l *loop) onEvent(c *lconn, ev uint32) {
	switch c.state {
	case lcConnecting:
		l.onConnected(c)
	case lcBackend:
		if ev&readEvents != 0 {
			l.onBackend(c, ev)
		}
	default:
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
		// Nothing is read while a request is in flight, as on the full
		// path: a client that half-closes after its request still gets
		// the answer. next reads what came meanwhile.
	}
}

// onClient reads from a client connection and forwards what it can.
func (l *loop) onClient(c *lconn) {
	if space := cap(c.in) - len(c.in); space > 0 && !c.eof {
		n, errno := rawRead(c.fd, c.in[len(c.in):cap(c.in)])
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
		if c.eof {
			l.close(c)
		}
		return
	}
	l.serve(c)
}

// serve forwards the request at the start of c.in, or hands c over.
func (l *loop) serve(c *lconn) {
	switch parseLaneRequest(c.in, &c.req) {
	case laneIncomplete:
		switch {
		case len(c.in) >= l.maxHead:
			l.handOff(c)
		case c.eof:
			l.close(c)
		}
		return
	case laneHandOff:
		l.handOff(c)
		return
	}
	if l.stopping || c.req.headLen > l.maxHead {
		l.handOff(c)
		return
	}
	r := &c.req
	host, ok := hostKey(l.hb[:0], r.host)
	if !ok || (r.dupForwarded || r.otherForwarded) && c.trusted {
		// The fasthttp path refuses the Host with a 400, or joins a
		// trusted proxy's repeated forwarding headers.
		l.handOff(c)
		return
	}
	rt := l.s.routes.Load().match(host, r.path)
	if rt == nil || rt.pool == nil {
		l.handOff(c)
		return
	}
	p := rt.pool
	c.tried = tried{}
	b := p.pick(l.nowNs, &c.tried)
	if b == nil || !b.ap.IsValid() {
		l.handOff(c)
		return
	}
	bc := l.backendConn(b)
	if bc == nil {
		l.handOff(c)
		return
	}
	c.pool = p
	c.start = l.now
	l.startTry(c, b, bc)
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

// retry tries c's request on another backend after a failed try, as the
// fasthttp path would: within the request's retries and deadline, on a
// backend not tried yet. It reports false when the request must go to
// the fasthttp path instead: then no backend is left here, or the loop is
// stopping.
func (l *loop) retry(c *lconn) bool {
	p := c.pool
	if l.stopping || c.tried.n > p.cfg.Retries || !l.now.Before(c.start.Add(p.cfg.Timeout)) {
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

// appendUpstreamRequest appends the request as it goes to the backend: the
// client's head minus the dropped lines, then X-Forwarded-*. It goes as
// HTTP/1.1 whatever the client spoke, on a connection kept alive.
func (l *loop) appendUpstreamRequest(dst []byte, c *lconn) []byte {
	r := &c.req
	head := c.in[:r.headLen-2]
	start, from := len(dst), 0
	for _, d := range r.drop[:r.ndrop] {
		dst = append(dst, head[from:d[0]]...)
		from = d[1]
	}
	dst = append(dst, head[from:]...)
	if r.http10 {
		// The request line, which no dropped line precedes, ends in
		// "HTTP/1.0\r\n".
		dst[start+bytes.IndexByte(head, '\r')-1] = '1'
	}
	dst = appendForwarding(dst, c.ip, r.host, strHTTP, c.trusted, r.xff, r.xfp, r.xfh, r.fwd)
	return append(dst, strCRLFCRLF...)
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

// laneSlot is one loop's share of a backend: its idle connections to it
// and how many it has open, which count against the backend's max_conns
// with the other loops'. A loop touches only its own slot.
type laneSlot struct {
	idle []*lconn
	open int
	_    [32]byte // a cache line each
}

// slot returns the loop's slot in b's lanes, which the first loop to
// need them makes.
func (l *loop) slot(b *Backend) *laneSlot {
	slots := b.lanes.slots.Load()
	if slots == nil {
		fresh := make([]laneSlot, l.nloops)
		if b.lanes.slots.CompareAndSwap(nil, &fresh) {
			slots = &fresh
		} else {
			slots = b.lanes.slots.Load()
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

func (l *loop) dial(b *Backend, sl *laneSlot) *lconn {
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
			bc.in = make([]byte, 0, laneBackendBuf)
		}
		if len(bc.in) == cap(bc.in) {
			if cap(bc.in) >= laneMaxResponse+fasthttpHeadLimit {
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
		switch parseLaneResponse(bc.in, c.req.head, &bc.resp) {
		case laneIncomplete:
			if len(bc.in) >= fasthttpHeadLimit {
				l.abandon(bc)
			}
			return
		case laneHandOff:
			if !hasStatusLinePrefix(bc.in) {
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
		o, retryable := classifyStatus(r.status, r.retryAfter)
		bc.outcome = o
		// Another backend or a stored answer may do better: the
		// fasthttp path decides, with this answer in hand once whole.
		bc.elsewhere = retryable ||
			(r.status >= 500 && r.status <= 504 && p.store != nil && p.staleOnStatus[r.status-500])
		if r.headLen+r.bodyLen > laneMaxResponse || r.bodyLen > p.cfg.MaxResponseBody {
			// Large bodies stream on the full path.
			l.abandon(bc)
			return
		}
	}
	r := &bc.resp
	if r.chunked {
		limit := min(laneMaxResponse, c.pool.cfg.MaxResponseBody)
		bodyLen, n, v := scanChunked(bc.in[r.headLen:], limit)
		switch v {
		case laneIncomplete:
			return
		case laneHandOff:
			l.abandon(bc)
			return
		}
		if len(bc.in) > r.headLen+n {
			r.keepAlive = false
		}
		if bc.elsewhere {
			l.tryElsewhere(bc, bc.in[:r.headLen+n])
			return
		}
		l.body = appendDechunked(l.body[:0], bc.in[r.headLen:r.headLen+n])
		bc.in = bc.in[:r.headLen+n]
		if len(l.body) != bodyLen {
			panic("BUG: chunked body decoded to another length than scanned")
		}
		l.respond(c, bc, l.body, true)
		return
	}
	total := bc.resp.headLen + bc.resp.bodyLen
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
		bc.resp.keepAlive = false
	}
	if bc.elsewhere {
		l.tryElsewhere(bc, bc.in[:total])
		return
	}
	l.respond(c, bc, bc.in[r.headLen:total], false)
}

var (
	strConnectionClose     = []byte("Connection: close\r\n")
	strConnectionKeepAlive = []byte("Connection: keep-alive\r\n")
)

// fasthttpHeadLimit bounds a backend's response head, as the HostClient's
// read buffer does on the full path.
const fasthttpHeadLimit = DefaultMaxHeaderBytes

// respond answers c with the response whose head is in bc.in and whose
// body is body; withLength adds the Content-Length the head lacks (a
// decoded chunked body).
func (l *loop) respond(c *lconn, bc *lconn, body []byte, withLength bool) {
	p, b, r := c.pool, bc.backend, &bc.resp
	lat := l.now.Sub(c.tryStart)
	b.target.Done(l.nowNs, bc.outcome, lat)
	p.m.requests.Inc()
	b.m.requests.Inc()
	b.m.latency.Update(lat)
	b.m.status[statusClass(r.status)].Inc()
	p.m.latency.Update(l.now.Sub(c.start))

	out := l.out[:0]
	for _, k := range r.keep[:r.nkeep] {
		out = append(out, bc.in[k[0]:k[1]]...)
	}
	if !r.hasDate {
		out = append(out, strHeadDate...)
		out = append(out, l.httpDate()...)
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
	case l.stopping || c.req.close:
		out = append(out, strConnectionClose...)
		c.closing = true
	case c.req.http10:
		out = append(out, strConnectionKeepAlive...)
	}
	out = append(out, strCRLF...)

	if p.store != nil && !c.req.head && l.storeWants(p, c, bc) {
		l.save(p, c, out, body)
	}

	c.peer, bc.client = nil, nil
	l.unwait(c)
	reqLen := c.req.headLen
	if len(body) <= 4096 {
		// Fast path: one write of head and body.
		out = append(out, body...)
		l.out = out
		n, errno := rawWrite(c.fd, out)
		l.releaseBackend(bc)
		l.afterWrite(c, out, n, errno, reqLen)
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
	l.releaseBackend(bc)
	if n < 0 && errno != syscall.EAGAIN {
		l.afterWrite(c, rest, -1, errno, reqLen)
		return
	}
	l.afterWrite(c, rest, 0, 0, reqLen)
}

// afterWrite follows a write of w to the client, n bytes of which went
// (-1 and errno on an error): it keeps the rest for EPOLLOUT, or goes on
// to the next request.
func (l *loop) afterWrite(c *lconn, w []byte, n int, errno syscall.Errno, reqLen int) {
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
func (l *loop) setNoDelay(c *lconn) {
	if !c.nodelay {
		c.nodelay = true
		syscall.SetsockoptInt(c.fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	}
}

// next makes c ready for its next request.
func (l *loop) next(c *lconn) {
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
	case c.eof:
		l.close(c)
	}
}

func (l *loop) flush(c *lconn) {
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

// releaseBackend returns bc to the idle list of its backend, or closes it.
func (l *loop) releaseBackend(bc *lconn) {
	keep := bc.resp.keepAlive && !bc.eof && !l.stopping
	bc.parsed, bc.elsewhere = false, false
	if cap(bc.in) > laneKeepBuf {
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

// finishBackend ends the request on bc with outcome o and closes it.
func (l *loop) finishBackend(bc *lconn, o health.Outcome, counted bool) {
	c := bc.client
	if c != nil {
		c.peer, bc.client = nil, nil
	}
	lat := time.Duration(0)
	if c != nil && counted {
		lat = l.now.Sub(c.tryStart)
	}
	bc.backend.target.Done(l.nowNs, o, lat)
	l.close(bc)
}

// backendFailed records a failed try on bc's backend and tries another
// backend; when none is left here, it hands the client, with the attempt,
// to the fasthttp path, which serves stale or answers with the error. Only
// requests safe to repeat take the loop.
func (l *loop) backendFailed(bc *lconn, o health.Outcome, code errCode) {
	c := bc.client
	bc.backend.m.errors[code].Inc()
	bc.backend.m.requests.Inc()
	l.finishBackend(bc, o, true)
	if c == nil || l.retry(c) {
		return
	}
	laneFallbacks.Inc()
	c.state = lcIdle
	l.handOffTried(c, code, nil)
}

// tryElsewhere records a backend's whole answer, raw, that another backend
// or a stored copy may better, and hands the client to the fasthttp path
// with it: the path retries elsewhere, serves stale, or answers with it,
// and asks this backend nothing again.
func (l *loop) tryElsewhere(bc *lconn, raw []byte) {
	c, b := bc.client, bc.backend
	b.m.requests.Inc()
	b.m.status[statusClass(bc.resp.status)].Inc()
	if bc.outcome == health.OutcomeOverloaded {
		b.m.errors[errOverloaded].Inc()
	}
	laneFallbacks.Inc()
	lat := l.now.Sub(c.tryStart)
	b.m.latency.Update(lat)
	b.target.Done(l.nowNs, bc.outcome, lat)
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
		head: c.req.head}
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
	laneFallbacks.Inc()
	l.finishBackend(bc, health.OutcomeCanceled, false)
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

// sweepIdle closes idle connections past their time and hands slow heads
// to the full path, which holds them to what is left of
// server.header_timeout and answers 408 once it is over.
func (l *loop) sweepIdle() {
	idleClient := l.idleTimeout
	slowHead := min(int64(laneSlowHead), l.headerTimeout)
	for _, c := range l.conns {
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
		case lcBackend:
			if c.client == nil && l.nowNs-c.lastActive > int64(c.backend.idleFor) {
				l.dropIdle(c)
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
func (l *loop) handOff(c *lconn) { l.handOffWith(c, nil) }

// handOffWith hands c to the fasthttp server with att, the tries made for
// its first request, if any.
func (l *loop) handOffWith(c *lconn, att *attempt) {
	laneHandoffs.Inc()
	l.forget(c)
	fd := c.fd
	c.fd = -1
	// While the loops drain, the fasthttp server still runs: it takes
	// what they hand over and drains it in turn.
	var pre []byte
	if len(c.in) > 0 {
		pre = append(pre, c.in...)
	}
	pc := newPrefixConn(newFDConn(fd, c.remote, l.s.ln.Addr()), pre, &l.s.handedOver)
	pc.att = att
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
// in bc to c's request; the store rate-limits its writes per URL.
func (l *loop) storeWants(p *Pool, c, bc *lconn) bool {
	if !bc.resp.vary {
		r := &c.req
		if n := len(r.host); len(c.dueURL) != n+1+len(r.uri) || !bytes.Equal(c.dueURL[:n], r.host) || !bytes.Equal(c.dueURL[n+1:], r.uri) {
			// Not the URL of the connection's last request: hash its key.
			c.dueURL = append(append(append(c.dueURL[:0], r.host...), 0), r.uri...)
			c.dueKey, c.dueOK, l.keyBuf = stale.URLKey(l.keyBuf, strHTTP, r.host, r.uri)
		}
		return c.dueOK && p.store.DueKey(c.dueKey, l.now)
	}
	l.vary, l.reqHeaders = l.vary[:0], l.reqHeaders[:0]
	for k, v := range eachHeader(bc.in[:bc.resp.headLen]) {
		if headerKindOf(k) == hkVary {
			l.vary = append(l.vary, v)
		}
	}
	for k, v := range eachHeader(c.in[:c.req.headLen]) {
		l.reqHeaders = append(l.reqHeaders, [2][]byte{k, v})
	}
	return p.store.Due(l.now, strHTTP, c.req.host, c.req.uri, l.vary, l.reqHeaders)
}

// save stores the response in the stale store (slow path: at most once per
// URL and refresh interval).
func (l *loop) save(p *Pool, c *lconn, head, body []byte) {
	req, resp := &l.sreq, &l.sresp
	req.Reset()
	resp.Reset()
	req.Header.DisableNormalizing()
	resp.Header.DisableNormalizing()
	if err := req.Header.Read(l.reader(c.in[:c.req.headLen])); err != nil {
		return
	}
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
		l.bufr = bufio.NewReaderSize(&l.br, laneReadBuf)
	} else {
		l.bufr.Reset(&l.br)
	}
	return l.bufr
}

// rawRead and rawWrite are recv and send on a non-blocking socket: the
// system call without the runtime's scheduler hooks, which a call that
// never blocks does not need, and without the file layer read and write
// go through.
func rawRead(fd int, p []byte) (int, syscall.Errno) {
	if len(p) == 0 {
		return 0, 0
	}
	n, _, e := syscall.RawSyscall6(syscall.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), 0, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(n), 0
}

func rawWrite(fd int, p []byte) (int, syscall.Errno) {
	if len(p) == 0 {
		return 0, 0
	}
	n, _, e := syscall.RawSyscall6(syscall.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), syscall.MSG_NOSIGNAL, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(n), 0
}

func rawWritev(fd int, iov *[2]syscall.Iovec, a, b []byte) (int, syscall.Errno) {
	iov[0].Base, iov[0].Len = &a[0], uint64(len(a))
	iov[1].Base, iov[1].Len = &b[0], uint64(len(b))
	n, _, e := syscall.RawSyscall(syscall.SYS_WRITEV, uintptr(fd), uintptr(unsafe.Pointer(&iov[0])), 2)
	iov[0].Base, iov[1].Base = nil, nil
	if e != 0 {
		return -1, e
	}
	return int(n), 0
}

// sockaddr returns a new socket address for ap: syscall.Connect writes into
// the one it is given, so loops cannot share one.
func sockaddr(ap netip.AddrPort) syscall.Sockaddr {
	if a := ap.Addr().Unmap(); a.Is4() {
		return &syscall.SockaddrInet4{Port: int(ap.Port()), Addr: a.As4()}
	}
	return &syscall.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
}
