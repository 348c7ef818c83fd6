package balancer

import (
	"bytes"
	"net/netip"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/h1"
	"github.com/edgelb/edgelb/health"
)

// Response headers that edgelb sets.
const (
	// HeaderError names why edgelb answered itself; see errCode.
	HeaderError = "Edgelb-Error"
)

var (
	strXForwardedFor   = []byte(h1.HeaderXForwardedFor)
	strXForwardedProto = []byte(h1.HeaderXForwardedProto)
	strXForwardedHost  = []byte(h1.HeaderXForwardedHost)
	strHTTP            = []byte("http")
	strHTTPS           = []byte("https")
	strClose           = []byte(h1.TokenClose)
	strKeepAlive       = []byte(h1.TokenKeepAlive)
	strConnection      = []byte(h1.HeaderConnection)
	strCommaSpace      = []byte(", ")
	strComma           = []byte(",")
	strColon           = []byte(":")
	strRetryAfter      = []byte(h1.HeaderRetryAfter)
	strDate            = []byte(h1.HeaderDate)
	strRetryAfterValue = []byte("1")
	strHeaderError     = []byte(HeaderError)
	strTextPlain       = []byte("text/plain; charset=utf-8")
	strExpect          = []byte(h1.HeaderExpect)
	strHTTP11          = []byte(h1.HTTP11)
	strHTTP10          = []byte(h1.HTTP10)
	strCRLF            = []byte("\r\n")
	strCRLFCRLF        = []byte("\r\n\r\n")
	strHeadDate        = []byte(h1.HeaderDate + ": ")
	strHeadContentLen  = []byte(h1.HeaderContentLength + ": ")
	strCacheStatus     = []byte("Cache-Status")
	strGET             = []byte(fasthttp.MethodGet)
	strHEAD            = []byte(fasthttp.MethodHead)
)

