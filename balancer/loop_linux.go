//go:build linux

package balancer

import (
	"bufio"
	"bytes"
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"
	"unsafe"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/h1"
	"github.com/edgelb/edgelb/health"
)

// An event loop serves the common request, a GET or HEAD answered with a
// Content-Length body or a chunked one (which it decodes), without a
// goroutine per connection: one epoll instance per loop, non-blocking
// sockets read and written with raw system calls, and backend connections
// of its own. That is what nginx and HAProxy do, and what forwarding at
// their CPU cost per request takes.
//
// The loop finishes the requests it starts: it retries a failed try or a
// retryable answer on another backend, and answers with a stored copy or
// an error of its own when no backend can, deciding as the fasthttp path
// does (core.go). Anything else (other methods, bodies, upgrades, odd
// heads) is handed with the bytes read so far to the fasthttp server,
// which does the full job for the rest of the connection's life; so is a
// response too large or too odd for the loop to buffer, with its backend
// connection and the request's attempt, so that nothing is asked twice.
//
// The loop's code is in these files: this one (the loop, its polling and
// batched waits, its connection table), loop_client_linux.go (client
// connections), loop_backend_linux.go (backend connections and tries),
// loop_answer_linux.go (answers it makes itself), loop_send_linux.go (its
// sends, queued and made together at the end of a batch of events),
// uring_linux.go (the io_uring that makes them) and loop_sys_linux.go
// (raw system calls).

const (
	// loopReadBuf is a client connection's read buffer; a longer head goes
	// to the full path.
	loopReadBuf = 4 << 10
	// loopBackendBuf is a backend connection's first read buffer.
	loopBackendBuf = 16 << 10
	// loopKeepBuf is the largest read buffer an idle backend connection
	// keeps for its next response.
	loopKeepBuf = 256 << 10
	// loopMaxResponse is the largest response (head and body) the loop
	// buffers; a larger one goes to the full path, with its backend
	// connection, which reads the rest.
	loopMaxResponse = 1 << 20
	// loopSweep is how often in-flight requests are checked for timeouts.
	loopSweep = 10 * time.Millisecond
	// loopSlowHead is how long a client may take to send a head before
	// its connection goes to the full path and its read timeout.
	loopSlowHead = time.Second
)

// Client connection states.
const (
	lcIdle       = iota // waiting for a request
	lcWaiting           // its request is with a backend
	lcWriting           // a response is partly written
	lcSending           // its answer is queued for sending (loop_send_linux.go)
	lcBackend           // a backend connection
	lcConnecting        // a backend connection being established
)

// sock is what the loop keeps of every socket it owns.
type sock struct {
	fd    int
	state uint8
	in    []byte
	// lastActive is when the connection last moved (unix nano).
	lastActive int64
	// eof is set once the client has shut its sending side, or the
	// backend has closed or reset its connection.
	eof bool
}

// loopSock is the loop's entry for a descriptor it polls: a client's
// connection or one of its own to a backend.
type loopSock struct {
	c  *loopClient
	bc *loopBackend
}

