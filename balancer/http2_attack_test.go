package balancer

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The known HTTP/2 attacks, sent as raw frames: what the attacking client
// sees, that a well-behaved client on another connection is served
// meanwhile, and that no backend's health changes.

// rawH2 is an HTTP/2 client connection driven frame by frame.
type rawH2 struct {
	t    *testing.T
	c    net.Conn
	fr   *http2.Framer
	wmu  sync.Mutex
	hbuf bytes.Buffer
	enc  *hpack.Encoder
	// https is the scheme of the requests.
	https bool
}

// dialRawH2 opens an HTTP/2 connection to e, over TLS with ALPN h2 or, for
// h2c, with prior knowledge to the plain listener, and sends the preface
// and an empty SETTINGS frame.
func dialRawH2(t *testing.T, e *h2Edge, transport string) *rawH2 {
	t.Helper()
	var c net.Conn
	var err error
	switch transport {
	case "tls":
		conf := e.pki.client("shop.example")
		conf.NextProtos = []string{"h2"}
		var tc *tls.Conn
		tc, err = tls.Dial("tcp", e.TLSAddr(), conf)
		if err == nil && tc.ConnectionState().NegotiatedProtocol != "h2" {
			t.Fatalf("ALPN chose %q, want h2", tc.ConnectionState().NegotiatedProtocol)
		}
		c = tc
	case "h2c":
		c, err = net.Dial("tcp", e.Addr())
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	r := &rawH2{t: t, c: c, fr: http2.NewFramer(c, c), https: transport == "tls"}
	r.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	r.fr.MaxHeaderListSize = 1 << 20
	r.enc = hpack.NewEncoder(&r.hbuf)
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := r.fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return r
}

// handshake reads the server's SETTINGS and acknowledges them, so that
// no acknowledgement comes between the frames the test sends later.
func (r *rawH2) handshake() {
	r.t.Helper()
	r.readUntil(true, func(e *h2End) bool { return e.settings > 0 })
}

// block encodes a GET of path, and fields (name, value...), as a header
// block.
func (r *rawH2) block(method, path string, fields ...string) []byte {
	r.hbuf.Reset()
	scheme := "http"
	if r.https {
		scheme = "https"
	}
	for _, f := range [][2]string{{":method", method}, {":scheme", scheme}, {":authority", "shop.example"}, {":path", path}} {
		r.enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	for i := 0; i+1 < len(fields); i += 2 {
		r.enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	return bytes.Clone(r.hbuf.Bytes())
}

// get opens stream id with a GET of path that ends the stream.
func (r *rawH2) get(id uint32, path string, fields ...string) error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	return r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: r.block("GET", path, fields...), EndStream: true, EndHeaders: true})
}

// write runs f with the framer's writing side.
func (r *rawH2) write(f func(fr *http2.Framer) error) error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	return f(r.fr)
}

// response is what came back on a stream.
type response struct {
	status int
	body   string
	reset  http2.ErrCode // the stream's RST_STREAM, if it got one
	wasRST bool
}

// h2End is how a connection ended for the client: the GOAWAY it got, if
// any, and whether the server closed it.
type h2End struct {
	goAway   *http2.GoAwayFrame
	closed   bool
	streams  map[uint32]*response
	settings int // SETTINGS frames but acknowledgements
	// settingsAcks and pingAcks count the server's acknowledgements.
	settingsAcks, pingAcks int
}

