package h1

import (
	"bufio"
	"bytes"
	"slices"
	"strings"
	"testing"

	"github.com/valyala/fasthttp"
)

// The scanners are held to fasthttp's parser, which serves whatever they
// hand off: on the same bytes, a head they forward must be one fasthttp
// accepts and reads the same way, so that the two engines never disagree
// on what a request or response means. HandOff is always allowed.
// `make fuzz` runs each target longer; `go test` runs the seeds in
// testdata/fuzz.

// fuzzMaxBody bounds the chunked bodies FuzzChunked decodes.
const fuzzMaxBody = 1 << 16

// header is a name, lower-cased, and a value.
type header struct{ name, value string }

// sortedHeaders returns the headers all yields, sorted, leaving out those
// that skip names and those with an empty value, which fasthttp drops for
// the fields it keeps apart (User-Agent, Server, Content-Type...).
func sortedHeaders(all func(yield func(k, v []byte) bool), skip ...string) []header {
	var hs []header
	for k, v := range all {
		name := strings.ToLower(string(k))
		if len(v) > 0 && !slices.Contains(skip, name) {
			hs = append(hs, header{name, string(v)})
		}
	}
	slices.SortFunc(hs, func(a, b header) int {
		return strings.Compare(a.name+"\x00"+a.value, b.name+"\x00"+b.value)
	})
	return hs
}

// readRequestHeader reads a request head the way the fasthttp server
// does, and returns the number of bytes it took.
func readRequestHeader(h *fasthttp.RequestHeader, data []byte) (int, error) {
	h.DisableNormalizing()
	br := bufio.NewReaderSize(bytes.NewReader(data), len(data)+16)
	if err := h.Read(br); err != nil {
		return 0, err
	}
	return len(data) - br.Buffered(), nil
}

func FuzzParseRequest(f *testing.F) {
	for _, s := range requestSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var r Request
		if ParseRequest(data, fuzzIDName, &r) != Forward {
			return
		}
		var h fasthttp.RequestHeader
		n, err := readRequestHeader(&h, data)
		if err != nil {
			t.Fatalf("forwarded a head fasthttp refuses: %v\n%q", err, data)
		}
		if n != r.HeadLen {
			t.Fatalf("head length %d, fasthttp's %d\n%q", r.HeadLen, n, data)
		}
		method := "GET"
		if r.Head {
			method = "HEAD"
		}
		if string(h.Method()) != method || string(h.RequestURI()) != string(r.URI) ||
			string(h.Host()) != string(r.Host) || string(h.Protocol()) != map[bool]string{false: HTTP11, true: HTTP10}[r.HTTP10] {
			t.Fatalf("read %s %q %s Host %q, fasthttp %s %q %s Host %q\n%q", method, r.URI, map[bool]string{false: HTTP11, true: HTTP10}[r.HTTP10], r.Host,
				h.Method(), h.RequestURI(), h.Protocol(), h.Host(), data)
		}
		if h.ConnectionClose() != r.Close {
			t.Fatalf("close %v, fasthttp's %v\n%q", r.Close, h.ConnectionClose(), data)
		}
		// -2 is fasthttp's "no framing header": no body for a GET.
		if cl := h.ContentLength(); cl != 0 && cl != -2 {
			t.Fatalf("a body framed by fasthttp (Content-Length %d), none forwarded\n%q", cl, data)
		}
		// The path routed on is the one the fasthttp server routes on.
		var u fasthttp.URI
		if err := u.Parse(nil, r.URI); err != nil || string(u.Path()) != string(r.Path) {
			t.Fatalf("path %q, fasthttp's %q (%v)\n%q", r.Path, u.Path(), err, data)
		}
		// Connection is compared by its meaning above; fasthttp keeps
		// Cookie apart, parsed, and Host is compared above.
		skip := []string{"connection", "cookie", "host"}
		ours := sortedHeaders(EachHeader(data[:r.HeadLen]), skip...)
		theirs := sortedHeaders(h.All(), skip...)
		if !slices.Equal(ours, theirs) {
			t.Fatalf("headers\n%q\nfasthttp's\n%q\n%q", ours, theirs, data)
		}
		// The request ID read is the first that fasthttp reads.
		if id, n := firstFold(h.All(), fuzzIDName); string(r.ID) != id || r.DupID != (n > 1) {
			t.Fatalf("request ID %q (repeated %v), fasthttp's %q (%d)\n%q", r.ID, r.DupID, id, n, data)
		}
	})
}

// fuzzIDName is the request-ID header the fuzz targets parse with.
var fuzzIDName = []byte("x-request-id")

