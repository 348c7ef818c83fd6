package balancer

import (
	"bytes"
	"encoding/binary"
	"iter"
)

// The event loop (see loop_linux.go) forwards the common request itself
// and hands everything else to the fasthttp server. These scanners decide
// which is which: they accept only heads whose meaning is unambiguous, and
// anything unusual goes to the full path, which parses and answers it.

var (
	strCRLF           = []byte("\r\n")
	strCRLFCRLF       = []byte("\r\n\r\n")
	strHTTP11         = []byte("HTTP/1.1")
	strHost           = []byte("Host")
	strContentLength  = []byte("Content-Length")
	strTransferEnc    = []byte("Transfer-Encoding")
	strExpect         = []byte("Expect")
	strVary           = []byte("Vary")
	strChunked        = []byte("chunked")
	strGET            = []byte("GET")
	strHEAD           = []byte("HEAD")
	strHeadDate       = []byte("Date: ")
	strHeadContentLen = []byte("Content-Length: ")
)

// laneRequest is a request head the event loop forwards itself.
type laneRequest struct {
	// headLen is the length of the head, blank line included.
	headLen int
	head    bool // HEAD, not GET
	// http10 is set for an HTTP/1.0 request, which goes upstream as
	// HTTP/1.1; close for one whose connection closes once answered:
	// Connection says close, or an HTTP/1.0 one lacks keep-alive.
	http10, close bool
	uri           []byte
	path          []byte
	host          []byte
	// The client's X-Forwarded-For, -Proto, -Host and Forwarded values,
	// which go upstream extended only when the peer is trusted;
	// dupForwarded is set when one of them came twice.
	xff, xfp, xfh, fwd []byte
	dupForwarded       bool
	// otherForwarded is set when another X-Forwarded-* or X-Real-IP
	// came.
	otherForwarded bool
	// drop holds the [start, end) ranges of the header lines that do not
	// go upstream: Connection, X-Forwarded-*, Forwarded and their
	// look-alikes.
	drop  [8][2]int
	ndrop int
}

// laneVerdict says what to do with the bytes read from a client.
type laneVerdict uint8

const (
	laneIncomplete laneVerdict = iota // wait for more bytes
	laneForward                       // the loop forwards it
	laneHandOff                       // the fasthttp server takes the connection
)

// parseLaneRequest looks at the head at the start of buf. It forwards only
// GET and HEAD over HTTP/1.1 or HTTP/1.0 with no body, a single Host, a
// plain path (one that fasthttp's path normalization leaves as it is),
// well-formed header lines and no hop-by-hop header but a Connection that
// lists only close and keep-alive.
func parseLaneRequest(buf []byte, r *laneRequest) laneVerdict {
	if len(buf) > 0 && buf[0] == '\r' {
		return laneHandOff
	}
	eol := bytes.IndexByte(buf, '\n')
	if eol < 0 {
		return laneIncomplete
	}
	if eol == 0 || buf[eol-1] != '\r' {
		return laneHandOff
	}
	*r = laneRequest{}
	line := buf[:eol-1]
	switch {
	case bytes.HasPrefix(line, strGET) && len(line) > 3 && line[3] == ' ':
		line = line[4:]
	case bytes.HasPrefix(line, strHEAD) && len(line) > 4 && line[4] == ' ':
		r.head = true
		line = line[5:]
	default:
		return laneHandOff
	}
	sp := bytes.IndexByte(line, ' ')
	if sp < 0 {
		return laneHandOff
	}
	switch ver := line[sp+1:]; {
	case bytes.Equal(ver, strHTTP11):
	case bytes.Equal(ver, strHTTP10):
		r.http10 = true
	default:
		return laneHandOff
	}
	keepAlive := false
	r.uri = line[:sp]
	path, ok := plainPath(r.uri)
	if !ok {
		return laneHandOff
	}
	r.path = path
	for off := eol + 1; ; {
		name, value, n := nextHeader(buf[off:])
		switch {
		case n < 0:
			return laneIncomplete
		case n == 0:
			return laneHandOff
		}
		start := off
		off += n
		if name == nil {
			r.headLen = off
			break
		}
		switch kind := requestHeaderKind(name); kind {
		case hkOther:
		case hkHost:
			if r.host != nil || len(value) == 0 {
				return laneHandOff
			}
			r.host = value
		case hkForwardedOther:
			// Dropped from an untrusted peer; a trusted one's go to the
			// fasthttp path, which keeps them.
			r.otherForwarded = true
			if r.ndrop == len(r.drop) {
				return laneHandOff
			}
			r.drop[r.ndrop] = [2]int{start, off}
			r.ndrop++
		case hkXForwardedFor, hkXForwardedProto, hkXForwardedHost, hkForwarded, hkForwardedLookalike:
			// None of these goes upstream as the client sent it: the
			// loop writes its own, from a trusted peer extending the
			// values kept here.
			if r.ndrop == len(r.drop) {
				return laneHandOff
			}
			r.drop[r.ndrop] = [2]int{start, off}
			r.ndrop++
			var v *[]byte
			switch kind {
			case hkXForwardedFor:
				v = &r.xff
			case hkXForwardedProto:
				v = &r.xfp
			case hkXForwardedHost:
				v = &r.xfh
			case hkForwarded:
				v = &r.fwd
			default:
				continue
			}
			if *v != nil {
				r.dupForwarded = true
			}
			*v = value
		case hkConnection:
			cl, ka, ok := connectionTokens(value)
			if !ok || r.ndrop == len(r.drop) {
				return laneHandOff
			}
			r.close = r.close || cl
			keepAlive = keepAlive || ka
			r.drop[r.ndrop] = [2]int{start, off}
			r.ndrop++
		case hkDate, hkVary, hkRetryAfter:
		default:
			// Content-Length, Transfer-Encoding, Expect and the other
			// hop-by-hop headers.
			return laneHandOff
		}
	}
	if r.host == nil {
		return laneHandOff
	}
	if r.http10 && !keepAlive {
		r.close = true
	}
	return laneForward
}