// readUntil reads frames, acknowledging SETTINGS when ack is set, until
// done says so or the connection ends, and returns what came.
func (r *rawH2) readUntil(ack bool, done func(e *h2End) bool) *h2End {
	r.t.Helper()
	e := &h2End{streams: make(map[uint32]*response)}
	stream := func(id uint32) *response {
		if e.streams[id] == nil {
			e.streams[id] = &response{}
		}
		return e.streams[id]
	}
	for !done(e) {
		f, err := r.fr.ReadFrame()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				r.t.Fatalf("the server neither answered nor closed the connection: %v", err)
			}
			e.closed = true
			return e
		}
		switch f := f.(type) {
		case *http2.PingFrame:
			if f.IsAck() {
				e.pingAcks++
			}
		case *http2.SettingsFrame:
			if f.IsAck() {
				e.settingsAcks++
			}
			if !f.IsAck() {
				e.settings++
				if ack {
					r.write(func(fr *http2.Framer) error { return fr.WriteSettingsAck() })
				}
			}
		case *http2.MetaHeadersFrame:
			st, _ := strconv.Atoi(f.PseudoValue("status"))
			stream(f.StreamID).status = st
		case *http2.DataFrame:
			s := stream(f.StreamID)
			s.body += string(f.Data())
		case *http2.RSTStreamFrame:
			s := stream(f.StreamID)
			s.reset, s.wasRST = f.ErrCode, true
		case *http2.GoAwayFrame:
			e.goAway = f
		}
	}
	return e
}

// readToEnd reads until the server closes the connection.
func (r *rawH2) readToEnd(ack bool) *h2End {
	r.t.Helper()
	return r.readUntil(ack, func(*h2End) bool { return false })
}

// assertGoAway fails unless the connection ended with GOAWAY code, then
// closed.
func assertGoAway(t *testing.T, e *h2End, codes ...http2.ErrCode) {
	t.Helper()
	if e.goAway == nil {
		t.Fatalf("the connection ended without GOAWAY (closed: %v)", e.closed)
	}
	for _, c := range codes {
		if e.goAway.ErrCode == c {
			if !e.closed {
				t.Fatal("GOAWAY but the connection stayed open")
			}
			return
		}
	}
	t.Fatalf("GOAWAY %v, want one of %v", e.goAway.ErrCode, codes)
}

// servedMeanwhile sends GETs from a well-behaved HTTP/2 client on a
// connection of its own until the returned function is called, which
// fails the test unless every one was answered 200 and some were.
func servedMeanwhile(t *testing.T, e *h2Edge) (stop func()) {
	t.Helper()
	c := e.client(t)
	done := make(chan struct{})
	var ok, bad atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			resp, err := c.Get("https://" + e.TLSAddr() + "/meanwhile")
			if err != nil {
				t.Errorf("the well-behaved client: %v", err)
				bad.Add(1)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Errorf("the well-behaved client got %d", resp.StatusCode)
				bad.Add(1)
				return
			}
			ok.Add(1)
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return func() {
		t.Helper()
		waitFor(t, "a request of the well-behaved client during the attack", func() bool { return ok.Load() > 0 || bad.Load() > 0 })
		close(done)
		wg.Wait()
	}
}

// countingOrigin is an origin that counts its requests, and the most it
// had in flight at once, answering after delay.
type countingOrigin struct {
	*origin
	inflight, maxInflight atomic.Int64
	// attacks counts the requests but the well-behaved client's.
	attacks atomic.Int64
}

func startCountingOrigin(t *testing.T, delay time.Duration) *countingOrigin {
	t.Helper()
	o := &countingOrigin{}
	o.origin = startOrigin(t, "o", func(ctx *fasthttp.RequestCtx) {
		n := o.inflight.Add(1)
		defer o.inflight.Add(-1)
		for {
			m := o.maxInflight.Load()
			if n <= m || o.maxInflight.CompareAndSwap(m, n) {
				break
			}
		}
		if string(ctx.Path()) != "/meanwhile" {
			o.attacks.Add(1)
		}
		time.Sleep(delay)
		ctx.WriteString("ok")
	})
	return o
}

// attackEdge starts an edge with both listeners speaking HTTP/2 in front
// of o, with server keys http2 (under server.http2).
func attackEdge(t *testing.T, o *origin, http2 string) *h2Edge {
	t.Helper()
	return startH2Edge(t, "  h2c: true\n  http2: {"+http2+"}\n",
		"services:\n  web: {static: ["+o.addr+"], health: {passive: {consecutive_5xx: 1, consecutive_gateway_failures: 1}}}\nroutes: [{service: web}]\n")
}

