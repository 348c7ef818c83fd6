package balancer

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// The access log, as a user reads it: one line per request from either
// engine, each field checked against what the client and the backends saw.

func TestAccessLogConfig(t *testing.T) {
	dir := t.TempDir()
	base := "services:\n  web: {static: [127.0.0.1:1]}\nroutes: [{service: web}]\n"
	bad := func(yaml string, wants ...string) {
		t.Helper()
		configRefused(t, base+yaml, wants...)
	}
	bad("access_log: {}", "access_log.path: missing: a file name, or - for the standard output")
	bad("access_log: {path: /nonexistent-dir/a.log}", `access_log.path: "/nonexistent-dir/a.log": directory "/nonexistent-dir" does not exist`)
	bad("access_log: {path: "+dir+"}", "access_log.path: "+fmt.Sprintf("%q", dir)+" is a directory")
	bad("access_log: {path: -, format: xml}", `access_log.format: must be json or combined (got "xml")`)
	bad("access_log: {path: -, sample: 1.5}", "access_log.sample: must be from 0 to 1")
	bad("access_log: {path: -, sample: -0.1}", "access_log.sample: must be from 0 to 1")
	bad("access_log: {path: -, buffer_size: 100}", "access_log.buffer_size: must be from 4096 to 67108864 bytes (got 100)")
	bad("access_log: {path: -, flush_interval: 1m}", "access_log.flush_interval: must be more than 0 and at most 10s (got 1m0s)")
	bad("access_log: {path: -, flush_interval: 5}", "access_log.flush_interval: duration 5 needs a unit")
	bad("access_log: {path: -, colour: red}", "access_log.colour: unknown key")
	bad("access_log: {path: -}\nrequest_id: false", "request_id.enabled: the access log needs request IDs")
	bad("request_id: {header: X_Request_Id}", `request_id.header: "X_Request_Id": a header name here holds only letters, digits and '-'`)
	bad("request_id: {header: X-Forwarded-For}", `request_id.header: "X-Forwarded-For" is a header edgelb reads or writes itself`)
	bad("request_id: {header: Edgelb-Error}", `request_id.header: "Edgelb-Error" has a meaning of its own`)
	bad("request_id: {header: "+strings.Repeat("a", 65)+"}", "request_id.header: want a header name of 1 to 64 characters")
	bad("request_id: {name: X}", "request_id.name: unknown key")

	cfg := mustConfig(t, base+"access_log: {path: "+filepath.Join(dir, "a.log")+"}\n")
	a := cfg.AccessLog
	if a.Format != "json" || *a.Sample != 1 || a.BufferSize != DefaultAccessLogBufferSize || a.FlushInterval != DefaultAccessLogFlushInterval {
		t.Fatalf("defaults: %+v", *a)
	}
	if !cfg.RequestID.enabled() || cfg.RequestID.Header != DefaultRequestIDHeader {
		t.Fatalf("request_id defaults: %+v", cfg.RequestID)
	}
	cfg = mustConfig(t, base+"request_id: {header: x-correlation-ID}\n")
	if ids := newRequestIDs(&cfg.RequestID); string(ids.name) != "X-Correlation-Id" || string(ids.lower) != "x-correlation-id" {
		t.Fatalf("header %q %q", ids.name, ids.lower)
	}
	if cfg := mustConfig(t, base+"request_id: false\n"); newRequestIDs(&cfg.RequestID) != nil {
		t.Fatal("request_id: false leaves IDs on")
	}
}

// startLoggedEdge starts an edge from yaml with the access log in a file
// of the test's, written out every 10ms (extra is added to its block), and
// returns the file's path.
func startLoggedEdge(t *testing.T, yaml, extra string) (*Server, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "access.log")
	if extra != "" {
		extra = ", " + extra
	}
	return startEdge(t, yaml+fmt.Sprintf("access_log: {path: %q, flush_interval: 10ms%s}\n", path, extra)), path
}

// logLine is one JSON line of the access log.
type logLine map[string]any

func (l logLine) str(k string) string { s, _ := l[k].(string); return s }
func (l logLine) num(k string) float64 {
	n, ok := l[k].(float64)
	if !ok {
		return -1
	}
	return n
}

// tries returns the line's tries.
func (l logLine) tries() []logLine {
	var out []logLine
	ts, _ := l["tries"].([]any)
	for _, t := range ts {
		out = append(out, logLine(t.(map[string]any)))
	}
	return out
}

