package h1

import "bytes"

// Response is what ParseResponse learns of a backend's response head it
// forwards.
type Response struct {
	HeadLen int // blank line included
	Status  int
	// BodyLen is the body's length from Content-Length; 0 when the
	// status or the request method means no body.
	BodyLen    int
	KeepAlive  bool // the backend connection may be reused
	HasDate    bool // a Date header, spelt so
	Vary       bool
	RetryAfter bool // a non-empty Retry-After
	// Chunked is a body in chunked transfer coding; BodyLen is then 0
	// and the loop decodes it, to answer with a Content-Length.
	Chunked bool
	// Keep holds the [start, end) ranges of the head that go to the
	// client: all of it but the hop-by-hop header lines and the
	// request-ID header, which the loop writes itself.
	Keep  [8][2]int
	NKeep int
}

// HasStatusLinePrefix reports whether b starts as a response status line
// does, "HTTP/d.d ": what does not is no HTTP response to anyone.
func HasStatusLinePrefix(b []byte) bool {
	return len(b) >= 9 && bytes.Equal(b[:5], strHTTP11[:5]) && b[5] >= '0' && b[5] <= '9' && b[6] == '.' &&
		b[7] >= '0' && b[7] <= '9' && b[8] == ' '
}

// ParseResponse looks at the response head at the start of buf, the
// answer to a GET (or a HEAD if head). It accepts HTTP/1.1 with a
// final status, a single valid Content-Length or a Transfer-Encoding of
// chunked alone (or no body by status or method), and hop-by-hop headers
// it can drop: Connection with only close or keep-alive, Keep-Alive, and
// the other fixed ones. Other transfer codings, both framings at once, a
// close-delimited body or anything unclear returns HandOff. id, when set,
// is the name of the request-ID header in lower case, whose lines are
// dropped too.
func ParseResponse(buf []byte, head bool, id []byte, r *Response) Verdict {
	eol := bytes.IndexByte(buf, '\n')
	if eol < 0 {
		return Incomplete
	}
	if eol == 0 || buf[eol-1] != '\r' {
		return HandOff
	}
	*r = Response{KeepAlive: true}
	line := buf[:eol-1]
	if len(line) < 12 || !bytes.Equal(line[:8], strHTTP11) || line[8] != ' ' || (len(line) > 12 && line[12] != ' ') {
		return HandOff
	}
	for _, c := range line[9:12] {
		if c < '0' || c > '9' {
			return HandOff
		}
		r.Status = r.Status*10 + int(c-'0')
	}
	if r.Status < 200 {
		return HandOff
	}
	noBody := head || r.Status == 204 || r.Status == 304
	keepFrom := 0
	cl := -1
	blank := 0
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
			r.HeadLen, blank = off, start
			break
		}
		switch KindOf(name) {
		case KindOther:
			if len(name) != len(id) || !EqualFoldToken(name, id) {
				continue
			}
		case KindHost, KindXForwardedFor, KindXForwardedProto, KindXForwardedHost, KindExpect:
			continue
		case KindContentLength:
			n, ok := parseContentLength(value)
			if !ok || cl >= 0 {
				return HandOff
			}
			cl = n
			continue
		case KindDate:
			if !bytes.Equal(name, strDate) {
				return HandOff
			}
			r.HasDate = true
			continue
		case KindVary:
			r.Vary = true
			continue
		case KindRetryAfter:
			r.RetryAfter = len(value) > 0
			continue
		case KindTransferEncoding:
			if r.Chunked || !bytes.EqualFold(value, strChunked) {
				return HandOff
			}
			r.Chunked = true
		case KindConnection:
			switch {
			case bytes.EqualFold(value, strKeepAlive):
			case !NamesNoHeader(value):
				return HandOff
			case HasToken(value, strClose):
				r.KeepAlive = false
			}
		}
		// Drop the line: keep what came before it.
		if start > keepFrom {
			if r.NKeep == len(r.Keep) {
				return HandOff
			}
			r.Keep[r.NKeep] = [2]int{keepFrom, start}
			r.NKeep++
		}
		keepFrom = off
	}
	switch {
	case noBody:
		r.Chunked = false
	case r.Chunked:
		if cl >= 0 {
			// Both framings: a request smuggler's favourite.
			return HandOff
		}
	case cl < 0:
		return HandOff
	default:
		r.BodyLen = cl
	}
	if r.NKeep == len(r.Keep) {
		return HandOff
	}
	r.Keep[r.NKeep] = [2]int{keepFrom, blank}
	r.NKeep++
	return Forward
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
