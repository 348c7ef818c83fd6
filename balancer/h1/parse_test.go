package h1

import (
	"bytes"
	"math/rand/v2"
	"strings"
	"testing"
)

func TestParseRequest(t *testing.T) {
	f := func(head string, want Verdict) {
		t.Helper()
		var r Request
		if got := ParseRequest([]byte(head), nil, &r); got != want {
			t.Fatalf("%q: verdict %d, want %d", head, got, want)
		}
	}
	f("GET / HTTP/1.1\r\nHost: a\r\n\r\n", Forward)
	f("HEAD /x?y=%2F HTTP/1.1\r\nhost: a\r\nAccept: */*\r\n\r\n", Forward)
	f("GET /a/.well-known/b HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n", Forward)
	f("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\tc\r\n\r\n", Forward)
	f("GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\tGecko/20100101 \xc3\xa9t\xc3\xa9\r\n\r\n", Forward)
	f("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", Forward)
	f("GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive ,CLOSE\r\nConnection: keep-alive\r\n\r\n", Forward)
	f("GET / HTTP/1.0\r\nHost: a\r\n\r\n", Forward)
	f("HEAD / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", Forward)
	f("GET / HTTP/1.1\r\nHost: a\r\n", Incomplete)
	f("GET / HTTP/1.1\r\nHo", Incomplete)

	// Everything else is the full path's, forwarded lines with other
	// white space than "Name: value" included.
	f("GET / HTTP/1.1\r\nHost:\ta\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a \r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost:a\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nX-A:  b\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\n\r\n", HandOff)
	// Headers fasthttp keeps one of, repeated.
	f("GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: x\r\nuser-agent: y\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nContent-Type: x\r\nContent-Type: y\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: x\r\nContent-Type: y\r\n\r\n", Forward)
	f("\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", HandOff)
	f("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx", HandOff)
	f("GET / HTTP/0.9\r\nHost: a\r\n\r\n", HandOff)
	f("GET / HTTP/2.0\r\nHost: a\r\n\r\n", HandOff)
	f("GET / HTTP/1.0\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost:\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret\r\n\r\n", HandOff)
	f("GET / HTTP/1.0\r\nHost: a\r\nConnection: X-Secret\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nConnection:\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nConnection: ,\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n", HandOff)
	// Repeated forwarding headers are all dropped; from a trusted peer the
	// loop hands them to the fasthttp path, which joins them.
	f("GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1\r\nX-Forwarded-For: 2\r\n\r\n", Forward)
	f("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nBad Name: 1\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\nX-B: 2\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\x00\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r2\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nX-A: 0123456789abcdef\x7fghij\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nX-A: 0123456789\x1fabcdefghij\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\n: 1\r\n\r\n", HandOff)
	f("GET / HTTP/1.1\r\nHost: a\r\nX-A 1\r\n\r\n", HandOff)
	f("GET /a/../admin HTTP/1.1\r\nHost: a\r\n\r\n", HandOff)
	f("GET /a/./b HTTP/1.1\r\nHost: a\r\n\r\n", HandOff)
	f("GET /a/.. HTTP/1.1\r\nHost: a\r\n\r\n", HandOff)
	f("GET //a HTTP/1.1\r\nHost: a\r\n\r\n", HandOff)
	f("GET /%61dmin HTTP/1.1\r\nHost: a\r\n\r\n", HandOff)
	f("GET /a\\b HTTP/1.1\r\nHost: a\r\n\r\n", HandOff)
	f("GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", HandOff)
	f("GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", HandOff)
}

// TestRequestConnection checks how a request's version and Connection
// decide whether its connection closes once answered.
func TestRequestConnection(t *testing.T) {
	for _, tc := range []struct {
		head          string
		http10, close bool
	}{
		{"GET / HTTP/1.1\r\nHost: a\r\n\r\n", false, false},
		{"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", false, false},
		{"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", false, true},
		{"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n", false, true},
		{"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\n\r\n", false, true},
		{"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n", false, true},
		{"GET / HTTP/1.0\r\nHost: a\r\n\r\n", true, true},
		{"GET / HTTP/1.0\r\nHost: a\r\nConnection: close\r\n\r\n", true, true},
		{"GET / HTTP/1.0\r\nHost: a\r\nConnection: Keep-Alive\r\n\r\n", true, false},
		{"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive,\tclose\r\n\r\n", true, true},
	} {
		var r Request
		if ParseRequest([]byte(tc.head), nil, &r) != Forward {
			t.Fatalf("%q: not forwarded", tc.head)
		}
		if r.HTTP10 != tc.http10 || r.Close != tc.close {
			t.Errorf("%q: http10 %v close %v, want %v %v", tc.head, r.HTTP10, r.Close, tc.http10, tc.close)
		}
		// The Connection lines never go upstream.
		kept := tc.head
		for i := r.NDrop - 1; i >= 0; i-- {
			kept = kept[:r.Drop[i][0]] + kept[r.Drop[i][1]:]
		}
		if strings.Contains(strings.ToLower(kept), "connection") {
			t.Errorf("%q: %q goes upstream", tc.head, kept)
		}
	}
}

