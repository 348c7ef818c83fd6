//go:build linux

package balancer

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// rawResponse is a response as read off the wire: its status line, its
// header lines but Date, sorted, and its body.
type rawResponse struct {
	status  string
	headers []string
	body    string
}

func (r rawResponse) String() string {
	return fmt.Sprintf("%s\n%s\n\n%q", r.status, strings.Join(r.headers, "\n"), r.body)
}

// generatedID reports whether id has the form of the request IDs edgelb
// makes.
func generatedID(id string) bool {
	if len(id) != requestIDLen {
		return false
	}
	for _, c := range id {
		if !strings.ContainsRune(hexDigits, c) {
			return false
		}
	}
	return true
}

// readRawResponse reads one response framed by its Content-Length (none
// for a HEAD); a generated request ID reads as "(generated)".
func readRawResponse(br *bufio.Reader, head bool) (rawResponse, error) {
	var r rawResponse
	line, err := br.ReadString('\n')
	if err != nil {
		return r, err
	}
	r.status = strings.TrimSuffix(line, "\r\n")
	n := 0
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return r, err
		}
		line = strings.TrimSuffix(line, "\r\n")
		if line == "" {
			break
		}
		k, v, _ := strings.Cut(line, ":")
		switch {
		case strings.EqualFold(k, "Date"):
			continue
		case strings.EqualFold(k, "Content-Length"):
			n, _ = strconv.Atoi(strings.TrimSpace(v))
		case strings.EqualFold(k, "X-Request-Id") && generatedID(strings.TrimSpace(v)):
			// Each request has its own: compared by form only.
			line = k + ": (generated)"
		}
		r.headers = append(r.headers, line)
	}
	slices.Sort(r.headers)
	if head {
		n = 0
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(br, body); err != nil {
		return r, err
	}
	r.body = string(body)
	return r, nil
}

// expectEOF fails unless the edge closes c with nothing more to read.
func expectEOF(t *testing.T, c net.Conn, br *bufio.Reader) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	rest, err := io.ReadAll(br)
	if err != nil || len(rest) != 0 {
		t.Fatalf("the connection stays open or says more: %v %q", err, rest)
	}
}

// expectOpen fails unless c still serves a request after the first.
func expectOpen(t *testing.T, c net.Conn, br *bufio.Reader, again string) {
	t.Helper()
	if _, err := io.WriteString(c, again); err != nil {
		t.Fatalf("second request: %v", err)
	}
	r, err := readRawResponse(br, false)
	if err != nil || !strings.HasSuffix(r.status, " 200 OK") || r.body != "/again" {
		t.Fatalf("second request on the connection: %v\n%s", err, r)
	}
}

// closeCases are requests whose connection closes once answered (close)
// or stays open, and the Connection header each answer has.
var closeCases = []struct {
	name, req string
	close     bool
	conn      string
}{
	{"close", "GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\nAccept: */*\r\n\r\n", true, "close"},
	{"close-mixed-case", "GET /a HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n\r\n", true, "close"},
	{"close-chunked", "GET /chunked HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", true, "close"},
	{"close-head", "HEAD /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", true, "close"},
	{"http10", "GET /a HTTP/1.0\r\nHost: a\r\n\r\n", true, "close"},
	{"http10-chunked", "GET /chunked HTTP/1.0\r\nHost: a\r\n\r\n", true, "close"},
	{"http10-head", "HEAD /a HTTP/1.0\r\nHost: a\r\n\r\n", true, "close"},
	{"http10-close", "GET /a HTTP/1.0\r\nHost: a\r\nConnection: close\r\n\r\n", true, "close"},
	{"http10-keep-alive", "GET /a HTTP/1.0\r\nHost: a\r\nConnection: Keep-Alive\r\n\r\n", false, "keep-alive"},
	{"http10-keep-alive-chunked", "GET /chunked HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", false, "keep-alive"},
	{"http11-keep-alive", "GET /a HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", false, ""},
}

// closeOrigin answers /chunked with a chunked body and the rest with a
// Content-Length one.
func closeOrigin(c net.Conn, head string) {
	if pathOf(head) == "/chunked" {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nX-App: 1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nchu\r\n4\r\nnked\r\n0\r\n\r\n")
		return
	}
	echoPath(c, head)
}