// triesText sums up the tries as "backend outcome status, ...".
func (l logLine) triesText() string {
	var s []string
	for _, t := range l.tries() {
		s = append(s, fmt.Sprintf("%s %s %d", t.str("backend"), t.str("outcome"), int(t.num("status"))))
	}
	return strings.Join(s, ", ")
}

// readLog returns the lines of the access log at path so far.
func readLog(t *testing.T, path string) []logLine {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []logLine
	for _, l := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		if l == "" {
			continue
		}
		var m logLine
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("access log line is not JSON: %v\n%s", err, l)
		}
		out = append(out, m)
	}
	return out
}

// waitLog waits for the line whose request_id is id.
func waitLog(t *testing.T, path, id string) logLine {
	t.Helper()
	var found logLine
	waitFor(t, "the access log line of request "+id, func() bool {
		for _, l := range readLog(t, path) {
			if l.str("request_id") == id {
				found = l
				return true
			}
		}
		return false
	})
	return found
}

// ask sends raw on c and reads the answer.
func ask(t *testing.T, c net.Conn, br *bufio.Reader, raw string) *fasthttp.Response {
	t.Helper()
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	resp := &fasthttp.Response{}
	resp.SkipBody = strings.HasPrefix(raw, "HEAD ")
	if err := resp.Read(br); err != nil {
		t.Fatalf("%q: %v", raw, err)
	}
	return resp
}

// idOf returns the request ID a response carries, which must be there.
func idOf(t *testing.T, resp *fasthttp.Response) string {
	t.Helper()
	id := string(resp.Header.Peek("X-Request-Id"))
	if id == "" {
		t.Fatalf("no X-Request-Id in the answer:\n%s", resp.Header.Header())
	}
	return id
}

// Every field of a proxied GET, a HEAD and an HTTP/1.0 request.
func TestAccessLogFields(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, func(c net.Conn, head string) {
			body := "hello"
			if strings.HasPrefix(head, "HEAD ") {
				body = ""
			}
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Request-Id: the-backend's-own\r\n\r\n%s", body)
		})
		s, path := startLoggedEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n", "")
		c := dialEdge(t, s)
		defer c.Close()
		br := bufio.NewReader(c)

		raw := "GET /page?q=1&x=%22 HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: t\r\n\r\n"
		before := time.Now()
		resp := ask(t, c, br, raw)
		took := time.Since(before)
		id := idOf(t, resp)
		if len(id) != requestIDLen || resp.StatusCode() != 200 || string(resp.Body()) != "hello" {
			t.Fatalf("answer %d %q, request ID %q", resp.StatusCode(), resp.Body(), id)
		}
		if up := headerValue(o.got()[0], "X-Request-Id"); up != id {
			t.Fatalf("the backend got request ID %q, the client %q", up, id)
		}
		l := waitLog(t, path, id)
		at, err := time.Parse("2006-01-02T15:04:05.000Z07:00", l.str("time"))
		if err != nil || at.Before(before.Truncate(time.Millisecond)) || at.After(before.Add(took)) {
			t.Errorf("time %q (%v), want between %v and %v", l.str("time"), err, before, before.Add(took))
		}
		for k, want := range map[string]string{"client": c.LocalAddr().String(), "method": "GET", "host": "shop.example",
			"uri": "/page?q=1&x=%22", "proto": "HTTP/1.1", "service": "web", "source": "backend"} {
			if got := l.str(k); got != want {
				t.Errorf("%s %q, want %q", k, got, want)
			}
		}
		for k, want := range map[string]float64{"status": 200, "bytes_in": float64(len(raw)), "bytes_out": 5, "retries": 0, "hedges": 0} {
			if got := l.num(k); got != want {
				t.Errorf("%s %v, want %v", k, got, want)
			}
		}
		if l["tls"] != false {
			t.Errorf("tls %v", l["tls"])
		}
		if d := l.num("duration_ms"); d < 0 || d > float64(took.Microseconds())/1000 {
			t.Errorf("duration_ms %v, the client waited %v", d, took)
		}
		for _, k := range []string{"edgelb_error", "reason", "cache_status"} {
			if _, ok := l[k]; ok {
				t.Errorf("%s %v in the line of a backend's answer", k, l[k])
			}
		}
		tries := l.tries()
		if len(tries) != 1 || l.triesText() != o.addr+" ok 200" {
			t.Fatalf("tries %s", l.triesText())
		}
		if st, d := tries[0].num("start_ms"), tries[0].num("duration_ms"); st < 0 || d < 0 || st+d > l.num("duration_ms")+0.002 {
			t.Errorf("try start_ms %v duration_ms %v in a request of %v ms", st, d, l.num("duration_ms"))
		}

		// HEAD: no body sent; HTTP/1.0: the client's version, though
		// the backend is asked in HTTP/1.1.
		resp = ask(t, c, br, "HEAD /h HTTP/1.1\r\nHost: shop.example\r\n\r\n")
		l = waitLog(t, path, idOf(t, resp))
		if l.str("method") != "HEAD" || l.num("bytes_out") != 0 || l.num("status") != 200 {
			t.Errorf("HEAD: method %q bytes_out %v status %v", l.str("method"), l.num("bytes_out"), l.num("status"))
		}
		resp = ask(t, c, br, "GET /old HTTP/1.0\r\nHost: shop.example\r\nConnection: keep-alive\r\n\r\n")
		l = waitLog(t, path, idOf(t, resp))
		if l.str("proto") != "HTTP/1.0" || l.str("uri") != "/old" {
			t.Errorf("HTTP/1.0: proto %q uri %q", l.str("proto"), l.str("uri"))
		}
	})
}

