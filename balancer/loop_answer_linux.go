//go:build linux

// The event loop's answers when no backend's answer goes as it came: an
// answer kept from an earlier try, a stored copy, or an error of edgelb's
// own. They are decided as the fasthttp path decides them (core.go) and
// written as the fasthttp server writes them.

package balancer

import (
	"bytes"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/h1"
)

// settle answers c's request, which no try is left for: with the answer
// kept from an earlier try if there is one, else a stored copy or an error
// for c.code.
func (l *loop) settle(c *loopClient) {
	c.state = lcIdle
	if len(c.kept) > 0 {
		l.answerKept(c)
		return
	}
	p := c.pool
	code := p.failureCode(c.code, &c.tried, true, l.nowNs)
	if p.store != nil && p.staleOn[code] && (l.serveStale(c, errCodeValues[code]) || l.handFill(c)) {
		return
	}
	p.m.generated[code].Inc()
	resp := &l.aresp
	resp.Reset()
	writeError(resp, code, false)
	l.settled(c)
	c.rl.source, c.rl.code = srcError, code
	l.writeAnswer(c, resp)
}

// answerKept answers c with the answer kept from an earlier try, or with
// a stored copy that its status gives way to.
func (l *loop) answerKept(c *loopClient) {
	raw, r := c.kept, &l.kresp
	if h1.ParseResponse(raw, c.req.Head, c.rl.idName(), r) != h1.Forward {
		panic("BUG: a kept answer no longer parses")
	}
	if c.pool.staleOnAnswer(r.Status) && (l.serveStale(c, upstreamStatusDetail[r.Status-500]) || l.handFill(c)) {
		return
	}
	body, withLength := raw[r.HeadLen:r.HeadLen+r.BodyLen], false
	if r.Chunked {
		_, n, _ := h1.ScanChunked(raw[r.HeadLen:], len(raw))
		l.body = h1.AppendDechunked(l.body[:0], raw[r.HeadLen:r.HeadLen+n])
		body, withLength = l.body, true
	}
	c.rl.source = srcBackend
	l.answer(c, raw, r, body, withLength, nil)
}

// serveStale answers c with a stored copy of what its request asks for,
// if the store holds a usable one; detail says why, in Cache-Status.
func (l *loop) serveStale(c *loopClient, detail []byte) bool {
	p := c.pool
	req := l.storeRequest(c)
	resp := &l.aresp
	if req == nil || !p.store.Serve(l.now, strHTTP, req, resp, p.stalePolicy, detail) {
		return false
	}
	p.m.staleServed.Inc()
	l.settled(c)
	c.rl.source = srcStale
	l.writeAnswer(c, resp)
	return true
}

// handFill hands c's request, whose tries are over and which the store
// has no copy for, to the fasthttp path when a peer may have one: that
// path asks the peers, which the loop does not wait on (see peerfill.go).
// The attempt carries the answer kept, if any, to send if no peer has a
// copy. It reports false when no peer fill would run.
func (l *loop) handFill(c *loopClient) bool {
	if !l.s.fill.wanted() {
		return false
	}
	l.handOverForFill(c)
	return true
}

// handOverForFill hands c's request over for a peer fill (see handFill).
func (l *loop) handOverForFill(c *loopClient) {
	a := l.attemptOf(c)
	a.settled = true
	if cap(c.kept) > loopKeepBuf {
		c.kept = nil
	}
	c.kept = c.kept[:0]
	c.state = lcIdle
	l.handOffWith(c, a)
}

// storeRequest returns c's request head as the stale store reads
// requests, or nil if fasthttp does not read it (it always does: the loop
// forwards no other).
func (l *loop) storeRequest(c *loopClient) *fasthttp.Request {
	req := &l.sreq
	req.Reset()
	req.Header.DisableNormalizing()
	if err := req.Header.Read(l.reader(c.in[:c.req.HeadLen])); err != nil {
		return nil
	}
	return req
}

// writeAnswer sends c an answer the loop made, with the headers the
// fasthttp server would write: its framing, its Date, and Connection as
// the client's request calls for.
func (l *loop) writeAnswer(c *loopClient, resp *fasthttp.Response) {
	h := &resp.Header
	switch {
	case l.stopping || c.req.Close:
		h.SetConnectionClose()
		c.closing = true
	case c.req.HTTP10:
		h.SetBytesKV(strConnection, strKeepAlive)
	}
	body := resp.Body()
	st := resp.StatusCode()
	send := !resp.SkipBody && !c.req.Head && st >= 200 && st != fasthttp.StatusNoContent && st != fasthttp.StatusNotModified
	if send || len(body) > 0 {
		h.SetContentLength(len(body))
	}
	if !send {
		body = nil
	}
	if ids := c.rl.ids; ids != nil {
		setResponseID(h, ids, c.rl.id.bytes())
	}
	l.logAnswer(c, st, len(body), resp)
	out := h.AppendBytes(l.out[:0])
	l.write(c, out, body, nil)
}

// logAnswer writes the access log line of c's request, answered with
// status and a body of out bytes; resp is the answer when the loop made
// it, nil for a backend's.
func (l *loop) logAnswer(c *loopClient, status, out int, resp *fasthttp.Response) {
	set := l.s.alog.set.Load()
	if set == nil {
		return
	}
	rl := &c.rl
	rl.hedges = uint8(c.hedges)
	e := logEntry{rl: rl, status: status, out: out, service: rl.service, client: c.remote}
	if !set.keep(e.forced()) {
		return
	}
	r := &c.req
	e.end, e.host, e.uri, e.method, e.proto = l.nowNs, r.Host, r.URI, strGET, strHTTP11
	if r.Head {
		e.method = strHEAD
	}
	if r.HTTP10 {
		e.proto = strHTTP10
	}
	if resp != nil && rl.source == srcStale {
		e.cacheStatus = peekFold(&resp.Header, strCacheStatus)
	}
	if !set.json {
		for k, v := range h1.EachHeader(c.in[:r.HeadLen]) {
			switch {
			case len(k) == len(strReferer) && bytes.EqualFold(k, strReferer):
				e.referer = v
			case len(k) == len(strUserAgent) && bytes.EqualFold(k, strUserAgent):
				e.ua = v
			}
		}
	}
	l.s.alog.add(l.s.alog.loopShard(l.idx), set, &e)
}

var (
	strReferer   = []byte(fasthttp.HeaderReferer)
	strUserAgent = []byte(fasthttp.HeaderUserAgent)
)