// serve forwards the request in ctx to a backend of the pool, retrying
// idempotent requests on other backends within one deadline.
// flags are what vetRequest saw in its head; trusted is set when the peer
// is in server.trusted_proxies.
//
// att, when set, holds the tries the event loop made for this request
// before it handed the connection over: serve goes on from them, within
// the same deadline, and does not count them again.
//
// up, when set, is the protocol switch the request asks for: each try
// goes to a backend connection of its own, and a backend's 101 opens a
// tunnel (see upgrade.go).
//
// rl is the request's record: its ID, which goes upstream, and where its
// tries and answer are written down for the access log.
func (p *Pool) serve(ctx *fasthttp.RequestCtx, now time.Time, flags int, trusted bool, att *attempt, up *upgrade, rl *reqLog) {
	p.m.requests.Inc()
	req := &ctx.Request
	clientClose := req.Header.ConnectionClose()
	prepareRequest(ctx, req, flags, trusted, rl)
	rl.service = p.name
	store := p.store
	if up != nil {
		// Slow path: a stored copy never stands in for a protocol switch,
		// nor is an answer to one stored.
		if !p.takeTunnelSlot(up) {
			p.m.tunnelResults[upgradeOverloaded].Inc()
			p.m.generated[errOverloaded].Inc()
			writeError(&ctx.Response, errOverloaded, clientClose)
			rl.source, rl.code = srcError, errOverloaded
			return
		}
		up.prepare(req)
		store = nil
	}

	idempotent := isIdempotent(req.Header.Method())
	deadline := now.Add(p.cfg.Timeout)
	start := now
	var t tried
	hedges := 0
	code := errNoHealthyBackend
	answered := false // ctx.Response holds a backend's answer
	// kept is a retryable answer held while other backends are tried: a
	// backend's answer beats an error edgelb would make up.
	var kept *fasthttp.Response
	first := 0
	if att != nil {
		// Slow path: go on from the event loop's tries.
		start, deadline, t, first = att.start, att.deadline, att.tried, att.tries
		switch {
		case att.conn != nil:
			// The last try's answer is still coming: read first.
			first--
			if att.resp != nil {
				kept = fasthttp.AcquireResponse()
				if att.readResponse(kept) != nil {
					fasthttp.ReleaseResponse(kept)
					kept = nil
				}
			}
		case att.code != errNone:
			code = att.code
		case att.resp != nil && att.readResponse(&ctx.Response) == nil:
			answered = true
			if _, retryable := classifyResponse(&ctx.Response); !retryAnswer(retryable, idempotent, now, deadline) {
				first = p.cfg.Retries + 1
			} else {
				kept = keepAnswer(kept, &ctx.Response)
			}
		}
		if att.settled {
			// The loop made every try there was: answer.
			first = p.cfg.Retries + 1
		}
	}
	// carried is a try the loop began whose answer is still on its
	// backend connection: it is read here, as this path's next try, and
	// counted once, here.
	carried := att != nil && att.conn != nil
	for attempt := first; attempt <= p.cfg.Retries; attempt++ {
		var b *Backend
		var err error
		var lat time.Duration
		if carried {
			carried = false
			b = att.backend
			tryDeadline := att.tryStart.Add(p.cfg.TryTimeout)
			if tryDeadline.After(deadline) {
				tryDeadline = deadline
			}
			err = att.readCarried(&ctx.Response, tryDeadline, p.cfg.MaxResponseBody)
			now = time.Now()
			lat = now.Sub(att.tryStart)
		} else {
			b = p.pick(now.UnixNano(), &t)
			if b == nil {
				if attempt == 0 {
					code = p.noBackendCode(now.UnixNano())
				}
				break
			}
			t.add(b)
			if attempt > 0 {
				p.m.retries.Inc()
			}
			tryDeadline := now.Add(p.cfg.TryTimeout)
			if tryDeadline.After(deadline) {
				tryDeadline = deadline
			}
			b.target.Begin()
			tryStart := now
			switch {
			case up != nil:
				err = up.try(b, req, &ctx.Response, tryDeadline, p.cfg)
			case p.hedge != nil && idempotent:
				b, err, tryStart = p.hedgedTry(b, req, &ctx.Response, &t, &hedges, now, deadline, rl)
			default:
				err = forwardOnce(b.client, req, &ctx.Response, tryDeadline, p.cfg.FirstByteTimeout, p.cfg.MaxResponseBody)
			}
			end := time.Now()
			lat = end.Sub(tryStart)
			now = end
		}

		if err == nil {
			outcome, retryable := classifyResponse(&ctx.Response)
			endTry(rl, b, now.UnixNano(), lat, outcome, ctx.Response.StatusCode(), errNone)
			answered = true
			if !retryAnswer(retryable, idempotent, now, deadline) {
				break
			}
			kept = keepAnswer(kept, &ctx.Response)
			continue
		}

		outcome, c := classifyErr(err)
		endTry(rl, b, now.UnixNano(), lat, outcome, 0, c)
		code, answered = c, false
		if !retryFailure(c, idempotent, isDialErr(err) || err == fasthttp.ErrNoFreeConns, now, deadline) {
			break
		}
	}
	p.m.latency.Update(now.Sub(start))
	rl.hedges += uint8(hedges)
	if kept != nil {
		// Slow path: the last retry failed, so the answer kept from an
		// earlier one goes to the client.
		if !answered {
			kept.CopyTo(&ctx.Response)
			answered = true
		}
		fasthttp.ReleaseResponse(kept)
	}
	if !answered {
		code = p.failureCode(code, &t, idempotent, now.UnixNano())
	}
	if up != nil && up.conn != nil {
		// Slow path: a backend switched protocols.
		rl.source = srcBackend
		p.openTunnel(ctx, up, rl)
		return
	}
	if answered {
		// Fast path: a backend answered.
		sc := ctx.Response.StatusCode()
		if sc >= 500 && sc <= 504 && store != nil && p.staleOnStatus[sc-500] &&
			p.serveStale(ctx, now, clientClose, upstreamStatusDetail[sc-500]) {
			rl.source = srcStale
			return
		}
		rl.source = srcBackend
		prepareResponse(&ctx.Response, clientClose)
		if store != nil {
			store.Save(now, scheme(ctx), req, &ctx.Response)
		}
		if up != nil {
			p.endUpgrade(upgradeDeclined)
		}
		return
	}
	if store != nil && p.staleOn[code] && p.serveStale(ctx, now, clientClose, errCodeValues[code]) {
		rl.source = srcStale
		return
	}
	ctx.Response.Reset()
	p.m.generated[code].Inc()
	writeError(&ctx.Response, code, clientClose)
	rl.source, rl.code = srcError, code
	if up != nil {
		p.endUpgrade(upgradeFailed)
	}
}

// keepAnswer copies resp into kept, acquired if nil, and returns it.
func keepAnswer(kept, resp *fasthttp.Response) *fasthttp.Response {
	if kept == nil {
		kept = fasthttp.AcquireResponse()
	}
	resp.CopyTo(kept)
	return kept
}

