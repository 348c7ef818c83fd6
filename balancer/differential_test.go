//go:build linux

package balancer

import (
	"bufio"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http/httputil"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// The differential test: one table of scenarios, each served once with the
// event loop on and once with it off, on fresh origins and a fresh edge.
// What the client gets (status line, headers but Date, body), what each
// origin was asked, backend health, metric deltas and the access log's
// lines must be the same both ways. Where they are not, diffKnown names every difference and why; the
// test fails when a named difference goes away as well as when a new one
// appears, so that the table says what is true today.

// diffKnown lists the cases whose engines still disagree, with the exact
// differences (as diffResults reports them, event loop first) and why.
var diffKnown = map[string]struct {
	why   string
	diffs []string
}{
	"header name case": {"the fasthttp server normalises request header names, the loop forwards them as sent", []string{
		`origin a request 1: ["host: shop.example" "x-lower: 1" "X-MIXED-case: 2"] vs ["Host: shop.example" "X-Lower: 1" "X-Mixed-Case: 2"]`,
	}},
}

// diffHandsOver lists the cases whose requests the event loop does not
// finish itself, and why; every other case it serves start to end, retries,
// stored copies and errors included, with no hand-over.
var diffHandsOver = map[string]string{
	"2 MiB body":                                 "the loop buffers at most 1 MiB: the fasthttp path reads the rest of the answer on the loop's backend connection",
	"503 Retry-After, then 2 MiB body":           "as for 2 MiB body, with the 503 kept in the attempt",
	"503 Retry-After, then 2 MiB body cut short": "as for 2 MiB body; the kept 503 goes to the client",
	"https redirect":                             "its POST step: the loop serves GET and HEAD only",
	"two User-Agent lines":                       "a header fasthttp keeps one of, repeated: the fasthttp path forwards the last",
	"Host with a trailing tab":                   "a forwarded line with white space around its value is not one the loop forwards as it came: the fasthttp path writes it as Name: value",
}

// diffOrigin is a scripted TCP origin. It records every request head and
// answers the nth request (from 0) with reply; a nil reply makes it a
// dead address that refuses connections.
type diffOrigin struct {
	addr    string
	ln      net.Listener
	mu      sync.Mutex
	heads   []string
	conns   map[net.Conn]bool
	stopped bool
}

// originReply answers the nth request an origin got.
type originReply func(n int, c net.Conn, head string)

// startDiffOrigin starts an origin on the loopback address ip.
func startDiffOrigin(t *testing.T, ip string, reply originReply) *diffOrigin {
	t.Helper()
	o := &diffOrigin{conns: make(map[net.Conn]bool)}
	ln, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	o.addr = ln.Addr().String()
	if reply == nil {
		ln.Close()
		return o
	}
	o.ln = ln
	t.Cleanup(o.stop)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			o.mu.Lock()
			if o.stopped {
				c.Close()
			} else {
				o.conns[c] = true
				go o.serve(c, reply)
			}
			o.mu.Unlock()
		}
	}()
	return o
}

func (o *diffOrigin) serve(c net.Conn, reply originReply) {
	defer func() {
		o.mu.Lock()
		delete(o.conns, c)
		o.mu.Unlock()
		c.Close()
	}()
	br := bufio.NewReader(c)
	for {
		h, err := readRequest(br)
		if err != nil {
			return
		}
		o.mu.Lock()
		n := len(o.heads)
		o.heads = append(o.heads, h)
		o.mu.Unlock()
		reply(n, c, h)
	}
}

// stop closes the listener and every connection, so that the origin then
// refuses connections like a dead one.
func (o *diffOrigin) stop() {
	if o.ln == nil {
		return
	}
	o.ln.Close()
	o.mu.Lock()
	defer o.mu.Unlock()
	o.stopped = true
	for c := range o.conns {
		c.Close()
	}
}

func (o *diffOrigin) got() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.heads)
}

// respond answers with status, extra header lines (each ending in CRLF)
// and body, which a HEAD request does not get.
func respond(status int, hdr, body string) originReply {
	return func(_ int, c net.Conn, head string) {
		b := body
		if strings.HasPrefix(head, "HEAD ") {
			b = ""
		}
		fmt.Fprintf(c, "HTTP/1.1 %d %s\r\n%sContent-Length: %d\r\n\r\n%s", status, fasthttp.StatusMessage(status), hdr, len(body), b)
	}
}

