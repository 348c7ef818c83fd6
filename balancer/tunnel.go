package balancer

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

// Tunnels: once a backend switched protocols, a client connection and a
// backend connection relayed byte for byte, each way until that way's
// sender closes (a half-close goes on to the other side), until both have,
// until a connection fails, or until nothing went either way for the
// service's websocket.idle_timeout. A tunnel has two goroutines, one per
// way, and takes no part in the backend's health: its try was counted when
// the 101 came. A backend that is ejected or leaves discovery keeps its
// tunnels; shutting down ends them (tunnelSet.drain).

// The ways of a tunnel.
const (
	toBackend = iota
	toClient
)

// Why a tunnel ended, counted in edgelb_tunnels_closed_total{reason}.
const (
	// endClient: the client closed its connection (before the backend
	// did, when both closed in turn), or it failed.
	endClient = iota
	// endBackend: the backend did.
	endBackend
	// endIdle: nothing went either way for websocket.idle_timeout.
	endIdle
	// endShutdown: edgelb shut down.
	endShutdown

	numTunnelEnds
)

var tunnelEndNames = [numTunnelEnds]string{
	endClient:   "client",
	endBackend:  "backend",
	endIdle:     "idle_timeout",
	endShutdown: "shutdown",
}

// tunnelBufSize is what one way of a tunnel reads at once.
const tunnelBufSize = 8 << 10

var tunnelBufs = sync.Pool{New: func() any { return new([tunnelBufSize]byte) }}

// hijackWait bounds the time between a backend's 101 and the fasthttp
// server handing the client connection over, which it does at once unless
// the connection broke: then the backend's connection is closed.
const hijackWait = 10 * time.Second

// Tunnel states.
const (
	tunnelPending   = iota // the 101 came; waiting for the client connection
	tunnelRunning          // relaying
	tunnelAbandoned        // the client connection never came, or shutdown
)

// tunnel is one open tunnel; see above.
type tunnel struct {
	set  *tunnelSet
	m    *serviceMetrics
	bm   *backendMetrics
	head []byte // the 101 for the client
	// ws is set when the protocol is WebSocket, whose frames shutting
	// down follows to send close frames between them.
	ws bool
	// id is the ID of the request that opened the tunnel, for the log
	// lines about it.
	id string
	// idle is the idle timeout, which becomes halfClosed once a side
	// half-closed (guarded by mu once the tunnel runs).
	idle, halfClosed time.Duration
	backend          net.Conn
	// br holds what the backend sent with its 101, until run starts.
	br *bufio.Reader

	// cmu guards clientRaw, the client connection under the one fasthttp
	// hands over (which reads through fasthttp's buffer but does not
	// close), and shutConns.
	cmu       sync.Mutex
	clientRaw net.Conn
	shutConns bool

	state    atomic.Int32
	watchdog *time.Timer
	// headSent is set once the client has the 101, from when close
	// frames may follow.
	headSent atomic.Bool
	awayOnce sync.Once
	// last is when a byte last came either way (unix nano).
	last atomic.Int64
	// firstEOF is the side (endClient or endBackend) that half-closed
	// first, or -1.
	firstEOF atomic.Int32
	eofs     atomic.Int32

	ways [2]tunnelWay

	mu       sync.Mutex // guards the fields below
	idler    *time.Timer
	finished bool

	endOnce sync.Once
	end     int
}

// newTunnel registers the tunnel that u's backend connection opens for
// the client, to which head (a 101) is due first; id is the ID of the
// request that asked for it.
func newTunnel(p *Pool, u *upgrade, head []byte, ws bool, id string) *tunnel {
	t := &tunnel{set: u.tunnels, m: p.m, bm: u.b.m, head: head, ws: ws, idle: p.cfg.WebSocket.IdleTimeout,
		halfClosed: p.cfg.WebSocket.HalfClosedTimeout, backend: u.conn, br: u.br, id: id}
	t.firstEOF.Store(-1)
	t.ways[toBackend].bytes = p.m.tunnelBytes[toBackend]
	t.ways[toClient].bytes = p.m.tunnelBytes[toClient]
	t.m.tunnelsOpen.Add(1)
	t.bm.tunnels.Add(1)
	t.set.add(t)
	t.watchdog = time.AfterFunc(hijackWait, func() { t.abandon(endClient) })
	return t
}

