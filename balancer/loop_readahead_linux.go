//go:build linux

package balancer

import (
	"syscall"
	"unsafe"
)

// Reading ahead: when a poll returns several events, the loop reads the
// sockets their handling will read, all in one io_uring_enter, before it
// handles the first; each event's handling then takes its socket's result
// (loop.recv) instead of calling recv itself. It reads what the handling
// would: a client connection waiting for a request into the rest of its
// buffer, a backend connection into the rest of its response buffer. The
// events are the poll's, handled in order, and what one event's handling
// does touches no other connection's buffer; a connection one closes is
// not read again.

// readAhead is what was read ahead for one event: from fd, the socket of
// c or bc, into the len bytes at base; n bytes, or -1 and errno.
type readAhead struct {
	ev    int // the event's index in l.events
	c     *loopClient
	bc    *loopBackend
	fd    int
	base  *byte
	len   int
	n     int
	errno syscall.Errno
	taken bool
}

// readAhead reads ahead for the n events in l.events, when there are two
// or more reads to make, and the loop has a ring.
func (l *loop) readAhead(n int) {
	l.ahead = l.ahead[:0]
	if l.ring == nil || n < 2 || l.stopping {
		return
	}
	fds, bufs := l.ringFDs[:0], l.ringBufs[:0]
	for i := 0; i < n; i++ {
		ev := &l.events[i]
		fd := int(ev.Fd)
		if ev.Events&readEvents == 0 || fd == l.lfd || fd == l.wake[0] || fd < 0 || fd >= len(l.conns) {
			continue
		}
		s := l.conns[fd]
		var b []byte
		switch {
		case s.c != nil && s.c.state == lcIdle && !s.c.eof:
			b = s.c.in[len(s.c.in):cap(s.c.in)]
		case s.bc != nil && s.bc.state == lcBackend && s.bc.in != nil:
			b = s.bc.in[len(s.bc.in):cap(s.bc.in)]
		}
		if len(b) == 0 {
			continue
		}
		l.ahead = append(l.ahead, readAhead{ev: i, c: s.c, bc: s.bc, fd: fd, base: &b[0], len: len(b)})
		fds, bufs = append(fds, fd), append(bufs, b)
	}
	if len(fds) < 2 {
		// One read is a recvfrom of its own.
		l.ahead = l.ahead[:0]
	} else {
		res := l.ringRes[:len(fds)]
		loopReadsAhead.Add(len(fds))
		loopReadAheadCalls.Inc()
		if errno := l.ring.recvAll(fds, bufs, res); errno != 0 {
			l.ringFailed(errno)
		}
		j := 0
		for i := range l.ahead {
			a := &l.ahead[i]
			switch r := res[i]; {
			case r == ringPending:
				// Not read: the handling reads it itself.
				continue
			case r < 0:
				a.n, a.errno = -1, syscall.Errno(-r)
			default:
				a.n = int(r)
			}
			l.ahead[j] = *a
			j++
		}
		clear(l.ahead[j:])
		l.ahead = l.ahead[:j]
	}
	clear(bufs)
	l.ringFDs, l.ringBufs = fds[:0], bufs[:0]
}

// recv reads from fd, the socket of c or bc, into p: what was read ahead
// for it, if the event being handled is its socket's, else with recvfrom.
func (l *loop) recv(c *loopClient, bc *loopBackend, fd int, p []byte) (int, syscall.Errno) {
	if l.cur >= 0 && l.cur < len(l.ahead) {
		a := &l.ahead[l.cur]
		if a.taken || a.fd != fd || a.c != c || a.bc != bc {
			return rawRead(fd, p)
		}
		a.taken = true
		if len(p) != a.len || unsafe.SliceData(p) != a.base {
			// The bytes are where the buffer was; they cannot be
			// given as read. Not expected: nothing moves the buffer of
			// a connection between its poll and its event.
			return -1, syscall.EIO
		}
		return a.n, a.errno
	}
	return rawRead(fd, p)
}

// dropAhead ends the reads ahead of this batch. One whose connection is
// still open but did not take its bytes cannot give them back to the
// socket: that connection closes, as after a read error. Not expected:
// an event read ahead for is handled by a read of its socket unless
// something closed the connection first.
func (l *loop) dropAhead() {
	l.cur = -1
	for i := range l.ahead {
		a := &l.ahead[i]
		if a.taken || a.n <= 0 || a.fd >= len(l.conns) {
			continue
		}
		s := l.conns[a.fd]
		switch {
		case a.c != nil && s.c == a.c:
			l.s.log.Error("event loop: bytes read ahead were not taken; the client connection is closed", "loop", l.idx)
			l.close(a.c)
		case a.bc != nil && s.bc == a.bc:
			// Not the backend's failure: its try ends uncounted, and
			// its request goes on on the fasthttp path.
			l.s.log.Error("event loop: bytes read ahead were not taken; the backend connection is closed", "loop", l.idx)
			l.closeBackend(a.bc)
		}
	}
	clear(l.ahead)
	l.ahead = l.ahead[:0]
}

// forgetAhead drops what was read ahead for the connection of c or bc,
// which is closing: a connection that reuses the object, or the
// descriptor, in the same batch must not be given it.
func (l *loop) forgetAhead(c *loopClient, bc *loopBackend) {
	for i := range l.ahead {
		if a := &l.ahead[i]; (c != nil && a.c == c) || (bc != nil && a.bc == bc) {
			a.taken = true
		}
	}
}