// atCapacity reports whether available backends, primaries or backups,
// exist but all are at their max_inflight cap (slow path).
func (p *Pool) atCapacity(now int64) bool {
	return countAvailable(p.set.Load(), now)+countAvailable(p.backup.Load(), now) > 0
}

// serveStale answers from the stale store if it holds a usable copy, or
// else, with peer fill, once a peer gave it one.
func (p *Pool) serveStale(ctx *fasthttp.RequestCtx, now time.Time, clientClose bool, detail []byte) bool {
	if !p.store.Serve(now, scheme(ctx), &ctx.Request, &ctx.Response, p.stalePolicy, detail) {
		// Slow path: ask the fleet.
		if p.fill == nil || !p.fill.fill(scheme(ctx), &ctx.Request) ||
			!p.store.Serve(time.Now(), scheme(ctx), &ctx.Request, &ctx.Response, p.stalePolicy, fromPeer(detail)) {
			return false
		}
	}
	p.m.staleServed.Inc()
	if clientClose {
		ctx.Response.SetConnectionClose()
	}
	return true
}

// upstreamStatusDetail names, in Cache-Status, the backend statuses 500 to
// 504 that made edgelb serve a stored response.
var upstreamStatusDetail = [5][]byte{
	[]byte("upstream_status_500"), []byte("upstream_status_501"), []byte("upstream_status_502"),
	[]byte("upstream_status_503"), []byte("upstream_status_504"),
}

func scheme(ctx *fasthttp.RequestCtx) []byte {
	if ctx.IsTLS() {
		return strHTTPS
	}
	return strHTTP
}

// classifyResponse tells how a backend's answer counts for its health, and
// whether another backend should be tried for an idempotent request.
func classifyResponse(resp *fasthttp.Response) (o health.Outcome, retryable bool) {
	sc := resp.StatusCode()
	return classifyStatus(sc, sc == fasthttp.StatusServiceUnavailable && len(peekFold(&resp.Header, strRetryAfter)) > 0)
}

// classifyStatus is classifyResponse for a status code; retryAfter tells
// whether the response has a Retry-After header.
func classifyStatus(sc int, retryAfter bool) (o health.Outcome, retryable bool) {
	switch {
	case sc < 500 && sc != fasthttp.StatusTooManyRequests:
		return health.OutcomeSuccess, false
	case sc == fasthttp.StatusTooManyRequests, sc == fasthttp.StatusServiceUnavailable && retryAfter:
		return health.OutcomeOverloaded, true
	case sc == fasthttp.StatusBadGateway, sc == fasthttp.StatusServiceUnavailable, sc == fasthttp.StatusGatewayTimeout:
		return health.OutcomeServerError, true
	default:
		return health.OutcomeServerError, false
	}
}

// peekFold returns the value of the first header called name, whatever the
// case of either: header names may be as the backend sent them.
func peekFold(h *fasthttp.ResponseHeader, name []byte) []byte {
	for k, v := range h.All() {
		if bytes.EqualFold(k, name) {
			return v
		}
	}
	return nil
}

// writeError makes resp the answer edgelb generates itself for code.
func writeError(resp *fasthttp.Response, code errCode, clientClose bool) {
	resp.SetStatusCode(code.status())
	resp.Header.SetContentTypeBytes(strTextPlain)
	resp.Header.SetBytesKV(strHeaderError, errCodeValues[code])
	if code == errNoHealthyBackend || code == errOverloaded {
		resp.Header.SetBytesKV(strRetryAfter, strRetryAfterValue)
	}
	resp.SetBodyRaw(code.body())
	if clientClose {
		resp.SetConnectionClose()
	}
}

func isIdempotent(method []byte) bool {
	switch string(method) {
	case fasthttp.MethodGet, fasthttp.MethodHead, fasthttp.MethodOptions, fasthttp.MethodPut,
		fasthttp.MethodDelete, fasthttp.MethodTrace:
		return true
	}
	return false
}

