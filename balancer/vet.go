package balancer

import (
	"bytes"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/h1"
)

// refusal is why edgelb answered a client's request itself without
// forwarding it: the request is malformed, or asks for something an edge
// must not pass on. Each is counted in
// edgelb_requests_refused_total{reason}.
type refusal uint8

const (
	refuseNone refusal = iota
	refuseMethod
	refuseMethodNotAllowed
	refuseVersion
	refuseTarget
	refuseNoHost
	refuseHost
	refuseHeaderName
	refuseFraming
	refuseExpect
	refuseBodyTooLarge
	answerOptionsStar

	numRefusals
)

var refusalNames = [numRefusals]string{
	refuseMethod:           "method",
	refuseMethodNotAllowed: "method_not_allowed",
	refuseVersion:          "version",
	refuseTarget:           "target",
	refuseNoHost:           "no_host",
	refuseHost:             "host",
	refuseHeaderName:       "header_name",
	refuseFraming:          "framing",
	refuseExpect:           "expect",
	refuseBodyTooLarge:     "body_too_large",
	answerOptionsStar:      "options_asterisk",
}

var refusalStatus = [numRefusals]int{
	refuseMethod:           fasthttp.StatusBadRequest,
	refuseMethodNotAllowed: fasthttp.StatusMethodNotAllowed,
	refuseVersion:          fasthttp.StatusHTTPVersionNotSupported,
	refuseTarget:           fasthttp.StatusBadRequest,
	refuseNoHost:           fasthttp.StatusBadRequest,
	refuseHost:             fasthttp.StatusBadRequest,
	refuseHeaderName:       fasthttp.StatusBadRequest,
	refuseFraming:          fasthttp.StatusBadRequest,
	refuseExpect:           fasthttp.StatusExpectationFailed,
	refuseBodyTooLarge:     fasthttp.StatusRequestEntityTooLarge,
	answerOptionsStar:      fasthttp.StatusOK,
}

var refusalBodies = [numRefusals]string{
	refuseMethod:           "edgelb: malformed request method\n",
	refuseMethodNotAllowed: "edgelb: method not allowed\n",
	refuseVersion:          "edgelb: HTTP version not supported\n",
	refuseTarget:           "edgelb: malformed request target\n",
	refuseNoHost:           "edgelb: missing Host header\n",
	refuseHost:             "edgelb: invalid Host header\n",
	refuseHeaderName:       "edgelb: malformed header name\n",
	refuseFraming:          "edgelb: both Content-Length and Transfer-Encoding\n",
	refuseExpect:           "edgelb: unsupported expectation\n",
	refuseBodyTooLarge:     "edgelb: request body too large\n",
}

var refusalsTotal = func() (c [numRefusals]*metrics.Counter) {
	for r := refusal(1); r < numRefusals; r++ {
		c[r] = metrics.NewCounter(`edgelb_requests_refused_total{reason="` + refusalNames[r] + `"}`)
	}
	return c
}()

// Header-scan flags: what vetRequest saw in a request's header lines.
const (
	// sawRewrite: a header that prepareRequest must remove or rewrite
	// (hop-by-hop, Connection, Expect, X-Forwarded-*, Forwarded or a
	// look-alike with '_').
	sawRewrite = 1 << iota
	sawContentLength
	sawTransferEncoding
	sawExpect
	// sawUpgrade: an Upgrade header, which may ask for a tunnel (see
	// upgradeOf).
	sawUpgrade
	// sawRequestID: the request-ID header, which prepareRequest replaces.
	sawRequestID
)

var strAllowAll = []byte("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH")

// vetRequest checks what fasthttp's parser lets through but a proxy must
// not forward, and makes an absolute-form request's authority its Host
// (RFC 9112 section 3.2.2), so that routing, the upstream Host,
// X-Forwarded-Host and the stale store all use one authority. It appends
// the routing key of the Host to dst. flags says what the header scan saw;
// id is the request-ID header's name in lower case, nil when IDs are off.
//
// It allocates nothing for a request it accepts.
func vetRequest(req *fasthttp.Request, dst, id []byte) (key []byte, flags int, r refusal) {
	h := &req.Header
	m := h.Method()
	if len(m) == 0 || len(m) > 32 {
		return dst, 0, refuseMethod
	}
	for _, c := range m {
		if (c < 'A' || c > 'Z') && c != '-' && c != '_' {
			return dst, 0, refuseMethod
		}
	}
	switch string(m) {
	case fasthttp.MethodConnect, fasthttp.MethodTrace:
		return dst, 0, refuseMethodNotAllowed
	}
	if p := h.Protocol(); !bytes.Equal(p, strHTTP11) && !bytes.Equal(p, strHTTP10) {
		return dst, 0, refuseVersion
	}
	raw := h.RawHeaders()
	flags, r = scanHeaderLines(raw, id)
	if r != refuseNone {
		return dst, flags, r
	}
	if len(raw) == 0 {
		// A request built in memory, not parsed: nothing says it is
		// clean.
		flags |= sawRewrite | sawRequestID
	}

	uri := h.RequestURI()
	switch {
	case len(uri) > 0 && uri[0] == '/':
	case len(uri) == 1 && uri[0] == '*':
		if string(m) == fasthttp.MethodOptions {
			return dst, flags, answerOptionsStar
		}
		return dst, flags, refuseTarget
	default:
		auth, rest, ok := h1.AbsoluteForm(uri)
		if !ok {
			return dst, flags, refuseTarget
		}
		key, ok = h1.HostKey(dst, auth)
		if !ok {
			return dst, flags, refuseHost
		}
		// The authority replaces Host, and the target goes upstream in
		// origin form: a backend never sees two hosts.
		h.SetHostBytes(auth)
		if len(rest) == 0 {
			rest = strSlash
		}
		req.SetRequestURIBytes(rest)
		return key, flags, refuseNone
	}
	host := h.Host()
	if len(host) == 0 {
		return dst, flags, refuseNoHost
	}
	key, ok := h1.HostKey(dst, host)
	if !ok {
		return dst, flags, refuseHost
	}
	return key, flags, refuseNone
}

