package stale

import "bytes"

// cacheControl holds the Cache-Control directives the store uses.
type cacheControl struct {
	noStore, noCache, private, public bool
	mustRevalidate                    bool
	maxAge, sMaxAge, staleIfError     int64 // seconds, -1 if absent
}

// parseCacheControl parses a Cache-Control value. Unknown directives are
// ignored. It allocates nothing.
func parseCacheControl(v []byte) cacheControl {
	cc := cacheControl{maxAge: -1, sMaxAge: -1, staleIfError: -1}
	for len(v) > 0 {
		var d []byte
		d, v, _ = bytes.Cut(v, strComma)
		d = bytes.TrimSpace(d)
		name, arg, _ := bytes.Cut(d, []byte{'='})
		name = bytes.TrimSpace(name)
		arg = bytes.Trim(bytes.TrimSpace(arg), `"`)
		switch {
		case bytes.EqualFold(name, []byte("no-store")):
			cc.noStore = true
		case bytes.EqualFold(name, []byte("no-cache")):
			cc.noCache = true
		case bytes.EqualFold(name, []byte("private")):
			cc.private = true
		case bytes.EqualFold(name, []byte("public")):
			cc.public = true
		case bytes.EqualFold(name, []byte("must-revalidate")), bytes.EqualFold(name, []byte("proxy-revalidate")):
			cc.mustRevalidate = true
		case bytes.EqualFold(name, []byte("max-age")):
			cc.maxAge = seconds(arg)
		case bytes.EqualFold(name, []byte("s-maxage")):
			cc.sMaxAge = seconds(arg)
		case bytes.EqualFold(name, []byte("stale-if-error")):
			cc.staleIfError = seconds(arg)
		}
	}
	return cc
}

// seconds parses a delta-seconds value; invalid values count as 0, as RFC
// 9111 section 1.2.2 asks.
func seconds(b []byte) int64 {
	var n int64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0
		}
		if n > 1<<40 {
			return 1 << 40 // past any useful lifetime
		}
		n = n*10 + int64(c-'0')
	}
	return n
}
