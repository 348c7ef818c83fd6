package h1

import "bytes"

// HostKey checks a Host header value or an absolute-form authority and
// appends its routing key to dst: the host in lower case, without its port
// and without one trailing dot. ok is false for anything that is not a
// valid host[:port] (RFC 9110 section 7.2, RFC 3986 section 3.2.2): empty,
// userinfo, a path, spaces, commas or other delimiters, percent-encoding,
// an empty, non-numeric or out-of-range port, or a malformed IPv6 literal.
// Both engines route with it, so that they agree on every Host.
func HostKey(dst, host []byte) (key []byte, ok bool) {
	if len(host) == 0 || len(host) > MaxHostLen {
		return dst, false
	}
	name, port := host, []byte(nil)
	if host[0] == '[' {
		end := -1
		for i, c := range host {
			if c == ']' {
				end = i
				break
			}
		}
		if end < 3 || !ipv6Literal(host[1:end]) {
			return dst, false
		}
		name, port = host[:end+1], host[end+1:]
		if len(port) > 0 {
			if port[0] != ':' {
				return dst, false
			}
			port = port[1:]
			if !validPort(port) {
				return dst, false
			}
		}
		return appendLowerASCII(dst, name), true
	}
	for i, c := range host {
		if c == ':' {
			name, port = host[:i], host[i+1:]
			if !validPort(port) {
				return dst, false
			}
			break
		}
	}
	if n := len(name); n > 0 && name[n-1] == '.' {
		name = name[:n-1]
	}
	if len(name) == 0 || name[len(name)-1] == '.' || name[0] == '-' {
		return dst, false
	}
	prev := byte('.') // no empty label: no leading dot, no ".."
	for _, c := range name {
		if !hostChars[c] || c == '.' && prev == '.' {
			return dst, false
		}
		prev = c
	}
	return appendLowerASCII(dst, name), true
}

// MaxHostLen bounds a Host value: a DNS name has at most 253 bytes, and
// the key is built in a fixed buffer on the hot path.
const MaxHostLen = 255

// hostChars holds the bytes of a registered name or IPv4 address in a
// Host: letters, digits, '-', '.' and '_'. The other characters RFC 3986
// allows (sub-delims, '~', percent-encoding) are in no real host name, and
// some of them mean something else to backends and caches.
var hostChars = func() (t [256]bool) {
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for c := 'a'; c <= 'z'; c++ {
		t[c], t[c-'a'+'A'] = true, true
	}
	t['-'], t['.'], t['_'] = true, true, true
	return t
}()

// validPort reports whether p is a port number: 1 to 5 digits, at most
// 65535.
func validPort(p []byte) bool {
	if len(p) == 0 || len(p) > 5 {
		return false
	}
	n := 0
	for _, c := range p {
		if c < '0' || c > '9' {
			return false
		}
		n = n*10 + int(c-'0')
	}
	return n <= 65535
}

// ipv6Literal reports whether s, the inside of brackets, looks like an
// IPv6 address: hex digits, colons and dots (an IPv4 tail), at least two
// colons. Zone identifiers are refused, as RFC 9110 does for Host.
func ipv6Literal(s []byte) bool {
	colons := 0
	for _, c := range s {
		switch {
		case c == ':':
			colons++
		case c == '.', '0' <= c && c <= '9', 'a' <= c && c <= 'f', 'A' <= c && c <= 'F':
		default:
			return false
		}
	}
	return colons >= 2
}

func appendLowerASCII(dst, s []byte) []byte {
	for _, c := range s {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		dst = append(dst, c)
	}
	return dst
}

var (
	strSchemeHTTP  = []byte("http://")
	strSchemeHTTPS = []byte("https://")
)

// AbsoluteForm splits an absolute-form request target with the http or
// https scheme into its authority and the rest (path and query). A target
// with userinfo is refused, as RFC 9110 section 4.2.4 asks.
func AbsoluteForm(uri []byte) (auth, rest []byte, ok bool) {
	switch {
	case hasPrefixFold(uri, strSchemeHTTP):
		uri = uri[len(strSchemeHTTP):]
	case hasPrefixFold(uri, strSchemeHTTPS):
		uri = uri[len(strSchemeHTTPS):]
	default:
		return nil, nil, false
	}
	end := len(uri)
	for i, c := range uri {
		if c == '/' || c == '?' || c == '#' {
			end = i
			break
		}
		if c == '@' {
			return nil, nil, false
		}
	}
	if end == 0 {
		return nil, nil, false
	}
	auth, rest = uri[:end], uri[end:]
	if len(rest) > 0 && rest[0] != '/' {
		// A query or fragment right after the authority: rare enough
		// to refuse rather than rebuild.
		return nil, nil, false
	}
	return auth, rest, true
}

func hasPrefixFold(b, prefix []byte) bool {
	return len(b) >= len(prefix) && bytes.EqualFold(b[:len(prefix)], prefix)
}
