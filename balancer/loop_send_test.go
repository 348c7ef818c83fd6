//go:build linux

package balancer

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// socketPair returns a connected pair of non-blocking stream sockets,
// closed when t ends.
func socketPair(t *testing.T) (int, int) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fds[0]); syscall.Close(fds[1]) })
	return fds[0], fds[1]
}

// received returns what is waiting on fd, without blocking.
func received(t *testing.T, fd int) string {
	t.Helper()
	var got []byte
	buf := make([]byte, 64<<10)
	for {
		n, err := syscall.Read(fd, buf)
		if n <= 0 {
			if err != nil && !errors.Is(err, syscall.EAGAIN) {
				t.Fatal(err)
			}
			return string(got)
		}
		got = append(got, buf[:n]...)
	}
}

// newTestRing returns a send ring, or skips the test where the kernel
// has none to give (before Linux 5.6, kernel.io_uring_disabled, seccomp).
func newTestRing(t *testing.T) *ioRing {
	t.Helper()
	r, err := newIORing()
	if err != nil {
		t.Skipf("io_uring unavailable here (%v): the loop sends with sendto, which the other tests cover", err)
	}
	t.Cleanup(r.close)
	return r
}

// TestSendRingSendsOnEverySocket checks the ring's system call: one call
// sends on several sockets, and says for each what send would have said,
// a whole send, a partial one, EAGAIN on a full socket or EBADF.
func TestSendRingSendsOnEverySocket(t *testing.T) {
	r := newTestRing(t)
	var fds []int
	var peers []int
	var bufs [][]byte
	for i := range 5 {
		a, b := socketPair(t)
		fds, peers = append(fds, a), append(peers, b)
		bufs = append(bufs, bytes.Repeat([]byte{'a' + byte(i)}, 100+i))
	}
	// The fourth socket is kept full: its send would block. The fifth is
	// closed.
	if err := syscall.SetsockoptInt(fds[3], syscall.SOL_SOCKET, syscall.SO_SNDBUF, 4096); err != nil {
		t.Fatal(err)
	}
	syscall.Close(fds[4])
	res := make([]int32, len(fds))
	for round := range 3 {
		fillSocket(fds[3])
		if errno := r.sendAll(fds, bufs, res); errno != 0 {
			t.Fatalf("round %d: sendAll: %v", round, errno)
		}
		for i := range 3 {
			if res[i] != int32(len(bufs[i])) {
				t.Errorf("round %d: send %d returned %d, want %d", round, i, res[i], len(bufs[i]))
			}
			if got := received(t, peers[i]); got != string(bufs[i]) {
				t.Errorf("round %d: peer %d received %q, want %q", round, i, got, bufs[i])
			}
		}
		if res[3] != -int32(syscall.EAGAIN) {
			t.Errorf("round %d: send on a full socket returned %d, want -EAGAIN (%d)", round, res[3], -int32(syscall.EAGAIN))
		}
		if res[4] != -int32(syscall.EBADF) {
			t.Errorf("round %d: send on a closed descriptor returned %d, want -EBADF (%d)", round, res[4], -int32(syscall.EBADF))
		}
		received(t, peers[3])
	}
}

// TestSendRingReceivesFromEverySocket checks the ring's reads: one call
// reads from several sockets and says for each what recv would have said:
// the bytes waiting, EAGAIN when none are, 0 at the end of the stream,
// EBADF for a closed descriptor.
func TestSendRingReceivesFromEverySocket(t *testing.T) {
	r := newTestRing(t)
	var fds, peers []int
	for range 5 {
		a, b := socketPair(t)
		fds, peers = append(fds, a), append(peers, b)
	}
	syscall.Write(peers[0], []byte("first"))
	syscall.Write(peers[1], bytes.Repeat([]byte{'x'}, 300))
	// peers[2] sends nothing.
	syscall.Shutdown(peers[3], syscall.SHUT_WR)
	syscall.Close(fds[4])
	bufs := make([][]byte, len(fds))
	for i := range bufs {
		bufs[i] = make([]byte, 100)
	}
	res := make([]int32, len(fds))
	if errno := r.recvAll(fds, bufs, res); errno != 0 {
		t.Fatalf("recvAll: %v", errno)
	}
	want := []int32{5, 100, -int32(syscall.EAGAIN), 0, -int32(syscall.EBADF)}
	for i := range want {
		if res[i] != want[i] {
			t.Errorf("read %d returned %d, want %d", i, res[i], want[i])
		}
	}
	if string(bufs[0][:5]) != "first" {
		t.Errorf("read 0 gave %q, want %q", bufs[0][:5], "first")
	}
}

