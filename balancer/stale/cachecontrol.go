package stale

import (
	"bytes"
	"time"

	"github.com/valyala/fasthttp"
)

// cacheControl holds the Cache-Control directives the store uses.
type cacheControl struct {
	noStore, noCache, private, public bool
	mustRevalidate, proxyRevalidate   bool
	maxAge, sMaxAge, staleIfError     int64 // seconds, -1 if absent
}

func (cc *cacheControl) reset() {
	*cc = cacheControl{maxAge: -1, sMaxAge: -1, staleIfError: -1}
}

// parse adds the directives of one Cache-Control field line to cc. Unknown
// directives are ignored; of a repeated directive the first one counts
// (RFC 9111 section 4.2.1). Quoted arguments may hold commas. It allocates
// nothing.
func (cc *cacheControl) parse(v []byte) {
	for len(v) > 0 {
		var name, arg []byte
		name, arg, v = nextDirective(v)
		switch len(name) {
		case 6:
			if bytes.EqualFold(name, strPublic) {
				cc.public = true
			}
		case 7:
			if bytes.EqualFold(name, strPrivate) {
				cc.private = true
			} else if bytes.EqualFold(name, strMaxAge) && cc.maxAge < 0 {
				cc.maxAge = deltaSeconds(arg)
			}
		case 8:
			if bytes.EqualFold(name, strNoStore) {
				cc.noStore = true
			} else if bytes.EqualFold(name, strNoCache) {
				cc.noCache = true
			} else if bytes.EqualFold(name, strSMaxAge) && cc.sMaxAge < 0 {
				cc.sMaxAge = deltaSeconds(arg)
			}
		case 14:
			if bytes.EqualFold(name, strStaleIfError) && cc.staleIfError < 0 {
				cc.staleIfError = deltaSeconds(arg)
			}
		case 15:
			if bytes.EqualFold(name, strMustRevalidate) {
				cc.mustRevalidate = true
			}
		case 16:
			if bytes.EqualFold(name, strProxyRevalidate) {
				cc.proxyRevalidate = true
			}
		}
	}
}

var (
	strPublic          = []byte("public")
	strPrivate         = []byte("private")
	strMaxAge          = []byte("max-age")
	strNoStore         = []byte("no-store")
	strNoCache         = []byte("no-cache")
	strSMaxAge         = []byte("s-maxage")
	strStaleIfError    = []byte("stale-if-error")
	strMustRevalidate  = []byte("must-revalidate")
	strProxyRevalidate = []byte("proxy-revalidate")
)

// nextDirective splits the first directive off a Cache-Control value: its
// name, its argument without quotes, and the rest of the value.
func nextDirective(v []byte) (name, arg, rest []byte) {
	v = trimOWS(v)
	i := 0
	for i < len(v) && v[i] != '=' && v[i] != ',' {
		i++
	}
	name = trimOWS(v[:i])
	if i == len(v) || v[i] == ',' {
		return name, nil, skipComma(v[i:])
	}
	v = trimOWS(v[i+1:])
	if len(v) > 0 && v[0] == '"' {
		// quoted-string: skip escaped characters and commas inside.
		j := 1
		for j < len(v) && v[j] != '"' {
			if v[j] == '\\' {
				j++
			}
			j++
		}
		arg = v[1:min(j, len(v))]
		return name, arg, skipComma(v[min(j+1, len(v)):])
	}
	j := bytes.IndexByte(v, ',')
	if j < 0 {
		return name, trimOWS(v), nil
	}
	return name, trimOWS(v[:j]), v[j+1:]
}

func skipComma(v []byte) []byte {
	if i := bytes.IndexByte(v, ','); i >= 0 {
		return v[i+1:]
	}
	return nil
}

// trimOWS trims the optional whitespace of RFC 9110 (spaces and tabs).
func trimOWS(v []byte) []byte {
	for len(v) > 0 && (v[0] == ' ' || v[0] == '\t') {
		v = v[1:]
	}
	for len(v) > 0 && (v[len(v)-1] == ' ' || v[len(v)-1] == '\t') {
		v = v[:len(v)-1]
	}
	return v
}

// maxDeltaSeconds is what RFC 9111 section 1.2.2 asks for values too large
// to represent: 2^31.
const maxDeltaSeconds = 1 << 31

// deltaSeconds parses a delta-seconds value. An invalid value counts as 0
// (already stale), a huge one as 2^31.
func deltaSeconds(b []byte) int64 {
	if len(b) == 0 {
		return 0
	}
	var n int64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0
		}
		n = n*10 + int64(c-'0')
		if n >= maxDeltaSeconds {
			n = maxDeltaSeconds
		}
	}
	return n
}

