package balancer

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgelb/edgelb/balancer/h1"
)

// FuzzProxyHead sends arbitrary bytes as a client through the whole proxy,
// on both engines, to an origin that records every request it receives,
// and checks two things for each input:
//
//   - the origin got at most as many requests as the client got final
//     answers: edgelb never sends a request the client does not hear about
//     (no smuggled second request, no hidden retry);
//   - every request the origin got is made of the client's bytes: its
//     method and target come from a request line the client sent, every
//     header line but the ones edgelb owns is a header line the client
//     sent (name in any case, value as sent), and its body is bytes the
//     client sent, de-chunked or not.
//
// `go test` runs the seeds below and testdata/fuzz/FuzzProxyHead; `make
// fuzz` searches for more.
func FuzzProxyHead(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
		"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
		"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
		"PUT /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
		"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\nHEAD /c HTTP/1.1\r\nHost: x\r\n\r\n",
		"GET / HTTP/1.0\r\n\r\n",
		"GET http://y/abs HTTP/1.1\r\nHost: x\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n\r\n",
		// An upgrade the origin declines, and the request after it.
		"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	engines := []struct {
		name string
		o    *fuzzOrigin
		s    *Server
	}{{name: "event_loop: true"}, {name: "event_loop: false"}}
	for i := range engines {
		e := &engines[i]
		e.o = startFuzzOrigin(f)
		e.s = startEdge(f, "server: {"+e.name+", max_request_body: 4096}\nservices:\n  web: {static: ["+e.o.addr+"], retries: 0, stale: {disabled: true}}\nroutes: [{service: web}]\n")
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		for _, e := range engines {
			checkProxyHead(t, e.name, e.s, e.o, in)
		}
	})
}

// fuzzPeers numbers the client addresses of checkProxyHead.
var fuzzPeers atomic.Uint32