// rapidReset opens and at once resets streams on a, n pairs at most, one
// every pause; it stops at the first write that fails.
func rapidReset(a *rawH2, n int, pause time.Duration) {
	for i := 0; i < n; i++ {
		id := uint32(2*i + 1)
		err := a.write(func(fr *http2.Framer) error {
			if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: a.block("GET", "/attack"), EndStream: true, EndHeaders: true}); err != nil {
				return err
			}
			return fr.WriteRSTStream(id, http2.ErrCodeCancel)
		})
		if err != nil {
			return
		}
		if pause > 0 {
			time.Sleep(pause)
		}
	}
}

// TestHTTP2RapidReset: a client that opens streams and resets them at
// once, in a loop (CVE-2023-44487), gets GOAWAY ENHANCE_YOUR_CALM and its
// connection closes, having caused a bounded amount of work however many
// streams it sent. At full speed whichever bound comes first ends it
// (max_resets_per_second, max_control_frames_per_second as RST_STREAM is
// one, or x/net's queue of streams waiting for a handler); paced so that
// neither of the other two is ever near, max_resets_per_second does.
func TestHTTP2RapidReset(t *testing.T) {
	for _, transport := range []string{"tls", "h2c"} {
		t.Run(transport, func(t *testing.T) {
			o := startCountingOrigin(t, 0)
			e := attackEdge(t, o.origin, "max_resets_per_second: 50, max_control_frames_per_second: 200")
			stop := servedMeanwhile(t, e)
			tr := transportTLS
			if transport == "h2c" {
				tr = transportH2C
			}
			streams := h2Streams[tr].Get()
			a := dialRawH2(t, e, transport)
			go rapidReset(a, 20000, 0)
			assertGoAway(t, a.readToEnd(true), http2.ErrCodeEnhanceYourCalm)
			stop()
			// Bursts of 50 resets or 200 control frames, 100 streams in
			// flight at most, and a little time at those rates.
			if n := h2Streams[tr].Get() - streams; n > 600 {
				t.Errorf("edgelb served %d streams of the attacker's", n)
			}
			if hits := o.attacks.Load(); hits > 400 {
				t.Errorf("the backend got %d requests of the attacker's", hits)
			}
			assertAllHealthy(t, e.Server)
		})
	}
	t.Run("paced", func(t *testing.T) {
		o := startCountingOrigin(t, 0)
		e := attackEdge(t, o.origin, "max_resets_per_second: 20, max_control_frames_per_second: 100000")
		stop := servedMeanwhile(t, e)
		closed, resets := h2Calmed[calmResets].Get(), h2StreamsReset.Get()
		a := dialRawH2(t, e, "tls")
		go rapidReset(a, 2000, 2*time.Millisecond)
		assertGoAway(t, a.readToEnd(true), http2.ErrCodeEnhanceYourCalm)
		stop()
		if got := h2Calmed[calmResets].Get() - closed; got != 1 {
			t.Errorf("edgelb_http2_conns_closed_total{reason=\"resets\"} +%d, want +1", got)
		}
		if n := h2StreamsReset.Get() - resets; n <= 20 || n > 200 {
			t.Errorf("%d streams reset before the connection closed, want a little over the burst of 20", n)
		}
		assertAllHealthy(t, e.Server)
	})
}

// TestHTTP2RapidResetSlowBackend: with a slow backend, resetting streams
// does not raise the work in flight: x/net runs at most
// max_concurrent_streams handlers for a connection at once, however many
// streams the client reset, and the connection ends with GOAWAY
// ENHANCE_YOUR_CALM.
func TestHTTP2RapidResetSlowBackend(t *testing.T) {
	o := startCountingOrigin(t, 300*time.Millisecond)
	e := attackEdge(t, o.origin, "max_concurrent_streams: 8")
	stop := servedMeanwhile(t, e)
	a := dialRawH2(t, e, "tls")
	go rapidReset(a, 20000, 0)
	end := a.readToEnd(true)
	assertGoAway(t, end, http2.ErrCodeEnhanceYourCalm)
	stop()
	// The well-behaved client has one request in flight at a time.
	if m := o.maxInflight.Load(); m > 8+1 {
		t.Errorf("the backend had %d requests in flight at once, want at most max_concurrent_streams (8) and the other client's", m)
	}
	assertAllHealthy(t, e.Server)
}

