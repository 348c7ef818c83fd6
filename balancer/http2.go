package balancer

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/textproto"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"
	"golang.org/x/net/http2"

	"github.com/edgelb/edgelb/balancer/h1"
	"github.com/edgelb/edgelb/internal/panics"
)

// HTTP/2 for clients, on the TLS listener (ALPN "h2") and, with server.h2c,
// on the plain one. Go's HTTP/2 server (golang.org/x/net/http2) does the
// framing, HPACK and flow control; each stream's request becomes the
// HTTP/1.1 request it stands for, parsed by fasthttp's own parser, and the
// root handler serves it, so that it goes through the same vetting,
// routing, forwarding core, retries, hedging, stale store, generated
// errors, forwarding headers and metrics as one that came over HTTP/1.1.
// Backends get HTTP/1.1 on their kept-alive connections. h2Conn
// (http2_conn.go) holds a connection to edgelb's limits on what the client
// sends.

// h2Server serves the HTTP/2 connections of a Server.
type h2Server struct {
	s   *Server
	srv *http2.Server
	// base is the net/http side of srv's config: header list size, a
	// stream body's time, logging, and graceful shutdown (Shutdown sends
	// GOAWAY on every connection).
	base *http.Server
	cfg  HTTP2Config
	// maxBody is server.max_request_body; idle is server.idle_timeout,
	// which bounds a request body's arrival and each stretch of a
	// response's sending.
	maxBody int
	idle    time.Duration
	// maxBlockFrames bounds the frames of one header block.
	maxBlockFrames int
	// calmLog holds back repeats of the log line of a connection closed
	// for going over a limit.
	calmLog repeatLog

	// heads are bufio.Readers big enough for the largest head, which a
	// stream's request is parsed from.
	heads sync.Pool

	mu    sync.Mutex
	conns map[*h2Conn]struct{}
}

// h2HeadSlack is room in a parsed head beyond max_header_list_size: the
// request line's method and version, and each line's ": " and CRLF, which
// HTTP/2 does not count (it counts 32 bytes a field instead).
const h2HeadSlack = 4 << 10

func newH2Server(s *Server, sc *ServerConfig) *h2Server {
	c := sc.HTTP2
	h := &h2Server{
		s:       s,
		cfg:     c,
		maxBody: sc.MaxRequestBody,
		idle:    sc.IdleTimeout,
		// A client splits a header block at the frame size, 16 KiB at
		// least: this leaves room for a block of twice the list size
		// in fragments a quarter of that.
		maxBlockFrames: 8 + 2*c.MaxHeaderListSize/(4<<10),
		conns:          make(map[*h2Conn]struct{}),
	}
	headSize := c.MaxHeaderListSize + h2HeadSlack
	h.heads.New = func() any { return bufio.NewReaderSize(nil, headSize) }
	h.srv = &http2.Server{
		MaxConcurrentStreams:         uint32(c.MaxConcurrentStreams),
		MaxReadFrameSize:             uint32(c.MaxFrameSize),
		MaxUploadBufferPerStream:     int32(c.InitialWindowSize),
		MaxUploadBufferPerConnection: int32(c.ConnectionWindowSize),
		IdleTimeout:                  c.IdleTimeout,
		// A client that stops reading its TCP socket while edgelb has
		// frames for it is dropped, not waited for.
		WriteByteTimeout: sc.IdleTimeout,
		CountError:       countH2Error,
	}
	h.base = &http.Server{
		// x/net adds ten fields' worth of HTTP/2's per-field overhead to
		// this in SETTINGS_MAX_HEADER_LIST_SIZE.
		MaxHeaderBytes: c.MaxHeaderListSize,
		// A stream's body must be in within idle_timeout of its
		// HEADERS, as a body over HTTP/1.1.
		ReadTimeout: sc.IdleTimeout,
		ErrorLog:    slog.NewLogLogger(s.log.With("component", "http2").Handler(), slog.LevelDebug),
	}
	if err := http2.ConfigureServer(h.base, h.srv); err != nil {
		panic("BUG: cannot configure the HTTP/2 server: " + err.Error())
	}
	return h
}

// serveTLS is the fasthttp server's handler of TLS connections that
// negotiated "h2": it serves c until it closes.
func (h *h2Server) serveTLS(c net.Conn) error {
	// fasthttp recovers no panics.
	defer func() {
		if r := recover(); r != nil {
			panics.Balancer.Recovered(h.s.log, r, "panic while serving an HTTP/2 connection")
		}
	}()
	tc, ok := c.(*tlsConn)
	if !ok {
		panic("BUG: a connection of the TLS listener is not a *tlsConn")
	}
	// fasthttp lifted every deadline after the handshake: the preface and
	// the client's first frame are still the head, due within
	// header_timeout of the accept (tlsConn holds a deadline to it).
	tc.SetReadDeadline(time.Time{})
	hc := h.newConn(tc, tc, transportTLS, len(http2.ClientPreface))
	h.serve(&h2TLSConn{h2Conn: hc, tc: tc}, hc, false)
	return nil
}

