package balancer

import (
	"bytes"
	"encoding/binary"
	"net"
	"testing"

	"github.com/VictoriaMetrics/metrics"
)

// wsFrame returns a WebSocket frame with opcode op and a payload of n
// bytes, masked when mask is set.
func wsFrame(op byte, n int, mask bool) []byte {
	f := []byte{0x80 | op}
	var m byte
	if mask {
		m = 0x80
	}
	switch {
	case n < 126:
		f = append(f, m|byte(n))
	case n < 1<<16:
		f = append(f, m|126)
		f = binary.BigEndian.AppendUint16(f, uint16(n))
	default:
		f = append(f, m|127)
		f = binary.BigEndian.AppendUint64(f, uint64(n))
	}
	if mask {
		f = append(f, 1, 2, 3, 4)
	}
	return append(f, bytes.Repeat([]byte{'x'}, n)...)
}

// The frame tracker finds the boundary after each frame, however the
// stream is cut into reads.
func TestFrameTracker(t *testing.T) {
	f := func(stream []byte, boundaries []int) {
		t.Helper()
		for cut := 1; cut <= len(stream); cut++ {
			var ft frameTracker
			var got []int
			off := 0
			for off < len(stream) {
				p := stream[off:min(off+cut, len(stream))]
				// Walk p boundary by boundary, as a way does when a close
				// frame is due.
				for len(p) > 0 {
					k := ft.advance(p, true)
					if k < 0 {
						off += len(p)
						break
					}
					if k == 0 {
						// At a boundary: step over one byte with stop
						// off, as forwarding does.
						ft.advance(p[:1], false)
						off++
						p = p[1:]
						if ft.atBoundary() {
							got = append(got, off)
						}
						continue
					}
					off += k
					p = p[k:]
					got = append(got, off)
				}
			}
			if !ft.atBoundary() {
				t.Fatalf("cut %d: not at a boundary at the end", cut)
			}
			if len(got) != len(boundaries) {
				t.Fatalf("cut %d: boundaries %v, want %v", cut, got, boundaries)
			}
			for i := range got {
				if got[i] != boundaries[i] {
					t.Fatalf("cut %d: boundaries %v, want %v", cut, got, boundaries)
				}
			}
		}
	}
	small, empty, mid, masked := wsFrame(1, 5, false), wsFrame(9, 0, false), wsFrame(2, 300, false), wsFrame(1, 3, true)
	big := wsFrame(2, 70000, true)
	var stream []byte
	var bs []int
	for _, fr := range [][]byte{small, empty, mid, masked, big, small} {
		stream = append(stream, fr...)
		bs = append(bs, len(stream))
	}
	f(stream[:len(small)+len(empty)+len(mid)+len(masked)], bs[:4])
	f(stream, bs)

	// A length with its top bit set is no WebSocket: no boundary again.
	var ft frameTracker
	bad := append([]byte{0x82, 127}, 0x80, 0, 0, 0, 0, 0, 0, 1)
	if ft.advance(bad, false); ft.atBoundary() || ft.advance(small, true) != -1 {
		t.Fatal("a frame of more than 2^63 bytes did not lose the tracker")
	}
}

// The close frames of a shutdown: 1001 going away, unmasked to the client
// and masked to the backend.
func TestGoingAwayFrames(t *testing.T) {
	if !bytes.Equal(wsGoingAway, append([]byte{0x88, 12, 0x03, 0xe9}, "going away"...)) {
		t.Fatalf("%x", wsGoingAway)
	}
	m := maskedClose(wsGoingAway, 0x01020304)
	if m[0] != 0x88 || m[1] != 0x80|12 || !bytes.Equal(m[2:6], []byte{1, 2, 3, 4}) || len(m) != 6+12 {
		t.Fatalf("%x", m)
	}
	for i, c := range m[6:] {
		if c^m[2+i%4] != wsGoingAway[2+i] {
			t.Fatalf("byte %d of the payload unmasks to %x", i, c^m[2+i%4])
		}
	}
	var ft frameTracker
	if ft.advance(m, true) != 0 || ft.advance(m, false) != -1 || !ft.atBoundary() {
		t.Fatal("the tracker does not take the masked close frame whole")
	}
}

// bufConn is a net.Conn whose writes go to a buffer.
type bufConn struct {
	net.Conn
	buf bytes.Buffer
}

func (c *bufConn) Write(p []byte) (int, error) { return c.buf.Write(p) }
func (c *bufConn) Len() int                    { return c.buf.Len() }
func (c *bufConn) Bytes() []byte               { return c.buf.Bytes() }
func (c *bufConn) Reset()                      { c.buf.Reset() }

// A close frame due in the middle of a frame waits for its end; what
// follows the close frame is dropped.
func TestTunnelWayClosesBetweenFrames(t *testing.T) {
	dst := &bufConn{}
	w := &tunnelWay{dst: dst, bytes: metrics.NewSet().NewCounter("x")}
	first, second := wsFrame(2, 1000, false), wsFrame(1, 5, false)
	if err := w.forward(first[:600], true); err != nil {
		t.Fatal(err)
	}
	w.requestClose(wsGoingAway)
	if dst.Len() != 600 {
		t.Fatalf("the close frame went in the middle of a frame: %d bytes written", dst.Len())
	}
	if err := w.forward(append(first[600:], second...), true); err != nil {
		t.Fatal(err)
	}
	want := append(append([]byte(nil), first...), wsGoingAway...)
	if !bytes.Equal(dst.Bytes(), want) {
		t.Fatalf("wrote %d bytes, want the frame then the close frame (%d)", dst.Len(), len(want))
	}
	w.forward(second, true)
	if dst.Len() != len(want) {
		t.Fatal("a frame went after the close frame")
	}

	// Between frames it goes at once.
	dst.Reset()
	w = &tunnelWay{dst: dst, bytes: metrics.NewSet().NewCounter("x")}
	w.forward(second, true)
	w.requestClose(wsGoingAway)
	if !bytes.Equal(dst.Bytes(), append(append([]byte(nil), second...), wsGoingAway...)) {
		t.Fatalf("%q", dst.Bytes())
	}
}