// run is the fasthttp hijack handler: it sends the 101 and relays until
// the tunnel ends. fasthttp closes c once it returns.
func (t *tunnel) run(c net.Conn) {
	defer t.recover()
	if !t.state.CompareAndSwap(tunnelPending, tunnelRunning) {
		return
	}
	t.watchdog.Stop()
	defer t.finish()
	t.cmu.Lock()
	t.clientRaw = rawConn(c)
	shut := t.shutConns
	t.cmu.Unlock()
	if shut || t.set.closed.Load() {
		t.shut(endShutdown)
		t.clientRaw.Close()
		return
	}
	w := &t.ways[toClient]
	w.dst, w.src = c, io.Reader(t.br)
	if t.br.Buffered() == 0 {
		w.src = t.backend
	}
	t.br = nil
	w = &t.ways[toBackend]
	w.dst, w.src = t.backend, c
	if _, err := c.Write(t.head); err != nil {
		t.shut(endClient)
		return
	}
	t.headSent.Store(true)
	if t.set.draining.Load() {
		t.set.goAway(t)
	}
	t.touch()
	t.mu.Lock()
	t.idler = time.AfterFunc(t.idle, t.checkIdle)
	t.mu.Unlock()
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer t.recover()
		t.pump(toClient)
	}()
	func() {
		defer t.recover()
		t.pump(toBackend)
	}()
	<-done
	// fasthttp takes c back once run returns: nothing may write to it
	// after, a close frame of a shutdown included.
	for i := range t.ways {
		w := &t.ways[i]
		w.mu.Lock()
		w.closed, w.dst = true, nil
		w.mu.Unlock()
	}
}

// recover, deferred by a tunnel's goroutines, reports a panic and ends the
// tunnel, whose other way would wait for ever.
func (t *tunnel) recover() {
	if r := recover(); r != nil {
		t.set.panicked(r, "panic in a tunnel", "request_id", t.id)
		t.shut(endShutdown)
	}
}

// abandon ends, for reason, a tunnel whose client connection has not
// come.
func (t *tunnel) abandon(reason int) {
	if t.state.CompareAndSwap(tunnelPending, tunnelAbandoned) {
		t.shut(reason)
		t.finish()
	}
}

// pump relays one way until it ends.
func (t *tunnel) pump(way int) {
	w := &t.ways[way]
	src, dst := endClient, endBackend // who sends, who receives
	if way == toClient {
		src, dst = endBackend, endClient
	}
	buf := tunnelBufs.Get().(*[tunnelBufSize]byte)
	defer tunnelBufs.Put(buf)
	for {
		n, err := w.src.Read(buf[:])
		if n > 0 {
			t.touch()
			if werr := w.forward(buf[:n], t.ws); werr != nil {
				t.shut(dst)
				return
			}
		}
		if br, ok := w.src.(*bufio.Reader); ok && br.Buffered() == 0 {
			// What the backend sent with its 101 is through: read its
			// connection directly from now on, and let the buffer go.
			w.src = t.backend
		}
		if err == nil {
			continue
		}
		if t.set.draining.Load() {
			t.shut(endShutdown)
			return
		}
		if err == io.EOF {
			// Noted before the half-close is passed on, which the
			// other side may answer at once.
			t.firstEOF.CompareAndSwap(-1, int32(src))
		}
		if err != io.EOF || closeWrite(t.peer(dst)) != nil {
			// A side that half-closed before ended the tunnel: what
			// fails after follows from it (a browser resets its
			// connection once the backend closed its WebSocket).
			if first := t.firstEOF.Load(); first >= 0 {
				src = int(first)
			}
			t.shut(src)
			return
		}
		// A half-close: the other way goes on, for as long as bytes
		// keep going within the half-closed timeout.
		if t.eofs.Add(1) == 2 {
			t.shut(int(t.firstEOF.Load()))
			return
		}
		t.halfClose()
		return
	}
}