// respInfo is what one pass over a response's headers finds out for the
// store. Its slices point into the header.
type respInfo struct {
	// cc holds the Cache-Control directives once parseCacheControl ran.
	cc cacheControl
	// cacheControl is the first Cache-Control field line, of
	// numCacheControl.
	cacheControl         []byte
	numCacheControl      int
	expires, date, age   []byte
	connection           []byte
	setCookie, varyStar  bool
	varyTooLong, hasVary bool
}

// scan reads h once, case-insensitively whatever the header's
// normalization, and appends the normalized Vary names to vary. It finds
// Cache-Control but leaves it to parseCacheControl, which most responses,
// stored a moment ago, never need.
func (ri *respInfo) scan(h *fasthttp.ResponseHeader, vary []byte) []byte {
	*ri = respInfo{}
	ri.cc.reset()
	for k, v := range h.All() {
		switch len(k) {
		case 3:
			if bytes.EqualFold(k, strAge) && ri.age == nil {
				ri.age = v
			}
		case 4:
			if bytes.EqualFold(k, strVary) {
				ri.hasVary = true
				vary = appendVaryNames(vary, v, &ri.varyStar)
			} else if bytes.EqualFold(k, strDate) && ri.date == nil {
				ri.date = v
			}
		case 7:
			if bytes.EqualFold(k, strExpires) && ri.expires == nil {
				ri.expires = v
			}
		case 10:
			if bytes.EqualFold(k, strSetCookie) {
				ri.setCookie = true
			} else if bytes.EqualFold(k, strConnection) {
				ri.connection = v
			}
		case 13:
			if bytes.EqualFold(k, strCacheControl) {
				if ri.numCacheControl == 0 {
					ri.cacheControl = v
				}
				ri.numCacheControl++
			}
		}
	}
	ri.varyTooLong = len(vary) > maxVaryNames
	return vary
}

// parseCacheControl parses into ri.cc the Cache-Control field lines that
// scan found in h.
func (ri *respInfo) parseCacheControl(h *fasthttp.ResponseHeader) {
	switch ri.numCacheControl {
	case 0:
	case 1:
		ri.cc.parse(ri.cacheControl)
	default:
		for k, v := range h.All() {
			if len(k) == len(strCacheControl) && bytes.EqualFold(k, strCacheControl) {
				ri.cc.parse(v)
			}
		}
	}
}

var (
	strAge          = []byte(fasthttp.HeaderAge)
	strVary         = []byte(fasthttp.HeaderVary)
	strDate         = []byte(fasthttp.HeaderDate)
	strExpires      = []byte(fasthttp.HeaderExpires)
	strSetCookie    = []byte(fasthttp.HeaderSetCookie)
	strConnection   = []byte(fasthttp.HeaderConnection)
	strCacheControl = []byte(fasthttp.HeaderCacheControl)
	strAuthz        = []byte(fasthttp.HeaderAuthorization)
	strCacheStatus  = []byte("Cache-Status")
)

// reqInfo is what the store needs to know of a request's headers.
type reqInfo struct {
	noStore, authorization bool
}

func (ri *reqInfo) scan(h *fasthttp.RequestHeader) {
	*ri = reqInfo{}
	for k, v := range h.All() {
		if len(k) != 13 {
			continue
		}
		if bytes.EqualFold(k, strAuthz) {
			ri.authorization = true
		} else if bytes.EqualFold(k, strCacheControl) {
			var cc cacheControl
			cc.reset()
			cc.parse(v)
			ri.noStore = ri.noStore || cc.noStore
		}
	}
}

// storable reports whether a shared cache may store the response (RFC 9111
// section 3), the method and status aside.
func storable(resp *respInfo, req *reqInfo) bool {
	cc := &resp.cc
	switch {
	case cc.noStore, cc.private, resp.setCookie, resp.varyStar, resp.varyTooLong, req.noStore:
		return false
	case req.authorization:
		// RFC 9111 section 3.5.
		return cc.public || cc.sMaxAge >= 0 || cc.mustRevalidate
	}
	return true
}

// freshness returns the response's freshness lifetime in seconds for a
// shared cache: s-maxage, max-age, or Expires minus Date. It is 0 without
// any: the store serves only on failures, so no heuristic is needed.
func (ri *respInfo) freshness(now time.Time) int64 {
	switch {
	case ri.cc.sMaxAge >= 0:
		return ri.cc.sMaxAge
	case ri.cc.maxAge >= 0:
		return ri.cc.maxAge
	case ri.expires == nil:
		return 0
	}
	exp, err := fasthttp.ParseHTTPDate(ri.expires)
	if err != nil {
		return 0 // an invalid Expires means already expired
	}
	date := now
	if d, err := fasthttp.ParseHTTPDate(ri.date); err == nil {
		date = d
	}
	return min(max(int64(exp.Sub(date)/time.Second), 0), maxDeltaSeconds)
}