// checkProxyHead sends in to s on a connection of its own, half-closes it,
// reads the answers and checks what o received for it. Each connection
// comes from an address of its own in 127.0.0.0/8, which the origin reads
// in X-Forwarded-For: a request forwarded late is still told apart.
func checkProxyHead(t *testing.T, engine string, s *Server, o *fuzzOrigin, in []byte) {
	n := fuzzPeers.Add(1) % 60000
	ip := net.IPv4(127, 1+byte(n/250), byte(n%250+1), 1)
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: ip}}
	c, err := d.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	go func() {
		// Beside the read: edgelb may answer and close before it has
		// read everything.
		c.Write(in)
		c.(*net.TCPConn).CloseWrite()
	}()
	var (
		mu   sync.Mutex
		got  []byte
		done bool
	)
	go func() {
		b := make([]byte, 4096)
		for {
			n, err := c.Read(b)
			mu.Lock()
			got = append(got, b[:n]...)
			done = err != nil
			mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	// Wait for the end of the connection or, as a connection may stay
	// open for more requests, for the origin and the client to have
	// been quiet with an answer for every request forwarded.
	peer := ip.String()
	var reqs []originReq
	var bad []string
	var answers, late int
	collect := func() {
		r, b, l := o.from(peer)
		reqs, bad, late = append(reqs, r...), append(bad, b...), late+l
	}
	lastOrigin, lastClient, since := int64(-1), -1, time.Now()
	for deadline := time.Now().Add(5 * time.Second); ; {
		time.Sleep(2 * time.Millisecond)
		mu.Lock()
		answers = countAnswers(got)
		fin, n := done, len(got)
		mu.Unlock()
		if fin {
			// Anything forwarded now would be a request the client
			// never hears about.
			o.quiet(t, 10*time.Millisecond)
			collect()
			break
		}
		if r := o.reads.Load(); r != lastOrigin || n != lastClient {
			lastOrigin, lastClient, since = r, n, time.Now()
			continue
		}
		if o.active.Load() == 0 && time.Since(since) >= 10*time.Millisecond {
			collect()
			if answers >= len(reqs) {
				break
			}
		}
		if time.Now().After(deadline) {
			collect()
			break
		}
	}
	if late > 0 {
		t.Logf("%s: %d requests of earlier inputs reached the origin late", engine, late)
	}
	for _, b := range bad {
		t.Errorf("%s: the origin could not parse what edgelb sent it for %q:\n%q", engine, in, b)
	}
	if len(reqs) > answers {
		t.Errorf("%s: the origin got %d requests for %q but the client got %d answers:\n%q\nthe origin got:\n%q",
			engine, len(reqs), in, answers, got, reqs)
	}
	for _, r := range reqs {
		if why := provenance(r, in, peer); why != "" {
			t.Errorf("%s: for %q the origin got a request the client did not send: %s:\n%q", engine, in, why, r.head)
		}
	}
}

func isReset(err error) bool {
	return strings.Contains(err.Error(), "connection reset")
}

// countAnswers counts the final (not 1xx) status lines in what a client
// read. The origin's answers have empty bodies and edgelb's own bodies are
// short text, so a status line is only ever at the start of a line.
func countAnswers(b []byte) int {
	n := 0
	for len(b) > 0 {
		if len(b) >= 13 && bytes.HasPrefix(b, []byte("HTTP/1.")) && b[8] == ' ' && b[9] != '1' {
			n++
		}
		i := bytes.Index(b, strCRLF)
		if i < 0 {
			break
		}
		b = b[i+2:]
	}
	return n
}

// originReq is one request as the origin read it.
type originReq struct {
	head string // request line and header lines, CRLF-terminated, no blank line
	body []byte // de-chunked if it came chunked
}

// fuzzOrigin answers every request it can parse with an empty 200 and
// records it; what it cannot parse it records as bad, and closes.
type fuzzOrigin struct {
	addr   string
	active atomic.Int64 // requests begun but not recorded
	reads  atomic.Int64 // bytes read, to tell when the origin is quiet
	mu     sync.Mutex
	log    []originEvent
}

// originEvent is a request the origin read or, when bad is set, what it
// could not parse.
type originEvent struct {
	req originReq
	bad string
}

func startFuzzOrigin(t testing.TB) *fuzzOrigin {
	o := &fuzzOrigin{}
	o.addr = serveRaw(t, o.serve)
	return o
}

func (o *fuzzOrigin) serve(c net.Conn) {
	br := bufio.NewReader(countingReader{c, &o.reads})
	for {
		if _, err := br.Peek(1); err != nil {
			return
		}
		o.active.Add(1)
		r, raw, err := readOriginReq(br)
		o.mu.Lock()
		if err != nil {
			o.log = append(o.log, originEvent{bad: err.Error() + ": " + raw})
		} else {
			o.log = append(o.log, originEvent{req: r})
		}
		o.mu.Unlock()
		o.active.Add(-1)
		if err != nil {
			return
		}
		if _, err := io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"); err != nil {
			return
		}
	}
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// quiet waits until the origin has read nothing for idle and has no
// request half-read.
func (o *fuzzOrigin) quiet(t *testing.T, idle time.Duration) {
	deadline := time.Now().Add(10 * time.Second)
	last, since := o.reads.Load(), time.Now()
	for {
		time.Sleep(5 * time.Millisecond)
		if n := o.reads.Load(); n != last {
			last, since = n, time.Now()
		}
		if o.active.Load() == 0 && time.Since(since) >= idle {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the origin is still reading a request after 10 s")
		}
	}
}

// from returns the requests with an X-Forwarded-For of peer and the ones
// with none naming any client of the test, which cannot be told apart,
// and every unparsable input, and forgets them. The requests of other
// peers, a connection's that was given up on, it returns as late.
func (o *fuzzOrigin) from(peer string) (reqs []originReq, bad []string, late int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, e := range o.log {
		if e.bad != "" {
			bad = append(bad, e.bad)
			continue
		}
		mine, other := false, false
		for _, l := range strings.Split(e.req.head, "\r\n")[1:] {
			k, v, _ := strings.Cut(l, ":")
			if strings.EqualFold(k, "X-Forwarded-For") {
				v = strings.TrimSpace(v)
				mine = mine || v == peer
				other = other || strings.HasPrefix(v, "127.") && v != peer
			}
		}
		if other && !mine {
			late++
		} else {
			reqs = append(reqs, e.req)
		}
	}
	o.log = o.log[:0]
	return reqs, bad, late
}

// readOriginReq reads one request strictly: CRLF line ends, a request
// line of exactly three fields, "Name:value" header lines (optional
// whitespace around the value), and a body
// framed by one Content-Length or by chunked encoding. raw is what it
// read when it fails.
func readOriginReq(br *bufio.Reader) (r originReq, raw string, err error) {
	var head strings.Builder
	fail := func(why string) (originReq, string, error) {
		rest, _ := br.Peek(br.Buffered())
		return originReq{}, head.String() + string(rest), errString(why)
	}
	cl, chunked := -1, false
	for first := true; ; first = false {
		line, err := br.ReadString('\n')
		head.WriteString(line)
		if err != nil {
			return fail("head cut short")
		}
		if !strings.HasSuffix(line, "\r\n") || strings.ContainsAny(line[:len(line)-2], "\r\n") {
			return fail("bare LF or CR")
		}
		line = line[:len(line)-2]
		if line == "" {
			if first {
				return fail("empty request line")
			}
			break
		}
		if first {
			if f := strings.Split(line, " "); len(f) != 3 || f[0] == "" || f[1] == "" || !strings.HasPrefix(f[2], "HTTP/1.") {
				return fail("request line is not METHOD TARGET VERSION")
			}
			continue
		}
		name, value, ok := strings.Cut(line, ":")
		value = strings.Trim(value, " \t")
		if !ok || name == "" || strings.ContainsAny(name, " \t") {
			return fail("header line is not Name: value")
		}
		switch {
		case strings.EqualFold(name, "Content-Length"):
			n, err := strconv.Atoi(value)
			if err != nil || n < 0 || cl >= 0 {
				return fail("bad or repeated Content-Length")
			}
			cl = n
		case strings.EqualFold(name, "Transfer-Encoding"):
			if !strings.EqualFold(value, "chunked") {
				return fail("Transfer-Encoding other than chunked")
			}
			chunked = true
		}
	}
	r.head = head.String()
	r.head = r.head[:len(r.head)-2]
	switch {
	case cl >= 0 && chunked:
		return fail("Content-Length and Transfer-Encoding")
	case cl >= 0:
		r.body = make([]byte, cl)
		if _, err := io.ReadFull(br, r.body); err != nil {
			return fail("body cut short")
		}
	case chunked:
		for {
			line, err := br.ReadString('\n')
			if err != nil || !strings.HasSuffix(line, "\r\n") {
				return fail("bad chunk size line")
			}
			n, err := strconv.ParseUint(strings.TrimSuffix(line, "\r\n"), 16, 31)
			if err != nil {
				return fail("bad chunk size")
			}
			chunk := make([]byte, n+2)
			if _, err := io.ReadFull(br, chunk); err != nil || string(chunk[n:]) != "\r\n" {
				return fail("bad chunk")
			}
			if n == 0 {
				break
			}
			r.body = append(r.body, chunk[:n]...)
		}
	}
	return r, "", nil
}

type errString string

func (e errString) Error() string { return string(e) }

// provenance says what in request r the client did not send in in, or ""
// when every part of it is the client's or one of the headers edgelb
// writes.
// upgradeProvenance checks an upgrade that went upstream: one Connection:
// Upgrade and one Upgrade, with a value the client sent in an Upgrade line,
// for a client that sent a Connection line naming upgrade.
func upgradeProvenance(head string, client [][2]string, seen map[string]int) string {
	if seen["connection"] != 1 || seen["upgrade"] != 1 {
		return "an upgrade went upstream without exactly one Connection: Upgrade and one Upgrade"
	}
	up := headerValue(head+"\r\n", "upgrade")
	sentUp, sentConn := false, false
	for _, kv := range client {
		switch {
		case strings.EqualFold(kv[0], "upgrade"):
			sentUp = sentUp || strings.Trim(kv[1], " \t") == up
		case strings.EqualFold(kv[0], "connection"):
			sentConn = sentConn || h1.HasToken([]byte(kv[1]), []byte("upgrade"))
		}
	}
	if !sentUp || !sentConn {
		return "Connection: Upgrade and Upgrade: " + up + " went upstream for a client that did not ask to upgrade to it"
	}
	return ""
}

func provenance(r originReq, in []byte, peer string) string {
	var client [][2]string // the client's lines split at the first ':' (or not)
	for _, l := range strings.Split(string(in), "\n") {
		l = strings.TrimSuffix(l, "\r")
		k, v, _ := strings.Cut(l, ":")
		client = append(client, [2]string{k, v})
	}
	lines := strings.Split(strings.TrimSuffix(r.head, "\r\n"), "\r\n")
	rl := strings.Split(lines[0], " ")
	if !clientSentTarget(string(in), rl[0], rl[1]) {
		return "no request line of the client's has this method and target"
	}
	seen := map[string]int{}
	var host string
	for _, l := range lines[1:] {
		name, value, _ := strings.Cut(l, ":")
		value = strings.Trim(value, " \t")
		canon := strings.ToLower(name)
		seen[canon]++
		switch canon {
		case "host":
			host = value
		case "content-length":
			if value != strconv.Itoa(len(r.body)) {
				return "Content-Length does not match the body"
			}
			continue
		case "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded":
			continue // checked below, against the Host
		case "x-request-id":
			// edgelb's own, whatever the client sent: the peer is not
			// trusted.
			if !generatedID(value) {
				return "request ID " + strconv.Quote(value) + " is not one edgelb made"
			}
			continue
		case "connection", "upgrade":
			// An upgrade edgelb forwards: its own Connection: Upgrade,
			// beside an Upgrade the client sent, checked below.
			if canon == "connection" && value == "Upgrade" || canon == "upgrade" {
				continue
			}
			return "hop-by-hop header " + name + " went upstream"
		case "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
			"te", "trailer", "transfer-encoding", "expect":
			return "hop-by-hop header " + name + " went upstream"
		}
		if h1.KindOf([]byte(name)) == h1.KindForwardedLookalike {
			return "look-alike " + name + " went upstream"
		}
		if canon == "host" && strings.Contains(string(in), "://"+value) {
			continue // an absolute-form target's authority
		}
		sent := false
		for _, kv := range client {
			if strings.EqualFold(kv[0], name) && strings.Trim(kv[1], " \t") == value {
				sent = true
				break
			}
		}
		if !sent {
			return "header line " + strconv.Quote(l) + " is not one the client sent"
		}
	}
	if seen["host"] != 1 {
		return strconv.Itoa(seen["host"]) + " Host headers"
	}
	if seen["x-request-id"] != 1 {
		return strconv.Itoa(seen["x-request-id"]) + " X-Request-Id headers"
	}
	if seen["connection"] > 0 || seen["upgrade"] > 0 {
		if why := upgradeProvenance(r.head, client, seen); why != "" {
			return why
		}
	}
	for name, want := range map[string]string{
		"x-forwarded-for":   peer,
		"x-forwarded-proto": "http",
		"x-forwarded-host":  host,
		"forwarded":         "for=" + peer + `;host="` + host + `";proto=http`,
	} {
		if seen[name] != 1 || headerValue(r.head+"\r\n", name) != want {
			return strconv.Itoa(seen[name]) + " " + name + " headers, want one saying " + want
		}
	}
	if seen["content-length"] > 1 {
		return "more than one Content-Length"
	}
	if len(r.body) > 0 && !bytes.Contains(in, r.body) && !isDechunked(in, r.body) {
		return "body " + strconv.Quote(string(r.body)) + " is not the client's"
	}
	return ""
}

// clientSentTarget reports whether in holds a request line with this
// method whose target is target, or an absolute-form target whose path is
// target. A request line may start anywhere: right after a body, say.
func clientSentTarget(in, method, target string) bool {
	for i := 0; ; i++ {
		j := strings.Index(in[i:], method+" ")
		if j < 0 {
			return false
		}
		i += j
		l := in[i+len(method)+1:]
		if e := strings.IndexByte(l, '\n'); e >= 0 {
			l = l[:e]
		}
		l = strings.TrimSuffix(l, "\r")
		sp := strings.LastIndexByte(l, ' ')
		if sp < 0 {
			continue
		}
		t := l[:sp]
		if t == target {
			return true
		}
		for _, scheme := range []string{"http://", "https://"} {
			if len(t) > len(scheme) && strings.EqualFold(t[:len(scheme)], scheme) {
				path := t[len(scheme):]
				if k := strings.IndexByte(path, '/'); k >= 0 {
					path = path[k:]
				} else {
					path = "/"
				}
				if path == target {
					return true
				}
			}
		}
	}
}

// isDechunked reports whether body is the de-chunked form of a chunked
// body that starts, in in, right after a blank line.
func isDechunked(in, body []byte) bool {
	for i := 0; i < len(in); i++ {
		if in[i] != '\n' || i == 0 || (in[i-1] != '\n' && !(in[i-1] == '\r' && i >= 2 && in[i-2] == '\n')) {
			continue
		}
		if got, ok := dechunk(in[i+1:]); ok && bytes.Equal(got, body) {
			return true
		}
	}
	return false
}

// dechunk decodes a chunked body leniently: sizes may carry extensions and
// whitespace, lines may end in a bare LF.
func dechunk(b []byte) ([]byte, bool) {
	var out []byte
	for {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			return nil, false
		}
		size, _, _ := bytes.Cut(bytes.TrimSuffix(b[:i], []byte("\r")), []byte(";"))
		n, err := strconv.ParseUint(string(bytes.Trim(size, " \t")), 16, 31)
		if err != nil {
			return nil, false
		}
		b = b[i+1:]
		if n == 0 {
			return out, true
		}
		if uint64(len(b)) < n {
			return nil, false
		}
		out = append(out, b[:n]...)
		b = b[n:]
		b = bytes.TrimPrefix(b, []byte("\r"))
		if len(b) == 0 || b[0] != '\n' {
			return nil, false
		}
		b = b[1:]
	}
}