// loopClient is a client's connection to the loop, and the request it is
// serving.
type loopClient struct {
	sock
	// headSince is when the head being read started to count against
	// server.header_timeout: the connection's opening for its first
	// request, the head's first byte for the next ones; 0 while a kept
	// alive connection waits for a request.
	headSince int64
	// remote is the client's address; ipHeld is set when the connection
	// counts against its server.max_conns_per_ip.
	remote netip.AddrPort
	ipHeld bool

	ip []byte // remote IP, as X-Forwarded-For carries it
	// trusted is set when the peer is in server.trusted_proxies.
	trusted bool
	// tried holds the backends the request in flight has tried.
	tried tried
	// code is why the request's last try failed; kept is the last
	// answer a backend gave it that another backend may better, held
	// while one is tried.
	code errCode
	kept []byte
	req  h1.Request
	pool *Pool
	// peers are the backend connections of the request's tries in
	// flight, live of them: one, or more while it is hedged.
	peers [1 + maxHedges]*loopBackend
	live  int
	start time.Time
	// expires is when the first of its tries in flight is due or its
	// next hedge goes, whichever is sooner (unix nano).
	expires int64
	// hedgeAt is when the request hedges its tries in flight (unix
	// nano), 0 for never; hedges counts the hedges it sent, and
	// hedgeWaited says the one due now has waited for budget.
	hedgeAt     int64
	hedges      int
	hedgeWaited bool
	pending     []byte
	waitIdx     int // index in loop.waiting, -1 if none
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
	// sendGen counts the answers queued for c, so that a send queued
	// before c closed, or for another connection c served, is not made.
	sendGen uint32
	// rdhup is set once epoll said the client shut its sending side,
	// before the end of file is read.
	rdhup bool
	// rl is the record of the request being served: its ID, its tries
	// and where its answer came from.
	rl reqLog
}

// loopBackend is one of the loop's connections to a backend, and the
// answer it is reading.
type loopBackend struct {
	sock
	backend *Backend
	client  *loopClient // whose request it carries, if any
	out     []byte      // request to write once connected
	// tryStart is when the try it carries began; due when it fails
	// (unix nano).
	tryStart time.Time
	due      int64
	// awaiting is set while due is the first byte's: the request went,
	// no byte of the answer came yet, and the service sets
	// first_byte_timeout.
	awaiting bool
	reused   bool
	resp     h1.Response
	parsed   bool
	// reset is set when the backend reset the connection.
	reset bool
	// elsewhere is set when the response, once whole, may give way to
	// another backend's (retryable is then set) or to a stored copy.
	elsewhere bool
	retryable bool
	outcome   health.Outcome // how resp counts for the backend's health
	// orphan is set on a try abandoned when another answered first (see
	// abandonTries); orphanIdx is then its place in the loop's orphans.
	orphan    bool
	orphanIdx int
	// sending is set while out is queued for sending; sendGen counts
	// the requests queued on bc, as a client's does its answers.
	sending bool
	sendGen uint32
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
	conns    []loopSock
	// idx is the loop's index among the nloops loops, and of its slot
	// in each backend's loopSlots.
	idx    int
	nloops int
	// waiting holds the client connections with a request in flight.
	waiting []*loopClient
	// free holds closed client connections, reused by accept.
	free []*loopClient
	// sa is accept's scratch for the client's address.
	sa     syscall.RawSockaddrAny
	events [256]syscall.EpollEvent
	now    time.Time
	nowNs  int64
	out    []byte
	body   []byte // a decoded chunked body
	// sends are queued for the end of the events in hand (flushSends);
	// ring, if the kernel has io_uring, sends them in one system call,
	// and makes the reads ahead (readAhead) in another. wbufs are free
	// answer buffers; ringFDs, ringBufs and ringRes are the scratch of
	// both.
	sends     []loopSend
	sendsNext []loopSend
	ring      *ioRing
	wbufs     [][]byte
	ringFDs   []int
	ringBufs  [][]byte
	ringRes   []int32
	// ahead holds what was read ahead for the events in hand, in their
	// order; cur is the one for the event being handled, -1 if none.
	ahead []readAhead
	cur   int
	// For the stale store's Vary check.
	vary       [][]byte
	reqHeaders [][2][]byte
	iov        [2]syscall.Iovec
	keyBuf     []byte // scratch for stale.URLKey
	date       []byte
	dateSec    int64
	hb         [128]byte
	// ids makes the request IDs of the loop's requests.
	ids idSource

	maxHead     int
	idleTimeout int64
	br          bytes.Reader
	bufr        *bufio.Reader

	lastSweep int64
	lastIdle  int64
	// hedgeNext is when the first hedge of a request in flight is due
	// (unix nano), 0 for none.
	hedgeNext int64
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
	// orphans are the tries abandoned and still out, which
	// sweepTimeouts ends at their deadline.
	orphans []*loopBackend
	// sweeping is the client whose request a sweep is handling, for a
	// panic there to cost that connection only.
	sweeping *loopClient
	// Scratch for the stale store, which takes fasthttp types.
	sreq  fasthttp.Request
	sresp fasthttp.Response
	// aresp is an answer the loop makes itself, a stored copy or an
	// error, with header names normalized as the fasthttp server's are;
	// kresp is the head of a kept answer.
	aresp fasthttp.Response
	kresp h1.Response

	// deaf is closed once the loop no longer accepts, done once it has
	// exited.
	deaf chan struct{}
	done chan struct{}
}