// TestHTTP2ContinuationFlood: a header block that never ends
// (CVE-2024-27316) gets GOAWAY and its connection closes before it holds
// more than about max_header_list_size: in big fragments, x/net's check of
// the header list size (PROTOCOL_ERROR); in small ones, or empty ones,
// edgelb's bound on the frames of a block (ENHANCE_YOUR_CALM).
func TestHTTP2ContinuationFlood(t *testing.T) {
	o := startCountingOrigin(t, 0)
	e := attackEdge(t, o.origin, "")
	stop := servedMeanwhile(t, e)
	for _, tc := range []struct {
		name string
		frag int
		code http2.ErrCode
	}{{"16 KiB fragments", 16 << 10, http2.ErrCodeProtocol}, {"100-byte fragments", 100, http2.ErrCodeEnhanceYourCalm}, {"empty fragments", 0, http2.ErrCodeEnhanceYourCalm}} {
		t.Run(tc.name, func(t *testing.T) {
			a := dialRawH2(t, e, "tls")
			a.handshake()
			frag := padFields(tc.frag)
			go func() {
				err := a.write(func(fr *http2.Framer) error {
					return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: a.block("GET", "/flood"), EndStream: true})
				})
				for i := 0; err == nil && i < 1<<20; i++ {
					err = a.write(func(fr *http2.Framer) error { return fr.WriteContinuation(1, false, frag) })
				}
			}()
			assertGoAway(t, a.readToEnd(true), tc.code)
		})
	}
	stop()
	if n := o.attacks.Load(); n != 0 {
		t.Errorf("%d requests of the flood reached the backend", n)
	}
	assertAllHealthy(t, e.Server)
}

// padFields returns at most n bytes of HPACK header fields of about 100
// bytes, as many as fit, each a whole literal that touches no table, so
// that any number of them decode in a row; for n under 100, n bytes of
// one such field.
func padFields(n int) []byte {
	var b bytes.Buffer
	enc := hpack.NewEncoder(&b)
	for i := 0; ; i++ {
		before := b.Len()
		enc.WriteField(hpack.HeaderField{Name: "x-pad", Value: strconv.Itoa(1e8+i) + strings.Repeat("p", 80), Sensitive: true})
		if b.Len() > n {
			if before == 0 {
				return b.Bytes()[:n]
			}
			return b.Bytes()[:before]
		}
	}
}

// TestHTTP2ControlFloods: SETTINGS and PING frames in a loop, read or not,
// and empty DATA frames, get GOAWAY ENHANCE_YOUR_CALM once they pass
// max_control_frames_per_second, and the connection closes; memory stays
// bounded, as x/net coalesces SETTINGS acknowledgements and edgelb closes
// the connection long before x/net's own bound of 10000 queued frames.
func TestHTTP2ControlFloods(t *testing.T) {
	o := startCountingOrigin(t, 0)
	e := attackEdge(t, o.origin, "max_control_frames_per_second: 200")
	stop := servedMeanwhile(t, e)
	for _, tc := range []struct {
		name string
		read bool
		send func(a *rawH2, fr *http2.Framer, i int) error
	}{
		{"SETTINGS", true, func(_ *rawH2, fr *http2.Framer, i int) error {
			return fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: uint32(65535 + i%2)})
		}},
		{"PING, acks read", true, func(_ *rawH2, fr *http2.Framer, i int) error { return fr.WritePing(false, [8]byte{byte(i)}) }},
		{"PING, acks never read", false, func(_ *rawH2, fr *http2.Framer, i int) error { return fr.WritePing(false, [8]byte{byte(i)}) }},
		{"empty DATA", true, func(a *rawH2, fr *http2.Framer, i int) error {
			if i == 0 {
				return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: a.block("POST", "/data"), EndHeaders: true})
			}
			return fr.WriteData(1, false, nil)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			closed := h2Calmed[calmControl].Get()
			a := dialRawH2(t, e, "h2c")
			sent := make(chan struct{})
			go func() {
				defer close(sent)
				for i := 0; i < 100000; i++ {
					if a.write(func(fr *http2.Framer) error { return tc.send(a, fr, i) }) != nil {
						return
					}
				}
			}()
			if !tc.read {
				// Read nothing until the client is done writing.
				<-sent
			}
			end := a.readToEnd(true)
			assertGoAway(t, end, http2.ErrCodeEnhanceYourCalm)
			// The server answered a burst and stopped: what it queued
			// for a client that reads nothing stays small.
			if end.pingAcks > 400 || end.settingsAcks > 400 {
				t.Errorf("the server acknowledged %d PINGs and %d SETTINGS", end.pingAcks, end.settingsAcks)
			}
			if h2Calmed[calmControl].Get() != closed+1 {
				t.Errorf("edgelb_http2_conns_closed_total{reason=\"control_frames\"} did not count it")
			}
		})
	}
	stop()
	assertAllHealthy(t, e.Server)
}