func TestRequestFields(t *testing.T) {
	head := "GET /p/q?x=1 HTTP/1.1\r\nHost: Example.com:80\r\nConnection: keep-alive\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nA: b\r\n\r\n"
	var r Request
	if ParseRequest([]byte(head), nil, &r) != Forward {
		t.Fatal("not forwarded")
	}
	if string(r.Path) != "/p/q" || string(r.URI) != "/p/q?x=1" || string(r.Host) != "Example.com:80" || string(r.XFF) != "1.2.3.4" {
		t.Fatalf("path %q uri %q host %q xff %q", r.Path, r.URI, r.Host, r.XFF)
	}
	if r.HeadLen != len(head) {
		t.Fatalf("headLen %d, want %d", r.HeadLen, len(head))
	}
	kept := head
	for i := r.NDrop - 1; i >= 0; i-- {
		kept = kept[:r.Drop[i][0]] + kept[r.Drop[i][1]:]
	}
	if want := "GET /p/q?x=1 HTTP/1.1\r\nHost: Example.com:80\r\nA: b\r\n\r\n"; kept != want {
		t.Fatalf("kept %q, want %q", kept, want)
	}
}

func TestRequestID(t *testing.T) {
	f := func(head, wantID string, dup bool, wantKept string) {
		t.Helper()
		var r Request
		if ParseRequest([]byte(head), []byte("x-request-id"), &r) != Forward {
			t.Fatalf("%q: not forwarded", head)
		}
		kept := head
		for i := r.NDrop - 1; i >= 0; i-- {
			kept = kept[:r.Drop[i][0]] + kept[r.Drop[i][1]:]
		}
		if string(r.ID) != wantID || (r.ID == nil) != (wantID == "") || r.DupID != dup || kept != wantKept {
			t.Fatalf("%q: id %q dup %v kept %q; want %q %v %q", head, r.ID, r.DupID, kept, wantID, dup, wantKept)
		}
	}
	f("GET / HTTP/1.1\r\nHost: a\r\n\r\n", "", false, "GET / HTTP/1.1\r\nHost: a\r\n\r\n")
	f("GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc\r\nA: b\r\n\r\n", "abc", false, "GET / HTTP/1.1\r\nHost: a\r\nA: b\r\n\r\n")
	f("GET / HTTP/1.1\r\nx-request-ID:\tabc \r\nHost: a\r\n\r\n", "abc", false, "GET / HTTP/1.1\r\nHost: a\r\n\r\n")
	f("GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: 1\r\nX-Request-Id: 2\r\nX-Request-Idx: 3\r\n\r\n", "1", true,
		"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Idx: 3\r\n\r\n")

	var r Response
	head := "HTTP/1.1 200 OK\r\nX-Request-Id: a\r\nContent-Length: 0\r\nx-request-id: b\r\nX: 1\r\n\r\n"
	if ParseResponse([]byte(head), false, []byte("x-request-id"), &r) != Forward {
		t.Fatal("response not forwarded")
	}
	var kept strings.Builder
	for _, k := range r.Keep[:r.NKeep] {
		kept.WriteString(head[k[0]:k[1]])
	}
	if want := "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX: 1\r\n"; kept.String() != want {
		t.Fatalf("response kept %q, want %q", kept.String(), want)
	}
}