// bodyless answers with a status that has no body, and no Content-Length.
func bodyless(status int, hdr string) originReply {
	return func(_ int, c net.Conn, _ string) {
		fmt.Fprintf(c, "HTTP/1.1 %d %s\r\n%s\r\n", status, fasthttp.StatusMessage(status), hdr)
	}
}

// thenReply answers the first request with first and the others with rest.
func thenReply(first, rest originReply) originReply {
	return func(n int, c net.Conn, head string) {
		if n == 0 {
			first(n, c, head)
			return
		}
		rest(n, c, head)
	}
}

// cacheable is a 200 that may be stored and is stale at once.
var cacheable = respond(200, "Cache-Control: max-age=0\r\nContent-Type: text/plain\r\n", "stored copy")

// diffCase is one scenario: its origins, the service's extra config, and
// the client's requests, each sent on a new connection.
type diffCase struct {
	name string
	// status is the status of the last answer without the event loop,
	// so that both engines failing alike does not pass.
	status  int
	origins []diffOriginSpec
	service string // extra keys of the service's flow map, after a comma
	routes  string // the routes list; one catch-all route if empty
	top     string // extra top-level keys (a tls block, say)
	steps   []diffStep
}

type diffOriginSpec struct {
	name  string
	reply originReply // nil: a dead address
}

type diffStep struct {
	raw string
	// before runs before the request is sent, with the case's origins.
	before func(map[string]*diffOrigin)
	// waitClose waits for the edge to close the connection after the
	// answer and records whether it did.
	waitClose bool
}

func get(path string) diffStep {
	return diffStep{raw: "GET " + path + " HTTP/1.1\r\nHost: shop.example\r\n\r\n"}
}

// diffResult is what one engine did with a case.
type diffResult struct {
	answers []diffAnswer
	heads   map[string][]string // origin name: request heads received
	health  map[string]string   // origin name: state and reason
	metrics map[string]int      // series, backends by origin name: delta
	// log holds the access log's lines, by answer, with what differs by
	// run (times, ports, IDs) masked.
	log []string
}

// diffAnswer is what the client got for one request.
type diffAnswer struct {
	status  string
	headers map[string][]string // lower-case name: values in order
	body    string
	closed  string
	err     string
	// id is the request ID the answer carried.
	id string
}