// A request retried after a dead backend: both tries, in order, and the
// retry counted.
func TestAccessLogRetry(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		dead := deadAddr(t)
		o := startRecOrigin(t, echoPath)
		s, path := startLoggedEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+dead+", "+o.addr+"], balance: round_robin,"+
			" health: {panic_threshold: -1, passive: {consecutive_gateway_failures: 100}}}\nroutes: [{service: web}]\n", "")
		var retried logLine
		for i := 0; i < 4 && retried == nil; i++ {
			resp, err := rawRequest(t, s, "GET /r HTTP/1.1\r\nHost: x\r\n\r\n")
			if err != nil || resp.StatusCode() != 200 {
				t.Fatalf("%v %d", err, statusOf(resp))
			}
			if l := waitLog(t, path, idOf(t, resp)); l.num("retries") == 1 {
				retried = l
			}
		}
		if retried == nil {
			t.Fatal("no request tried the dead backend first")
		}
		if got, want := retried.triesText(), dead+" connect_failed 0, "+o.addr+" ok 200"; got != want {
			t.Errorf("tries %s, want %s", got, want)
		}
		if retried.str("source") != "backend" || retried.num("hedges") != 0 || retried.num("status") != 200 {
			t.Errorf("source %q hedges %v status %v", retried.str("source"), retried.num("hedges"), retried.num("status"))
		}
	})
}

// A hedged request: the slow first try lost, the hedge answered.
func TestAccessLogHedge(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		slow := slowOrigin(t, "slow", 2*time.Second)
		fast := slowOrigin(t, "fast", 0)
		s, path := startLoggedEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+slow.addr+", "+fast.addr+"], balance: round_robin, try_timeout: 5s,"+
			" hedge: {after: 30ms}}\nroutes: [{service: web}]\n", "")
		var hedged logLine
		for i := 0; i < 4 && hedged == nil; i++ {
			resp, err := rawRequest(t, s, "GET /h HTTP/1.1\r\nHost: x\r\n\r\n")
			if err != nil || resp.StatusCode() != 200 || string(resp.Body()) != "fast" {
				t.Fatalf("%v %d %q", err, statusOf(resp), bodyOf(resp))
			}
			if l := waitLog(t, path, idOf(t, resp)); l.num("hedges") == 1 {
				hedged = l
			}
		}
		if hedged == nil {
			t.Fatal("no request was hedged")
		}
		if got, want := hedged.triesText(), slow.addr+" hedge_lost 0, "+fast.addr+" ok 200"; got != want {
			t.Errorf("tries %s, want %s", got, want)
		}
		tries := hedged.tries()
		if tries[1].num("start_ms") < 25 || hedged.num("retries") != 0 {
			t.Errorf("the hedge went at %v ms (after: 30ms), retries %v", tries[1].num("start_ms"), hedged.num("retries"))
		}
	})
}

