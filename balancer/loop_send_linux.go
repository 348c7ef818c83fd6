//go:build linux

package balancer

import (
	"syscall"
	"time"
)

// The loop's sends wait for the end of the events in hand, and then go
// together: with io_uring in one system call (ioRing), else one sendto
// each. An answer or a request queued for sending is a loopSend; its
// connection waits for the send to complete before it does anything else:
// a client in state lcSending reads nothing, a backend connection with
// sending set is not reused. Closing either drops its send, if it has not
// gone yet, and makes the completion of one that has a no-op.

// loopSend is a send queued: a client's answer or a backend's request.
type loopSend struct {
	c   *loopClient
	bc  *loopBackend
	fd  int
	gen uint32
	buf []byte
	// reqLen is the length of the client's request head, consumed once
	// its answer is sent.
	reqLen int
	// idx is the send's place in the batch sent, -1 if it was not.
	idx int
}

// loopWbufs is how many answer buffers a loop keeps for reuse, and
// loopWbufMax the largest it keeps.
const (
	loopWbufs   = 256
	loopWbufMax = 64 << 10
)

// queueAnswer queues out, the whole answer to c's request, whose head is
// reqLen bytes of c.in; out is l.out's buffer, which the send keeps and
// replaces with a free one.
func (l *loop) queueAnswer(c *loopClient, out []byte, reqLen int) {
	c.state = lcSending
	c.sendGen++
	l.sends = append(l.sends, loopSend{c: c, fd: c.fd, gen: c.sendGen, buf: out, reqLen: reqLen})
	l.out = nil
	if n := len(l.wbufs); n > 0 {
		l.out = l.wbufs[n-1]
		l.wbufs[n-1] = nil
		l.wbufs = l.wbufs[:n-1]
	}
}

// queueRequest queues out, a request for bc's backend, in bc.out's buffer.
func (l *loop) queueRequest(bc *loopBackend, out []byte) {
	bc.out = out
	bc.sending = true
	bc.sendGen++
	l.sends = append(l.sends, loopSend{bc: bc, fd: bc.fd, gen: bc.sendGen, buf: out})
}

// unqueue drops bc's send, if one is queued: its connection is closing.
func (bc *loopBackend) unqueue() {
	if bc.sending {
		bc.sending = false
		bc.sendGen++
	}
}

// live reports whether the send is still wanted: its connection is the
// one it was queued for, open, and has queued nothing since.
func (s *loopSend) live() bool {
	if s.c != nil {
		return s.c.fd == s.fd && s.c.sendGen == s.gen && s.c.state == lcSending
	}
	return s.bc.fd == s.fd && s.bc.sendGen == s.gen && s.bc.sending
}

// flushSends sends what is queued, and goes on with each connection as
// its send completes; what that queues goes in the next round.
func (l *loop) flushSends() {
	for len(l.sends) > 0 {
		batch := l.sends
		l.sends, l.sendsNext = l.sendsNext[:0], batch
		for len(batch) > 0 {
			k := min(len(batch), ioRingEntries)
			l.sendBatch(batch[:k])
			batch = batch[k:]
		}
		clear(l.sendsNext)
		l.sendsNext = l.sendsNext[:0]
	}
}

// sendBatch sends the live sends of batch and completes them. What a
// completion does may close the connection of a send further on, sent
// already or not: that one is then dropped.
func (l *loop) sendBatch(batch []loopSend) {
	fds, bufs, res := l.ringFDs[:0], l.ringBufs[:0], l.ringRes
	for i := range batch {
		s := &batch[i]
		s.idx = -1
		if s.live() {
			s.idx = len(fds)
			fds, bufs = append(fds, s.fd), append(bufs, s.buf)
			res[s.idx] = ringPending
		}
	}
	loopSends.Add(len(fds))
	if l.ring != nil && len(fds) > 1 {
		loopSendCalls.Inc()
		if errno := l.ring.sendAll(fds, bufs, res); errno != 0 {
			l.ringFailed(errno)
		}
	}
	clear(bufs)
	l.ringFDs, l.ringBufs = fds[:0], bufs[:0]
	for i := range batch {
		s := &batch[i]
		if s.idx < 0 || !s.live() {
			l.dropSend(s)
			continue
		}
		r := res[s.idx]
		if r == ringPending {
			// A send alone, or the ring broke before it went.
			loopSendCalls.Inc()
			n, errno := rawWrite(s.fd, s.buf)
			r = int32(n)
			if n < 0 {
				r = -int32(errno)
			}
		}
		l.sendDone(s, r)
	}
}

// dropSend frees what a send no longer wanted holds.
func (l *loop) dropSend(s *loopSend) {
	if s.c != nil {
		l.freeWbuf(s.buf)
	}
}

// freeWbuf keeps b, an answer's buffer, for another.
func (l *loop) freeWbuf(b []byte) {
	if cap(b) <= loopWbufMax && len(l.wbufs) < loopWbufs {
		l.wbufs = append(l.wbufs, b[:0])
	}
}

// sendDone goes on with the connection of s, whose send returned r: the
// bytes sent, or a negated errno. A panic there costs that connection
// only, as one in dispatch does.
func (l *loop) sendDone(s *loopSend, r int32) {
	c := s.c
	if c == nil {
		c = s.bc.client
	}
	defer func() {
		if p := recover(); p != nil {
			l.recovered(p, "panic in event loop; its connection is closed", c)
			if s.bc != nil && s.bc.fd >= 0 {
				l.closeBackend(s.bc)
			}
		}
	}()
	n, errno := int(r), syscall.Errno(0)
	if r < 0 {
		n, errno = -1, syscall.Errno(-r)
	}
	if s.c != nil {
		s.c.state = lcWriting
		l.afterWrite(s.c, s.buf, n, errno, s.reqLen)
		l.freeWbuf(s.buf)
		return
	}
	bc := s.bc
	bc.sending = false
	bc.out = bc.out[:0]
	l.sent(bc, n == len(s.buf))
}

// ringFailed gives up the loop's ring after a call on it failed with
// errno: from then on each read and send is a system call of its own,
// and batched waits, which pay through the ring, go back to what the
// configuration says without one.
func (l *loop) ringFailed(errno syscall.Errno) {
	l.s.log.Warn("event loop: io_uring failed; one system call per read and per send from now on", "loop", l.idx, "err", errno)
	l.ring.close()
	l.ring = nil
	l.setBatchWait(l.s.cfg.Server.batchWait(false))
}

// setBatchWait sets how long the loop's batched waits are; 0 turns them
// off.
func (l *loop) setBatchWait(d time.Duration) {
	l.batchWait = int64(d)
	l.batchSleep = syscall.NsecToTimespec(l.batchWait)
	if d == 0 {
		l.batching = false
	}
}