// TestSendRingNeedsIOUringSend checks what a ring asks of the kernel
// besides io_uring: its send (Linux 5.6), without which, as on 5.5, whose
// io_uring has every feature newIORing checks, each send the ring made
// would fail with EINVAL. The probe finds it on this kernel, and finds
// nothing on a descriptor that is no ring, as it finds nothing on 5.5,
// which has no probe.
func TestSendRingNeedsIOUringSend(t *testing.T) {
	r := newTestRing(t)
	if !uringCanSend(r.fd) {
		t.Error("the probe does not find IORING_OP_SEND on a kernel whose ring sends")
	}
	a, _ := socketPair(t)
	if uringCanSend(a) {
		t.Error("the probe finds IORING_OP_SEND on a socket")
	}
}

// fillSocket writes to fd until it would block.
func fillSocket(fd int) {
	b := make([]byte, 4096)
	for {
		if _, err := syscall.Write(fd, b); err != nil {
			return
		}
	}
}

// TestLoopSendsQueuedGoOnlyToTheirConnections checks the loop's queue of
// sends, with the ring and with one sendto each: an answer goes to its
// client, which then waits for its next request; an answer that only
// partly fits is kept for EPOLLOUT; the send of a connection closed since
// it was queued, or of a client connection that has queued another answer
// since, or of a backend connection taken out of use, is never made, and
// a new connection that took the closed one's descriptor gets nothing of
// it.
func TestLoopSendsQueuedGoOnlyToTheirConnections(t *testing.T) {
	for _, withRing := range []bool{true, false} {
		name := "sendto"
		if withRing {
			name = "io_uring"
		}
		t.Run(name, func(t *testing.T) {
			l := &loop{now: time.Now(), ringFDs: make([]int, 0, ioRingEntries),
				ringBufs: make([][]byte, 0, ioRingEntries), ringRes: make([]int32, ioRingEntries)}
			l.nowNs = l.now.UnixNano()
			if withRing {
				l.ring = newTestRing(t)
			}
			client := func() (*loopClient, int) {
				a, b := socketPair(t)
				c := &loopClient{waitIdx: -1}
				c.fd = a
				c.in = append(make([]byte, 0, 64), "GET / HTTP/1.1\r\n\r\n"...)
				return c, b
			}
			answer := func(c *loopClient, s string) {
				l.out = append(l.out[:0], s...)
				l.queueAnswer(c, l.out, len("GET / HTTP/1.1\r\n\r\n"))
			}

			ok, okPeer := client()
			answer(ok, "answer ok")

			closed, closedPeer := client()
			answer(closed, "answer to a closed connection")
			// As loop.close does, but for the descriptor, which a new
			// connection then takes.
			closed.sendGen++
			reusedFD := closed.fd
			closed.fd = -1
			newer := &loopClient{waitIdx: -1}
			newer.fd = reusedFD
			newer.in = append(make([]byte, 0, 64), "GET / HTTP/1.1\r\n\r\n"...)
			answer(newer, "answer to the new connection")

			full, fullPeer := client()
			if err := syscall.SetsockoptInt(full.fd, syscall.SOL_SOCKET, syscall.SO_SNDBUF, 4096); err != nil {
				t.Fatal(err)
			}
			fillSocket(full.fd)
			big := string(bytes.Repeat([]byte{'z'}, 64<<10))
			answer(full, big)

			bcA, bcPeer := socketPair(t)
			bc := &loopBackend{}
			bc.fd = bcA
			l.queueRequest(bc, append([]byte(nil), "GET /dropped HTTP/1.1\r\n\r\n"...))
			bc.unqueue()

			l.flushSends()

			if got := received(t, okPeer); got != "answer ok" {
				t.Errorf("client received %q, want %q", got, "answer ok")
			}
			if ok.state != lcIdle || len(ok.in) != 0 {
				t.Errorf("after its answer went: state %d, %d bytes unread; want idle (%d) with the request consumed", ok.state, len(ok.in), lcIdle)
			}
			if got := received(t, closedPeer); got != "answer to the new connection" {
				t.Errorf("the descriptor's new connection received %q, want only its own answer", got)
			}
			if newer.state != lcIdle {
				t.Errorf("the new connection's state is %d after its answer went, want idle", newer.state)
			}
			if full.state != lcWriting || len(full.pending) == 0 || !strings.HasSuffix(big, string(full.pending)) {
				t.Errorf("an answer that did not fit: state %d, %d bytes kept; want lcWriting (%d) with the rest kept", full.state, len(full.pending), lcWriting)
			}
			if got := received(t, fullPeer); strings.Trim(got, "\x00") != "" && !strings.HasPrefix(big, strings.TrimLeft(got, "\x00")) {
				t.Errorf("a full socket's peer received bytes that are not the start of the answer")
			}
			if got := received(t, bcPeer); got != "" {
				t.Errorf("a backend connection taken out of use sent %q", got)
			}
			if len(l.sends) != 0 {
				t.Errorf("%d sends left queued after the flush", len(l.sends))
			}
		})
	}
}