// A stored copy served when the backend is down: its Cache-Status, and the
// try that failed.
func TestAccessLogStale(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
			ctx.Response.Header.Set("Cache-Control", "max-age=0")
			ctx.SetBodyString("stored copy")
		})
		s, path := startLoggedEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"], health: {panic_threshold: -1}}\nroutes: [{service: web}]\n", "")
		if resp, err := rawRequest(t, s, "GET /s HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil || resp.StatusCode() != 200 {
			t.Fatalf("%v %d", err, statusOf(resp))
		}
		o.stop()
		resp, err := rawRequest(t, s, "GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
		if err != nil || resp.StatusCode() != 200 || string(resp.Body()) != "stored copy" {
			t.Fatalf("%v %d %q", err, statusOf(resp), bodyOf(resp))
		}
		l := waitLog(t, path, idOf(t, resp))
		cs := l.str("cache_status")
		if l.str("source") != "stale" || cs != string(resp.Header.Peek("Cache-Status")) || !strings.Contains(cs, "detail=upstream_connect_failed") {
			t.Errorf("source %q cache_status %q; the client got Cache-Status %q", l.str("source"), cs, resp.Header.Peek("Cache-Status"))
		}
		if got, want := l.triesText(), o.addr+" connect_failed 0"; got != want {
			t.Errorf("tries %s, want %s", got, want)
		}
		if _, ok := l["edgelb_error"]; ok {
			t.Error("a stored copy has an edgelb_error")
		}
	})
}

// Errors edgelb generates: the Edgelb-Error code the client got, and the
// try that failed; a request without a route has no service and no try.
func TestAccessLogGeneratedErrors(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		hung := slowOrigin(t, "hung", 5*time.Second)
		s, path := startLoggedEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+hung.addr+"], try_timeout: 200ms, timeout: 1s, stale: {disabled: true}}\n"+
			"routes: [{path: /app, service: web}]\n", "")
		resp, err := rawRequest(t, s, "GET /app/x HTTP/1.1\r\nHost: x\r\n\r\n")
		if err != nil || resp.StatusCode() != 504 {
			t.Fatalf("%v %d", err, statusOf(resp))
		}
		l := waitLog(t, path, idOf(t, resp))
		if l.str("source") != "error" || l.str("edgelb_error") != string(resp.Header.Peek(HeaderError)) || l.str("edgelb_error") != "upstream_timeout" {
			t.Errorf("source %q edgelb_error %q; the client got %q", l.str("source"), l.str("edgelb_error"), resp.Header.Peek(HeaderError))
		}
		if got, want := l.triesText(), hung.addr+" timeout 0"; got != want {
			t.Errorf("tries %s, want %s", got, want)
		}
		if d := l.tries()[0].num("duration_ms"); d < 190 {
			t.Errorf("the try timed out after %v ms, try_timeout 200ms", d)
		}

		resp, err = rawRequest(t, s, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
		if err != nil || resp.StatusCode() != 404 {
			t.Fatalf("%v %d", err, statusOf(resp))
		}
		l = waitLog(t, path, idOf(t, resp))
		if l.str("source") != "error" || l.str("edgelb_error") != "no_route" || l.str("service") != "" || len(l.tries()) != 0 {
			t.Errorf("no route: source %q edgelb_error %q service %q tries %s", l.str("source"), l.str("edgelb_error"), l.str("service"), l.triesText())
		}
	})
}

// Requests edgelb answers itself without forwarding them, before or after
// fasthttp has read them: each logged with the answer's status, source
// edgelb and why, and each answer carrying the line's request ID.
func TestAccessLogRefusals(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, echoPath)
		s, path := startLoggedEdge(t, "server: {"+engine+", max_header_bytes: 1024, max_request_body: 10, header_timeout: 300ms}\n"+
			"services:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n", "")
		f := func(raw string, status int, reason, method string) {
			t.Helper()
			resp, err := rawRequest(t, s, raw)
			if err != nil || resp.StatusCode() != status {
				t.Fatalf("%.40q: %v %d, want %d", raw, err, statusOf(resp), status)
			}
			l := waitLog(t, path, idOf(t, resp))
			if l.str("source") != "edgelb" || l.str("reason") != reason || l.num("status") != float64(status) || l.str("method") != method {
				t.Errorf("%.40q: source %q reason %q status %v method %q; want edgelb %q %d %q", raw, l.str("source"), l.str("reason"), l.num("status"),
					l.str("method"), reason, status, method)
			}
			if len(l.tries()) != 0 || l.str("service") != "" {
				t.Errorf("%.40q: tries %s service %q", raw, l.triesText(), l.str("service"))
			}
		}
		f("GET / HTTP/1.1\r\nHost: a..b\r\n\r\n", 400, "host", "GET")
		f("GET / HTTP/1.1\r\n\r\n", 400, "malformed", "")
		f("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "framing", "GET")
		f("TRACE / HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed", "TRACE")
		f("GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "malformed", "")
		f("GET / HTTP/1.1\r\nHost: x\r\nX-Big: "+strings.Repeat("a", 2048)+"\r\n\r\n", 431, "header_too_large", "")
		f("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n01234567890123456789", 413, "body_too_large", "POST")
		f("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\nExpect: 100-continue\r\n\r\n", 413, "body_too_large", "POST")
		f("GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ", 408, "head_timeout", "")
		if n := len(o.got()); n != 0 {
			t.Errorf("the backend got %d of the refused requests", n)
		}
	})
}