// firstFold returns the value of the first header called name, whatever
// its case, and how many there are.
func firstFold(all func(yield func(k, v []byte) bool), name []byte) (first string, n int) {
	for k, v := range all {
		if bytes.EqualFold(k, name) {
			if n == 0 {
				first = string(v)
			}
			n++
		}
	}
	return first, n
}

// readResponseHeader reads a response head the way the event loop's
// backends' answers are read on the fasthttp path, and returns the number
// of bytes it took.
func readResponseHeader(h *fasthttp.ResponseHeader, data []byte) (int, error) {
	h.DisableNormalizing()
	h.SetNoDefaultContentType(true)
	br := bufio.NewReaderSize(bytes.NewReader(data), len(data)+16)
	if err := h.Read(br); err != nil {
		return 0, err
	}
	return len(data) - br.Buffered(), nil
}

func FuzzParseResponse(f *testing.F) {
	for _, s := range responseSeeds {
		f.Add([]byte(s), false)
		f.Add([]byte(s), true)
	}
	f.Fuzz(func(t *testing.T, data []byte, head bool) {
		var r Response
		if ParseResponse(data, head, fuzzIDName, &r) != Forward {
			return
		}
		var h fasthttp.ResponseHeader
		n, err := readResponseHeader(&h, data)
		if err != nil {
			t.Fatalf("forwarded a head fasthttp refuses: %v\n%q", err, data)
		}
		if n != r.HeadLen {
			t.Fatalf("head length %d, fasthttp's %d\n%q", r.HeadLen, n, data)
		}
		if h.StatusCode() != r.Status {
			t.Fatalf("status %d, fasthttp's %d\n%q", r.Status, h.StatusCode(), data)
		}
		if !h.IsHTTP11() {
			t.Fatalf("forwarded a response fasthttp reads as %q\n%q", h.Protocol(), data)
		}
		// fasthttp reads a head without Content-Length as one whose body
		// ends at close, not knowing the request was HEAD, which has none.
		if h.ConnectionClose() == r.KeepAlive && !(head && h.ContentLength() == -2) {
			t.Fatalf("keep-alive %v, fasthttp's %v\n%q", r.KeepAlive, !h.ConnectionClose(), data)
		}
		if !head && r.Status != 204 && r.Status != 304 {
			switch cl := h.ContentLength(); {
			case r.Chunked && cl != -1:
				t.Fatalf("chunked, fasthttp's Content-Length %d\n%q", cl, data)
			case !r.Chunked && cl != r.BodyLen:
				t.Fatalf("body of %d bytes, fasthttp's %d\n%q", r.BodyLen, cl, data)
			}
		}
		// Framing and Connection are compared by their meaning above.
		skip := []string{"connection", "content-length", "transfer-encoding"}
		ours := sortedHeaders(EachHeader(data[:r.HeadLen]), skip...)
		theirs := sortedHeaders(h.All(), skip...)
		if !slices.Equal(ours, theirs) {
			t.Fatalf("headers\n%q\nfasthttp's\n%q\n%q", ours, theirs, data)
		}
		// No request-ID line is kept.
		var kept []byte
		for _, k := range r.Keep[:r.NKeep] {
			kept = append(kept, data[k[0]:k[1]]...)
		}
		if _, n := firstFold(EachHeader(append(kept, "\r\n"...)), fuzzIDName); n > 0 {
			t.Fatalf("kept the request-ID line\n%q", data)
		}
	})
}

// chunkedHead is the response head FuzzChunked puts before a body for
// fasthttp to read it.
const chunkedHead = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

func FuzzChunked(f *testing.F) {
	for _, s := range chunkedSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		bodyLen, n, v := ScanChunked(data, fuzzMaxBody)
		if v != Forward {
			return
		}
		body := AppendDechunked(nil, data[:n])
		if len(body) != bodyLen {
			t.Fatalf("scanned %d bytes of data, decoded %d\n%q", bodyLen, len(body), data)
		}
		wire := append([]byte(chunkedHead), data...)
		br := bufio.NewReaderSize(bytes.NewReader(wire), len(wire)+16)
		var resp fasthttp.Response
		resp.Header.DisableNormalizing()
		resp.Header.SetNoDefaultContentType(true)
		if err := resp.ReadLimitBody(br, fuzzMaxBody); err != nil {
			t.Fatalf("decoded a body fasthttp refuses: %v\n%q", err, data)
		}
		if !bytes.Equal(resp.Body(), body) {
			t.Fatalf("decoded %q, fasthttp %q\n%q", body, resp.Body(), data)
		}
		if used := len(wire) - len(chunkedHead) - br.Buffered(); used != n {
			t.Fatalf("took %d bytes, fasthttp %d\n%q", n, used, data)
		}
	})
}