func TestDifferentialEngines(t *testing.T) {
	// slow never answers: it reads until the edge or the test closes.
	slow := func(_ int, c net.Conn, _ string) { io.Copy(io.Discard, c) }
	pki := newTestPKI(t)
	cert, key := pki.issue("shop", "shop.example")
	withTLS := tlsYAML("", cert, key)
	big := strings.Repeat("0123456789abcdef", 2<<20/16)
	cases := []diffCase{
		{name: "200", status: 200, origins: []diffOriginSpec{{"a", echoReply}}, steps: []diffStep{get("/page?q=1")}},
		{name: "204", status: 204, origins: []diffOriginSpec{{"a", bodyless(204, "X-Origin: a\r\n")}}, steps: []diffStep{get("/")}},
		{name: "304", status: 304, origins: []diffOriginSpec{{"a", bodyless(304, "ETag: \"v1\"\r\n")}},
			steps: []diffStep{{raw: "GET / HTTP/1.1\r\nHost: shop.example\r\nIf-None-Match: \"v1\"\r\n\r\n"}}},
		{name: "404", status: 404, origins: []diffOriginSpec{{"a", respond(404, "Content-Type: text/plain\r\n", "not here")}}, steps: []diffStep{get("/x")}},
		{name: "500 stale off", status: 500, origins: []diffOriginSpec{{"a", respond(500, "", "broken")}},
			service: "stale: {disabled: true}", steps: []diffStep{get("/")}},
		{name: "500 nothing stored", status: 500, origins: []diffOriginSpec{{"a", respond(500, "", "broken")}}, steps: []diffStep{get("/")}},
		{name: "500 stale", status: 200, origins: []diffOriginSpec{{"a", thenReply(cacheable, respond(500, "", "broken"))}},
			steps: []diffStep{get("/"), get("/")}},
		{name: "502 retried", status: 502, origins: []diffOriginSpec{{"a", respond(502, "", "bad a")}, {"b", respond(502, "", "bad b")}},
			steps: []diffStep{get("/")}},
		{name: "dead backend, then 503 Retry-After", status: 503, origins: []diffOriginSpec{{"a", nil}, {"b", respond(503, "Retry-After: 1\r\n", "busy")}},
			steps: []diffStep{get("/")}},
		{name: "503 Retry-After, then a dead backend", status: 503, origins: []diffOriginSpec{{"a", respond(503, "Retry-After: 1\r\n", "busy")}, {"b", nil}},
			steps: []diffStep{get("/")}},
		{name: "429", status: 429, origins: []diffOriginSpec{{"a", respond(429, "Retry-After: 1\r\n", "slow down a")}, {"b", respond(429, "Retry-After: 1\r\n", "slow down b")}},
			steps: []diffStep{get("/")}},
		{name: "connect refused", status: 200, origins: []diffOriginSpec{{"a", nil}, {"b", echoReply}}, steps: []diffStep{get("/")}},
		{name: "reset mid-response", status: 502, origins: []diffOriginSpec{{"a", func(_ int, c net.Conn, _ string) {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
			time.Sleep(20 * time.Millisecond)
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		}}}, steps: []diffStep{get("/")}},
		{name: "timeout", status: 504, origins: []diffOriginSpec{{"a", slow}},
			service: "try_timeout: 200ms, timeout: 1s", steps: []diffStep{get("/")}},
		{name: "first byte timeout", status: 504, origins: []diffOriginSpec{{"a", slow}},
			service: "first_byte_timeout: 100ms, try_timeout: 2s", steps: []diffStep{get("/")}},
		{name: "first byte timeout, then another backend", status: 200, origins: []diffOriginSpec{{"a", slow}, {"b", echoReply}},
			service: "first_byte_timeout: 100ms, try_timeout: 2s", steps: []diffStep{get("/")}},
		{name: "slow body after the first byte", status: 200, origins: []diffOriginSpec{{"a", func(_ int, c net.Conn, _ string) {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\n")
			for _, b := range "slow!" {
				time.Sleep(50 * time.Millisecond)
				io.WriteString(c, string(b))
			}
		}}}, service: "first_byte_timeout: 100ms, try_timeout: 2s", steps: []diffStep{get("/")}},
		{name: "garbage", status: 502, origins: []diffOriginSpec{{"a", func(_ int, c net.Conn, _ string) {
			io.WriteString(c, "this is not HTTP\r\n\r\n")
			c.Close()
		}}}, steps: []diffStep{get("/")}},
		{name: "short body", status: 502, origins: []diffOriginSpec{{"a", func(_ int, c net.Conn, _ string) {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
			c.Close()
		}}}, steps: []diffStep{get("/")}},
		{name: "chunked", status: 200, origins: []diffOriginSpec{{"a", func(_ int, c net.Conn, _ string) {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
		}}}, steps: []diffStep{get("/")}},
		{name: "2 MiB body", status: 200, origins: []diffOriginSpec{{"a", respond(200, "Content-Type: application/octet-stream\r\n", big)}}, steps: []diffStep{get("/big")}},
		{name: "503 Retry-After, then 2 MiB body", status: 200, origins: []diffOriginSpec{{"a", respond(503, "Retry-After: 1\r\n", "busy")},
			{"b", respond(200, "Content-Type: application/octet-stream\r\n", big)}}, steps: []diffStep{get("/big")}},
		{name: "503 Retry-After, then 2 MiB body cut short", status: 503, origins: []diffOriginSpec{{"a", respond(503, "Retry-After: 1\r\n", "busy")},
			{"b", func(_ int, c net.Conn, _ string) {
				fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(big), big[:len(big)/2])
				c.Close()
			}}}, steps: []diffStep{get("/big")}},
		{name: "HEAD", status: 200, origins: []diffOriginSpec{{"a", respond(200, "Content-Type: text/plain\r\n", "twelve bytes")}},
			steps: []diffStep{{raw: "HEAD /h HTTP/1.1\r\nHost: shop.example\r\n\r\n"}}},
		{name: "stale hit", status: 200, origins: []diffOriginSpec{{"a", cacheable}},
			steps: []diffStep{get("/s"), {raw: get("/s").raw, before: func(o map[string]*diffOrigin) { o["a"].stop() }}}},
		{name: "no healthy backend", status: 503, origins: []diffOriginSpec{{"a", nil}},
			service: "health: {passive: {consecutive_gateway_failures: 1}}", steps: []diffStep{get("/"), get("/")}},
		{name: "no route", status: 404, origins: []diffOriginSpec{{"a", echoReply}},
			routes: "[{host: shop.example, path: /app, service: diff}]", steps: []diffStep{get("/other")}},
		{name: "Connection: close", status: 200, origins: []diffOriginSpec{{"a", echoReply}},
			steps: []diffStep{{raw: "GET /c HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n", waitClose: true}}},
		{name: "HTTP 1.0", status: 200, origins: []diffOriginSpec{{"a", echoReply}},
			steps: []diffStep{{raw: "GET /old HTTP/1.0\r\nHost: shop.example\r\n\r\n", waitClose: true}}},
		{name: "https redirect", status: 308, top: withTLS, origins: []diffOriginSpec{{"a", echoReply}},
			routes: "[{service: diff, https_redirect: true}]",
			steps:  []diffStep{get("/r?x=1"), {raw: "POST /form HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 3\r\n\r\nabc"}}},
		{name: "hsts on plain HTTP", status: 200, top: withTLS, origins: []diffOriginSpec{{"a", echoReply}},
			routes: "[{service: diff, hsts: {max_age: 1y, include_subdomains: true}}]", steps: []diffStep{get("/h")}},
		{name: "header name case", status: 200, origins: []diffOriginSpec{{"a", echoReply}},
			steps: []diffStep{{raw: "GET /h HTTP/1.1\r\nhost: shop.example\r\nx-lower: 1\r\nX-MIXED-case: 2\r\n\r\n"}}},
		{name: "two User-Agent lines", status: 200, origins: []diffOriginSpec{{"a", echoReply}},
			steps: []diffStep{{raw: "GET /ua HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: one\r\nUser-Agent: two\r\n\r\n"}}},
		{name: "cookies", status: 200, origins: []diffOriginSpec{{"a", echoReply}},
			steps: []diffStep{{raw: "GET /c1 HTTP/1.1\r\nHost: shop.example\r\nCookie: a=1; b=2\r\n\r\n"},
				{raw: "GET /c2 HTTP/1.1\r\nHost: shop.example\r\nCookie: a=1;b=2\r\n\r\n"},
				{raw: "GET /c3 HTTP/1.1\r\nHost: shop.example\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n"},
				{raw: "GET /c4 HTTP/1.1\r\nHost: shop.example\r\nCookie: flag; a=\"q\"\r\n\r\n"}}},
		{name: "Host with a trailing tab", status: 200, origins: []diffOriginSpec{{"a", echoReply}},
			steps: []diffStep{{raw: "GET /t HTTP/1.1\r\nHost: shop.example\t\r\n\r\n"}}},
	}
	for name := range diffHandsOver {
		if !slices.ContainsFunc(cases, func(c diffCase) bool { return c.name == name }) {
			t.Errorf("diffHandsOver names %q, which is no case", name)
		}
	}
	for name := range diffKnown {
		if !slices.ContainsFunc(cases, func(c diffCase) bool { return c.name == name }) {
			t.Errorf("diffKnown names %q, which is no case", name)
		}
	}
	start := time.Now()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var results [2]*diffResult
			handoffs, fallbacks := loopHandoffs.Get(), loopFallbacks.Get()
			for i, on := range []bool{true, false} {
				t.Run(engineName(on), func(t *testing.T) { results[i] = runDiffCase(t, c, on) })
				if on {
					t.Logf("the event loop handed over %d connections and left %d tries to the fasthttp path",
						loopHandoffs.Get()-handoffs, loopFallbacks.Get()-fallbacks)
				}
			}
			if results[0] == nil || results[1] == nil {
				return
			}
			if n, why := loopHandoffs.Get()-handoffs, diffHandsOver[c.name]; (n > 0) != (why != "") {
				t.Errorf("the event loop handed over %d connections; diffHandsOver says %q", n, why)
			}
			last := results[1].answers[len(c.steps)-1]
			if want := fmt.Sprintf(" %d ", c.status); !strings.Contains(last.status+" ", want) || last.err != "" {
				t.Errorf("without the event loop the last answer is %q (error %q), want status %d", last.status, last.err, c.status)
			}
			for i, st := range c.steps {
				if a := results[1].answers[i]; st.waitClose && a.closed != "closed" {
					t.Errorf("answer %d: connection %s, want closed", i+1, a.closed)
				}
			}
			got := diffResults(results[0], results[1])
			known, listed := diffKnown[c.name]
			switch {
			case !listed && len(got) > 0:
				t.Errorf("the engines disagree (event loop first):\n  %s", strings.Join(got, "\n  "))
			case listed && !slices.Equal(got, slices.Sorted(slices.Values(known.diffs))):
				t.Errorf("the engines' differences changed; diffKnown names (%s):\n  %s\nnow (event loop first):\n  %s",
					known.why, strings.Join(known.diffs, "\n  "), strings.Join(got, "\n  "))
			}
		})
	}
	t.Logf("%d cases, both engines, in %v", len(cases), time.Since(start).Round(time.Millisecond))
}