// An upgrade: the 101 is logged, with its try, and carries the request ID
// the backend got.
func TestAccessLogUpgrade(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, func(c net.Conn, head string) {
			io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: chat\r\n\r\n")
			io.Copy(c, c)
		})
		s, path := startLoggedEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n", "")
		resp, br, c := rawUpgrade(t, s, "GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: chat\r\n\r\n")
		if resp.StatusCode() != 101 {
			t.Fatalf("status %d", resp.StatusCode())
		}
		id := idOf(t, resp)
		if up := headerValue(o.got()[0], "X-Request-Id"); up != id {
			t.Fatalf("the backend got request ID %q, the client %q", up, id)
		}
		io.WriteString(c, "ping")
		b := make([]byte, 4)
		if _, err := io.ReadFull(br, b); err != nil || string(b) != "ping" {
			t.Fatalf("through the tunnel: %q %v", b, err)
		}
		l := waitLog(t, path, id)
		if l.num("status") != 101 || l.str("source") != "backend" || l.triesText() != o.addr+" ok 101" || l.str("uri") != "/chat" {
			t.Errorf("status %v source %q tries %s uri %q", l.num("status"), l.str("source"), l.triesText(), l.str("uri"))
		}
	})
}

// The combined format: the NCSA fields a log tool reads, then edgelb's.
func TestAccessLogCombined(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		dead := deadAddr(t)
		o := startRecOrigin(t, echoPath)
		s, path := startLoggedEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+dead+", "+o.addr+"], balance: round_robin,"+
			" health: {panic_threshold: -1, passive: {consecutive_gateway_failures: 100}}}\nroutes: [{service: web}]\n", "format: combined")
		c := dialEdge(t, s)
		defer c.Close()
		br := bufio.NewReader(c)
		var ids []string
		for range 2 {
			resp := ask(t, c, br, "GET /c?q=\"x\" HTTP/1.1\r\nHost: shop.example\r\nReferer: http://r.example/\r\nUser-Agent: agent \"7\"\r\n\r\n")
			ids = append(ids, idOf(t, resp))
		}
		re := regexp.MustCompile(`^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /c\?q=\\x22x\\x22 HTTP/1\.1" 200 8 ` +
			`"http://r\.example/" "agent \\x227\\x22" request_id=(\w+) host=shop\.example duration_ms=\d+\.\d{3} service=web source=backend edgelb_error=- ` +
			`retries=(\d) hedges=0 tries="([^"]*)"$`)
		waitFor(t, "both lines", func() bool {
			b, _ := os.ReadFile(path)
			return strings.Count(string(b), "\n") == 2
		})
		b, _ := os.ReadFile(path)
		lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
		retried := 0
		for i, line := range lines {
			m := re.FindStringSubmatch(line)
			if m == nil {
				t.Fatalf("line %d is not as expected:\n%s", i+1, line)
			}
			if m[1] != ids[i] {
				t.Errorf("line %d: request_id %s, the client got %s", i+1, m[1], ids[i])
			}
			tries := regexp.MustCompile(`^(` + regexp.QuoteMeta(dead) + ` connect_failed - \d+\.\d{3}ms, )?` + regexp.QuoteMeta(o.addr) + ` ok 200 \d+\.\d{3}ms$`)
			if !tries.MatchString(m[3]) || (m[2] == "1") != strings.Contains(m[3], "connect_failed") {
				t.Errorf("line %d: retries=%s tries=%q", i+1, m[2], m[3])
			}
			if m[2] == "1" {
				retried++
			}
		}
		if retried == 0 {
			t.Error("no request retried; round robin over a dead and a live backend tries the dead one first")
		}
	})
}

