package h1

import "bytes"

// Request is what ParseRequest learns of a request head it forwards. Its
// slices point into the bytes parsed.
type Request struct {
	// HeadLen is the length of the head, blank line included.
	HeadLen int
	Head    bool // HEAD, not GET
	// HTTP10 is set for an HTTP/1.0 request, which goes upstream as
	// HTTP/1.1; Close for one whose connection closes once answered:
	// Connection says close, or an HTTP/1.0 one lacks keep-alive.
	HTTP10, Close bool
	URI           []byte // the request target
	Path          []byte // URI without its query
	Host          []byte
	// The client's X-Forwarded-For, -Proto, -Host and Forwarded values,
	// which go upstream extended only when the peer is trusted;
	// DupForwarded is set when one of them came twice.
	XFF, XFP, XFH, Fwd []byte
	DupForwarded       bool
	// OtherForwarded is set when another X-Forwarded-* or X-Real-IP
	// came.
	OtherForwarded bool
	// ID is the value of the request-ID header named by ParseRequest's
	// id, nil when absent; DupID is set when it came more than once.
	ID    []byte
	DupID bool
	// Drop holds the [start, end) ranges of the header lines that do not
	// go upstream: Connection, X-Forwarded-*, Forwarded, their
	// look-alikes, and the request-ID header, which the loop writes
	// itself.
	Drop  [8][2]int
	NDrop int
}

// ParseRequest looks at the head at the start of buf. It forwards only
// GET and HEAD over HTTP/1.1 or HTTP/1.0 with no body, a single Host, a
// plain path (one that fasthttp's path normalization leaves as it is),
// well-formed header lines and no hop-by-hop header but a Connection that
// lists only close and keep-alive.
//
// id, when set, is the name of the request-ID header in lower case
// (letters, digits and '-'): its lines are dropped and the value of the
// first is kept in r.ID.
func ParseRequest(buf []byte, id []byte, r *Request) Verdict {
	if len(buf) > 0 && buf[0] == '\r' {
		return HandOff
	}
	eol := bytes.IndexByte(buf, '\n')
	if eol < 0 {
		return Incomplete
	}
	if eol == 0 || buf[eol-1] != '\r' {
		return HandOff
	}
	*r = Request{}
	line := buf[:eol-1]
	switch {
	case bytes.HasPrefix(line, strGET) && len(line) > 3 && line[3] == ' ':
		line = line[4:]
	case bytes.HasPrefix(line, strHEAD) && len(line) > 4 && line[4] == ' ':
		r.Head = true
		line = line[5:]
	default:
		return HandOff
	}
	sp := bytes.IndexByte(line, ' ')
	if sp < 0 {
		return HandOff
	}
	switch ver := line[sp+1:]; {
	case bytes.Equal(ver, strHTTP11):
	case bytes.Equal(ver, strHTTP10):
		r.HTTP10 = true
	default:
		return HandOff
	}
	keepAlive := false
	var singles uint8 // the KindSingle headers seen
	r.URI = line[:sp]
	path, ok := PlainPath(r.URI)
	if !ok {
		return HandOff
	}
	r.Path = path
	for off := eol + 1; ; {
		name, value, n := NextHeader(buf[off:])
		switch {
		case n < 0:
			return Incomplete
		case n == 0:
			return HandOff
		}
		start := off
		off += n
		if name == nil {
			r.HeadLen = off
			break
		}
		kind := RequestKindOf(name)
		if kind == KindOther && len(name) == len(id) && EqualFoldToken(name, id) {
			if r.NDrop == len(r.Drop) {
				return HandOff
			}
			r.Drop[r.NDrop] = [2]int{start, off}
			r.NDrop++
			r.DupID = r.ID != nil
			if !r.DupID {
				r.ID = value
			}
			continue
		}
		switch kind {
		case KindOther, KindHost, KindDate, KindVary, KindRetryAfter, KindSingle:
			if n != len(name)+len(value)+4 || buf[start+len(name)+1] != ' ' {
				// A line forwarded as it came, but not "Name: value":
				// the fasthttp path would drop the white space around
				// the value.
				return HandOff
			}
		}
		switch kind {
		case KindOther:
		case KindSingle:
			// User-Agent and Content-Type, told apart by length.
			bit := uint8(1)
			if len(name) != len("user-agent") {
				bit = 2
			}
			if singles&bit != 0 {
				return HandOff
			}
			singles |= bit
		case KindHost:
			if r.Host != nil || len(value) == 0 {
				return HandOff
			}
			r.Host = value
		case KindForwardedOther:
			// Dropped from an untrusted peer; a trusted one's go to the
			// fasthttp path, which keeps them.
			r.OtherForwarded = true
			if r.NDrop == len(r.Drop) {
				return HandOff
			}
			r.Drop[r.NDrop] = [2]int{start, off}
			r.NDrop++
		case KindXForwardedFor, KindXForwardedProto, KindXForwardedHost, KindForwarded, KindForwardedLookalike:
			// None of these goes upstream as the client sent it: the
			// loop writes its own, from a trusted peer extending the
			// values kept here.
			if r.NDrop == len(r.Drop) {
				return HandOff
			}
			r.Drop[r.NDrop] = [2]int{start, off}
			r.NDrop++
			var v *[]byte
			switch kind {
			case KindXForwardedFor:
				v = &r.XFF
			case KindXForwardedProto:
				v = &r.XFP
			case KindXForwardedHost:
				v = &r.XFH
			case KindForwarded:
				v = &r.Fwd
			default:
				continue
			}
			if *v != nil {
				r.DupForwarded = true
			}
			*v = value
		case KindConnection:
			cl, ka, ok := ConnectionTokens(value)
			if !ok || r.NDrop == len(r.Drop) {
				return HandOff
			}
			r.Close = r.Close || cl
			keepAlive = keepAlive || ka
			r.Drop[r.NDrop] = [2]int{start, off}
			r.NDrop++
		case KindDate, KindVary, KindRetryAfter:
		default:
			// Content-Length, Transfer-Encoding, Expect and the other
			// hop-by-hop headers.
			return HandOff
		}
	}
	if r.Host == nil {
		return HandOff
	}
	if r.HTTP10 && !keepAlive {
		r.Close = true
	}
	return Forward
}

