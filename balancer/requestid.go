package balancer

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sync/atomic"

	"github.com/valyala/fasthttp"
	"gopkg.in/yaml.v3"

	"github.com/edgelb/edgelb/balancer/h1"
)

// Request IDs: every request edgelb serves has one, in a header both ways.
// A trusted peer's (server.trusted_proxies) is kept when well-formed; any
// other is replaced by one edgelb makes: a random prefix drawn once per
// generator (each event loop, the fasthttp path) and a counter, so that
// IDs are unique across generators, restarts and instances without any
// coordination. The backend gets the ID, the client gets it back, and the
// access log and every log line about the request carry it.

// RequestIDConfig is request_id.
type RequestIDConfig struct {
	// Enabled gives every request an ID. On if not set; the access log
	// needs it.
	Enabled *bool `yaml:"enabled"`
	// Header names the header that carries the ID both ways.
	// DefaultRequestIDHeader is used if not set.
	Header string `yaml:"header"`
}

// DefaultRequestIDHeader is the request-ID header if request_id.header is
// not set.
const DefaultRequestIDHeader = "X-Request-Id"

// Request ID bounds.
const (
	// maxRequestIDLen is the longest ID a trusted peer's may be; a longer
	// one is replaced.
	maxRequestIDLen = 128
	// maxRequestIDHeaderLen bounds request_id.header.
	maxRequestIDHeaderLen = 64
	// requestIDLen is the length of the IDs edgelb makes: 16 hex digits
	// of prefix, 16 of counter.
	requestIDLen = 32
)

// UnmarshalYAML accepts a bool, short for {enabled: BOOL}, as well as the
// mapping.
func (r *RequestIDConfig) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		var on bool
		if err := n.Decode(&on); err != nil {
			return err
		}
		*r = RequestIDConfig{Enabled: &on}
		return nil
	}
	type plain RequestIDConfig
	return n.Decode((*plain)(r))
}

// enabled reports whether requests get IDs.
func (r *RequestIDConfig) enabled() bool { return r.Enabled == nil || *r.Enabled }

func (r *RequestIDConfig) applyDefaults() {
	setDefault(&r.Header, DefaultRequestIDHeader)
}

// validate checks r after applyDefaults; accessLog tells whether the
// access log is on, which needs IDs.
func (r *RequestIDConfig) validate(path string, accessLog bool) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	if !r.enabled() && accessLog {
		bad(".enabled", "the access log needs request IDs: remove request_id.enabled: false, or the access_log block")
	}
	if err := checkRequestIDHeader(r.Header); err != nil {
		bad(".header", "%v", err)
	}
	return errs
}

// checkRequestIDHeader checks a request_id.header value.
func checkRequestIDHeader(name string) error {
	if name == "" || len(name) > maxRequestIDHeaderLen {
		return fmt.Errorf("want a header name of 1 to %d characters (got %q)", maxRequestIDHeaderLen, name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("%q: a header name here holds only letters, digits and '-'", name)
		}
	}
	if h1.RequestKindOf([]byte(name)) != h1.KindOther {
		return fmt.Errorf("%q is a header edgelb reads or writes itself; choose another name", name)
	}
	switch string(bytes.ToLower([]byte(name))) {
	case "content-type", "user-agent", "cookie", "set-cookie", "server", "location", "cache-status", "age",
		"authorization", "edgelb-error", "strict-transport-security", "allow":
		return fmt.Errorf("%q has a meaning of its own; choose another name", name)
	}
	return nil
}

// requestIDs is request_id at run time.
type requestIDs struct {
	// name is the header name in the form the fasthttp server normalizes
	// names to, so that both engines write it alike; lower is it in
	// lower case, for the event loop's scanners.
	name, lower []byte
}

func newRequestIDs(c *RequestIDConfig) *requestIDs {
	if !c.enabled() {
		return nil
	}
	name := []byte(c.Header)
	upper := true
	for i, ch := range name {
		switch {
		case upper && ch >= 'a' && ch <= 'z':
			name[i] = ch - 'a' + 'A'
		case !upper && ch >= 'A' && ch <= 'Z':
			name[i] = ch - 'A' + 'a'
		}
		upper = ch == '-'
	}
	return &requestIDs{name: name, lower: bytes.ToLower(name)}
}

// reqID is a request's ID, held without allocating.
type reqID struct {
	b [maxRequestIDLen]byte
	n uint8
}

func (id *reqID) bytes() []byte { return id.b[:id.n] }

// String returns the ID (slow path: it allocates).
func (id *reqID) String() string { return string(id.b[:id.n]) }

// set makes v, which validRequestID accepted, the ID.
func (id *reqID) set(v []byte) { id.n = uint8(copy(id.b[:], v)) }

// validRequestID reports whether a peer's request ID may be kept: 1 to
// maxRequestIDLen visible ASCII characters.
func validRequestID(v []byte) bool {
	if len(v) == 0 || len(v) > maxRequestIDLen {
		return false
	}
	for _, c := range v {
		if c < 0x21 || c > 0x7e {
			return false
		}
	}
	return true
}

// idSource makes the request IDs of one event loop: its own prefix and a
// counter only it touches.
type idSource struct {
	prefix [16]byte
	n      uint64
}

func newIDSource() idSource {
	var g idSource
	g.prefix = randomIDPrefix()
	return g
}

func (g *idSource) next(id *reqID) {
	g.n++
	formatRequestID(id, &g.prefix, g.n)
}

// sharedIDSource makes the request IDs of the fasthttp path, whose
// goroutines share one counter.
type sharedIDSource struct {
	prefix [16]byte
	n      atomic.Uint64
}

func (g *sharedIDSource) next(id *reqID) {
	formatRequestID(id, &g.prefix, g.n.Add(1))
}

// randomIDPrefix draws a generator's prefix: 64 random bits in hex.
func randomIDPrefix() (p [16]byte) {
	var b [8]byte
	rand.Read(b[:])
	hex.Encode(p[:], b[:])
	return p
}

const hexDigits = "0123456789abcdef"

// formatRequestID makes id the prefix followed by n in 16 hex digits.
func formatRequestID(id *reqID, prefix *[16]byte, n uint64) {
	copy(id.b[:16], prefix[:])
	for i := requestIDLen - 1; i >= 16; i-- {
		id.b[i] = hexDigits[n&15]
		n >>= 4
	}
	id.n = requestIDLen
}

// peekRequestID returns the value of the request's first request-ID header,
// whatever the case of its name, and whether there are several.
func peekRequestID(h *fasthttp.RequestHeader, ids *requestIDs) (v []byte, dup bool) {
	for k, val := range h.All() {
		if len(k) == len(ids.name) && bytes.EqualFold(k, ids.name) {
			if v != nil {
				return v, true
			}
			v = val
		}
	}
	return v, false
}

// setRequestID sets the request-ID header of an upstream request to id,
// removing the client's copies first when it sent any (saw).
func setRequestID(h *fasthttp.RequestHeader, ids *requestIDs, id []byte, saw bool) {
	if saw {
		for range maxHeaderDeletes {
			var del []byte
			for k := range h.All() {
				if len(k) == len(ids.name) && bytes.EqualFold(k, ids.name) {
					del = k
					break
				}
			}
			if del == nil {
				break
			}
			h.DelBytes(del)
		}
	}
	h.SetCanonical(ids.name, id)
}

// setResponseID sets the request-ID header of a response to id, in place
// of any the backend sent under that name in any case.
func setResponseID(h *fasthttp.ResponseHeader, ids *requestIDs, id []byte) {
	delFold(h, ids.name)
	h.SetBytesKV(ids.name, id)
}