// With sample: 0 no 2xx is logged but every error, retried request and
// stored copy is; with sample: 0.5 about half the 2xx are.
func TestAccessLogSampling(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		dead := deadAddr(t)
		o := startRecOrigin(t, func(c net.Conn, head string) {
			if pathOf(head) == "/missing" {
				io.WriteString(c, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
				return
			}
			echoPath(c, head)
		})
		yaml := "server: {" + engine + "}\nservices:\n  web: {static: [" + dead + ", " + o.addr + "], balance: round_robin," +
			" health: {panic_threshold: -1, passive: {consecutive_gateway_failures: 1000}}}\nroutes: [{path: /, service: web}]\n"
		s, path := startLoggedEdge(t, yaml, "sample: 0")
		// One connection: its lines are in one shard, in order.
		c := dialEdge(t, s)
		defer c.Close()
		br := bufio.NewReader(c)
		// Round robin over a dead and a live backend: some requests are
		// retried, and those are logged.
		retries0 := metricValue(t, s, `edgelb_retries_total{service="web"}`)
		for i := 0; i < 10; i++ {
			resp := ask(t, c, br, fmt.Sprintf("GET /ok%d HTTP/1.1\r\nHost: x\r\n\r\n", i))
			if resp.StatusCode() != 200 {
				t.Fatalf("status %d", resp.StatusCode())
			}
		}
		wantRetried := metricValue(t, s, `edgelb_retries_total{service="web"}`) - retries0
		resp := ask(t, c, br, "GET /missing HTTP/1.1\r\nHost: x\r\n\r\n")
		if resp.StatusCode() != 404 {
			t.Fatalf("status %d", resp.StatusCode())
		}
		last := idOf(t, resp)
		waitLog(t, path, last)
		retried := 0
		for _, l := range readLog(t, path) {
			switch {
			case l.str("uri") == "/missing":
			case l.num("retries") == 1 && l.num("status") == 200:
				retried++
			default:
				t.Errorf("logged with sample: 0: %s %v retries %v", l.str("uri"), l.num("status"), l.num("retries"))
			}
		}
		if retried != wantRetried || retried == 0 {
			t.Errorf("%d retried requests logged, %d retried", retried, wantRetried)
		}

		// sample: 0.5, one live backend: about half of 400 answers.
		s, path = startLoggedEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n", "sample: 0.5")
		c2 := dialEdge(t, s)
		defer c2.Close()
		br2 := bufio.NewReader(c2)
		for i := 0; i < 400; i++ {
			ask(t, c2, br2, "GET /half HTTP/1.1\r\nHost: x\r\n\r\n")
		}
		waitLog(t, path, idOf(t, ask(t, c2, br2, "GET /missing HTTP/1.1\r\nHost: x\r\n\r\n")))
		if n := len(readLog(t, path)) - 1; n < 140 || n > 260 {
			t.Errorf("%d of 400 answers logged with sample: 0.5", n)
		}
	})
}