// TestHTTP2HugeHeaderList: a header list over max_header_list_size gets
// 431 on its stream, from x/net, and the connection goes on; one far over
// it ends the connection (GOAWAY) before it is read whole. Neither
// reaches the backend.
func TestHTTP2HugeHeaderList(t *testing.T) {
	o := startCountingOrigin(t, 0)
	e := attackEdge(t, o.origin, "max_header_list_size: 4096")
	stop := servedMeanwhile(t, e)
	a := dialRawH2(t, e, "tls")
	var fields []string
	for i := 0; i < 8; i++ {
		fields = append(fields, "x-big-"+strconv.Itoa(i), strings.Repeat("b", 1000))
	}
	if err := a.get(1, "/big", fields...); err != nil {
		t.Fatal(err)
	}
	if err := a.get(3, "/small"); err != nil {
		t.Fatal(err)
	}
	end := a.readUntil(true, func(e *h2End) bool {
		s1, s3 := e.streams[1], e.streams[3]
		return s1 != nil && s1.status != 0 && s3 != nil && s3.body != ""
	})
	if s := end.streams[1]; s.status != 431 {
		t.Errorf("a header list over max_header_list_size: %+v, want 431", s)
	}
	if s := end.streams[3]; s.status != 200 || s.body != "ok" || end.goAway != nil {
		t.Errorf("the next request on the connection: %+v (GOAWAY %v)", s, end.goAway)
	}
	// One value larger than the whole list: the decoder stops at it.
	a = dialRawH2(t, e, "tls")
	a.get(1, "/huge", "x-huge", strings.Repeat("h", 12000))
	assertGoAway(t, a.readToEnd(true), http2.ErrCodeCompression, http2.ErrCodeProtocol)
	stop()
	if n := o.attacks.Load(); n != 1 {
		t.Errorf("the backend got %d requests of the attacker, want 1 (/small)", n)
	}
	assertAllHealthy(t, e.Server)
}