// prepareRequest turns the client's request into the upstream one in
// place: hop-by-hop headers and Expect (edgelb answered it) go first, then
// the forwarding headers are set, so that a client cannot smuggle them away
// through Connection (golang/go#50580), and the request ID of rl.
func prepareRequest(ctx *fasthttp.RequestCtx, req *fasthttp.Request, flags int, trusted bool, rl *reqLog) {
	h := &req.Header
	// Fast path: the head as received names no header to remove, which
	// vetRequest's one scan of it tells.
	if flags&sawRewrite != 0 {
		h1.RemoveConnectionHeaders(h.Peek(fasthttp.HeaderConnection), h.DelBytes)
		for _, k := range h1.HopHeaders {
			h.Del(k)
		}
		h.DelBytes(strExpect)
	}
	h.ResetConnectionClose()
	if !h.IsHTTP11() {
		// Upstream is HTTP/1.1 on a kept-alive connection whatever the
		// client speaks, as from the event loop.
		h.SetProtocolBytes(strHTTP11)
	}
	// A body with no Content-Type goes up without one, not with the
	// client library's default.
	h.SetNoDefaultContentType(true)
	setForwarding(ctx, h, flags, trusted)
	if rl.ids != nil {
		setRequestID(h, rl.ids, rl.id.bytes(), flags&sawRequestID != 0)
	}
	// Keep the client's Host (or the authority of an absolute-form
	// target, which vetRequest made the Host): it goes upstream as sent.
	req.UseHostHeader = true
}

// prepareResponse strips hop-by-hop headers from a backend's response and
// keeps the client's connection open unless the client asked to close it.
// Names compare case-insensitively, so that it works whether or not the
// client normalized the backend's header names.
func prepareResponse(resp *fasthttp.Response, clientClose bool) {
	h := &resp.Header
	// Fast path: one scan finds nothing to remove but, as most backends
	// send, a single Connection header saying keep-alive or close, which
	// then goes alone.
	var conn []byte
	slow := false
	for k, v := range h.All() {
		if !h1.IsHopHeader(k) {
			if isOddDate(k) {
				slow = true
				break
			}
			continue
		}
		if conn == nil && bytes.EqualFold(k, strConnection) && h1.NamesNoHeader(v) {
			conn = k
			continue
		}
		slow = true
		break
	}
	switch {
	case slow:
		removeHopHeaders(h)
	case conn != nil:
		h.DelBytes(conn)
	}
	h.ResetConnectionClose()
	if clientClose {
		h.SetConnectionClose()
	}
}

// maxHeaderDeletes bounds removeHopHeaders' loop, so that a header that
// fasthttp cannot delete never makes it spin.
const maxHeaderDeletes = 64

// removeHopHeaders deletes from a response, whatever the case of their
// names, the hop-by-hop headers, the headers that Connection names, and a
// Date whose name is not in canonical case, which the server would send
// beside its own (slow path). Each header is deleted by the name it has, as
// the header's normalization setting needs; Connection goes last, as its
// value says what else to delete.
func removeHopHeaders(h *fasthttp.ResponseHeader) {
	for range maxHeaderDeletes {
		var del []byte
		for k := range h.All() {
			if !bytes.EqualFold(k, strConnection) && (h1.IsHopHeader(k) || isOddDate(k) || connectionNames(h, k)) {
				del = k
				break
			}
		}
		if del == nil {
			break
		}
		h.DelBytes(del)
	}
	for range maxHeaderDeletes {
		var del []byte
		for k := range h.All() {
			if bytes.EqualFold(k, strConnection) {
				del = k
				break
			}
		}
		if del == nil {
			break
		}
		h.DelBytes(del)
	}
}

// connectionNames reports whether a Connection header of h names the header
// called name.
func connectionNames(h *fasthttp.ResponseHeader, name []byte) bool {
	for k, v := range h.All() {
		if !bytes.EqualFold(k, strConnection) {
			continue
		}
		for len(v) > 0 {
			var tok []byte
			tok, v, _ = bytes.Cut(v, strComma)
			if bytes.EqualFold(bytes.TrimSpace(tok), name) {
				return true
			}
		}
	}
	return false
}

// isOddDate reports whether name is Date in other than canonical case: the
// server skips only a backend's "Date" when it writes its own.
func isOddDate(name []byte) bool {
	return len(name) == len(strDate) && !bytes.Equal(name, strDate) && bytes.EqualFold(name, strDate)
}

// appendRemoteIP appends the client's IP address in text form.
func appendRemoteIP(dst []byte, ctx *fasthttp.RequestCtx) []byte {
	ip, ok := netip.AddrFromSlice(ctx.RemoteIP())
	if !ok {
		return append(dst, "unknown"...)
	}
	return ip.Unmap().AppendTo(dst)
}