func engineName(on bool) string {
	if on {
		return "event_loop"
	}
	return "fasthttp"
}

// echoReply answers 200 with the request target as the body.
func echoReply(_ int, c net.Conn, head string) {
	p := pathOf(head)
	if strings.HasPrefix(head, "HEAD ") {
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n", len(p))
		return
	}
	fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%s", len(p), p)
}

// diffMetrics are the metric families compared: everything that counts
// what happened to a request. The event loop's own counters differ by
// design.
var diffMetrics = []string{
	"edgelb_requests_total", "edgelb_retries_total", "edgelb_stale_responses_total",
	"edgelb_generated_errors_total", "edgelb_backend_requests_total", "edgelb_backend_errors_total",
	"edgelb_backend_responses_total", "edgelb_backend_state_changes_total", "edgelb_https_redirects_total",
}

// runDiffCase serves c with the event loop on or off and records what
// happened.
func runDiffCase(t *testing.T, c diffCase, loop bool) *diffResult {
	origins := make(map[string]*diffOrigin)
	var addrs []string
	names := make(map[string]string) // addr: origin name
	for i, spec := range c.origins {
		// Backends are ordered by address and round robin starts at the
		// second: these addresses make the origins' order the order of
		// the tries.
		ip := fmt.Sprintf("127.0.0.%d", (i+1)%len(c.origins)+1)
		o := startDiffOrigin(t, ip, spec.reply)
		origins[spec.name] = o
		addrs = append(addrs, o.addr)
		names[o.addr] = spec.name
	}
	svc := "{static: [" + strings.Join(addrs, ", ") + "], balance: round_robin"
	if c.service != "" {
		svc += ", " + c.service
	}
	routes := c.routes
	if routes == "" {
		routes = "[{service: diff}]"
	}
	logPath := filepath.Join(t.TempDir(), "access.log")
	s := startEdge(t, fmt.Sprintf("server: {event_loop: %v}\n%sservices:\n  diff: %s}\nroutes: %s\naccess_log: {path: %q, flush_interval: 10ms}\n",
		loop, c.top, svc, routes, logPath))

	before := diffSeries(t, s, names)
	r := &diffResult{heads: make(map[string][]string), health: make(map[string]string)}
	for _, st := range c.steps {
		if st.before != nil {
			st.before(origins)
		}
		r.answers = append(r.answers, diffAsk(t, s, st))
	}
	after := diffSeries(t, s, names)
	r.metrics = make(map[string]int)
	for k, v := range after {
		if d := v - before[k]; d != 0 {
			r.metrics[k] = d
		}
	}
	// Every try of a request carries the ID its answer does.
	step := make(map[string]string)
	for i, a := range r.answers {
		step[a.id] = fmt.Sprintf("(answer %d)", i+1)
	}
	for name, o := range origins {
		for _, h := range o.got() {
			id := headerValue(h, "X-Request-Id")
			if step[id] == "" {
				t.Errorf("origin %s got request ID %q, which no answer carries", name, id)
			}
			r.heads[name] = append(r.heads[name], strings.Replace(normHead(h), "X-Request-Id: "+id, "X-Request-Id: "+step[id], 1))
		}
	}
	r.log = diffLog(t, logPath, step, names, len(c.steps))
	for _, b := range s.Status().Services["diff"].Backends {
		r.health[names[b.Addr]] = b.State + " (" + durationRe.ReplaceAllString(b.Reason, "*") + ")"
	}
	return r
}