// TestHTTP2TooManyStreams: a stream over max_concurrent_streams is refused
// with RST_STREAM and never reaches the backend: REFUSED_STREAM while the
// client has not acknowledged the limit (it may not know it yet), and
// PROTOCOL_ERROR once it has (RFC 9113 section 5.1.2 allows either);
// the streams within the limit are answered and the connection goes on.
func TestHTTP2TooManyStreams(t *testing.T) {
	o := startCountingOrigin(t, 500*time.Millisecond)
	e := attackEdge(t, o.origin, "max_concurrent_streams: 4")
	stop := servedMeanwhile(t, e)
	for _, tc := range []struct {
		ack  bool
		code http2.ErrCode
	}{{false, http2.ErrCodeRefusedStream}, {true, http2.ErrCodeProtocol}} {
		a := dialRawH2(t, e, "tls")
		if tc.ack {
			// The server's SETTINGS, acknowledged before any request.
			a.handshake()
		}
		for i := uint32(0); i < 6; i++ {
			if err := a.get(2*i+1, "/s"+strconv.Itoa(int(i))); err != nil {
				t.Fatal(err)
			}
		}
		end := a.readUntil(tc.ack, func(e *h2End) bool {
			n := 0
			for _, s := range e.streams {
				if s.body != "" || s.wasRST {
					n++
				}
			}
			return n == 6
		})
		for i := uint32(0); i < 6; i++ {
			s := end.streams[2*i+1]
			switch {
			case i < 4 && (s.status != 200 || s.body != "ok"):
				t.Errorf("ack %v: stream %d within the limit: %+v", tc.ack, 2*i+1, s)
			case i >= 4 && (!s.wasRST || s.reset != tc.code):
				t.Errorf("ack %v: stream %d over the limit: %+v, want RST_STREAM %v", tc.ack, 2*i+1, s, tc.code)
			}
		}
		if end.goAway != nil || end.closed {
			t.Errorf("ack %v: the connection ended: GOAWAY %v", tc.ack, end.goAway)
		}
	}
	stop()
	if n := o.attacks.Load(); n != 8 {
		t.Errorf("the backend got %d requests of the attacker, want the 8 within the limit", n)
	}
	assertAllHealthy(t, e.Server)
}

// TestHTTP2MalformedRequests: requests that HTTP/2's framing lets through
// but edgelb refuses over HTTP/1.1 get the same refusal on their stream,
// and those x/net refuses get RST_STREAM; none reaches the backend, and
// the connection goes on.
func TestHTTP2MalformedRequests(t *testing.T) {
	o := startCountingOrigin(t, 0)
	e := attackEdge(t, o.origin, "")
	a := dialRawH2(t, e, "tls")
	a.handshake()
	raw := func(id uint32, fields ...string) {
		var b bytes.Buffer
		enc := hpack.NewEncoder(&b)
		for i := 0; i+1 < len(fields); i += 2 {
			enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
		}
		if err := a.write(func(fr *http2.Framer) error {
			return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: b.Bytes(), EndHeaders: true, EndStream: true})
		}); err != nil {
			t.Fatal(err)
		}
	}
	raw(1, ":method", "CONNECT", ":authority", "shop.example:443")
	raw(3, ":method", "GET", ":scheme", "https", ":authority", "shop.example", ":path", "/a b")
	raw(5, ":method", "get", ":scheme", "https", ":authority", "shop.example", ":path", "/")
	raw(7, ":method", "GET", ":scheme", "https", ":authority", "bad host", ":path", "/")
	raw(9, ":method", "GET", ":scheme", "https", ":authority", "shop.example", ":path", "/", "host", "other.example")
	raw(11, ":method", "GET", ":scheme", "https", ":authority", "shop.example", ":path", "/", "Upper", "1")
	raw(13, ":method", "GET", ":scheme", "https", ":authority", "shop.example", ":path", "/ok")
	end := a.readUntil(true, func(e *h2End) bool {
		n := 0
		for _, s := range e.streams {
			if s.body != "" || s.wasRST {
				n++
			}
		}
		return n == 7
	})
	f := func(id uint32, status int, body string) {
		t.Helper()
		if s := end.streams[id]; s.status != status || s.body != body {
			t.Errorf("stream %d: %+v, want %d %q", id, s, status, body)
		}
	}
	f(1, 405, "edgelb: method not allowed\n")
	f(3, 400, "edgelb: malformed request target\n")
	f(5, 400, "edgelb: malformed request method\n")
	// A :authority that is not host[:port], a host field that differs
	// from it, an upper-case field name: x/net refuses them first.
	for _, id := range []uint32{7, 9, 11} {
		if s := end.streams[id]; !s.wasRST || s.reset != http2.ErrCodeProtocol {
			t.Errorf("stream %d: %+v, want RST_STREAM PROTOCOL_ERROR", id, s)
		}
	}
	f(13, 200, "ok")
	if n := o.attacks.Load(); n != 1 {
		t.Errorf("the backend got %d requests, want 1 (/ok)", n)
	}
	assertAllHealthy(t, e.Server)
}