// eventLoopSupported reports whether this platform has the event loop.
const eventLoopSupported = true

// startLoops starts n event loops accepting on ln's socket.
func (s *Server) startLoops(ln net.Listener, n int) error {
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return errNoLoop
	}
	f, err := tl.File()
	if err != nil {
		return err
	}
	lfd := int(f.Fd())
	// f keeps the duplicate open for as long as the loops run.
	s.loopFile = f
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
		maxHead:     min(loopReadBuf, s.cfg.Server.MaxHeaderBytes),
		idleTimeout: int64(s.cfg.Server.IdleTimeout),
		deaf:        make(chan struct{}),
		done:        make(chan struct{}),
		ids:         newIDSource(),
	}
	l.headerTimeout = int64(s.cfg.Server.HeaderTimeout)
	l.ringFDs = make([]int, 0, ioRingEntries)
	l.ringBufs = make([][]byte, 0, ioRingEntries)
	l.ringRes = make([]int32, ioRingEntries)
	l.ahead, l.cur = make([]readAhead, 0, len(l.events)), -1
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
	// Last, as nothing after it fails: a loop without a ring works.
	if s.cfg.Server.ioUring() {
		ring, err := newIORing()
		if err != nil {
			// Said once per server: every loop meets the same kernel,
			// but for a memlock limit (before Linux 5.12) that may let
			// the first loops have one and not the next.
			if !s.ringRefused.Swap(true) {
				s.log.Info("event loop: io_uring unavailable; one system call per read and per send", "loop", idx, "err", err)
			}
		} else {
			l.ring = ring
		}
	}
	l.setBatchWait(s.cfg.Server.batchWait(l.ring != nil))
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
		l.handle(n)
		if l.stopping && l.lfd >= 0 {
			// This batch held the listener's last events. The server
			// closes it once no loop accepts, so that new connections are
			// refused while these drain, and its descriptor number may
			// then be reused: it must not look like the listener.
			l.lfd = -1
			close(l.deaf)
		}
		l.flushSends()
		l.sweep()
		l.flushSends()
		if l.stopping && len(l.waiting) == 0 && l.busy() == 0 {
			return
		}
	}
}

// handle handles the n events in l.events, having read ahead for them.
func (l *loop) handle(n int) {
	l.swept += n
	l.readAhead(n)
	defer l.dropAhead()
	next := 0 // the first read ahead not reached yet
	for i := 0; i < n; i++ {
		ev := &l.events[i]
		fd := int(ev.Fd)
		l.cur = -1
		if next < len(l.ahead) && l.ahead[next].ev == i {
			l.cur, next = next, next+1
		}
		switch {
		case fd == l.lfd:
			l.accept()
		case fd == l.wake[0]:
			var b [8]byte
			rawRead(l.wake[0], b[:])
			l.beginStop()
		default:
			if fd < len(l.conns) {
				l.dispatch(l.conns[fd], ev.Events)
			}
		}
	}
}

