package h1

import "bytes"

// HopHeaders are the hop-by-hop headers of RFC 9110 section 7.6.1, plus the
// legacy ones net/http/httputil also drops. Connection itself is handled
// apart, with the headers it names.
var HopHeaders = []string{
	"Keep-Alive",
	"Proxy-Connection",
	"Proxy-Authenticate",
	"Proxy-Authorization",
	"Te",
	"Trailer",
	"Transfer-Encoding",
	"Upgrade",
}

var hopHeaderBytes = func() [][]byte {
	b := make([][]byte, len(HopHeaders))
	for i, k := range HopHeaders {
		b[i] = []byte(k)
	}
	return b
}()

// IsHopHeader reports whether name is Connection or one of HopHeaders,
// whatever its case.
func IsHopHeader(name []byte) bool {
	if len(name) == 0 {
		return false
	}
	switch name[0] | 0x20 {
	case 'c', 'k', 'p', 't', 'u':
		if bytes.EqualFold(name, strConnection) {
			return true
		}
		for _, k := range hopHeaderBytes {
			if bytes.EqualFold(name, k) {
				return true
			}
		}
	}
	return false
}

// NamesNoHeader reports whether a Connection value holds only the options
// close and keep-alive, which name no header to remove.
func NamesNoHeader(v []byte) bool {
	for len(v) > 0 {
		var tok []byte
		tok, v, _ = bytes.Cut(v, strComma)
		tok = bytes.TrimSpace(tok)
		if len(tok) > 0 && !bytes.EqualFold(tok, strClose) && !bytes.EqualFold(tok, strKeepAlive) {
			return false
		}
	}
	return true
}

// RemoveConnectionHeaders calls del with each header name that a
// Connection header value names, then with Connection itself. Fast path:
// nothing to do when it is absent or just "close".
func RemoveConnectionHeaders(v []byte, del func([]byte)) {
	if len(v) == 0 || bytes.Equal(v, strClose) {
		return
	}
	// v may be used while deleting: fasthttp moves header entries but not
	// the bytes they own, and Connection itself goes last.
	for len(v) > 0 {
		var tok []byte
		tok, v, _ = bytes.Cut(v, strComma)
		tok = bytes.TrimSpace(tok)
		// Host and the framing headers are never hop-by-hop, whatever
		// Connection says: without them the request means something else.
		if len(tok) > 0 && !bytes.EqualFold(tok, strClose) && !bytes.EqualFold(tok, strKeepAlive) &&
			!bytes.EqualFold(tok, strHost) && !bytes.EqualFold(tok, strContentLength) && !bytes.EqualFold(tok, strContentType) {
			del(tok)
		}
	}
	del(strConnection)
}