// peer returns the connection of side (endClient or endBackend).
func (t *tunnel) peer(side int) net.Conn {
	if side == endClient {
		t.cmu.Lock()
		defer t.cmu.Unlock()
		return t.clientRaw
	}
	return t.backend
}

func (t *tunnel) touch() { t.last.Store(time.Now().UnixNano()) }

// halfClose shortens the tunnel's idle timeout to its half-closed one.
func (t *tunnel) halfClose() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.finished || t.halfClosed <= 0 || t.halfClosed >= t.idle {
		return
	}
	t.idle = t.halfClosed
	if t.idler != nil {
		t.idler.Reset(t.idle)
	}
}

// checkIdle ends the tunnel if nothing went either way for its idle
// timeout, or looks again when it would be.
func (t *tunnel) checkIdle() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.finished {
		return
	}
	quiet := time.Duration(time.Now().UnixNano() - t.last.Load())
	if quiet >= t.idle {
		if first := t.firstEOF.Load(); first >= 0 {
			// Half-closed, and the other side never closed: counted
			// for the side that closed first.
			t.shut(int(first))
			return
		}
		t.shut(endIdle)
		return
	}
	t.idler.Reset(t.idle - quiet)
}

// shut ends the tunnel, for reason, the first time it is called: both
// connections close, which stops both ways.
func (t *tunnel) shut(reason int) {
	t.endOnce.Do(func() {
		t.end = reason
		t.cmu.Lock()
		c := t.clientRaw
		t.shutConns = true
		t.cmu.Unlock()
		if c != nil {
			c.Close()
		}
		t.backend.Close()
	})
}

// finish counts the tunnel as closed, once both ways stopped.
func (t *tunnel) finish() {
	t.shut(endShutdown) // only if nothing ended it before
	t.mu.Lock()
	t.finished = true
	if t.idler != nil {
		t.idler.Stop()
	}
	t.mu.Unlock()
	t.m.tunnelCloses[t.end].Inc()
	t.m.tunnelsOpen.Add(-1)
	t.m.tunnelSlots.Add(-1)
	t.bm.tunnels.Add(-1)
	t.set.remove(t)
}

// goingAway sends WebSocket close frames with status 1001, going away:
// unmasked to the client, as a server sends it, and masked to the backend,
// as a client does. Each goes between two frames of its way; from then on
// that way drops what comes, as the sender of a close frame sends no more
// data.
func (t *tunnel) goingAway() {
	if !t.ws {
		return
	}
	t.ways[toClient].requestClose(wsGoingAway)
	t.ways[toBackend].requestClose(maskedClose(wsGoingAway, rand.Uint32()))
}

// wsGoingAway is a WebSocket close frame (FIN, opcode 8) with status 1001
// and a reason.
var wsGoingAway = []byte{0x88, 12, 0x03, 0xe9, 'g', 'o', 'i', 'n', 'g', ' ', 'a', 'w', 'a', 'y'}

// maskedClose returns frame, a close frame with a payload of at most 125
// bytes, masked with key as a client must send it (RFC 6455 section 5.3).
func maskedClose(frame []byte, key uint32) []byte {
	out := make([]byte, 0, len(frame)+4)
	out = append(out, frame[0], frame[1]|0x80)
	out = binary.BigEndian.AppendUint32(out, key)
	for i, c := range frame[2:] {
		out = append(out, c^out[2+i%4])
	}
	return out
}

