package balancer

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"golang.org/x/net/http2"
)

// The limits an HTTP/2 connection is held to beyond what x/net's server
// enforces itself (max_concurrent_streams, handler goroutines at most that
// many, a queue of at most four times that many streams reset before their
// handler started, max_header_list_size, 10000 queued control frames).
// h2Conn reads the frame headers of what the client sends, on their way to
// x/net's server, and counts what costs edgelb work but carries no request;
// its streams count the ones that end before their answer. A connection
// over a limit gets GOAWAY ENHANCE_YOUR_CALM and closes: the reader hands
// x/net a ConnectionError of that code, which x/net answers that way.

// calmReason is why edgelb closed an HTTP/2 connection.
type calmReason int32

const (
	calmNone calmReason = iota
	// calmResets: more streams reset before their answer than
	// max_resets_per_second allows (rapid reset, CVE-2023-44487).
	calmResets
	// calmControl: more frames without a request than
	// max_control_frames_per_second allows (SETTINGS, PING, empty frames
	// floods).
	calmControl
	// calmHeaderBlock: a header block in more CONTINUATION frames than any
	// client splits one into (CONTINUATION flood, CVE-2024-27316).
	calmHeaderBlock

	numCalmReasons
)

var calmNames = [numCalmReasons]string{calmResets: "resets", calmControl: "control_frames", calmHeaderBlock: "header_block"}

var h2Calmed = func() (c [numCalmReasons]*metrics.Counter) {
	for r := calmReason(1); r < numCalmReasons; r++ {
		c[r] = metrics.NewCounter(`edgelb_http2_conns_closed_total{reason="` + calmNames[r] + `"}`)
	}
	return c
}()

// errCalm is what h2Conn's Read returns once the connection is over a
// limit: x/net sends GOAWAY with its code and closes the connection.
var errCalm error = http2.ConnectionError(http2.ErrCodeEnhanceYourCalm)

// h2FrameHeaderLen is the length of an HTTP/2 frame header.
const h2FrameHeaderLen = 9

// h2Conn is a client connection served as HTTP/2: the connection x/net's
// server reads and writes, and the handler of its streams. x/net reads it
// from one goroutine at a time; the streams' goroutines only count resets.
type h2Conn struct {
	net.Conn
	h *h2Server
	// reqConn is the connection a stream's RequestCtx reports: the
	// *tlsConn over TLS, so that the stream is served as HTTPS.
	reqConn net.Conn
	// deadlines is the connection under the wrappers that keep state
	// of their own, whose read deadline any goroutine may set.
	deadlines net.Conn
	transport int

	// The reader's state: bytes of the client preface still to come, the
	// frame header being read, the payload bytes of the current frame
	// still to come, and the frames of the header block in progress (0
	// outside one).
	preface int
	hdr     [h2FrameHeaderLen]byte
	hn      int
	skip    int
	block   int
	started bool
	control rateBudget

	resetMu sync.Mutex
	resets  rateBudget

	// calm is why the connection is being closed, calmNone until then.
	calm atomic.Int32
}

// newConn returns the h2Conn of c, whose client preface has preface bytes
// still to come.
func (h *h2Server) newConn(c, reqConn net.Conn, transport, preface int) *h2Conn {
	return &h2Conn{
		Conn: c, h: h, reqConn: reqConn, deadlines: bareConn(c), transport: transport, preface: preface,
		control: newRateBudget(h.cfg.MaxControlFramesPerSecond),
		resets:  newRateBudget(h.cfg.MaxResetsPerSecond),
	}
}

// Read implements net.Conn.
func (c *h2Conn) Read(p []byte) (int, error) {
	if c.calm.Load() != 0 {
		return 0, errCalm
	}
	n, err := c.Conn.Read(p)
	if c.calm.Load() != 0 {
		// A stream went over the reset limit meanwhile.
		return 0, errCalm
	}
	if n > 0 {
		if why := c.scan(p[:n]); why != calmNone {
			c.goCalm(why)
			return 0, errCalm
		}
	}
	return n, err
}