var (
	strSlash       = []byte("/")
	strSchemeHTTP  = []byte("http://")
	strSchemeHTTPS = []byte("https://")
	str100Continue = []byte("100-continue")
	strForwarded   = []byte(h1.HeaderForwarded)
	strContentType = []byte(h1.HeaderContentType)
	// strUpgradeLower is in the lower case that h1.EqualFoldToken wants.
	strUpgradeLower = []byte("upgrade")
)

// scanHeaderLines checks the header lines of a request head as received:
// every name must be a token (RFC 9110 section 5.1), with no space before
// the colon and no line folding, and Content-Length and Transfer-Encoding
// must not both be present (RFC 9112 section 6.1). It reports in flags
// what prepareRequest needs to know; id is the request-ID header's name in
// lower case, or nil.
func scanHeaderLines(raw, id []byte) (flags int, r refusal) {
	for len(raw) > 0 {
		line := raw
		if i := bytes.IndexByte(raw, '\n'); i >= 0 {
			line, raw = raw[:i], raw[i+1:]
		} else {
			raw = nil
		}
		if n := len(line); n > 0 && line[n-1] == '\r' {
			line = line[:n-1]
		}
		if len(line) == 0 {
			continue
		}
		colon := 0
		for colon < len(line) && h1.TokenChars[line[colon]] {
			colon++
		}
		if colon == 0 || colon == len(line) || line[colon] != ':' {
			return flags, refuseHeaderName
		}
		name := line[:colon]
		switch h1.RequestKindOf(name) {
		case h1.KindOther:
			if len(name) == len(id) && h1.EqualFoldToken(name, id) {
				flags |= sawRequestID
			}
		case h1.KindContentLength:
			flags |= sawContentLength
		case h1.KindTransferEncoding:
			flags |= sawTransferEncoding | sawRewrite
		case h1.KindExpect:
			flags |= sawExpect | sawRewrite
			v := bytes.TrimSpace(line[colon+1:])
			if !bytes.EqualFold(v, str100Continue) {
				return flags, refuseExpect
			}
		case h1.KindHop:
			flags |= sawRewrite
			if len(name) == len(strUpgradeLower) && h1.EqualFoldToken(name, strUpgradeLower) {
				flags |= sawUpgrade
			}
		case h1.KindConnection, h1.KindXForwardedFor, h1.KindXForwardedProto, h1.KindXForwardedHost, h1.KindForwarded, h1.KindForwardedLookalike,
			h1.KindForwardedOther:
			flags |= sawRewrite
		}
	}
	if flags&(sawContentLength|sawTransferEncoding) == sawContentLength|sawTransferEncoding {
		return flags, refuseFraming
	}
	return flags, refuseNone
}

// refuse answers a request that vetRequest refused, and closes the
// connection after a malformed one: what follows it cannot be trusted.
func refuse(ctx *fasthttp.RequestCtx, r refusal) {
	refusalsTotal[r].Inc()
	if r == answerOptionsStar {
		ctx.Response.Header.SetBytesKV(strAllow, strAllowAll)
		ctx.SetStatusCode(fasthttp.StatusOK)
		return
	}
	ctx.Error(refusalBodies[r], refusalStatus[r])
	if r == refuseMethodNotAllowed {
		ctx.Response.Header.SetBytesKV(strAllow, strAllowAll)
		return
	}
	ctx.SetConnectionClose()
}

var strAllow = []byte("Allow")

// expectStatus is the fasthttp server's ExpectHandler: it decides before
// "100 Continue" is sent, so that a request that will be refused, or whose
// body is too large, is answered at once and its body never read.
//
// A request refused here is logged here: the handler never sees it.
func (s *Server) expectStatus(ctx *fasthttp.RequestCtx) int {
	var hb [128]byte
	r := refuseNone
	if _, _, why := vetRequest(&ctx.Request, hb[:0], nil); why != refuseNone && why != answerOptionsStar {
		r = why
	} else if n := ctx.Request.Header.ContentLength(); n > s.srv.MaxRequestBodySize {
		r = refuseBodyTooLarge
	}
	if r == refuseNone {
		return fasthttp.StatusContinue
	}
	refusalsTotal[r].Inc()
	// Slow path: the answer is the status alone, which fasthttp writes.
	ctx.SetStatusCode(refusalStatus[r])
	s.answeredEarly(ctx, refusalNames[r], true)
	return refusalStatus[r]
}
