package balancer

import (
	"bytes"
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
	strGET            = []byte("GET")
	strHEAD           = []byte("HEAD")
	strHeadXFF        = []byte("X-Forwarded-For: ")
	strHeadXFP        = []byte("\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: ")
	strHeadDate       = []byte("Date: ")
	strHeadContentLen = []byte("Content-Length: ")
)

// laneRequest is a request head the event loop forwards itself.
type laneRequest struct {
	// headLen is the length of the head, blank line included.
	headLen int
	head    bool // HEAD, not GET
	uri     []byte
	path    []byte
	host    []byte
	xff     []byte
	// drop holds the [start, end) ranges of the header lines that do not
	// go upstream: Connection: keep-alive and the X-Forwarded-* ones.
	drop  [4][2]int
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
// GET and HEAD over HTTP/1.1 with no body, a single Host, a plain path
// (one that fasthttp's path normalization leaves as it is), well-formed
// header lines and no hop-by-hop header but Connection: keep-alive.
func parseLaneRequest(buf []byte, r *laneRequest) laneVerdict {
	end := bytes.Index(buf, strCRLFCRLF)
	if end < 0 {
		if len(buf) >= 2 && buf[0] == '\r' {
			return laneHandOff
		}
		return laneIncomplete
	}
	*r = laneRequest{headLen: end + 4}
	line, rest, _ := bytes.Cut(buf[:end+2], strCRLF)
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
	if sp < 0 || !bytes.Equal(line[sp+1:], strHTTP11) {
		return laneHandOff
	}
	r.uri = line[:sp]
	path, ok := plainPath(r.uri)
	if !ok {
		return laneHandOff
	}
	r.path = path
	block := buf[:end+2]
	for off := len(block) - len(rest); off < len(block); {
		name, value, n := nextHeader(block[off:])
		if n == 0 {
			return laneHandOff
		}
		start := off
		off += n
		switch name[0] | 0x20 {
		case 'h':
			if bytes.EqualFold(name, strHost) {
				if r.host != nil || len(value) == 0 {
					return laneHandOff
				}
				r.host = value
			}
		case 'x':
			if len(name) < 15 || !bytes.EqualFold(name[:12], strXForwardedFor[:12]) {
				break
			}
			switch {
			case bytes.EqualFold(name, strXForwardedFor):
				if r.xff != nil {
					return laneHandOff
				}
				r.xff = value
			case bytes.EqualFold(name, strXForwardedProto), bytes.EqualFold(name, strXForwardedHost):
			default:
				continue
			}
			if r.ndrop == len(r.drop) {
				return laneHandOff
			}
			r.drop[r.ndrop] = [2]int{start, off}
			r.ndrop++
		case 'c':
			if bytes.EqualFold(name, strConnection) {
				if !bytes.EqualFold(value, strKeepAlive) || r.ndrop == len(r.drop) {
					return laneHandOff
				}
				r.drop[r.ndrop] = [2]int{start, off}
				r.ndrop++
			} else if bytes.EqualFold(name, strContentLength) {
				return laneHandOff
			}
		case 'e':
			if bytes.EqualFold(name, strExpect) {
				return laneHandOff
			}
		case 'k', 'p', 't', 'u':
			if isHopHeader(name) {
				return laneHandOff
			}
		}
	}
	if r.host == nil {
		return laneHandOff
	}
	return laneForward
}

// plainPath returns the path of an origin-form request target if routing
// it needs no normalization: no percent-encoding, no dot segments, no
// empty segments, no backslash, fragment or control byte.
func plainPath(uri []byte) ([]byte, bool) {
	if len(uri) == 0 || uri[0] != '/' {
		return nil, false
	}
	path := uri
	for i, c := range uri {
		if c <= ' ' || c == 0x7f || c == '#' {
			return nil, false
		}
		if c == '?' && len(path) == len(uri) {
			path = uri[:i]
		}
	}
	for i, c := range path {
		switch c {
		case '%', '\\':
			return nil, false
		case '/':
			if i+1 < len(path) && (path[i+1] == '/' || path[i+1] == '.' && dotSegment(path[i+1:])) {
				return nil, false
			}
		}
	}
	return path, true
}

// dotSegment reports whether the segment at the start of s is "." or "..".
func dotSegment(s []byte) bool {
	if i := bytes.IndexByte(s, '/'); i >= 0 {
		s = s[:i]
	}
	return len(s) == 1 || len(s) == 2 && s[1] == '.'
}

// nextHeader parses the header line at the start of b, which ends in
// CRLF: it returns the name, the value without surrounding whitespace and
// the line's length, CRLF included. n is 0 for a line it refuses: folded
// onto the previous one, with an empty or non-token name, or a value
// holding a control byte other than tab.
func nextHeader(b []byte) (name, value []byte, n int) {
	colon := 0
	for colon < len(b) && b[colon] != ':' {
		if !tokenChars[b[colon]] {
			return nil, nil, 0
		}
		colon++
	}
	if colon == 0 || colon == len(b) {
		return nil, nil, 0
	}
	i := colon + 1
	for i < len(b) && (b[i] >= 0x20 && b[i] != 0x7f || b[i] == '\t') {
		i++
	}
	if i+1 >= len(b) || b[i] != '\r' || b[i+1] != '\n' {
		return nil, nil, 0
	}
	value = b[colon+1 : i]
	for len(value) > 0 && (value[0] == ' ' || value[0] == '\t') {
		value = value[1:]
	}
	for len(value) > 0 && (value[len(value)-1] == ' ' || value[len(value)-1] == '\t') {
		value = value[:len(value)-1]
	}
	return b[:colon], value, i + 2
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
	// keep holds the [start, end) ranges of the head that go to the
	// client: all of it but the hop-by-hop header lines.
	keep  [8][2]int
	nkeep int
}

// parseLaneResponse looks at the response head at the start of buf, the
// answer to a GET (or a HEAD if head). It accepts HTTP/1.1 with a
// final status, a single valid Content-Length (or no body by status or
// method), and hop-by-hop headers it can drop: Connection with only close
// or keep-alive, Keep-Alive, and the other fixed ones. Transfer-Encoding,
// a close-delimited body or anything unclear returns laneHandOff.
func parseLaneResponse(buf []byte, head bool, r *laneResponse) laneVerdict {
	end := bytes.Index(buf, strCRLFCRLF)
	if end < 0 {
		return laneIncomplete
	}
	*r = laneResponse{headLen: end + 4, keepAlive: true}
	line, _, _ := bytes.Cut(buf[:end+2], strCRLF)
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
	block := buf[:end+2]
	for off := len(line) + 2; off < len(block); {
		name, value, n := nextHeader(block[off:])
		if n == 0 {
			return laneHandOff
		}
		start := off
		off += n
		switch name[0] | 0x20 {
		case 'c':
			if bytes.EqualFold(name, strContentLength) {
				n, ok := parseContentLength(value)
				if !ok || cl >= 0 {
					return laneHandOff
				}
				cl = n
				continue
			}
		case 'd':
			if bytes.EqualFold(name, strDate) {
				if !bytes.Equal(name, strDate) {
					return laneHandOff
				}
				r.hasDate = true
			}
			continue
		case 't':
			if bytes.EqualFold(name, strTransferEnc) {
				return laneHandOff
			}
		case 'v':
			if bytes.EqualFold(name, strVary) {
				r.vary = true
			}
			continue
		case 'r':
			if bytes.EqualFold(name, strRetryAfter) {
				r.retryAfter = len(value) > 0
			}
			continue
		}
		if !isHopHeader(name) {
			continue
		}
		if bytes.EqualFold(name, strConnection) {
			if !namesNoHeader(value) {
				return laneHandOff
			}
			if hasToken(value, strClose) {
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
	if cl < 0 && !noBody {
		return laneHandOff
	}
	if !noBody {
		r.bodyLen = cl
	}
	if r.nkeep == len(r.keep) {
		return laneHandOff
	}
	r.keep[r.nkeep] = [2]int{keepFrom, end + 2}
	r.nkeep++
	return laneForward
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