// logrotate's way: rename the file, then SIGUSR1 (ReopenAccessLog), while
// requests go on from several clients. Every request is in one of the
// files, once.
func TestAccessLogRotationLosesNothing(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, echoPath)
		s, path := startLoggedEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n", "")
		// The clients go on until the rotations are over.
		const clients, rotations = 4, 5
		var wg sync.WaitGroup
		var mu sync.Mutex
		ids := map[string]bool{}
		stop := make(chan struct{})
		for i := 0; i < clients; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := net.Dial("tcp", s.Addr())
				if err != nil {
					t.Error(err)
					return
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(30 * time.Second))
				br := bufio.NewReader(c)
				for {
					select {
					case <-stop:
						return
					default:
					}
					io.WriteString(c, "GET /rot HTTP/1.1\r\nHost: x\r\n\r\n")
					var resp fasthttp.Response
					if err := resp.Read(br); err != nil {
						t.Error(err)
						return
					}
					mu.Lock()
					ids[string(resp.Header.Peek("X-Request-Id"))] = true
					mu.Unlock()
				}
			}()
		}
		for r := 1; r <= rotations; r++ {
			time.Sleep(30 * time.Millisecond)
			if err := os.Rename(path, fmt.Sprintf("%s.%d", path, r)); err != nil {
				t.Fatal(err)
			}
			if err := s.ReopenAccessLog(); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(30 * time.Millisecond)
		close(stop)
		wg.Wait()
		total := len(ids)
		files := []string{path}
		for r := 1; r <= rotations; r++ {
			files = append(files, fmt.Sprintf("%s.%d", path, r))
		}
		var lines []logLine
		waitFor(t, "every line", func() bool {
			lines = nil
			for _, f := range files {
				lines = append(lines, readLog(t, f)...)
			}
			return len(lines) >= total
		})
		seen := map[string]int{}
		for _, l := range lines {
			seen[l.str("request_id")]++
		}
		for id := range ids {
			if seen[id] != 1 {
				t.Errorf("request %s is in the logs %d times", id, seen[id])
			}
		}
		if len(lines) != total {
			t.Errorf("%d lines for %d requests", len(lines), total)
		}
		nonEmpty := 0
		for _, f := range files {
			if len(readLog(t, f)) > 0 {
				nonEmpty++
			}
		}
		if nonEmpty < 2 {
			t.Errorf("the lines are in %d file(s): the rotations did not take", nonEmpty)
		}
	})
}

// A writer that cannot keep up (the log is a pipe nobody reads) costs
// lines, counted, never requests: every request is answered at once.
func TestAccessLogFullWriterDrops(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		fifo := filepath.Join(t.TempDir(), "access.fifo")
		if err := syscall.Mkfifo(fifo, 0o600); err != nil {
			t.Fatal(err)
		}
		// A reader that never reads: edgelb's open succeeds, and its
		// writes stop once the pipe's buffer is full.
		r, err := os.OpenFile(fifo, os.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		o := startRecOrigin(t, echoPath)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n"+
			fmt.Sprintf("access_log: {path: %q, buffer_size: 4096, flush_interval: 10ms}\n", fifo))
		dropped := accessLogDropped.Get()
		c := dialEdge(t, s)
		defer c.Close()
		br := bufio.NewReader(c)
		for i := 0; i < 1500; i++ {
			start := time.Now()
			c.SetDeadline(start.Add(10 * time.Second))
			if resp := ask(t, c, br, "GET /"+strings.Repeat("p", 200)+" HTTP/1.1\r\nHost: x\r\n\r\n"); resp.StatusCode() != 200 {
				t.Fatalf("request %d: %d", i, resp.StatusCode())
			}
			if took := time.Since(start); took > 5*time.Second {
				t.Fatalf("request %d took %v: the log writer held it", i, took)
			}
		}
		waitFor(t, "dropped lines counted", func() bool { return accessLogDropped.Get() > dropped })
		if n := metricValue(t, s, "edgelb_access_log_dropped_total"); uint64(n) < accessLogDropped.Get()-1 {
			t.Errorf("/metrics says %d dropped", n)
		}
	})
}

// SIGHUP's reload changes the format, the sampling and the file.
func TestAccessLogReload(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, echoPath)
		dir := t.TempDir()
		first, second := filepath.Join(dir, "first.log"), filepath.Join(dir, "second.log")
		yaml := "state_dir: " + dir + "\nserver: {" + engine + "}\nservices:\n  web: {static: [" + o.addr + "]}\nroutes: [{service: web}]\n"
		s := startEdge(t, yaml+"access_log: {path: "+first+", flush_interval: 10ms}\n")
		reload := func(extra string) {
			t.Helper()
			cfg := mustConfig(t, "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n"+yaml+extra)
			if err := s.Reload(cfg); err != nil {
				t.Fatal(err)
			}
		}
		get := func() string {
			resp, err := rawRequest(t, s, "GET /re HTTP/1.1\r\nHost: x\r\n\r\n")
			if err != nil || resp.StatusCode() != 200 {
				t.Fatalf("%v %d", err, statusOf(resp))
			}
			return idOf(t, resp)
		}
		waitLog(t, first, get())
		reload("access_log: {path: " + first + ", flush_interval: 10ms, format: combined}\n")
		id := get()
		waitFor(t, "a combined line", func() bool {
			b, _ := os.ReadFile(first)
			return strings.Contains(string(b), `" request_id=`+id+` `)
		})
		reload("access_log: {path: " + second + ", flush_interval: 10ms}\n")
		waitLog(t, second, get())
		reload("")
		id = get()
		time.Sleep(100 * time.Millisecond)
		for _, f := range []string{first, second} {
			if b, _ := os.ReadFile(f); strings.Contains(string(b), id) {
				t.Errorf("a request after the access log was turned off is in %s", f)
			}
		}
		reload("access_log: {path: " + second + ", flush_interval: 10ms}\n")
		waitLog(t, second, get())
	})
}