// tunnelWay is one way of a tunnel.
type tunnelWay struct {
	src   io.Reader
	dst   net.Conn
	bytes *metrics.Counter

	mu     sync.Mutex // serializes writes to dst; guards the fields below
	frames frameTracker
	// closeFrame, when set, is due at the next frame boundary; once it
	// is sent, closed is set and what comes is dropped.
	closeFrame []byte
	closed     bool
}

// forward writes p to the way's receiver. ws says whether it holds
// WebSocket frames, which are followed for the close frame of a shutdown.
func (w *tunnelWay) forward(p []byte, ws bool) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil
	}
	if w.closeFrame == nil {
		if ws {
			w.frames.advance(p, false)
		}
		return w.write(p)
	}
	k := w.frames.advance(p, true)
	if k < 0 {
		return w.write(p)
	}
	if err := w.write(p[:k]); err != nil {
		return err
	}
	return w.sendCloseLocked()
}

func (w *tunnelWay) write(p []byte) error {
	if len(p) == 0 {
		return nil
	}
	n, err := w.dst.Write(p)
	w.bytes.Add(n)
	return err
}

// requestClose has frame sent at the way's next frame boundary: now, if it
// is at one.
func (w *tunnelWay) requestClose(frame []byte) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed || w.closeFrame != nil {
		return
	}
	w.closeFrame = frame
	if w.frames.atBoundary() {
		w.sendCloseLocked()
	}
}

func (w *tunnelWay) sendCloseLocked() error {
	w.closed = true
	_, err := w.dst.Write(w.closeFrame)
	return err
}

// frameTracker follows the frames of a WebSocket stream (RFC 6455 section
// 5.2) to tell where one ends, reading only their headers.
type frameTracker struct {
	hdr  [14]byte
	nhdr int
	// left is the payload left of the current frame.
	left uint64
	// lost is set on a length no frame has: no boundary is known again.
	lost bool
}

// atBoundary reports whether the stream is between two frames.
func (f *frameTracker) atBoundary() bool { return !f.lost && f.nhdr == 0 && f.left == 0 }

// advance follows the frames in p, the next bytes of the stream. With stop
// set it stops at the first frame boundary and returns how many bytes of p
// lead to it (0 when the stream is at one); it returns -1 when p ends first,
// or, without stop, always.
func (f *frameTracker) advance(p []byte, stop bool) int {
	i := 0
	for {
		switch {
		case f.lost:
			return -1
		case stop && f.atBoundary():
			return i
		case i == len(p):
			return -1
		case f.left > 0:
			n := min(f.left, uint64(len(p)-i))
			f.left -= n
			i += int(n)
			continue
		}
		f.hdr[f.nhdr] = p[i]
		f.nhdr++
		i++
		if need := frameHeaderLen(f.hdr[:f.nhdr]); need == f.nhdr {
			f.left, f.lost = framePayloadLen(f.hdr[:need])
			f.nhdr = 0
		}
	}
}

// frameHeaderLen returns the length of the frame header starting with h,
// or 0 when h is too short to tell.
func frameHeaderLen(h []byte) int {
	if len(h) < 2 {
		return 0
	}
	n := 2
	switch h[1] & 0x7f {
	case 126:
		n += 2
	case 127:
		n += 8
	}
	if h[1]&0x80 != 0 {
		n += 4 // masking key
	}
	return n
}

// framePayloadLen returns the payload length of the whole frame header h;
// lost is set for a 64-bit length with its top bit set, which RFC 6455
// forbids.
func framePayloadLen(h []byte) (n uint64, lost bool) {
	switch l := h[1] & 0x7f; l {
	case 126:
		return uint64(binary.BigEndian.Uint16(h[2:])), false
	case 127:
		n = binary.BigEndian.Uint64(h[2:])
		return n, n>>63 != 0
	default:
		return uint64(l), false
	}
}