// The event loop answers Connection: close and HTTP/1.0 requests itself,
// as the fasthttp path does: the same status line, headers and body, the
// connection closed after the answer or kept open as the request says.
func TestEventLoopServesCloseAndHTTP10LikeTheFullPath(t *testing.T) {
	got := map[string]map[string]rawResponse{}
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, closeOrigin)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
		loop := engine == "event_loop: true"
		got[engine] = map[string]rawResponse{}
		for _, tc := range closeCases {
			h0 := loopHandoffs.Get()
			seen := len(o.got())
			c := dialEdge(t, s)
			br := bufio.NewReader(c)
			if _, err := io.WriteString(c, tc.req); err != nil {
				t.Fatal(err)
			}
			r, err := readRawResponse(br, strings.HasPrefix(tc.req, "HEAD "))
			if err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			got[engine][tc.name] = r
			wantConn := ""
			if tc.conn != "" {
				wantConn = "Connection: " + tc.conn
			}
			var conn []string
			for _, h := range r.headers {
				if strings.HasPrefix(strings.ToLower(h), "connection:") {
					conn = append(conn, h)
				}
			}
			if strings.Join(conn, "|") != wantConn {
				t.Errorf("%s: Connection headers %q, want %q", tc.name, conn, wantConn)
			}
			if tc.close {
				expectEOF(t, c, br)
			} else {
				again := strings.Replace(strings.Replace(tc.req, "/chunked ", "/again ", 1), "/a ", "/again ", 1)
				expectOpen(t, c, br, again)
			}
			c.Close()
			if loop && loopHandoffs.Get() != h0 {
				t.Errorf("%s: the request left the event loop", tc.name)
			}
			// Upstream, the client's Connection never goes; the loop
			// speaks HTTP/1.1 whatever the client spoke.
			up := o.got()[seen]
			if headerValue(up, "Connection") != "" {
				t.Errorf("%s: Connection went upstream: %q", tc.name, up)
			}
			if loop && !strings.Contains(strings.SplitN(up, "\r\n", 2)[0], " HTTP/1.1") {
				t.Errorf("%s: upstream request line %q", tc.name, up)
			}
		}
	})
	for _, tc := range closeCases {
		loop, full := got["event_loop: true"][tc.name], got["event_loop: false"][tc.name]
		if loop.String() != full.String() {
			t.Errorf("%s: the engines answer differently:\nevent loop:\n%s\nfasthttp:\n%s", tc.name, loop, full)
		}
	}
}

// A request pipelined behind one that says Connection: close is never
// answered, nor sent to a backend.
func TestEventLoopPipelinedAfterCloseIsNotAnswered(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, echoPath)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
		h0 := loopHandoffs.Get()
		c := dialEdge(t, s)
		defer c.Close()
		io.WriteString(c, "GET /one HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\n")
		br := bufio.NewReader(c)
		r, err := readRawResponse(br, false)
		if err != nil || r.body != "/one" || !slices.Contains(r.headers, "Connection: close") {
			t.Fatalf("first answer: %v\n%s", err, r)
		}
		expectEOF(t, c, br)
		if hs := o.got(); len(hs) != 1 || pathOf(hs[0]) != "/one" {
			t.Fatalf("the origin got %d requests", len(hs))
		}
		if engine == "event_loop: true" && loopHandoffs.Get() != h0 {
			t.Fatal("the request left the event loop")
		}
	})
}

// A Connection: close answer too large for the socket's buffers is
// written as the client reads it, then the connection closes.
func TestEventLoopClosesAfterPartialWrites(t *testing.T) {
	body := bytes.Repeat([]byte("0123456789abcdef"), (900<<10)/16)
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, func(c net.Conn, _ string) {
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		})
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
		// Small socket buffers on both sides make the edge's writes
		// partial.
		rc, err := s.ln.(*net.TCPListener).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, 8192) })
		d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
			return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 8192) })
		}}
		c, err := d.Dial("tcp", s.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		h0 := loopHandoffs.Get()
		io.WriteString(c, "GET /big HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
		// Let the edge fill the buffers before anything is read.
		time.Sleep(100 * time.Millisecond)
		br := bufio.NewReaderSize(c, 1024)
		r, err := readRawResponse(br, false)
		if err != nil || r.body != string(body) || !slices.Contains(r.headers, "Connection: close") {
			t.Fatalf("answer: %v, %d bytes, headers %q", err, len(r.body), r.headers)
		}
		expectEOF(t, c, br)
		if engine == "event_loop: true" && loopHandoffs.Get() != h0 {
			t.Fatal("the request left the event loop")
		}
	})
}

// A Connection that names a header still goes to the fasthttp path, which
// removes that header before the request goes upstream.
func TestEventLoopHandsOffConnectionNamingAHeader(t *testing.T) {
	o := startRecOrigin(t, echoPath)
	s := startEdge(t, "services:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
	h0 := loopHandoffs.Get()
	c := dialEdge(t, s)
	defer c.Close()
	io.WriteString(c, "GET /x HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n\r\n")
	br := bufio.NewReader(c)
	r, err := readRawResponse(br, false)
	if err != nil || r.body != "/x" || !slices.Contains(r.headers, "Connection: close") {
		t.Fatalf("answer: %v\n%s", err, r)
	}
	expectEOF(t, c, br)
	if loopHandoffs.Get() == h0 {
		t.Fatal("the event loop served a request whose Connection names a header")
	}
	if up := o.got()[0]; headerValue(up, "X-Secret") != "" {
		t.Fatalf("X-Secret went upstream: %q", up)
	}
}