// sweep runs the sweeps due at l.nowNs: the tries' deadlines and the
// batching's judgement every loopSweep, the idle connections and slow
// heads every idleEvery, the hedges due, and the accepts paused for want
// of descriptors. Each runs once it is due, whatever woke the loop: wait
// makes the next one due its poll's deadline, and a deadline left in the
// past would end every wait at once, before it polls, until that sweep
// ran.
//
// A panic in a sweep is counted and logged, and costs the connection
// whose request was being swept, if any, as one in dispatch does: the
// loop goes on.
func (l *loop) sweep() {
	defer l.recoverSweep()
	if l.nowNs-l.lastSweep >= int64(loopSweep) {
		l.decideBatching(l.nowNs - l.lastSweep)
		l.lastSweep = l.nowNs
		l.sweepTimeouts()
	}
	if l.nowNs-l.lastIdle >= l.idleEvery {
		l.lastIdle = l.nowNs
		l.sweepIdle()
	}
	if l.hedgeNext != 0 && l.nowNs >= l.hedgeNext {
		l.sweepHedges()
	}
	if l.acceptPaused && l.nowNs >= l.acceptResume && !l.stopping {
		l.resumeAccept()
	}
}

// recoverSweep is sweep's deferred recover.
func (l *loop) recoverSweep() {
	r := recover()
	c := l.sweeping
	l.sweeping = nil
	if r != nil {
		l.recovered(r, "panic in event loop sweep; the connection swept is closed", c)
	}
}

// nextDue returns when the next sweep is due (unix nano): after sweep,
// always later than l.nowNs.
func (l *loop) nextDue() int64 {
	next := l.lastIdle + l.idleEvery
	if len(l.waiting) > 0 || len(l.orphans) > 0 {
		next = min(next, l.lastSweep+int64(loopSweep))
	}
	if l.acceptPaused && !l.stopping {
		next = min(next, l.acceptResume)
	}
	if l.hedgeNext != 0 {
		next = min(next, l.hedgeNext)
	}
	return next
}

