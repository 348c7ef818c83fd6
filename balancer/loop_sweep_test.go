//go:build linux

package balancer

import (
	"math/rand/v2"
	"os"
	"syscall"
	"testing"
	"time"
)

// TestLoopNextSweepIsAhead checks that after the sweeps due, the next one
// is always in the future: wait makes it the poll's deadline, and a
// deadline in the past ends every wait at once, before the loop polls,
// so that it would answer nothing until the sweep ran. The idle sweep
// coming due between two timeout sweeps, with no request in flight, did
// that for up to loopSweep once every idleEvery, which raised the event
// loop's p99.9 at low load to several milliseconds.
func TestLoopNextSweepIsAhead(t *testing.T) {
	const now = int64(1_000_000) * int64(time.Second)
	check := func(name string, l *loop) {
		t.Helper()
		l.now, l.nowNs = time.Unix(0, now), now
		l.sweep()
		if next := l.nextDue(); next <= now {
			t.Errorf("%s: next sweep due %v after now, want later than now", name, time.Duration(next-now))
		}
	}
	idle := 100 * int64(time.Millisecond)
	inFlight := []*loopClient{{expires: now + int64(time.Hour), live: 1, waitIdx: 0}}
	// The case that stalled: the idle sweep due, the last timeout sweep
	// 5ms ago, nothing in flight.
	check("idle sweep due between timeout sweeps", &loop{idleEvery: idle, lastIdle: now - idle, lastSweep: now - 5*int64(time.Millisecond)})
	check("idle sweep due, a request in flight", &loop{idleEvery: idle, lastIdle: now - idle, lastSweep: now - 5*int64(time.Millisecond), waiting: inFlight})
	check("accepts paused while stopping", &loop{idleEvery: idle, lastIdle: now, lastSweep: now, acceptPaused: true, acceptResume: now - 1, stopping: true})
	for i := range 1000 {
		r := rand.New(rand.NewPCG(uint64(i), 1))
		back := func(max time.Duration) int64 { return now - r.Int64N(int64(max)) }
		l := &loop{
			idleEvery: int64(time.Millisecond) + r.Int64N(int64(time.Second)),
			lastIdle:  back(2 * time.Second),
			lastSweep: back(30 * time.Millisecond),
		}
		if r.IntN(2) == 0 {
			l.waiting = []*loopClient{{expires: now + int64(time.Hour), live: 1, waitIdx: 0}}
		}
		if r.IntN(3) == 0 {
			l.acceptPaused, l.acceptResume, l.stopping = true, now+1+r.Int64N(int64(time.Second)), r.IntN(2) == 0
		}
		check("random state", l)
	}
}

// TestLoopWaitPastDeadlineHasNoOldEvents checks that a wait whose poll
// deadline has passed already, as after a batch that outlasted the next
// sweep's time, returns no events: Read then ends before it polls, and the
// events of the poll before, handled already, must not be handled again
// on sockets that may have been closed, or their descriptors reused, since.
func TestLoopWaitPastDeadlineHasNoOldEvents(t *testing.T) {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.SetNonblock(epfd, true); err != nil {
		t.Fatal(err)
	}
	l := &loop{epfd: epfd, ep: os.NewFile(uintptr(epfd), "test-epoll"), idleEvery: int64(time.Hour)}
	defer l.ep.Close()
	if l.rc, err = l.ep.SyscallConn(); err != nil {
		t.Fatal(err)
	}
	l.pollFn = l.poll
	var p [2]int
	if err := syscall.Pipe2(p[:], syscall.O_NONBLOCK|syscall.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(p[0])
	defer syscall.Close(p[1])
	if err := l.ctl(syscall.EPOLL_CTL_ADD, p[0], syscall.EPOLLIN); err != nil {
		t.Fatal(err)
	}
	syscall.Write(p[1], []byte{1})
	now := time.Now().UnixNano()
	l.lastIdle = now
	if n, err := l.wait(); n != 1 || err != nil {
		t.Fatalf("wait with the pipe readable: %d events, %v; want 1", n, err)
	}
	var b [8]byte
	rawRead(p[0], b[:])
	// The next sweep was due an hour ago: the deadline is in the past.
	l.lastIdle = now - 2*int64(time.Hour)
	if n, err := l.wait(); n != 0 || err != nil {
		t.Fatalf("wait past its deadline, nothing readable: %d events, %v; want none", n, err)
	}
}