// serveH2C serves c, whose preface has been read, as HTTP/2 until it
// closes; rest holds what the client sent after the preface.
func (h *h2Server) serveH2C(c net.Conn, rest []byte) {
	defer func() {
		if r := recover(); r != nil {
			panics.Balancer.Recovered(h.s.log, r, "panic while serving an HTTP/2 connection")
		}
	}()
	rc := &replayConn{Conn: c, pre: rest}
	hc := h.newConn(rc, rc, transportH2C, 0)
	h.serve(hc, hc, true)
}

// serve runs x/net's server on conn, the h2Conn hc or its TLS face, until
// the connection closes.
func (h *h2Server) serve(conn net.Conn, hc *h2Conn, sawPreface bool) {
	if !h.track(hc) {
		// Shutting down: no new connection is served.
		hc.Close()
		return
	}
	defer h.untrack(hc)
	h2Conns[hc.transport].Inc()
	h2Open.Add(1)
	defer h2Open.Add(-1)
	h.srv.ServeConn(conn, &http2.ServeConnOpts{
		BaseConfig:       h.base,
		Handler:          hc,
		SawClientPreface: sawPreface,
	})
}

// track adds hc to the open connections, unless the server stops.
func (h *h2Server) track(hc *h2Conn) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.conns == nil {
		return false
	}
	h.conns[hc] = struct{}{}
	return true
}

func (h *h2Server) untrack(hc *h2Conn) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.conns, hc)
}

// open returns how many HTTP/2 connections are open.
func (h *h2Server) open() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.conns)
}

// goAway starts a graceful shutdown of every open connection: GOAWAY, then
// the connection closes once its streams are done. Connections that open
// after it get theirs from the next call.
func (h *h2Server) goAway() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	h.base.Shutdown(ctx)
}

// closeAll closes every open connection and serves no new one: the end of
// a drain whose time ran out.
func (h *h2Server) closeAll() {
	h.mu.Lock()
	conns := h.conns
	h.conns = nil
	h.mu.Unlock()
	for hc := range conns {
		hc.Close()
	}
}

// shutdown stops srv and drains the HTTP/2 connections with it: they get
// GOAWAY, also those that srv accepts while it stops, and finish their
// streams. When ctx ends first, the ones left are closed.
func (h *h2Server) shutdown(ctx context.Context, srv *fasthttp.Server) error {
	done := make(chan error, 1)
	go func() { done <- srv.ShutdownWithContext(ctx) }()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var err error
	srvDone := false
	for {
		h.goAway()
		if srvDone && h.open() == 0 {
			break
		}
		select {
		case err = <-done:
			srvDone = true
		case <-tick.C:
		case <-ctx.Done():
			if !srvDone {
				err = <-done
			}
			h.closeAll()
			if err == nil {
				err = ctx.Err()
			}
			return err
		}
	}
	h.closeAll()
	return err
}

// ServeHTTP serves one stream of hc: its request goes through the root
// handler as the HTTP/1.1 request it stands for, and the answer goes back
// on the stream. x/net runs it on a goroutine of its own, at most
// max_concurrent_streams of them for a connection at once.
func (hc *h2Conn) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := hc.h
	h2Streams[hc.transport].Inc()
	if r.Context().Err() != nil {
		// Reset before it started (rapid reset): no work for it.
		hc.streamReset()
		return
	}
	ctx := acquireH2Ctx()
	defer releaseH2Ctx(ctx)
	defer func() {
		if v := recover(); v != nil {
			panics.Balancer.Recovered(h.s.log, v, "panic while serving an HTTP/2 stream", "uri", r.RequestURI)
			// x/net resets the stream, quietly for this value.
			panic(http.ErrAbortHandler)
		}
	}()
	ctx.Init2(hc.reqConn, fasthttpLogger{h.s.log}, false)
	if !h.serveStream(ctx, r) {
		hc.streamReset()
		return
	}
	if err := h.writeResponse(w, r, &ctx.Response); err != nil || r.Context().Err() != nil {
		hc.streamReset()
	}
}