// connectionTokens reads a request's Connection value: whether it lists
// close (cl) and keep-alive (ka), whatever their case. ok is false for an
// empty list or one naming anything else, a header the full path removes.
func connectionTokens(v []byte) (cl, ka, ok bool) {
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

// plainPath returns the path of an origin-form request target if routing
// it needs no normalization: no percent-encoding, no dot segments, no
// empty segments, no backslash, fragment or control byte.
func plainPath(uri []byte) ([]byte, bool) {
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

// Classes of request target bytes for plainPath.
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

// headerKind names the headers the event loop looks at.
type headerKind uint8

const (
	hkOther headerKind = iota
	hkHost
	hkConnection
	hkContentLength
	hkTransferEncoding
	hkExpect
	hkDate
	hkVary
	hkRetryAfter
	hkXForwardedFor
	hkXForwardedProto
	hkXForwardedHost
	hkForwarded
	// hkForwardedLookalike is X-Forwarded-For, -Proto or -Host spelt with
	// '_' for a '-': some backends read them as the real ones, so they
	// never go upstream.
	hkForwardedLookalike
	// hkForwardedOther is any other X-Forwarded-* (Port, Prefix, Ssl,
	// Server...) or X-Real-IP: frameworks believe them, so they reach a
	// backend only from a trusted proxy.
	hkForwardedOther
	hkHop // another hop-by-hop header
)

// headerKindOf classifies a header name that nextHeader accepted (a
// token), whatever its case. It compares only the names of the same
// length and first letter: most names match none.
func headerKindOf(name []byte) headerKind {
	if len(name) >= len(headerKindsByLen) {
		return hkOther
	}
	for _, e := range headerKindsByLen[len(name)] {
		if name[0]|0x20 == e.lower[0] && equalFoldToken(name, e.lower) {
			return e.kind
		}
	}
	return hkOther
}

// requestHeaderKind is headerKindOf for a request header, which also tells
// the X-Forwarded-* family apart.
func requestHeaderKind(name []byte) headerKind {
	k := headerKindOf(name)
	if k == hkOther && len(name) > len(strXForwardedPrefix) && name[0]|0x20 == 'x' &&
		(name[1] == '-' || name[1] == '_') && equalFoldToken(name[2:len(strXForwardedPrefix)], strXForwardedPrefix[2:]) {
		return hkForwardedOther
	}
	return k
}

// strXForwardedPrefix starts every X-Forwarded-* name, in lower case.
var strXForwardedPrefix = []byte("x-forwarded")

// equalFoldToken reports whether name equals lower, a name of the same
// length in lower-case letters and '-', whatever name's case. Setting bit
// 0x20 maps a letter to its lower case and no byte of a token but the
// letters themselves onto a letter or '-', so name must be a token.
func equalFoldToken(name, lower []byte) bool {
	const fold = 0x2020202020202020
	for len(lower) >= 8 {
		if binary.LittleEndian.Uint64(name)|fold != binary.LittleEndian.Uint64(lower) {
			return false
		}
		name, lower = name[8:], lower[8:]
	}
	for i, c := range lower {
		if name[i]|0x20 != c {
			return false
		}
	}
	return true
}

type headerKindName struct {
	kind  headerKind
	lower []byte
}

// headerKindsByLen lists the named header kinds by name length.
var headerKindsByLen = func() (t [20][]headerKindName) {
	add := func(k headerKind, name []byte) {
		// equalFoldToken compares names with bit 0x20 set: '_' becomes
		// 0x7f, which no other token byte folds onto.
		lower := bytes.ToLower(name)
		for i, c := range lower {
			if c == '_' {
				lower[i] = '_' | 0x20
				continue
			}
			if (c < 'a' || c > 'z') && c != '-' {
				panic("BUG: header kind names must be letters, '-' and '_' for equalFoldToken: " + string(name))
			}
		}
		for _, e := range t[len(name)] {
			if bytes.Equal(e.lower, lower) {
				return
			}
		}
		t[len(name)] = append(t[len(name)], headerKindName{k, lower})
	}
	for _, e := range []headerKindName{
		{hkHost, strHost}, {hkDate, strDate}, {hkVary, strVary}, {hkExpect, strExpect},
		{hkConnection, strConnection}, {hkRetryAfter, strRetryAfter}, {hkContentLength, strContentLength},
		{hkTransferEncoding, strTransferEnc}, {hkXForwardedFor, strXForwardedFor},
		{hkXForwardedProto, strXForwardedProto}, {hkXForwardedHost, strXForwardedHost},
	} {
		add(e.kind, e.lower)
	}
	add(hkForwarded, strForwarded)
	add(hkForwardedOther, []byte("x-real-ip"))
	for _, suffix := range []string{"for", "proto", "host"} {
		for _, sep := range [][2]byte{{'_', '_'}, {'_', '-'}, {'-', '_'}} {
			add(hkForwardedLookalike, []byte("x"+string(sep[0])+"forwarded"+string(sep[1])+suffix))
		}
	}
	// The other hop-by-hop headers, from the list the fasthttp path uses.
	for _, name := range hopHeaderBytes {
		add(hkHop, name)
	}
	return t
}()

// nextHeader parses the header line at the start of b: it returns the
// name, the value without surrounding whitespace and the line's length,
// CRLF included. The blank line that ends a head has a nil name and n 2.
// n is -1 when b ends before the line does, and 0 for a line it refuses:
// folded onto the previous one, with an empty or non-token name, a bare LF,
// or a value holding a control byte other than tab.
func nextHeader(b []byte) (name, value []byte, n int) {
	if len(b) > 0 && b[0] == '\r' {
		switch {
		case len(b) == 1:
			return nil, nil, -1
		case b[1] == '\n':
			return nil, nil, 2
		}
		return nil, nil, 0
	}
	colon := 0
	for colon < len(b) && tokenChars[b[colon]] {
		colon++
	}
	switch {
	case colon == len(b):
		return nil, nil, -1
	case colon == 0 || b[colon] != ':':
		return nil, nil, 0
	}
	end := colon + 1 + valueLen(b[colon+1:])
	switch {
	case end == len(b):
		return nil, nil, -1
	case b[end] != '\r':
		return nil, nil, 0
	case end+1 == len(b):
		return nil, nil, -1
	case b[end+1] != '\n':
		return nil, nil, 0
	}
	value = b[colon+1 : end]
	for len(value) > 0 && (value[0] == ' ' || value[0] == '\t') {
		value = value[1:]
	}
	for len(value) > 0 && (value[len(value)-1] == ' ' || value[len(value)-1] == '\t') {
		value = value[:len(value)-1]
	}
	return b[:colon], value, end + 2
}

// valueLen returns the length of the field value at the start of v: up
// to the first control byte other than tab, or all of v. It goes eight
// bytes at a time, then byte by byte from the first word that may hold
// such a byte.
func valueLen(v []byte) int {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	i := 0
	for ; i+8 <= len(v); i += 8 {
		w := binary.LittleEndian.Uint64(v[i:])
		del := w ^ 0x7f7f7f7f7f7f7f7f
		if (w-0x20*ones)&^w&highs != 0 || (del-ones)&^del&highs != 0 {
			break
		}
	}
	for i < len(v) && valueChars[v[i]] {
		i++
	}
	return i
}

// eachHeader yields the name and value of each header line of a head
// that parseLaneRequest or parseLaneResponse accepted.
func eachHeader(head []byte) iter.Seq2[[]byte, []byte] {
	return func(yield func(k, v []byte) bool) {
		off := bytes.IndexByte(head, '\n') + 1
		for off > 0 && off < len(head) {
			name, value, n := nextHeader(head[off:])
			if n <= 0 || name == nil || !yield(name, value) {
				return
			}
			off += n
		}
	}
}

// tokenChars holds the bytes that may appear in a header name (RFC 9110
// section 5.6.2).
var tokenChars = func() (t [256]bool) {
	for c := '0'; c <= 'z'; c++ {
		t[c] = c <= '9' || c >= 'A' && c <= 'Z' || c >= 'a'
	}
	for _, c := range "!#$%&'*+-.^_`|~" {
		t[c] = true
	}
	return t
}()

// valueChars holds the bytes that may appear in a field value: all but the
// control bytes, tab excepted.
var valueChars = func() (t [256]bool) {
	for c := range t {
		t[c] = c >= 0x20 && c != 0x7f || c == '\t'
	}
	return t
}()

// laneResponse is a backend's response head the event loop forwards.
type laneResponse struct {
	headLen int // blank line included
	status  int
	// bodyLen is the body's length from Content-Length; 0 when the
	// status or the request method means no body.
	bodyLen    int
	keepAlive  bool // the backend connection may be reused
	hasDate    bool
	vary       bool
	retryAfter bool
	// chunked is a body in chunked transfer coding; bodyLen is then 0
	// and the loop decodes it, to answer with a Content-Length.
	chunked bool
	// keep holds the [start, end) ranges of the head that go to the
	// client: all of it but the hop-by-hop header lines.
	keep  [8][2]int
	nkeep int
}

// hasStatusLinePrefix reports whether b starts as a response status line
// does, "HTTP/d.d ": what does not is no HTTP response to anyone.
func hasStatusLinePrefix(b []byte) bool {
	return len(b) >= 9 && bytes.Equal(b[:5], strHTTP11[:5]) && b[5] >= '0' && b[5] <= '9' && b[6] == '.' &&
		b[7] >= '0' && b[7] <= '9' && b[8] == ' '
}

// parseLaneResponse looks at the response head at the start of buf, the
// answer to a GET (or a HEAD if head). It accepts HTTP/1.1 with a
// final status, a single valid Content-Length or a Transfer-Encoding of
// chunked alone (or no body by status or method), and hop-by-hop headers
// it can drop: Connection with only close or keep-alive, Keep-Alive, and
// the other fixed ones. Other transfer codings, both framings at once, a
// close-delimited body or anything unclear returns laneHandOff.
func parseLaneResponse(buf []byte, head bool, r *laneResponse) laneVerdict {
	eol := bytes.IndexByte(buf, '\n')
	if eol < 0 {
		return laneIncomplete
	}
	if eol == 0 || buf[eol-1] != '\r' {
		return laneHandOff
	}
	*r = laneResponse{keepAlive: true}
	line := buf[:eol-1]
	if len(line) < 12 || !bytes.Equal(line[:8], strHTTP11) || line[8] != ' ' || (len(line) > 12 && line[12] != ' ') {
		return laneHandOff
	}
	for _, c := range line[9:12] {
		if c < '0' || c > '9' {
			return laneHandOff
		}
		r.status = r.status*10 + int(c-'0')
	}
	if r.status < 200 {
		return laneHandOff
	}
	noBody := head || r.status == 204 || r.status == 304
	keepFrom := 0
	cl := -1
	blank := 0
	for off := eol + 1; ; {
		name, value, n := nextHeader(buf[off:])
		switch {
		case n < 0:
			return laneIncomplete
		case n == 0:
			return laneHandOff
		}
		start := off
		off += n
		if name == nil {
			r.headLen, blank = off, start
			break
		}
		switch headerKindOf(name) {
		case hkOther, hkHost, hkXForwardedFor, hkXForwardedProto, hkXForwardedHost, hkExpect:
			continue
		case hkContentLength:
			n, ok := parseContentLength(value)
			if !ok || cl >= 0 {
				return laneHandOff
			}
			cl = n
			continue
		case hkDate:
			if !bytes.Equal(name, strDate) {
				return laneHandOff
			}
			r.hasDate = true
			continue
		case hkVary:
			r.vary = true
			continue
		case hkRetryAfter:
			r.retryAfter = len(value) > 0
			continue
		case hkTransferEncoding:
			if r.chunked || !bytes.EqualFold(value, strChunked) {
				return laneHandOff
			}
			r.chunked = true
		case hkConnection:
			switch {
			case bytes.EqualFold(value, strKeepAlive):
			case !namesNoHeader(value):
				return laneHandOff
			case hasToken(value, strClose):
				r.keepAlive = false
			}
		}
		// Drop the line: keep what came before it.
		if start > keepFrom {
			if r.nkeep == len(r.keep) {
				return laneHandOff
			}
			r.keep[r.nkeep] = [2]int{keepFrom, start}
			r.nkeep++
		}
		keepFrom = off
	}
	switch {
	case noBody:
		r.chunked = false
	case r.chunked:
		if cl >= 0 {
			// Both framings: a request smuggler's favourite.
			return laneHandOff
		}
	case cl < 0:
		return laneHandOff
	default:
		r.bodyLen = cl
	}
	if r.nkeep == len(r.keep) {
		return laneHandOff
	}
	r.keep[r.nkeep] = [2]int{keepFrom, blank}
	r.nkeep++
	return laneForward
}

// scanChunked looks at the chunked body at the start of b: it returns the
// decoded length and the length of b the body takes, trailers and final
// CRLF included. It says laneIncomplete until the body is all there, and
// laneHandOff for a malformed body or one decoding to more than max bytes.
func scanChunked(b []byte, max int) (bodyLen, n int, v laneVerdict) {
	off := 0
	for {
		eol := bytes.IndexByte(b[off:], '\n')
		if eol < 0 {
			if len(b)-off > maxChunkLine {
				return 0, 0, laneHandOff
			}
			return 0, 0, laneIncomplete
		}
		line := b[off : off+eol]
		off += eol + 1
		if len(line) == 0 || line[len(line)-1] != '\r' {
			return 0, 0, laneHandOff
		}
		line = line[:len(line)-1]
		if i := bytes.IndexByte(line, ';'); i >= 0 {
			line = line[:i] // chunk extensions
		}
		size, ok := parseChunkSize(bytes.TrimRight(line, " \t"))
		if !ok || bodyLen+size > max {
			return 0, 0, laneHandOff
		}
		if size == 0 {
			// Trailer lines, dropped, then the blank line.
			for {
				eol := bytes.IndexByte(b[off:], '\n')
				if eol < 0 {
					return 0, 0, laneIncomplete
				}
				if eol == 0 || b[off+eol-1] != '\r' {
					return 0, 0, laneHandOff
				}
				off += eol + 1
				if eol == 1 {
					return bodyLen, off, laneForward
				}
			}
		}
		if len(b)-off < size+2 {
			return 0, 0, laneIncomplete
		}
		if b[off+size] != '\r' || b[off+size+1] != '\n' {
			return 0, 0, laneHandOff
		}
		bodyLen += size
		off += size + 2
	}
}

// appendDechunked appends the data of the chunked body b, which
// scanChunked found complete and well-formed.
func appendDechunked(dst, b []byte) []byte {
	off := 0
	for {
		eol := bytes.IndexByte(b[off:], '\n')
		line := b[off : off+eol-1]
		off += eol + 1
		if i := bytes.IndexByte(line, ';'); i >= 0 {
			line = line[:i]
		}
		size, _ := parseChunkSize(bytes.TrimRight(line, " \t"))
		if size == 0 {
			return dst
		}
		dst = append(dst, b[off:off+size]...)
		off += size + 2
	}
}

// maxChunkLine bounds a chunk-size line, extensions included.
const maxChunkLine = 4096

// parseChunkSize parses a chunk size of at most 8 hex digits.
func parseChunkSize(v []byte) (int, bool) {
	if len(v) == 0 || len(v) > 8 {
		return 0, false
	}
	n := 0
	for _, c := range v {
		switch {
		case c >= '0' && c <= '9':
			n = n<<4 | int(c-'0')
		case c|0x20 >= 'a' && c|0x20 <= 'f':
			n = n<<4 | int(c|0x20-'a'+10)
		default:
			return 0, false
		}
	}
	return n, true
}

// parseContentLength parses a Content-Length value of at most 15 digits.
func parseContentLength(v []byte) (int, bool) {
	if len(v) == 0 || len(v) > 15 {
		return 0, false
	}
	n := 0
	for _, c := range v {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}

// hasToken reports whether the comma-separated list v holds tok, whatever
// its case.
func hasToken(v, tok []byte) bool {
	for len(v) > 0 {
		var t []byte
		t, v, _ = bytes.Cut(v, strComma)
		if bytes.EqualFold(bytes.TrimSpace(t), tok) {
			return true
		}
	}
	return false
}