// Seeds: the shapes the parser tests use, the request smuggling classics
// and what fasthttp's own fuzz targets start from.
var requestSeeds = []string{
	"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
	"HEAD /x?y=%2F HTTP/1.1\r\nhost:a\r\nAccept: */*\r\n\r\n",
	"GET /a/.well-known/b HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
	"GET / HTTP/1.1\r\nHost:\ta \r\nX-A: b\tc\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\tGecko/20100101 \xc3\xa9t\xc3\xa9\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive ,CLOSE\r\nConnection: keep-alive\r\n\r\n",
	"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
	"HEAD / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
	"GET /static/app.js?v=1 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: bench\r\nAccept: */*\r\nCookie: a=b; c=d\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1\r\nX-Forwarded-For: 2\r\nX_Forwarded_For: 3\r\nX-Real-IP: 4\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc-1\r\nx-request-ID:  2 \r\nX-Request-Idx: 3\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nDate: x\r\nVary: y\r\nRetry-After: 1\r\n\r\nGET / HTTP/1.1\r\nHost: b\r\n\r\n",
	// CL.TE and TE.CL, both framings at once.
	"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
	"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n",
	// Obsolete line folding, bare LF and CR, NUL and DEL bytes.
	"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\n Host: b\r\n\r\n",
	"GET / HTTP/1.1\nHost: a\n\n",
	"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\nX-B: 2\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r2\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\x00\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nX-A: 0123456789abcdef\x7fghij\r\n\r\n",
	"GET /a\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
	// Hosts, targets and versions.
	"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
	"GET / HTTP/1.1\r\nHost:\r\n\r\n",
	"GET / HTTP/1.1\r\n\r\n",
	"GET http://a/ HTTP/1.1\r\nHost: b\r\n\r\n",
	"GET /a/../admin HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET //a HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET /%61dmin HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET /a\\b HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET /a?b/../c HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
	"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
	"get / HTTP/1.1\r\nHost: a\r\n\r\n",
	"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nUpgrade: h2c\r\nTE: trailers\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\nBad Name: 1\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: a\r\n: 1\r\n\r\n",
}

var responseSeeds = []string{
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
	"HTTP/1.1 200 OK\r\nServer: o\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\nProxy-Authenticate: x\r\n\r\nok",
	"HTTP/1.1 404 Not Found\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n",
	"HTTP/1.1 204 No Content\r\nDate: x\r\n\r\n",
	"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
	"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nX-Request-Id: a\r\nContent-Length: 0\r\nx-request-id: b\r\n\r\n",
	"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 12:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 64\r\nConnection: keep-alive\r\n\r\n",
	"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nVary: Accept\r\nSet-Cookie: a=b\r\nContent-Length: 0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX: 1\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
	"HTTP/1.1 200 OK\r\nServer: o\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Internal\r\nX-Internal: 1\r\n\r\n",
	"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
	"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",
	"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\n",
	"HTTP/1.1 200 OK\r\nDATE: x\r\nContent-Length: 2\r\n\r\n",
	"HTTP/1.1 200 OK\nContent-Length: 2\n\n",
	"HTTP/1.1 200 OK\r\nX: 1\r\n folded\r\nContent-Length: 0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",
	"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\n",
	"garbage\r\n\r\n",
}

var chunkedSeeds = []string{
	"0\r\n\r\n",
	"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
	"5;ext=1\r\nhello\r\nA \r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT",
	"5 ; name=\"quoted;value\"\r\nhello\r\n0\r\n\r\n",
	"5\r\nhel",
	"5\r\nhello\r\n0\r\n",
	"5\r\nhelloXX0\r\n\r\n",
	"x\r\n",
	"-1\r\n",
	"+5\r\nhello\r\n0\r\n\r\n",
	"0x5\r\nhello\r\n0\r\n\r\n",
	"123456789\r\n",
	"ffffffffffffffff1\r\nx\r\n0\r\n\r\n",
	"5\nhello\r\n0\r\n\r\n",
	"5\r\nhello\n0\r\n\r\n",
	"5\r\nhello\r\n0\r\n\n",
	"5\r\nhe\x00lo\r\n0\r\n\r\n",
	"0\r\nContent-Length: 5\r\n\r\n",
	"0\r\nX-A: 1\r\n folded\r\n\r\n",
	"0\r\nbad trailer\r\n\r\n",
	"00000000000000000000001\r\nx\r\n0\r\n\r\n",
}
