package h1

import (
	"bytes"
	"encoding/binary"
	"iter"
)

// HeaderKind names the headers the event loop looks at.
type HeaderKind uint8

const (
	KindOther HeaderKind = iota
	KindHost
	KindConnection
	KindContentLength
	KindTransferEncoding
	KindExpect
	KindDate
	KindVary
	KindRetryAfter
	KindXForwardedFor
	KindXForwardedProto
	KindXForwardedHost
	KindForwarded
	// KindForwardedLookalike is X-Forwarded-For, -Proto or -Host spelt with
	// '_' for a '-': some backends read them as the real ones, so they
	// never go upstream.
	KindForwardedLookalike
	// KindForwardedOther is any other X-Forwarded-* (Port, Prefix, Ssl,
	// Server...) or X-Real-IP: frameworks believe them, so they reach a
	// backend only from a trusted proxy.
	KindForwardedOther
	KindHop // another hop-by-hop header
	// KindSingle is a header that fasthttp keeps one of (User-Agent,
	// Content-Type): a request that repeats it goes to the fasthttp path,
	// which forwards the last, as the loop would forward every line.
	KindSingle
)

// KindOf classifies a header name that NextHeader accepted (a
// token), whatever its case. It compares only the names of the same
// length and first letter: most names match none.
func KindOf(name []byte) HeaderKind {
	if len(name) >= len(headerKindsByLen) {
		return KindOther
	}
	for _, e := range headerKindsByLen[len(name)] {
		if name[0]|0x20 == e.lower[0] && EqualFoldToken(name, e.lower) {
			return e.kind
		}
	}
	return KindOther
}

// Lower-case names RequestKindOf compares with EqualFoldToken.
var (
	lowerUserAgent   = []byte("user-agent")
	lowerContentType = []byte("content-type")
)

// RequestKindOf is KindOf for a request header, which also tells
// the X-Forwarded-* family and the headers fasthttp keeps one of apart.
func RequestKindOf(name []byte) HeaderKind {
	k := KindOf(name)
	if k == KindOther && (len(name) == len(lowerUserAgent) && EqualFoldToken(name, lowerUserAgent) ||
		len(name) == len(lowerContentType) && EqualFoldToken(name, lowerContentType)) {
		return KindSingle
	}
	if k == KindOther && len(name) > len(strXForwardedPrefix) && name[0]|0x20 == 'x' &&
		(name[1] == '-' || name[1] == '_') && EqualFoldToken(name[2:len(strXForwardedPrefix)], strXForwardedPrefix[2:]) {
		return KindForwardedOther
	}
	return k
}

// strXForwardedPrefix starts every X-Forwarded-* name, in lower case.
var strXForwardedPrefix = []byte("x-forwarded")

// EqualFoldToken reports whether name equals lower, a name of the same
// length in lower-case letters and '-', whatever name's case. Setting bit
// 0x20 maps a letter to its lower case and no byte of a token but the
// letters themselves onto a letter or '-', so name must be a token.
func EqualFoldToken(name, lower []byte) bool {
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
	kind  HeaderKind
	lower []byte
}

// headerKindsByLen lists the named header kinds by name length.
var headerKindsByLen = func() (t [20][]headerKindName) {
	add := func(k HeaderKind, name []byte) {
		// EqualFoldToken compares names with bit 0x20 set: '_' becomes
		// 0x7f, which no other token byte folds onto.
		lower := bytes.ToLower(name)
		for i, c := range lower {
			if c == '_' {
				lower[i] = '_' | 0x20
				continue
			}
			if (c < 'a' || c > 'z') && c != '-' {
				panic("BUG: header kind names must be letters, '-' and '_' for EqualFoldToken: " + string(name))
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
		{KindHost, strHost}, {KindDate, strDate}, {KindVary, strVary}, {KindExpect, strExpect},
		{KindConnection, strConnection}, {KindRetryAfter, strRetryAfter}, {KindContentLength, strContentLength},
		{KindTransferEncoding, strTransferEnc}, {KindXForwardedFor, strXForwardedFor},
		{KindXForwardedProto, strXForwardedProto}, {KindXForwardedHost, strXForwardedHost},
	} {
		add(e.kind, e.lower)
	}
	add(KindForwarded, strForwarded)
	add(KindForwardedOther, []byte("x-real-ip"))
	for _, suffix := range []string{"for", "proto", "host"} {
		for _, sep := range [][2]byte{{'_', '_'}, {'_', '-'}, {'-', '_'}} {
			add(KindForwardedLookalike, []byte("x"+string(sep[0])+"forwarded"+string(sep[1])+suffix))
		}
	}
	// The other hop-by-hop headers, from the list the fasthttp path uses.
	for _, name := range hopHeaderBytes {
		add(KindHop, name)
	}
	return t
}()

// NextHeader parses the header line at the start of b: it returns the
// name, the value without surrounding whitespace and the line's length,
// CRLF included. The blank line that ends a head has a nil name and n 2.
// n is -1 when b ends before the line does, and 0 for a line it refuses:
// folded onto the previous one, with an empty or non-token name, a bare LF,
// or a value holding a control byte other than tab.
func NextHeader(b []byte) (name, value []byte, n int) {
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
	for colon < len(b) && TokenChars[b[colon]] {
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

// EachHeader yields the name and value of each header line of a head
// that ParseRequest or ParseResponse accepted.
func EachHeader(head []byte) iter.Seq2[[]byte, []byte] {
	return func(yield func(k, v []byte) bool) {
		off := bytes.IndexByte(head, '\n') + 1
		for off > 0 && off < len(head) {
			name, value, n := NextHeader(head[off:])
			if n <= 0 || name == nil || !yield(name, value) {
				return
			}
			off += n
		}
	}
}

// TokenChars holds the bytes that may appear in a header name (RFC 9110
// section 5.6.2).
var TokenChars = func() (t [256]bool) {
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