// rawConn returns the connection under the one fasthttp hands a hijack
// handler, which reads through the server's buffer but does not close.
func rawConn(c net.Conn) net.Conn {
	if u, ok := c.(interface{ UnsafeConn() net.Conn }); ok {
		return u.UnsafeConn()
	}
	return c
}

var errNoHalfClose = errors.New("edgelb: connection cannot be half-closed")

// closeWrite half-closes c: the peer reads the end of the stream and can
// still send.
func closeWrite(c net.Conn) error {
	for range 4 {
		switch x := c.(type) {
		case interface{ CloseWrite() error }:
			return x.CloseWrite()
		case *clientConn:
			c = x.Conn
		case *prefixConn:
			c = x.Conn
		default:
			return errNoHalfClose
		}
	}
	return errNoHalfClose
}

// tunnelSet holds a Server's open tunnels, so that shutting down can end
// them. It is safe for concurrent use.
type tunnelSet struct {
	// panicked reports a recovered panic (panics.Balancer).
	panicked func(r any, msg string, attrs ...any)
	// draining is set once shutting down began: no tunnel opens, and the
	// open ones are told to go away.
	draining atomic.Bool
	// closed is set once the drain is over: a tunnel that opens late
	// closes at once.
	closed atomic.Bool

	mu   sync.Mutex
	open map[*tunnel]struct{}
	// busy counts the goroutines sending close frames.
	busy int
}

func newTunnelSet(panicked func(r any, msg string, attrs ...any)) *tunnelSet {
	return &tunnelSet{panicked: panicked, open: make(map[*tunnel]struct{})}
}

func (ts *tunnelSet) add(t *tunnel) {
	ts.mu.Lock()
	ts.open[t] = struct{}{}
	ts.mu.Unlock()
}

func (ts *tunnelSet) remove(t *tunnel) {
	ts.mu.Lock()
	delete(ts.open, t)
	ts.mu.Unlock()
}

// drain refuses new tunnels and tells the open ones to go away: WebSocket
// tunnels get close frames each way; the others carry on until wait ends
// them.
func (ts *tunnelSet) drain() {
	ts.draining.Store(true)
	ts.mu.Lock()
	list := make([]*tunnel, 0, len(ts.open))
	for t := range ts.open {
		list = append(list, t)
	}
	ts.mu.Unlock()
	for _, t := range list {
		if t.headSent.Load() {
			ts.goAway(t)
		}
	}
}

// goAway has t's close frames sent, once, by a goroutine of their own: a
// way may be busy writing to a slow peer.
func (ts *tunnelSet) goAway(t *tunnel) {
	t.awayOnce.Do(func() {
		if !t.ws {
			return
		}
		ts.mu.Lock()
		ts.busy++
		ts.mu.Unlock()
		go func() {
			defer func() {
				ts.mu.Lock()
				ts.busy--
				ts.mu.Unlock()
			}()
			defer t.recover()
			t.goingAway()
		}()
	})
}

// wait waits until every tunnel has closed, or until ctx is done and then
// closes the ones left; it returns how many it closed.
func (ts *tunnelSet) wait(ctx context.Context) (cut int) {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	var giveUp time.Time
	for {
		ts.mu.Lock()
		n := len(ts.open) + ts.busy
		ts.mu.Unlock()
		if n == 0 {
			return cut
		}
		if !giveUp.IsZero() && time.Now().After(giveUp) {
			return cut
		}
		select {
		case <-tick.C:
			continue
		case <-ctx.Done():
		}
		if giveUp.IsZero() {
			ts.closed.Store(true)
			ts.mu.Lock()
			list := make([]*tunnel, 0, len(ts.open))
			for t := range ts.open {
				list = append(list, t)
			}
			ts.mu.Unlock()
			cut = len(list)
			for _, t := range list {
				t.abandon(endShutdown)
				t.shut(endShutdown)
			}
			// Closed connections stop the ways at once.
			giveUp = time.Now().Add(5 * time.Second)
		}
		<-tick.C
	}
}