// serveStream fills ctx.Request from r and serves it as fasthttp's server
// would: a head that cannot be parsed, or that is refused, is answered
// before the body is read; a body over max_request_body gets 413. It
// reports false when the stream went away before it was served.
func (h *h2Server) serveStream(ctx *fasthttp.RequestCtx, r *http.Request) bool {
	s := h.s
	req := &ctx.Request
	if why, err := h.readHead(req, r); why != refuseNone {
		refuse(ctx, why)
		return true
	} else if err != nil {
		// What fasthttp's server answers a head it cannot parse: 431
		// for one too large, else 400.
		s.handleParseError(ctx, err)
		return true
	}
	var hb [h1.MaxHostLen]byte
	if _, _, why := vetRequest(req, hb[:0], nil); why != refuseNone && why != answerOptionsStar {
		refuse(ctx, why)
		return true
	}
	if r.ContentLength > int64(h.maxBody) {
		refuse(ctx, refuseBodyTooLarge)
		return true
	}
	switch err := h.readBody(req, r); {
	case err == nil:
	case errors.Is(err, fasthttp.ErrBodyTooLarge):
		refuse(ctx, refuseBodyTooLarge)
		return true
	case errors.Is(err, os.ErrDeadlineExceeded):
		clientBodyTimeouts.Inc()
		ctx.Error("edgelb: request timeout\n", fasthttp.StatusRequestTimeout)
		return true
	default:
		// Reset, or the connection is gone: nobody to answer.
		return false
	}
	if r.Context().Err() != nil {
		return false
	}
	s.handle(ctx)
	return true
}

// readHead puts into req the request head that r stands for, as fasthttp
// parses it from HTTP/1.1: "METHOD PATH HTTP/1.1", Host from :authority,
// then the header fields, which x/net has checked (lower-case tokens,
// values without CR, LF or NUL, no connection-specific field) and whose
// names it has put in canonical form. Lines come sorted by name: HTTP/2
// leaves their order to a map. A method or path that would not read back
// as the same request line is refused; err is what the parser said of a
// head it could not read.
func (h *h2Server) readHead(req *fasthttp.Request, r *http.Request) (why refusal, err error) {
	if !isToken(r.Method) {
		return refuseMethod, nil
	}
	if !plainTarget(r.RequestURI) {
		return refuseTarget, nil
	}
	bp := h2HeadBufs.Get().(*[]byte)
	defer h2HeadBufs.Put(bp)
	b := append((*bp)[:0], r.Method...)
	b = append(b, ' ')
	b = append(b, r.RequestURI...)
	b = append(b, " HTTP/1.1\r\n"...)
	if r.Host != "" {
		b = append(b, "Host: "...)
		b = append(b, r.Host...)
		b = append(b, strCRLF...)
	}
	keys := make([]string, 0, len(r.Header))
	for k := range r.Header {
		if k != "" && k[0] != ':' && k != "Host" {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	for _, k := range keys {
		for _, v := range r.Header[k] {
			b = append(b, k...)
			b = append(b, ": "...)
			b = append(b, v...)
			b = append(b, strCRLF...)
		}
	}
	b = append(b, strCRLF...)
	*bp = b
	br := h.heads.Get().(*bufio.Reader)
	defer h.heads.Put(br)
	br.Reset(bytes.NewReader(b))
	err = req.Header.Read(br)
	br.Reset(nil)
	return refuseNone, err
}

// h2HeadBufs hold the heads readHead writes.
var h2HeadBufs = sync.Pool{New: func() any { b := make([]byte, 0, 4<<10); return &b }}

// readBody reads r's body into req, at most maxBody bytes.
func (h *h2Server) readBody(req *fasthttp.Request, r *http.Request) error {
	if r.Body == nil || r.Body == http.NoBody {
		return nil
	}
	bp := h2BodyBufs.Get().(*[]byte)
	defer h2BodyBufs.Put(bp)
	buf := *bp
	total := 0
	for {
		n, err := r.Body.Read(buf)
		if n > 0 {
			total += n
			if total > h.maxBody {
				return fasthttp.ErrBodyTooLarge
			}
			req.AppendBody(buf[:n])
		}
		switch {
		case err == io.EOF:
			return nil
		case err != nil:
			return err
		}
	}
}

// h2BodyBufs hold what readBody reads at a time.
var h2BodyBufs = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}

// h2WriteChunk is how much of a response body goes out under one write
// deadline: a client that takes none of it within idle_timeout (holding
// its flow-control window shut) loses the stream, not edgelb the memory.
const h2WriteChunk = 256 << 10

// writeResponse writes resp to w: its status, its headers but the
// hop-by-hop and connection-specific ones HTTP/2 forbids, and its body
// unless r is a HEAD request or the status has none. Date is the server's
// own and a missing Content-Type stays missing, as over HTTP/1.1.
func (h *h2Server) writeResponse(w http.ResponseWriter, r *http.Request, resp *fasthttp.Response) error {
	hdr := w.Header()
	var declared []byte // Content-Length as the response gives it
	for k, v := range resp.Header.All() {
		switch {
		case h1.IsHopHeader(k):
			continue
		case bytes.EqualFold(k, strContentLength):
			declared = v
			continue
		case bytes.EqualFold(k, strDate):
			continue
		}
		key := textproto.CanonicalMIMEHeaderKey(string(k))
		hdr[key] = append(hdr[key], string(v))
	}
	if _, ok := hdr["Content-Type"]; !ok {
		// x/net would sniff one from the body.
		hdr["Content-Type"] = nil
	}
	status := resp.StatusCode()
	head := r.Method == fasthttp.MethodHead
	body := resp.Body()
	switch {
	case status == fasthttp.StatusNoContent:
	case head || status == fasthttp.StatusNotModified:
		// The length of the answer a GET would have got, if known.
		switch {
		case len(declared) > 0:
			hdr["Content-Length"] = []string{string(declared)}
		case len(body) > 0:
			hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
		}
	default:
		hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
	}
	w.WriteHeader(status)
	if head || status == fasthttp.StatusNoContent || status == fasthttp.StatusNotModified {
		return nil
	}
	if h.idle <= 0 {
		_, err := w.Write(body)
		return err
	}
	rc := http.NewResponseController(w)
	for len(body) > 0 {
		n := min(len(body), h2WriteChunk)
		if err := rc.SetWriteDeadline(time.Now().Add(h.idle)); err != nil {
			return err
		}
		if _, err := w.Write(body[:n]); err != nil {
			return err
		}
		body = body[n:]
	}
	return rc.SetWriteDeadline(time.Time{})
}

var strContentLength = []byte(h1.HeaderContentLength)

// h2Ctxs hold the RequestCtx of streams.
var h2Ctxs sync.Pool

func acquireH2Ctx() *fasthttp.RequestCtx {
	if v := h2Ctxs.Get(); v != nil {
		return v.(*fasthttp.RequestCtx)
	}
	return new(fasthttp.RequestCtx)
}

func releaseH2Ctx(ctx *fasthttp.RequestCtx) {
	ctx.Request.Reset()
	ctx.Response.Reset()
	ctx.ResetUserValues()
	h2Ctxs.Put(ctx)
}

// isToken reports whether s is an RFC 9110 token.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !h1.TokenChars[s[i]] {
			return false
		}
	}
	return true
}