// TestEventLoopSendsWithAndWithoutIOUring serves the same traffic with
// server.io_uring on and off: keep-alive and pipelined requests on many
// connections at once. Every answer must be right either way; without the
// ring each send is its own system call and nothing is read ahead, with it
// the calls are at most the sends.
func TestEventLoopSendsWithAndWithoutIOUring(t *testing.T) {
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) { ctx.WriteString("answer to " + string(ctx.Path())) })
	for _, ring := range []bool{true, false} {
		t.Run(fmt.Sprintf("io_uring=%v", ring), func(t *testing.T) {
			s := startEdge(t, fmt.Sprintf("server: {io_uring: %v}\nservices:\n  web: {static: %s}\nroutes: [{service: web}]\n", ring, staticList(o)))
			sends0, calls0, h0, ahead0 := loopSends.Get(), loopSendCalls.Get(), loopHandoffs.Get(), loopReadsAhead.Get()
			const conns, perConn = 16, 20
			var wg sync.WaitGroup
			errs := make(chan error, conns)
			for i := range conns {
				wg.Add(1)
				go func() {
					defer wg.Done()
					c := dialEdge(t, s)
					defer c.Close()
					c.SetDeadline(time.Now().Add(20 * time.Second))
					br := bufio.NewReader(c)
					// Two pipelined, then one at a time.
					var raw strings.Builder
					for j := range perConn {
						fmt.Fprintf(&raw, "GET /%d/%d HTTP/1.1\r\nHost: a\r\n\r\n", i, j)
						if j == 0 {
							continue
						}
						if _, err := io.WriteString(c, raw.String()); err != nil {
							errs <- err
							return
						}
						for k := j - 1; k <= j; k++ {
							if k == j-1 && j > 1 {
								continue
							}
							var resp fasthttp.Response
							if err := resp.Read(br); err != nil {
								errs <- err
								return
							}
							if want := fmt.Sprintf("answer to /%d/%d", i, k); string(resp.Body()) != want {
								errs <- fmt.Errorf("got %q, want %q", resp.Body(), want)
								return
							}
						}
						raw.Reset()
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			if loopHandoffs.Get() != h0 {
				t.Fatal("a connection left the event loop")
			}
			sends, calls := loopSends.Get()-sends0, loopSendCalls.Get()-calls0
			// Each request is one send to the origin and one answer.
			if want := uint64(2 * conns * perConn); sends != want {
				t.Errorf("%d sends, want %d", sends, want)
			}
			if !ring && calls != sends {
				t.Errorf("without io_uring: %d send calls for %d sends, want one each", calls, sends)
			}
			if calls > sends || calls == 0 {
				t.Errorf("%d send calls for %d sends", calls, sends)
			}
			ahead := loopReadsAhead.Get() - ahead0
			if !ring && ahead != 0 {
				t.Errorf("without io_uring: %d reads ahead, want none", ahead)
			}
			t.Logf("%d sends in %d system calls, %d reads ahead", sends, calls, ahead)
		})
	}
}

// newSendLoop returns a loop with what its sends need, and with the ring
// if withRing, as newLoop makes them; it polls nothing.
func newSendLoop(t *testing.T, withRing bool) *loop {
	t.Helper()
	l := &loop{now: time.Now(), epfd: -1, lfd: -1, ringFDs: make([]int, 0, ioRingEntries),
		ringBufs: make([][]byte, 0, ioRingEntries), ringRes: make([]int32, ioRingEntries)}
	l.nowNs = l.now.UnixNano()
	if withRing {
		l.ring = newTestRing(t)
	}
	return l
}

// loopClientOn returns a client connection of l, on one end of a socket
// pair, that has read req; the other end, the client's, is returned too.
// The loop closes its end, as it does a client's.
func loopClientOn(t *testing.T, l *loop, req string) (*loopClient, int) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	c := &loopClient{waitIdx: -1}
	c.fd = fds[0]
	c.in = append(make([]byte, 0, 64), req...)
	c.req.HeadLen = len(req)
	for c.fd >= len(l.conns) {
		l.conns = append(l.conns, loopSock{})
	}
	l.conns[c.fd] = loopSock{c: c}
	t.Cleanup(func() {
		if c.fd >= 0 {
			syscall.Close(c.fd)
		}
		syscall.Close(fds[1])
	})
	return c, fds[1]
}

// readToEOF reads what is waiting on fd, without blocking, and reports
// whether the end of the connection came after it.
func readToEOF(t *testing.T, fd int) (string, bool) {
	t.Helper()
	var got []byte
	buf := make([]byte, 64<<10)
	for {
		n, err := syscall.Read(fd, buf)
		switch {
		case n > 0:
			got = append(got, buf[:n]...)
		case err == nil:
			return string(got), true
		case errors.Is(err, syscall.EAGAIN):
			return string(got), false
		default:
			t.Fatal(err)
		}
	}
}

// TestLoopStopClosesConnectionsOnceAnswered checks that a loop told to
// stop closes a kept-alive client connection once its answer has gone,
// as it closes the idle ones at once: an answer queued by the events that
// came with the stop, and one a slow reader was still being written when
// it came. Left open, the connection keeps the loop, and the server's
// shutdown, waiting until the client leaves or idle_timeout cuts it.
func TestLoopStopClosesConnectionsOnceAnswered(t *testing.T) {
	const req = "GET / HTTP/1.1\r\nHost: a\r\n\r\n"
	const ans = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
	for _, withRing := range []bool{true, false} {
		name := "sendto"
		if withRing {
			name = "io_uring"
		}
		t.Run(name, func(t *testing.T) {
			l := newSendLoop(t, withRing)
			type conn struct {
				c    *loopClient
				peer int
				want string
			}
			var conns []conn
			// A slow reader: its answer, bigger than the socket takes,
			// is partly written when the stop comes.
			slow, slowPeer := loopClientOn(t, l, req)
			if err := syscall.SetsockoptInt(slow.fd, syscall.SOL_SOCKET, syscall.SO_SNDBUF, 4096); err != nil {
				t.Fatal(err)
			}
			big := "HTTP/1.1 200 OK\r\nContent-Length: 65536\r\n\r\n" + strings.Repeat("b", 64<<10)
			l.queueAnswer(slow, append([]byte(nil), big...), len(req))
			l.flushSends()
			if slow.state != lcWriting {
				t.Fatalf("a 64KiB answer went whole on a 4KiB socket: state %d", slow.state)
			}
			conns = append(conns, conn{slow, slowPeer, big})
			// Answers queued, then the stop in the same batch of events.
			for range 2 {
				c, peer := loopClientOn(t, l, req)
				l.queueAnswer(c, append([]byte(nil), ans...), len(req))
				conns = append(conns, conn{c, peer, ans})
			}

			l.beginStop()
			l.flushSends()

			// The slow reader reads its answer as it comes.
			got := make([]string, len(conns))
			for i := 0; i < 1<<16 && slow.state == lcWriting; i++ {
				s, _ := readToEOF(t, slowPeer)
				got[0] += s
				l.flush(slow)
			}
			for i, c := range conns {
				s, eof := readToEOF(t, c.peer)
				got[i] += s
				if got[i] != c.want {
					t.Errorf("client %d received %d bytes, want its answer (%d bytes)", i, len(got[i]), len(c.want))
				}
				if !eof {
					t.Errorf("client %d: the connection stays open after its answer, while the loop stops (state %d)", i, c.c.state)
				}
			}
			if n := l.busy(); n != 0 {
				t.Errorf("%d client connections left open: the stopping loop would not exit", n)
			}
		})
	}
}

// TestLoopRingFailureFallsBackToSystemCalls: a ring whose call fails
// mid-run is given up; the sends and reads it did not make are made with
// sendto and recvfrom, and batched waits, which pay only through the
// ring, go back to their setting without one (off by default).
func TestLoopRingFailureFallsBackToSystemCalls(t *testing.T) {
	r := newTestRing(t)
	fd := r.fd
	t.Cleanup(func() { syscall.Close(fd) })
	l := newSendLoop(t, false)
	l.s, l.ring = &Server{log: quietLogger(), cfg: mustConfig(t, "services:\n  web: {static: [127.0.0.1:1]}\n")}, r
	l.setBatchWait(DefaultBatchWait)
	l.batching = true
	// The ring's descriptor is no longer one: its next call fails.
	r.fd = -1

	var peers []int
	for i := range 3 {
		c, peer := loopClientOn(t, l, "GET / HTTP/1.1\r\n\r\n")
		peers = append(peers, peer)
		l.out = append(l.out[:0], fmt.Sprintf("answer %d", i)...)
		l.queueAnswer(c, l.out, c.req.HeadLen)
	}
	l.flushSends()
	for i, p := range peers {
		if got, want := received(t, p), fmt.Sprintf("answer %d", i); got != want {
			t.Errorf("client %d received %q after the ring failed, want %q", i, got, want)
		}
	}
	if l.ring != nil {
		t.Error("the loop kept a ring whose call failed")
	}
	if l.batchWait != 0 || l.batching {
		t.Errorf("after the ring failed: batch wait %v, batching %v; want off, as configured without a ring", time.Duration(l.batchWait), l.batching)
	}
}