// SetReadDeadline implements net.Conn. Once the connection is over a
// limit, the deadline stays in the past: x/net lifts the read deadline
// at every new stream, and the reader must see the end.
func (c *h2Conn) SetReadDeadline(t time.Time) error {
	if c.calm.Load() != 0 {
		return nil
	}
	return c.deadlines.SetReadDeadline(t)
}

// bareConn returns the connection under c's wrappers that hold the head's
// deadline (tlsConn, prefixConn), which only the goroutine reading may
// call: x/net sets read deadlines from another goroutine, and a stream
// wakes the reader from its own. Their head is over once HTTP/2 frames
// come.
func bareConn(c net.Conn) net.Conn {
	for {
		switch w := c.(type) {
		case *replayConn:
			c = w.Conn
		case *tlsConn:
			return w.Conn
		case *prefixConn:
			return w.Conn
		case *clientConn:
			return w.Conn
		default:
			return c
		}
	}
}

// scan follows the frames in b, the next bytes the client sent, and
// reports a limit they go over.
func (c *h2Conn) scan(b []byte) calmReason {
	var now time.Time
	for len(b) > 0 {
		switch {
		case c.preface > 0:
			k := min(c.preface, len(b))
			c.preface -= k
			b = b[k:]
			continue
		case c.skip > 0:
			k := min(c.skip, len(b))
			c.skip -= k
			b = b[k:]
			continue
		}
		k := copy(c.hdr[c.hn:], b)
		c.hn += k
		b = b[k:]
		if c.hn < h2FrameHeaderLen {
			break
		}
		c.hn = 0
		length := int(c.hdr[0])<<16 | int(c.hdr[1])<<8 | int(c.hdr[2])
		c.skip = length
		if !c.started {
			// The preface and a first frame are in: the head's time is
			// over, what follows has x/net's timeouts.
			c.started = true
			c.Conn.SetReadDeadline(time.Time{})
		}
		control := c.isControl(http2.FrameType(c.hdr[3]), http2.Flags(c.hdr[4]), length)
		if c.block > c.h.maxBlockFrames {
			return calmHeaderBlock
		}
		if !control {
			continue
		}
		if now.IsZero() {
			now = time.Now()
		}
		if !c.control.take(now) {
			return calmControl
		}
	}
	return calmNone
}

// isControl tells whether a frame costs edgelb work but carries no
// request, and keeps count of the frames of a header block.
func (c *h2Conn) isControl(t http2.FrameType, f http2.Flags, length int) bool {
	switch t {
	case http2.FrameData:
		return length == 0 && !f.Has(http2.FlagDataEndStream)
	case http2.FrameHeaders:
		c.block = 0
		if !f.Has(http2.FlagHeadersEndHeaders) {
			c.block = 1
		}
		return length == 0 && !f.Has(http2.FlagHeadersEndStream) && !f.Has(http2.FlagHeadersEndHeaders)
	case http2.FrameContinuation:
		if c.block > 0 {
			c.block++
		}
		if f.Has(http2.FlagContinuationEndHeaders) {
			c.block = 0
			return false
		}
		return length == 0
	case http2.FrameWindowUpdate, http2.FrameGoAway, http2.FramePushPromise:
		// WINDOW_UPDATE follows the data a client takes, which may be
		// a lot; GOAWAY ends the connection; PUSH_PROMISE from a
		// client is an error that x/net closes the connection for.
		return false
	}
	// SETTINGS, PING, PRIORITY, PRIORITY_UPDATE, RST_STREAM and unknown
	// types.
	return true
}