// diffSeries returns the compared series of /metrics, each backend
// named by its origin.
func diffSeries(t *testing.T, s *Server, names map[string]string) map[string]int {
	t.Helper()
	_, body := adminGet(t, s, "/metrics")
	m := make(map[string]int)
	for _, line := range strings.Split(body, "\n") {
		series, v, ok := strings.Cut(line, " ")
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		family, labels, _ := strings.Cut(series, "{")
		if !slices.Contains(diffMetrics, family) ||
			!(strings.Contains(labels, `service="diff"`) || strings.Contains(labels, `service=""`) || !strings.Contains(labels, "service=")) {
			continue
		}
		for addr, name := range names {
			series = strings.ReplaceAll(series, `backend="`+addr+`"`, `backend="`+name+`"`)
		}
		f, err := strconv.ParseFloat(v, 64)
		if err != nil {
			t.Fatalf("/metrics: %q: %v", line, err)
		}
		m[series] += int(f)
	}
	return m
}

// normHead turns a request head into lines joined by "\n", without the
// blank line that ends it.
func normHead(h string) string {
	lines := strings.Split(strings.TrimSuffix(h, "\r\n\r\n"), "\r\n")
	return strings.Join(lines, "\n")
}

var (
	ttlRe      = regexp.MustCompile(`ttl=-?\d+`)
	durationRe = regexp.MustCompile(`[0-9.]+(ns|µs|ms|s|m|h)\b`)
)