// ConnectionTokens reads a request's Connection value: whether it lists
// close (cl) and keep-alive (ka), whatever their case. ok is false for an
// empty list or one naming anything else, a header the full path removes.
func ConnectionTokens(v []byte) (cl, ka, ok bool) {
	switch {
	case bytes.EqualFold(v, strKeepAlive):
		return false, true, true
	case bytes.EqualFold(v, strClose):
		return true, false, true
	}
	for len(v) > 0 {
		var tok []byte
		tok, v, _ = bytes.Cut(v, strComma)
		tok = bytes.Trim(tok, " \t")
		switch {
		case len(tok) == 0:
		case bytes.EqualFold(tok, strClose):
			cl = true
		case bytes.EqualFold(tok, strKeepAlive):
			ka = true
		default:
			return false, false, false
		}
	}
	return cl, ka, cl || ka
}

// PlainPath returns the path of an origin-form request target if routing
// it needs no normalization: no percent-encoding, no dot segments, no
// empty segments, no backslash, fragment or control byte.
func PlainPath(uri []byte) ([]byte, bool) {
	if len(uri) == 0 || uri[0] != '/' {
		return nil, false
	}
	q := len(uri) // where the query starts
	for i := 0; i < len(uri); i++ {
		switch targetBytes[uri[i]] {
		case tbPlain:
		case tbSlash:
			if i < q && i+1 < len(uri) && (uri[i+1] == '/' || uri[i+1] == '.' && dotSegment(uri[i+1:])) {
				return nil, false
			}
		case tbQuestion:
			q = min(q, i)
		case tbPathOnly:
			if i < q {
				return nil, false
			}
		default:
			return nil, false
		}
	}
	return uri[:q], true
}

// Classes of request target bytes for PlainPath.
const (
	tbPlain    = iota
	tbSlash    // '/'
	tbQuestion // '?': the query starts at the first
	tbPathOnly // '%' and backslash: refused in the path, not in the query
	tbNever    // control bytes, space, DEL and '#'
)

var targetBytes = func() (t [256]uint8) {
	for c := range 0x21 {
		t[c] = tbNever
	}
	t[0x7f], t['#'] = tbNever, tbNever
	t['/'], t['?'] = tbSlash, tbQuestion
	t['%'], t['\\'] = tbPathOnly, tbPathOnly
	return t
}()

// dotSegment reports whether the segment at the start of s, which ends at
// a '/', a '?' or the end of s, is "." or "..".
func dotSegment(s []byte) bool {
	return len(s) == 1 || s[1] == '/' || s[1] == '?' ||
		s[1] == '.' && (len(s) == 2 || s[2] == '/' || s[2] == '?')
}