// plainTarget reports whether a :path can stand in a request line as it
// is: no space, control byte or DEL, which would end or bend the line.
func plainTarget(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c == 0x7f {
			return false
		}
	}
	return true
}

// Transports of HTTP/2 connections, indexing their metrics.
const (
	transportTLS = iota
	transportH2C
	numTransports
)

var transportNames = [numTransports]string{transportTLS: "tls", transportH2C: "h2c"}

// HTTP/2 metrics.
var (
	h2Conns = func() (c [numTransports]*metrics.Counter) {
		for i, n := range transportNames {
			c[i] = metrics.NewCounter(`edgelb_http2_connections_total{transport="` + n + `"}`)
		}
		return c
	}()
	h2Streams = func() (c [numTransports]*metrics.Counter) {
		for i, n := range transportNames {
			c[i] = metrics.NewCounter(`edgelb_http2_streams_total{transport="` + n + `"}`)
		}
		return c
	}()
	h2StreamsReset = metrics.NewCounter(`edgelb_http2_streams_reset_total`)
	// h2Open counts the HTTP/2 connections open, of every Server.
	h2Open atomic.Int64
	_      = metrics.NewGauge(`edgelb_http2_connections_open`, func() float64 { return float64(h2Open.Load()) })
)

// countH2Error counts a protocol error x/net met, by scope (conn or
// stream) and HTTP/2 error code; errType is "SCOPE_CODE_detail".
// Slow path: errors only.
func countH2Error(errType string) {
	scope, rest, _ := strings.Cut(errType, "_")
	code := "other"
	for c := http2.ErrCodeNo; c <= http2.ErrCodeHTTP11Required; c++ {
		if n := c.String(); len(rest) > len(n) && rest[:len(n)] == n && rest[len(n)] == '_' {
			code = n
			break
		}
	}
	if scope != "conn" && scope != "stream" {
		scope = "other"
	}
	metrics.GetOrCreateCounter(`edgelb_http2_errors_total{scope="` + scope + `",code="` + code + `"}`).Inc()
}