// goCalm marks the connection over a limit for why, once.
func (c *h2Conn) goCalm(why calmReason) {
	if !c.calm.CompareAndSwap(0, int32(why)) {
		return
	}
	h2Calmed[why].Inc()
	if ok, held := c.h.calmLog.allow(time.Now().UnixNano()); ok {
		c.h.s.log.Warn("HTTP/2 connection over a limit: GOAWAY ENHANCE_YOUR_CALM", "reason", calmNames[why],
			"client", c.RemoteAddr().String(), "repeats_not_logged", held)
	}
}

// streamReset counts a stream that ended before its answer was sent, and
// ends the connection when there are too many of them.
func (c *h2Conn) streamReset() {
	h2StreamsReset.Inc()
	c.resetMu.Lock()
	ok := c.resets.take(time.Now())
	c.resetMu.Unlock()
	if ok {
		return
	}
	c.goCalm(calmResets)
	// Wake the reader, which may be waiting for the client: its next
	// Read ends the connection.
	c.deadlines.SetReadDeadline(time.Unix(1, 0))
}

// h2TLSConn is an h2Conn over TLS: x/net checks its TLS state.
type h2TLSConn struct {
	*h2Conn
	tc *tlsConn
}

// ConnectionState returns the TLS state of the connection.
func (c *h2TLSConn) ConnectionState() tls.ConnectionState { return c.tc.ConnectionState() }

// rateBudget lets a burst of rate events through, then rate a second (a
// token bucket). It is not safe for concurrent use.
type rateBudget struct {
	rate, tokens float64
	last         time.Time
}

func newRateBudget(rate int) rateBudget {
	return rateBudget{rate: float64(rate), tokens: float64(rate)}
}

// take reports whether an event at now is within the budget, and counts
// it.
func (b *rateBudget) take(now time.Time) bool {
	if !b.last.IsZero() {
		b.tokens = min(b.rate, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// replayConn is a connection whose first bytes were read already: pre
// holds them, to be read again.
type replayConn struct {
	net.Conn
	pre []byte
}

func (c *replayConn) Read(p []byte) (int, error) {
	if len(c.pre) > 0 {
		n := copy(p, c.pre)
		c.pre = c.pre[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// sniffConn is a connection of the plain listener given to the fasthttp
// server while server.h2c is on. Its first read tells HTTP/2 with prior
// knowledge from HTTP/1: a connection that opens with the client preface
// ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") moves to the HTTP/2 server, and
// fasthttp, whose read ends there, sees a connection closed before its
// first request, which it leaves without a word; closing the connection
// is then the HTTP/2 side's. Any other goes on as HTTP/1 with every byte.
// fasthttp has no hook for another protocol on a plain connection.
type sniffConn struct {
	net.Conn // the *clientConn or *prefixConn
	h        *h2Server
	sniffed  bool
	moved    atomic.Bool
}

func (c *sniffConn) Read(p []byte) (int, error) {
	if c.sniffed {
		return c.Conn.Read(p)
	}
	// Slow path: the connection's first bytes.
	c.sniffed = true
	const preface = http2.ClientPreface
	if len(p) < len(preface) {
		// fasthttp reads into a buffer of max_header_bytes.
		return c.Conn.Read(p)
	}
	n := 0
	for {
		m, err := c.Conn.Read(p[n:])
		n += m
		k := min(n, len(preface))
		if string(p[:k]) != preface[:k] || err != nil || m == 0 {
			return n, err
		}
		if n < len(preface) {
			continue
		}
		rest := bytes.Clone(p[len(preface):n])
		c.moved.Store(true)
		go c.h.serveH2C(c.Conn, rest)
		return 0, io.EOF
	}
}

// Close implements net.Conn: fasthttp's close of a connection that moved
// to HTTP/2 is not the last word.
func (c *sniffConn) Close() error {
	if c.moved.Load() {
		return nil
	}
	return c.Conn.Close()
}

// sentAny reports whether the client sent anything (see headTimedOut).
func (c *sniffConn) sentAny() bool {
	a, ok := c.Conn.(interface{ sentAny() bool })
	return ok && a.sentAny()
}