// diffAsk sends one step's request on a new connection and reads the
// answer as it came on the wire.
func diffAsk(t *testing.T, s *Server, st diffStep) diffAnswer {
	t.Helper()
	c := dialEdge(t, s)
	defer c.Close()
	if _, err := io.WriteString(c, st.raw); err != nil {
		return diffAnswer{err: err.Error()}
	}
	br := bufio.NewReader(c)
	a := diffAnswer{headers: make(map[string][]string)}
	line, err := br.ReadString('\n')
	if err != nil {
		a.err = "reading the status line: " + err.Error()
		return a
	}
	a.status = strings.TrimRight(line, "\r\n")
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			a.err = "reading the head: " + err.Error()
			return a
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			break
		}
		k, v, _ := strings.Cut(line, ":")
		k, v = strings.ToLower(k), strings.TrimSpace(v)
		switch k {
		case "date":
			continue
		case "x-request-id":
			if !generatedID(v) {
				a.err = "request ID " + strconv.Quote(v) + " is not one edgelb makes"
			}
			a.id, v = v, "*"
		case "age":
			v = "*" // seconds since the copy was stored: timing
		case "cache-status":
			v = ttlRe.ReplaceAllString(v, "ttl=*")
		case "location":
			// Each edge has a TLS port of its own.
			if _, port, err := net.SplitHostPort(s.TLSAddr()); err == nil {
				v = strings.Replace(v, ":"+port+"/", ":TLSPORT/", 1)
			}
		}
		a.headers[k] = append(a.headers[k], v)
	}
	code, _ := strconv.Atoi(strings.Fields(a.status + " 0 0")[1])
	var body []byte
	switch {
	case strings.HasPrefix(st.raw, "HEAD "), code/100 == 1, code == 204, code == 304:
	case len(a.headers["transfer-encoding"]) > 0:
		body, err = io.ReadAll(httputil.NewChunkedReader(br))
	case len(a.headers["content-length"]) > 0:
		n, _ := strconv.Atoi(a.headers["content-length"][0])
		body = make([]byte, n)
		_, err = io.ReadFull(br, body)
	default:
		body, err = io.ReadAll(br)
	}
	if err != nil {
		a.err = "reading the body: " + err.Error()
	}
	a.body = digest(body)
	if st.waitClose {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		switch n, err := br.Read(make([]byte, 1)); {
		case n > 0:
			a.closed = "open, with more bytes"
		case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed), err != nil && strings.Contains(err.Error(), "reset"):
			a.closed = "closed"
		default:
			a.closed = "open: " + err.Error()
		}
	}
	return a
}

// digest shows a body in full when short, else by length and hash.
func digest(b []byte) string {
	if len(b) <= 64 {
		return strconv.Quote(string(b))
	}
	return fmt.Sprintf("%d bytes, sha256 %x", len(b), sha256.Sum256(b))
}

