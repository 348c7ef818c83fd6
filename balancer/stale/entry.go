package stale

import (
	"bytes"
	"encoding/binary"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/h1"
)

// Values start with a kind byte and a format version; a value of another
// version reads as a miss, so a format change only costs a cold store.
const (
	kindResponse byte = 'R' // a stored response
	kindVary     byte = 'V' // a URL's Vary index: generation and names
	kindBig      byte = 'B' // the response is under the nsBig key, via SetBig
	formatV      byte = 2
)

// Entry flags: directives that forbid serving the response stale.
const (
	flagMustRevalidate  byte = 1 << iota
	flagProxyRevalidate      // s-maxage implies it too (RFC 9111 section 5.2.2.10)
	flagNoCache
	flagStaleIfError // the response sets stale-if-error
)

// Response entry layout, little-endian: kind, version, storedAt unix nano
// (8), Age at store (8), freshness (8), stale-if-error (8, -1 if none),
// flags (1), status (2), Vary names length (2), headers length (4), Vary
// names, headers as (key length (2), value length (2), key, value)*, body.
const entryFixedLen = 2 + 8*4 + 1 + 2 + 2 + 4

// entry is a decoded response entry; its slices point into the value it
// was decoded from.
type entry struct {
	storedAt     int64 // unix nano
	ageAtStore   int64 // seconds
	freshness    int64 // seconds
	staleIfError int64 // seconds, -1 if none
	flags        byte
	status       int
	vary         []byte
	headers      []byte
	body         []byte
}

// appendEntry serializes resp, stored at now, as a response entry.
func appendEntry(dst []byte, now time.Time, resp *fasthttp.Response, ri *respInfo, vary []byte) []byte {
	cc := &ri.cc
	var flags byte
	if cc.mustRevalidate {
		flags |= flagMustRevalidate
	}
	if cc.proxyRevalidate || cc.sMaxAge >= 0 {
		flags |= flagProxyRevalidate
	}
	if cc.noCache {
		flags |= flagNoCache
	}
	if cc.staleIfError >= 0 {
		flags |= flagStaleIfError
	}
	le := binary.LittleEndian
	dst = append(dst, kindResponse, formatV)
	dst = le.AppendUint64(dst, uint64(now.UnixNano()))
	dst = le.AppendUint64(dst, uint64(deltaSeconds(trimOWS(ri.age))))
	dst = le.AppendUint64(dst, uint64(ri.freshness(now)))
	dst = le.AppendUint64(dst, uint64(cc.staleIfError))
	dst = append(dst, flags)
	dst = le.AppendUint16(dst, uint16(resp.StatusCode()))
	dst = le.AppendUint16(dst, uint16(len(vary)))
	lenAt := len(dst)
	dst = append(dst, 0, 0, 0, 0)
	dst = append(dst, vary...)
	hdrAt := len(dst)
	for k, v := range resp.Header.All() {
		if len(k) > 0xffff || len(v) > 0xffff || notStored(k, ri.connection) {
			continue
		}
		dst = le.AppendUint16(dst, uint16(len(k)))
		dst = le.AppendUint16(dst, uint16(len(v)))
		dst = append(dst, k...)
		dst = append(dst, v...)
	}
	le.PutUint32(dst[lenAt:], uint32(len(dst)-hdrAt))
	return append(dst, resp.Body()...)
}

// decodeEntry decodes a response entry, checking every length, so that a
// damaged value is a miss rather than a panic or a half-written response.
func decodeEntry(b []byte) (e entry, ok bool) {
	if len(b) < entryFixedLen || b[0] != kindResponse || b[1] != formatV {
		return e, false
	}
	le := binary.LittleEndian
	e = entry{
		storedAt:     int64(le.Uint64(b[2:])),
		ageAtStore:   int64(le.Uint64(b[10:])),
		freshness:    int64(le.Uint64(b[18:])),
		staleIfError: int64(le.Uint64(b[26:])),
		flags:        b[34],
		status:       int(le.Uint16(b[35:])),
	}
	vl := int(le.Uint16(b[37:]))
	hl := int(le.Uint32(b[39:]))
	b = b[entryFixedLen:]
	if e.status < 100 || e.status > 999 || e.ageAtStore < 0 || e.freshness < 0 || vl+hl > len(b) {
		return e, false
	}
	e.vary, e.headers, e.body = b[:vl], b[vl:vl+hl], b[vl+hl:]
	for h := e.headers; len(h) > 0; {
		if len(h) < 4 {
			return e, false
		}
		n := 4 + int(le.Uint16(h)) + int(le.Uint16(h[2:]))
		if n > len(h) {
			return e, false
		}
		h = h[n:]
	}
	return e, true
}

// nextHeader splits the first header off a validated header block.
func nextHeader(h []byte) (k, v, rest []byte) {
	kl := int(binary.LittleEndian.Uint16(h))
	vl := int(binary.LittleEndian.Uint16(h[2:]))
	h = h[4:]
	return h[:kl], h[kl : kl+vl], h[kl+vl:]
}

// appendVaryIndex serializes a URL's Vary index.
func appendVaryIndex(dst []byte, gen uint64, names []byte) []byte {
	dst = append(dst, kindVary, formatV)
	dst = binary.LittleEndian.AppendUint64(dst, gen)
	return append(dst, names...)
}

func decodeVaryIndex(b []byte) (gen uint64, names []byte, ok bool) {
	if len(b) < 2+8 || b[0] != kindVary || b[1] != formatV {
		return 0, nil, false
	}
	return binary.LittleEndian.Uint64(b[2:]), b[10:], true
}

// bigPointer is the value under a primary key whose response is too big
// for one fastcache chunk.
var bigPointer = []byte{kindBig, formatV}

// notStored reports whether a response header is left out of a stored
// copy: hop-by-hop headers (RFC 9110 section 7.6.1) and those the
// Connection header names, Content-Length (the body sets it), Age and
// Cache-Status (set when served), Set-Cookie (never stored anyway).
func notStored(k, connection []byte) bool {
	if h1.IsHopHeader(k) {
		return true
	}
	switch len(k) {
	case 3:
		return bytes.EqualFold(k, strAge)
	case 10:
		if bytes.EqualFold(k, strSetCookie) {
			return true
		}
	case 12:
		return bytes.EqualFold(k, strCacheStatus)
	case 14:
		if bytes.EqualFold(k, strContentLength) {
			return true
		}
	}
	return len(connection) > 0 && h1.HasToken(connection, k)
}

var strContentLength = []byte(h1.HeaderContentLength)