func TestParseResponse(t *testing.T) {
	f := func(head string, isHead bool, want Verdict, wantKept string, bodyLen int, keepAlive bool) {
		t.Helper()
		var r Response
		got := ParseResponse([]byte(head), isHead, nil, &r)
		if got != want {
			t.Fatalf("%q: verdict %d, want %d", head, got, want)
		}
		if want != Forward {
			return
		}
		var kept strings.Builder
		for _, k := range r.Keep[:r.NKeep] {
			kept.WriteString(head[k[0]:k[1]])
		}
		if kept.String() != wantKept || r.BodyLen != bodyLen || r.KeepAlive != keepAlive {
			t.Fatalf("%q: kept %q body %d keep-alive %v; want %q %d %v", head, kept.String(), r.BodyLen, r.KeepAlive, wantKept, bodyLen, keepAlive)
		}
	}
	f("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false, Forward, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", 2, true)
	f("HTTP/1.1 200 OK\r\nServer: o\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\nProxy-Authenticate: x\r\n\r\nok", false, Forward,
		"HTTP/1.1 200 OK\r\nServer: o\r\nContent-Length: 2\r\n", 2, true)
	f("HTTP/1.1 404 Not Found\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n", false, Forward, "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n", 0, false)
	f("HTTP/1.1 204 No Content\r\nDate: x\r\n\r\n", false, Forward, "HTTP/1.1 204 No Content\r\nDate: x\r\n", 0, true)
	f("HTTP/1.1 304 Not Modified\r\n\r\n", false, Forward, "HTTP/1.1 304 Not Modified\r\n", 0, true)
	f("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", true, Forward, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n", 0, true)
	f("HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", false, Forward, "HTTP/1.1 200\r\nContent-Length: 0\r\n", 0, true)
	f("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", false, Incomplete, "", 0, false)
	f("HTTP/1.1 200 OK\r\nContent-Le", false, Incomplete, "", 0, false)
	f("HTTP/1.1 200 OK\r\nContent-Length: 2\r", false, Incomplete, "", 0, false)
	f("HTTP/1.1 200 OK\r", false, Incomplete, "", 0, false)
	f("HTTP/1.1 200 OK\r\nX: 1\r\n\rX", false, HandOff, "", 0, false)
	f("HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\n", false, HandOff, "", 0, false)

	f("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX: 1\r\n\r\n", false, Forward, "HTTP/1.1 200 OK\r\nX: 1\r\n", 0, true)
	f("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false, HandOff, "", 0, false)
	f("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", false, HandOff, "", 0, false)
	f("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", false, HandOff, "", 0, false)
	f("HTTP/1.1 200 OK\r\nServer: o\r\n\r\n", false, HandOff, "", 0, false)
	f("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n", false, HandOff, "", 0, false)
	f("HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\n", false, HandOff, "", 0, false)
	f("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Internal\r\nX-Internal: 1\r\n\r\n", false, HandOff, "", 0, false)
	f("HTTP/1.1 100 Continue\r\n\r\n", false, HandOff, "", 0, false)
	f("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", false, HandOff, "", 0, false)
	f("HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\n", false, HandOff, "", 0, false)
	f("HTTP/1.1 200 OK\r\nDATE: x\r\nContent-Length: 2\r\n\r\n", false, HandOff, "", 0, false)
	f("garbage\r\n\r\n", false, HandOff, "", 0, false)
}

func TestScanChunked(t *testing.T) {
	f := func(body string, max int, want Verdict, wantData string) {
		t.Helper()
		n, used, v := ScanChunked([]byte(body), max)
		if v != want {
			t.Fatalf("%q: verdict %d, want %d", body, v, want)
		}
		if v != Forward {
			return
		}
		if got := string(AppendDechunked(nil, []byte(body)[:used])); got != wantData || n != len(wantData) {
			t.Fatalf("%q: decoded %q (%d), want %q", body, got, n, wantData)
		}
		if used != len(body) && !strings.HasPrefix(body[used:], "NEXT") {
			t.Fatalf("%q: took %d bytes", body, used)
		}
	}
	f("0\r\n\r\n", 10, Forward, "")
	f("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", 100, Forward, "hello world")
	f("5;ext=1\r\nhello\r\nA \r\n0123456789\r\n0\r\n\r\nNEXT", 100, Forward, "hello0123456789")
	// Trailers, and whitespace before an extension, are fasthttp's to
	// judge: it refuses some.
	f("5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n", 100, HandOff, "")
	f("5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n", 100, HandOff, "")
	f("5 ;ext=1\r\nhello\r\n0\r\n\r\n", 100, HandOff, "")
	f("5\r\nhello\r\n0\r\n\n", 100, HandOff, "")
	f("5;\r\r\nhello\r\n0\r\n\r\n", 100, HandOff, "")
	f("5\r\nhello\r\n0\r\n\r", 100, Incomplete, "")
	f("5\r\nhel", 100, Incomplete, "")
	f("5\r\nhello\r\n0\r\n", 100, Incomplete, "")
	f("5\r\nhello\r\n", 100, Incomplete, "")
	f("5\r\nhello\r\n0\r\n\r\n", 4, HandOff, "")
	f("5\r\nhelloXX0\r\n\r\n", 100, HandOff, "")
	f("x\r\n", 100, HandOff, "")
	f("-1\r\n", 100, HandOff, "")
	f("123456789\r\n", 1<<40, HandOff, "")
	f("5\nhello\r\n0\r\n\r\n", 100, HandOff, "")
}

// The scanners, as plain as they can be written: the event loop's are
// checked against them on random input.

func refPlainPath(uri []byte) ([]byte, bool) {
	if len(uri) == 0 || uri[0] != '/' {
		return nil, false
	}
	path := uri
	if i := bytes.IndexByte(uri, '?'); i >= 0 {
		path = uri[:i]
	}
	for _, c := range uri {
		if c <= ' ' || c == 0x7f || c == '#' {
			return nil, false
		}
	}
	if bytes.ContainsAny(path, "%\\") || bytes.Contains(path, []byte("//")) {
		return nil, false
	}
	for _, seg := range bytes.Split(path, []byte("/")) {
		if string(seg) == "." || string(seg) == ".." {
			return nil, false
		}
	}
	return path, true
}

func refNextHeader(b []byte) (name, value []byte, n int) {
	lf := bytes.IndexByte(b, '\n')
	if lf < 0 {
		if len(b) > 0 && b[0] == '\r' && len(b) > 1 {
			return nil, nil, 0
		}
		return nil, nil, -1
	}
	if lf == 0 || b[lf-1] != '\r' {
		return nil, nil, 0
	}
	line := b[:lf-1]
	if len(line) == 0 {
		return nil, nil, 2
	}
	k, v, ok := bytes.Cut(line, []byte(":"))
	if !ok || len(k) == 0 {
		return nil, nil, 0
	}
	for _, c := range k {
		if !strings.ContainsRune("!#$%&'*+-.^_`|~", rune(c)) && !('0' <= c && c <= '9' || 'a' <= c|0x20 && c|0x20 <= 'z') {
			return nil, nil, 0
		}
	}
	for _, c := range v {
		if c < 0x20 && c != '\t' || c == 0x7f {
			return nil, nil, 0
		}
	}
	return k, bytes.Trim(v, " \t"), lf + 1
}

func TestScannersMatchReference(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	gen := func(alphabet string, max int) []byte {
		b := make([]byte, rnd.IntN(max+1))
		for i := range b {
			b[i] = alphabet[rnd.IntN(len(alphabet))]
		}
		return b
	}
	for range 200000 {
		uri := gen("//..??%\\#a b\x00\x7f", 12)
		if len(uri) > 0 && rnd.IntN(2) == 0 {
			uri[0] = '/'
		}
		p, ok := PlainPath(uri)
		rp, rok := refPlainPath(uri)
		if ok != rok || !bytes.Equal(p, rp) {
			t.Fatalf("PlainPath(%q) = %q %v, want %q %v", uri, p, ok, rp, rok)
		}

		// Lines that end, most of them with a value long enough for
		// the word-at-a-time scan.
		line := gen("Ab-:: \t\r\nx\x00\x7f\x1f\xc3@[", 30)
		if rnd.IntN(4) > 0 {
			line = append(line, "\r\n"...)
		}
		name, value, n := NextHeader(line)
		rname, rvalue, rn := refNextHeader(line)
		if _, _, end := refNextHeader(append(line[:len(line):len(line)], "\r\n"...)); rn == -1 && n == 0 && end == 0 {
			// An unfinished line that no ending could make valid:
			// refused at once rather than when its end comes.
			continue
		}
		if n != rn || !bytes.Equal(name, rname) || !bytes.Equal(value, rvalue) {
			t.Fatalf("NextHeader(%q) = %q %q %d, want %q %q %d", line, name, value, n, rname, rvalue, rn)
		}
		if n > 0 && name != nil {
			want := KindOther
			for _, e := range []headerKindName{{KindHost, strHost}, {KindConnection, strConnection}, {KindContentLength, strContentLength}} {
				if bytes.EqualFold(name, e.lower) {
					want = e.kind
				}
			}
			if got := KindOf(name); got != want && (want != KindOther || got <= KindContentLength) {
				t.Fatalf("KindOf(%q) = %d, want %d", name, got, want)
			}
		}
	}
}