// diffResults lists the differences between what the event loop (l) and
// the fasthttp path (f) did, sorted.
func diffResults(l, f *diffResult) []string {
	var out []string
	add := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }
	for i := 0; i < max(len(l.answers), len(f.answers)); i++ {
		la, fa := l.answers[i], f.answers[i]
		n := i + 1
		if la.status != fa.status {
			add("answer %d status: %q vs %q", n, la.status, fa.status)
		}
		if la.err != fa.err {
			add("answer %d error: %q vs %q", n, la.err, fa.err)
		}
		if la.body != fa.body {
			add("answer %d body: %s vs %s", n, la.body, fa.body)
		}
		if la.closed != fa.closed {
			add("answer %d connection: %q vs %q", n, la.closed, fa.closed)
		}
		for _, k := range unionKeys(la.headers, fa.headers) {
			if lv, fv := la.headers[k], fa.headers[k]; !slices.Equal(lv, fv) {
				add("answer %d header %s: %q vs %q", n, k, lv, fv)
			}
		}
	}
	for _, name := range unionKeys(l.heads, f.heads) {
		lh, fh := l.heads[name], f.heads[name]
		if len(lh) != len(fh) {
			add("origin %s asked %d times vs %d", name, len(lh), len(fh))
			continue
		}
		for i := range lh {
			if only, fonly := linesOnlyIn(lh[i], fh[i]), linesOnlyIn(fh[i], lh[i]); len(only)+len(fonly) > 0 {
				add("origin %s request %d: %q vs %q", name, i+1, only, fonly)
			}
		}
	}
	for _, name := range unionKeys(l.health, f.health) {
		if l.health[name] != f.health[name] {
			add("backend %s: %q vs %q", name, l.health[name], f.health[name])
		}
	}
	for _, k := range unionKeys(l.metrics, f.metrics) {
		if l.metrics[k] != f.metrics[k] {
			add("%s: +%d vs +%d", k, l.metrics[k], f.metrics[k])
		}
	}
	for i := 0; i < max(len(l.log), len(f.log)); i++ {
		var ll, fl string
		if i < len(l.log) {
			ll = l.log[i]
		}
		if i < len(f.log) {
			fl = f.log[i]
		}
		if ll != fl {
			add("log line %d: %s vs %s", i+1, ll, fl)
		}
	}
	sort.Strings(out)
	return out
}

// diffLog waits for the n lines of the access log at path and returns
// them in the order of their answers, as JSON with what differs by run
// masked: times, the client's port, the request ID (named by its answer,
// step) and backend addresses (by origin name, names).
func diffLog(t *testing.T, path string, step, names map[string]string, n int) []string {
	t.Helper()
	var lines []string
	waitFor(t, fmt.Sprintf("%d access log lines", n), func() bool {
		b, _ := os.ReadFile(path)
		lines = strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
		return len(b) > 0 && len(lines) >= n
	})
	out := make([]string, 0, len(lines))
	for _, l := range lines {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("access log line %q: %v", l, err)
		}
		m["time"], m["duration_ms"] = "*", "*"
		m["request_id"] = step[m["request_id"].(string)]
		if c, ok := m["client"].(string); ok {
			m["client"], _, _ = strings.Cut(c, ":")
		}
		if cs, ok := m["cache_status"].(string); ok {
			m["cache_status"] = ttlRe.ReplaceAllString(cs, "ttl=*")
		}
		for _, try := range m["tries"].([]any) {
			tr := try.(map[string]any)
			tr["start_ms"], tr["duration_ms"] = "*", "*"
			tr["backend"] = names[tr["backend"].(string)]
		}
		b, _ := json.Marshal(m)
		out = append(out, string(b))
	}
	sort.Strings(out) // "request_id":"(answer N)" sorts them by answer
	return out
}

// linesOnlyIn returns the lines of head a that head b lacks.
func linesOnlyIn(a, b string) []string {
	var only []string
	for _, l := range strings.Split(a, "\n") {
		if !slices.Contains(strings.Split(b, "\n"), l) {
			only = append(only, l)
		}
	}
	return only
}

func unionKeys[V any](a, b map[string]V) []string {
	var keys []string
	for k := range a {
		keys = append(keys, k)
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	return keys
}
