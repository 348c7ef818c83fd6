// Package h1 holds edgelb's HTTP/1 wire rules: the scanners with which the
// event loop decides what it forwards itself and what it hands to the
// fasthttp server, the hop-by-hop header table, comma-separated token
// lists, and Host checking. The event loop, the fasthttp path and the
// stale store all use it, so that they read the wire the same way.
//
// The scanners accept only heads whose meaning is unambiguous: anything
// unusual gets HandOff, and the fasthttp server, which parses and answers
// everything, takes it. Fuzz tests hold them to that: whatever they
// forward, fasthttp's own parser reads the same way.
//
// Nothing here allocates or keeps the bytes it is given.
package h1

// Verdict says what to do with the bytes read from a peer.
type Verdict uint8

const (
	// Incomplete: wait for more bytes.
	Incomplete Verdict = iota
	// Forward: the head is complete and unambiguous; the event loop
	// forwards it.
	Forward
	// HandOff: anything else; the fasthttp server takes the connection.
	HandOff
)

// Spellings of the header names, tokens and versions the rules use.
const (
	HeaderHost             = "Host"
	HeaderConnection       = "Connection"
	HeaderContentLength    = "Content-Length"
	HeaderContentType      = "Content-Type"
	HeaderTransferEncoding = "Transfer-Encoding"
	HeaderExpect           = "Expect"
	HeaderDate             = "Date"
	HeaderVary             = "Vary"
	HeaderRetryAfter       = "Retry-After"
	HeaderXForwardedFor    = "X-Forwarded-For"
	HeaderXForwardedProto  = "X-Forwarded-Proto"
	HeaderXForwardedHost   = "X-Forwarded-Host"
	HeaderForwarded        = "Forwarded"
	TokenClose             = "close"
	TokenKeepAlive         = "keep-alive"
	TokenChunked           = "chunked"
	HTTP11                 = "HTTP/1.1"
	HTTP10                 = "HTTP/1.0"
)

var (
	strHTTP11          = []byte(HTTP11)
	strHTTP10          = []byte(HTTP10)
	strHost            = []byte(HeaderHost)
	strConnection      = []byte(HeaderConnection)
	strContentLength   = []byte(HeaderContentLength)
	strContentType     = []byte(HeaderContentType)
	strTransferEnc     = []byte(HeaderTransferEncoding)
	strExpect          = []byte(HeaderExpect)
	strDate            = []byte(HeaderDate)
	strVary            = []byte(HeaderVary)
	strRetryAfter      = []byte(HeaderRetryAfter)
	strXForwardedFor   = []byte(HeaderXForwardedFor)
	strXForwardedProto = []byte(HeaderXForwardedProto)
	strXForwardedHost  = []byte(HeaderXForwardedHost)
	strForwarded       = []byte(HeaderForwarded)
	strClose           = []byte(TokenClose)
	strKeepAlive       = []byte(TokenKeepAlive)
	strChunked         = []byte(TokenChunked)
	strComma           = []byte(",")
	strGET             = []byte("GET")
	strHEAD            = []byte("HEAD")
)