// wait returns the number of events in l.events, waiting for some or for
// the next sweep; under load, after a short batch, it first sleeps for
// the batch wait. The loop's epoll descriptor is itself in Go's network
// poller: when nothing is ready the goroutine parks as any network
// goroutine does, instead of blocking its thread in a system call, which
// would have the runtime take the thread's P away and hand it back at
// every idle moment.
func (l *loop) wait() (int, error) {
	if next := l.nextDue(); next != l.deadline {
		l.deadline = next
		l.ep.SetReadDeadline(time.Unix(0, next))
	}
	if l.batching && l.polled > 0 && l.polled < loopBatchFull && l.s.fastConns.Load() == 0 {
		// A short batch under load: let the next events gather, so
		// that one poll returns several. The sleep is a raw system
		// call: the thread keeps its P and nothing else runs on it
		// meanwhile, which is why the loops do not batch while the
		// fasthttp server, whose goroutines need a P, has a connection.
		syscall.RawSyscall(syscall.SYS_NANOSLEEP, uintptr(unsafe.Pointer(&l.batchSleep)), 0, 0)
		loopBatchWaits.Inc()
		l.waits++
		l.slept = true
	}
	// A deadline already past, as when a batch outlasts the time to the
	// next sweep, ends Read before it calls poll: no events then, rather
	// than the last poll's again.
	l.polled, l.pollErr = 0, 0
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

// loopBatchFull is the batch of events after which a loop polls again at
// once: it is busy enough that waiting gathers nothing more.
const loopBatchFull = 8

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
	judged := l.waits >= loopBatchJudge
	switch {
	case was && judged && l.gathered < loopBatchFull*l.waits:
		l.batching = false
		if l.batchPaid {
			l.batchPaid = false
			l.batchRetry = l.nowNs
			break
		}
		l.batchBackoff = min(max(2*l.batchBackoff, int64(loopBatchBackoff)), int64(loopBatchMaxBackoff))
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
	loopBatchJudge      = 8
	loopBatchBackoff    = 100 * time.Millisecond
	loopBatchMaxBackoff = 5 * time.Second
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

// beginStop stops accepting and closes the client connections that have
// no request in progress; the others close once answered.
func (l *loop) beginStop() {
	if l.stopping {
		return
	}
	l.stopping = true
	l.batching = false
	l.ctl(syscall.EPOLL_CTL_DEL, l.lfd, 0)
	for _, s := range l.conns {
		if c := s.c; c != nil && c.state == lcIdle && len(c.in) == 0 {
			l.close(c)
		}
	}
}

// busy counts client connections still being served.
func (l *loop) busy() int {
	n := 0
	for _, s := range l.conns {
		if s.c != nil {
			n++
		}
	}
	return n
}

func (l *loop) closeAll() {
	for _, s := range l.conns {
		switch {
		case s.c != nil:
			l.close(s.c)
		case s.bc != nil:
			l.closeBackend(s.bc)
		}
	}
	syscall.Close(l.wake[0])
	syscall.Close(l.wake[1])
	l.ep.Close()
	if l.ring != nil {
		l.ring.close()
	}
}

// add polls fd, whose socket s is, for events.
func (l *loop) add(fd int, s loopSock, events uint32) bool {
	for fd >= len(l.conns) {
		l.conns = append(l.conns, loopSock{})
	}
	l.conns[fd] = s
	if err := l.ctl(syscall.EPOLL_CTL_ADD, fd, events); err != nil {
		l.conns[fd] = loopSock{}
		syscall.Close(fd)
		return false
	}
	return true
}

// forget takes the socket fd out of the loop without closing it.
func (l *loop) forget(fd int) {
	if len(l.ahead) > 0 {
		s := l.conns[fd]
		l.forgetAhead(s.c, s.bc)
	}
	l.ctl(syscall.EPOLL_CTL_DEL, fd, 0)
	l.conns[fd] = loopSock{}
}

// close closes a client connection, and ends the try of its request in
// flight, if any, uncounted.
func (l *loop) close(c *loopClient) {
	if c.fd < 0 {
		return
	}
	// Closing the descriptor, which nothing duplicates, takes it out of
	// the epoll set: no EPOLL_CTL_DEL.
	l.conns[c.fd] = loopSock{}
	c.sendGen++
	if len(l.ahead) > 0 {
		l.forgetAhead(c, nil)
	}
	l.unwait(c)
	// A client gone while its request is with backends: their
	// connections carry answers nobody reads.
	l.cancelTries(c)
	l.releaseIP(c)
	syscall.Close(c.fd)
	c.fd = -1
	if len(l.free) < loopFreeConns {
		// Only accept takes it back, between events: nothing refers to
		// a closed client connection by then.
		l.free = append(l.free, c)
	}
}

// closeBackend closes a backend connection.
func (l *loop) closeBackend(bc *loopBackend) {
	if bc.fd < 0 {
		return
	}
	l.conns[bc.fd] = loopSock{}
	bc.unqueue()
	if len(l.ahead) > 0 {
		l.forgetAhead(nil, bc)
	}
	if cl := bc.client; cl != nil {
		// Not expected: every path frees the client first. Do not leave
		// it waiting.
		l.detach(cl, bc)
		cl.rl.addTry(bc.backend, l.nowNs, l.now.Sub(bc.tryStart), tryCanceled, 0)
		bc.backend.target.Done(l.nowNs, health.OutcomeCanceled, 0)
		if cl.live == 0 {
			l.unwait(cl)
			cl.state = lcIdle
			l.handOff(cl)
		}
	}
	if bc.orphan {
		l.dropOrphan(bc)
		bc.backend.target.Done(l.nowNs, health.OutcomeCanceled, 0)
	}
	l.slot(bc.backend).open--
	syscall.Close(bc.fd)
	bc.fd = -1
}

func (l *loop) addWaiting(c *loopClient) {
	c.waitIdx = len(l.waiting)
	l.waiting = append(l.waiting, c)
}

func (l *loop) unwait(c *loopClient) {
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
