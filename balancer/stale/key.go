package stale

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/valyala/fasthttp"
)

// Keys start with a namespace byte: a primary key (the URL), and the key
// under which fastcache's SetBig keeps an entry too big for one chunk.
const (
	nsKey byte = 'k'
	nsBig byte = 'b'
)

// maxKeyLen bounds keys; longer URLs (with their Vary values) are not
// stored. fastcache itself refuses keys near 64 KiB.
const maxKeyLen = 8 << 10

// maxVaryNames bounds the normalized Vary names of one response.
const maxVaryNames = 1 << 10

// appendKey appends the primary key of req: method-independent, from the
// scheme, the lower-cased host and the request URI as sent (path and
// query).
func appendKey(dst, scheme []byte, req *fasthttp.Request) []byte {
	return appendKeyParts(dst, scheme, req.Header.Host(), req.Header.RequestURI())
}

func appendKeyParts(dst, scheme, host, uri []byte) []byte {
	dst = append(dst, nsKey)
	if len(scheme) == 0 {
		scheme = strHTTP
	}
	dst = appendLower(dst, scheme)
	dst = append(dst, "://"...)
	dst = appendLower(dst, host)
	if len(uri) > 0 && uri[0] != '/' {
		// absolute-form: keep the path and query only.
		if i := bytes.Index(uri, strSchemeSep); i >= 0 {
			uri = uri[i+len(strSchemeSep):]
			if j := bytes.IndexAny(uri, "/?"); j >= 0 {
				uri = uri[j:]
			} else {
				uri = nil
			}
		}
	}
	if i := bytes.IndexByte(uri, '#'); i >= 0 {
		uri = uri[:i]
	}
	if len(uri) == 0 || uri[0] != '/' {
		dst = append(dst, '/')
	}
	return append(dst, uri...)
}

var (
	strHTTP      = []byte("http")
	strSchemeSep = []byte("://")
)

func appendLower(dst, s []byte) []byte {
	for _, c := range s {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		dst = append(dst, c)
	}
	return dst
}

// ErrPurgeURL is returned by Purge for a URL that is not absolute.
var ErrPurgeURL = errors.New("stale: purge wants an absolute URL such as http://example.com/path?query")

// appendPurgeKey appends the primary key of an absolute URL, as a request
// for it would have it.
func appendPurgeKey(dst []byte, rawURL string) ([]byte, error) {
	scheme, rest, ok := strings.Cut(rawURL, "://")
	if !ok || !isScheme(scheme) {
		return dst, fmt.Errorf("%w: %q", ErrPurgeURL, rawURL)
	}
	authority, uri := rest, ""
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		authority, uri = rest[:i], rest[i:]
	}
	if i := strings.LastIndexByte(authority, '@'); i >= 0 {
		authority = authority[i+1:]
	}
	if authority == "" {
		return dst, fmt.Errorf("%w: %q has no host", ErrPurgeURL, rawURL)
	}
	return appendKeyParts(dst, []byte(scheme), []byte(authority), []byte(uri)), nil
}

// isScheme reports whether s is a URI scheme (RFC 3986 section 3.1).
func isScheme(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i] | 0x20
		switch {
		case 'a' <= c && c <= 'z':
		case i > 0 && (('0' <= s[i] && s[i] <= '9') || s[i] == '+' || s[i] == '-' || s[i] == '.'):
		default:
			return false
		}
	}
	return true
}

// appendVaryNames appends to dst the header names a Vary field line
// lists, lower-cased and comma-separated, and sets *star on "*".
func appendVaryNames(dst, v []byte, star *bool) []byte {
	for len(v) > 0 {
		var name []byte
		name, v, _ = bytes.Cut(v, strComma)
		name = trimOWS(name)
		switch {
		case len(name) == 0:
			continue
		case len(name) == 1 && name[0] == '*':
			*star = true
		}
		if len(dst) > 0 {
			dst = append(dst, ',')
		}
		dst = appendLower(dst, name)
	}
	return dst
}

var strComma = []byte(",")

// variantPrefixLen is the length of what appendVariantKey puts between the
// primary key and the header values: a separator and the generation.
const variantPrefixLen = 2 + 8

// appendVariantKey appends to a primary key the generation of the URL's
// Vary index and the request's values of the headers that names lists;
// headers are the request's, as name, value pairs.
func appendVariantKey(dst []byte, gen uint64, names []byte, headers [][2][]byte) []byte {
	dst = append(dst, 0, 'g')
	dst = binary.BigEndian.AppendUint64(dst, gen)
	for len(names) > 0 {
		var name []byte
		name, names, _ = bytes.Cut(names, strComma)
		dst = append(dst, 0)
		dst = append(dst, name...)
		dst = append(dst, ':')
		n := 0
		for _, h := range headers {
			if !bytes.EqualFold(h[0], name) {
				continue
			}
			if n > 0 {
				dst = append(dst, ',')
			}
			dst = append(dst, trimOWS(h[1])...)
			n++
		}
	}
	return dst
}