func TestAccessLogEscaping(t *testing.T) {
	f := func(in, wantJSON, wantCombined string) {
		t.Helper()
		j := string(appendJSONString(nil, []byte(in)))
		var back string
		if err := json.Unmarshal([]byte(j), &back); err != nil || j != wantJSON {
			t.Errorf("%q: JSON %s (%v), want %s", in, j, err, wantJSON)
		}
		if c := string(appendQuoted(nil, []byte(in))); c != wantCombined {
			t.Errorf("%q: combined %s, want %s", in, c, wantCombined)
		}
	}
	f("/a?b=1", `"/a?b=1"`, `/a?b=1`)
	f(`"\`, `"\"\\"`, `\x22\x5c`)
	f("a\tb\x00\x7f", `"a\u0009b\u0000`+"\x7f"+`"`, `a\x09b\x00\x7f`)
	f("été", `"été"`, `\xc3\xa9t\xc3\xa9`)
	f("\xff\xc3(", `"\u00ff\u00c3("`, `\xff\xc3(`)
	f("\xed\xa0\x80", `"\u00ed\u00a0\u0080"`, `\xed\xa0\x80`)
	for _, tc := range []struct {
		ns   int64
		want string
	}{{0, "0.000"}, {499, "0.000"}, {500, "0.001"}, {1234567, "1.235"}, {-5, "0.000"}, {12_000_000_000, "12000.000"}} {
		if got := string(appendMillis(nil, tc.ns)); got != tc.want {
			t.Errorf("appendMillis(%d) %s, want %s", tc.ns, got, tc.want)
		}
	}
}

// A file that cannot be opened stops the start, naming the key; at reload
// it fails the reload and the running log goes on.
func TestAccessLogCannotOpen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "logs")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	base := "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nstate_dir: " + t.TempDir() + "\nservices:\n  web: {static: [127.0.0.1:1]}\nroutes: [{service: web}]\n"
	cfg := mustConfig(t, base+"access_log: {path: "+filepath.Join(dir, "a.log")+"}\n")
	os.Remove(dir)
	s := NewServer(cfg, quietLogger())
	if err := s.Start(); err == nil || !strings.Contains(err.Error(), "access_log.path: cannot open") {
		s.Shutdown(t.Context())
		t.Fatalf("start with a log in a removed directory: %v", err)
	}

	good := filepath.Join(t.TempDir(), "a.log")
	s = startEdge(t, strings.SplitN(base, "\n", 3)[2]+"access_log: {path: "+good+", flush_interval: 10ms}\n")
	os.Mkdir(dir, 0o755)
	cfg = mustConfig(t, base+"access_log: {path: "+filepath.Join(dir, "b.log")+"}\n")
	os.Remove(dir)
	if err := s.Reload(cfg); err == nil || !strings.Contains(err.Error(), "access_log.path: cannot open") {
		t.Fatalf("reload to a log in a removed directory: %v", err)
	}
	resp, err := rawRequest(t, s, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	if err != nil {
		t.Fatal(err)
	}
	waitLog(t, good, idOf(t, resp))
}

// An answer from the backup set says so: source backup.
func TestAccessLogBackupSource(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, echoPath)
		s, path := startLoggedEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+deadAddr(t)+"], backup: ["+o.addr+"],"+
			" health: {panic_threshold: -1, passive: {consecutive_gateway_failures: 1}}}\nroutes: [{service: web}]\n", "")
		for i := 0; i < 2; i++ {
			resp, err := rawRequest(t, s, "GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
			if err != nil || resp.StatusCode() != 200 {
				t.Fatalf("%v %d", err, statusOf(resp))
			}
			if l := waitLog(t, path, idOf(t, resp)); l.str("source") != "backup" || l.str("datacenter") != "" {
				t.Fatalf("source %q datacenter %q, want backup and none (static)", l.str("source"), l.str("datacenter"))
			}
		}
	})
}
