package balancer

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/valyala/fasthttp"
)

// wsOrigin is a WebSocket origin (net/http and gorilla/websocket) that
// answers each message with "NAME: message".
type wsOrigin struct {
	name string
	addr string
	ln   net.Listener
	srv  *http.Server

	mu     sync.Mutex
	conns  map[*websocket.Conn]bool
	heads  []http.Header
	closes []int // close codes received from edgelb
}

func startWSOrigin(t *testing.T, name string) *wsOrigin {
	t.Helper()
	return startWSOriginWithPage(t, name, nil)
}

// startWSOriginWithPage is startWSOrigin that serves requests other than
// WebSocket upgrades with page, when set.
func startWSOriginWithPage(t *testing.T, name string, page http.Handler) *wsOrigin {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o := &wsOrigin{name: name, addr: ln.Addr().String(), ln: ln, conns: make(map[*websocket.Conn]bool)}
	up := websocket.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}
	o.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if page != nil && !websocket.IsWebSocketUpgrade(r) {
			page.ServeHTTP(w, r)
			return
		}
		o.mu.Lock()
		o.heads = append(o.heads, r.Header.Clone())
		o.mu.Unlock()
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		o.mu.Lock()
		o.conns[c] = true
		o.mu.Unlock()
		defer func() {
			o.mu.Lock()
			delete(o.conns, c)
			o.mu.Unlock()
			c.Close()
		}()
		for {
			mt, msg, err := c.ReadMessage()
			if err != nil {
				var ce *websocket.CloseError
				if errors.As(err, &ce) {
					o.mu.Lock()
					o.closes = append(o.closes, ce.Code)
					o.mu.Unlock()
				}
				return
			}
			if err := c.WriteMessage(mt, append([]byte(o.name+": "), msg...)); err != nil {
				return
			}
		}
	})}
	go o.srv.Serve(ln)
	t.Cleanup(o.kill)
	return o
}

// kill stops the origin as kill -9 would: its port refuses connections and
// its WebSocket connections close without a close frame.
func (o *wsOrigin) kill() {
	o.srv.Close()
	o.mu.Lock()
	defer o.mu.Unlock()
	for c := range o.conns {
		c.NetConn().Close()
	}
}

func (o *wsOrigin) lastHead() http.Header {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.heads) == 0 {
		return nil
	}
	return o.heads[len(o.heads)-1]
}

func (o *wsOrigin) closeCodes() []int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]int(nil), o.closes...)
}

// wsDial opens a WebSocket connection to path through s.
func wsDial(t *testing.T, s *Server, path string) (*websocket.Conn, *http.Response, error) {
	t.Helper()
	d := websocket.Dialer{HandshakeTimeout: 10 * time.Second}
	c, resp, err := d.Dial("ws://"+s.Addr()+path, http.Header{"X-App": {"kept"}})
	if c != nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, resp, err
}

// echo sends msg on c and returns the answer.
func echo(t *testing.T, c *websocket.Conn, msg string) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if err := c.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
		t.Fatalf("write %q: %v", msg, err)
	}
	_, got, err := c.ReadMessage()
	if err != nil {
		t.Fatalf("read the echo of %q: %v", msg, err)
	}
	return string(got)
}

func statusOfEdge(t *testing.T, s *Server) *Status {
	t.Helper()
	_, body := adminGet(t, s, "/status")
	var st Status
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatalf("/status: %v\n%s", err, body)
	}
	return &st
}

func wsEdge(t *testing.T, engine, service string, os ...*wsOrigin) *Server {
	addrs := make([]string, len(os))
	for i, o := range os {
		addrs[i] = o.addr
	}
	return startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+strings.Join(addrs, ", ")+"]"+service+"}\nroutes: [{service: web}]\n")
}

// A WebSocket client talks to its origin through edgelb, on either engine:
// the origin gets the upgrade with the forwarding headers, messages of any
// size go both ways, and /status and /metrics count the tunnel while it is
// open.
func TestWebSocketEcho(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startWSOrigin(t, "a")
		s := wsEdge(t, engine, "", o)
		handoffs := loopHandoffs.Get()
		c, resp, err := wsDial(t, s, "/chat?room=1")
		if err != nil {
			t.Fatalf("dial: %v (%v)", err, resp)
		}
		if resp.StatusCode != 101 || !strings.EqualFold(resp.Header.Get("Connection"), "upgrade") || resp.Header.Get("Upgrade") != "websocket" {
			t.Fatalf("handshake answer: %d %v", resp.StatusCode, resp.Header)
		}
		for _, m := range []string{"hello", "", strings.Repeat("x", 1<<20)} {
			if got := echo(t, c, m); got != "a: "+m {
				t.Fatalf("echo of a %d-byte message: got %d bytes", len(m), len(got))
			}
		}
		c.WriteMessage(websocket.BinaryMessage, []byte{0, 1, 2})
		if mt, got, err := c.ReadMessage(); err != nil || mt != websocket.BinaryMessage || string(got) != "a: \x00\x01\x02" {
			t.Fatalf("binary echo: %d %q %v", mt, got, err)
		}
		h := o.lastHead()
		if h.Get("X-Forwarded-For") != "127.0.0.1" || h.Get("X-Forwarded-Proto") != "http" || h.Get("Forwarded") == "" ||
			h.Get("X-App") != "kept" || h.Get("Connection") != "Upgrade" || h.Get("Upgrade") != "websocket" || h.Get("Sec-Websocket-Key") == "" {
			t.Fatalf("origin got: %v", h)
		}
		if eventLoopSupported && strings.Contains(engine, "true") && loopHandoffs.Get() == handoffs {
			t.Fatal("the event loop did not hand the upgrade to the fasthttp server")
		}
		st := statusOfEdge(t, s)
		if web := st.Services["web"]; web.Tunnels != 1 || web.Backends[0].Tunnels != 1 {
			t.Fatalf("/status tunnels: %+v", web)
		}
		if n := metricValue(t, s, `edgelb_tunnels_open{service="web"}`); n != 1 {
			t.Fatalf("edgelb_tunnels_open: %d", n)
		}
		if n := metricValue(t, s, `edgelb_tunnel_bytes_total{service="web",direction="to_backend"}`); n < 1<<20 {
			t.Fatalf("bytes to the backend: %d", n)
		}
		c.Close()
		waitFor(t, "closed", func() bool { return metricValue(t, s, `edgelb_tunnels_open{service="web"}`) == 0 })
		if n := metricValue(t, s, `edgelb_tunnels_closed_total{service="web",reason="client"}`); n != 1 {
			t.Fatalf("closes by the client: %d", n)
		}
		if n := metricValue(t, s, `edgelb_tunnels_total{service="web",result="opened"}`); n != 1 {
			t.Fatalf("tunnels opened: %d", n)
		}
		if st := statusOfEdge(t, s); st.Services["web"].Tunnels != 0 || st.Services["web"].Backends[0].Tunnels != 0 {
			t.Fatalf("/status after the close: %+v", st.Services["web"])
		}
		assertAllHealthy(t, s)
	})
}

// A backend killed mid-tunnel: the client sees its connection end, and the
// next connections go to the healthy backend without a 502.
func TestWebSocketBackendKilledMidTunnel(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		a, b := startWSOrigin(t, "a"), startWSOrigin(t, "b")
		s := wsEdge(t, engine, "", a, b)
		c, _, err := wsDial(t, s, "/")
		if err != nil {
			t.Fatal(err)
		}
		first, live := a, b
		if strings.HasPrefix(echo(t, c, "hi"), "b:") {
			first, live = b, a
		}
		first.kill()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, _, err := c.ReadMessage(); err == nil || errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("the client did not see its backend go: %v", err)
		} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatalf("the client did not see its backend go within 10 s")
		}
		for i := range 6 {
			c, resp, err := wsDial(t, s, "/")
			if err != nil {
				t.Fatalf("connection %d after the kill: %v %v", i, err, resp)
			}
			if got := echo(t, c, "again"); got != live.name+": again" {
				t.Fatalf("connection %d: %q", i, got)
			}
			c.Close()
		}
		// The tunnel is half-closed until the client closes too.
		c.Close()
		waitFor(t, "closed", func() bool { return metricValue(t, s, `edgelb_tunnels_open{service="web"}`) == 0 })
		if n := metricValue(t, s, `edgelb_tunnels_closed_total{service="web",reason="backend"}`); n != 1 {
			t.Fatalf("closes by the backend: %d", n)
		}
	})
}

// An upgrade try that cannot connect counts as any failed try and goes to
// the next backend: the client never sees it.
func TestWebSocketRetriesDeadBackend(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startWSOrigin(t, "a")
		dead := deadAddr(t)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+", "+dead+"]}\nroutes: [{service: web}]\n")
		// Selection is random: dial until a first try went to the dead
		// backend.
		for i := 0; metricValue(t, s, `edgelb_retries_total{service="web"}`) == 0; i++ {
			if i == 100 {
				t.Fatal("100 upgrades and not one tried the dead backend")
			}
			c, resp, err := wsDial(t, s, "/")
			if err != nil {
				t.Fatalf("dial %d: %v %v", i, err, resp)
			}
			if got := echo(t, c, "x"); got != "a: x" {
				t.Fatalf("echo: %q", got)
			}
			c.Close()
		}
		if n := metricValue(t, s, `edgelb_backend_errors_total{service="web",backend="`+dead+`",cause="upstream_connect_failed"}`); n != 1 {
			t.Fatalf("connect failures of the dead backend: %d", n)
		}
	})
}

// An upgrade try that times out (the backend takes the request and never
// answers) counts as a timeout and goes to the next backend.
func TestWebSocketRetriesHungBackend(t *testing.T) {
	o := startWSOrigin(t, "a")
	hung := serveRaw(t, func(c net.Conn) { io.Copy(io.Discard, c) })
	s := startEdge(t, "services:\n  web: {static: ["+o.addr+", "+hung+"], try_timeout: 300ms}\nroutes: [{service: web}]\n")
	for i := 0; metricValue(t, s, `edgelb_retries_total{service="web"}`) == 0; i++ {
		if i == 100 {
			t.Fatal("100 upgrades and not one tried the hung backend")
		}
		c, resp, err := wsDial(t, s, "/")
		if err != nil {
			t.Fatalf("dial %d: %v %v", i, err, resp)
		}
		if got := echo(t, c, "x"); got != "a: x" {
			t.Fatalf("echo: %q", got)
		}
		c.Close()
	}
	if n := metricValue(t, s, `edgelb_backend_errors_total{service="web",backend="`+hung+`",cause="upstream_timeout"}`); n != 1 {
		t.Fatalf("timeouts of the hung backend: %d", n)
	}
}

// A backend that answers an upgrade with anything but 101: the client gets
// that answer, counted like any, and its connection stays usable.
func TestWebSocketUpgradeDeclined(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		for _, code := range []int{400, 404, 426} {
			o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
				ctx.Error("nope", code)
				ctx.Response.Header.Set("X-Why", "no websocket here")
			})
			s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
			_, resp, err := wsDial(t, s, "/")
			if !errors.Is(err, websocket.ErrBadHandshake) || resp == nil || resp.StatusCode != code || resp.Header.Get("X-Why") != "no websocket here" {
				t.Fatalf("%d: %v %v", code, err, resp)
			}
			if b, _ := io.ReadAll(resp.Body); string(b) != "nope" {
				t.Fatalf("%d: body %q", code, b)
			}
			c := dialEdge(t, s)
			br := bufio.NewReader(c)
			for range 2 {
				io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
				var r fasthttp.Response
				if err := r.Read(br); err != nil || r.StatusCode() != code {
					t.Fatalf("%d on a kept-alive connection: %v %d", code, err, r.StatusCode())
				}
			}
			c.Close()
			if n := metricValue(t, s, `edgelb_tunnels_total{service="web",result="declined"}`); n != 3 {
				t.Fatalf("declined upgrades: %d", n)
			}
			if n := metricValue(t, s, `edgelb_backend_responses_total{service="web",backend="`+o.addr+`",class="4xx"}`); n != 3 {
				t.Fatalf("4xx answers counted: %d", n)
			}
			assertAllHealthy(t, s)
		}
	})
}

// Over websocket.max_tunnels an upgrade gets 503 overloaded with
// Retry-After, counted; a tunnel that closes frees its slot.
func TestWebSocketTunnelCap(t *testing.T) {
	o := startWSOrigin(t, "a")
	s := startEdge(t, "services:\n  web: {static: ["+o.addr+"], websocket: {max_tunnels: 2}}\nroutes: [{service: web}]\n")
	c1, _, err := wsDial(t, s, "/")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := wsDial(t, s, "/"); err != nil {
		t.Fatal(err)
	}
	_, resp, err := wsDial(t, s, "/")
	if !errors.Is(err, websocket.ErrBadHandshake) || resp.StatusCode != 503 || resp.Header.Get(HeaderError) != "overloaded" || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("third tunnel: %v %+v", err, resp)
	}
	if n := metricValue(t, s, `edgelb_tunnels_total{service="web",result="overloaded"}`); n != 1 {
		t.Fatalf("overloaded upgrades: %d", n)
	}
	if n := metricValue(t, s, `edgelb_generated_errors_total{service="web",code="overloaded"}`); n != 1 {
		t.Fatalf("generated overloaded: %d", n)
	}
	c1.Close()
	waitFor(t, "a slot free", func() bool { return metricValue(t, s, `edgelb_tunnels_open{service="web"}`) == 1 })
	c3, _, err := wsDial(t, s, "/")
	if err != nil {
		t.Fatalf("after a close: %v", err)
	}
	if got := echo(t, c3, "in"); got != "a: in" {
		t.Fatal(got)
	}
	assertAllHealthy(t, s)
}

// A tunnel through which nothing goes for websocket.idle_timeout closes;
// one in use stays.
func TestWebSocketIdleTimeout(t *testing.T) {
	o := startWSOrigin(t, "a")
	s := startEdge(t, "services:\n  web: {static: ["+o.addr+"], websocket: {idle_timeout: 1s}}\nroutes: [{service: web}]\n")
	busy, _, err := wsDial(t, s, "/")
	if err != nil {
		t.Fatal(err)
	}
	idle, _, err := wsDial(t, s, "/")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for time.Since(start) < 2500*time.Millisecond {
		echo(t, busy, "ping")
		time.Sleep(100 * time.Millisecond)
	}
	idle.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, _, err := idle.ReadMessage(); err == nil {
		t.Fatal("the idle tunnel is still open")
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("the idle tunnel did not close")
	}
	if got := echo(t, busy, "still"); got != "a: still" {
		t.Fatal(got)
	}
	if n := metricValue(t, s, `edgelb_tunnels_closed_total{service="web",reason="idle_timeout"}`); n != 1 {
		t.Fatalf("idle closes: %d", n)
	}
}

// websocket: false on a route, or on a service, sends upgrade requests
// upstream as plain requests, without Upgrade: the WebSocket origin
// refuses them, and the client gets its answer. A route's key wins over
// its service's.
func TestWebSocketOff(t *testing.T) {
	o := startWSOrigin(t, "a")
	f := func(service, route string, want bool) {
		t.Helper()
		s := startEdge(t, "services:\n  web: {static: ["+o.addr+"]"+service+"}\nroutes: [{service: web"+route+"}]\n")
		c, resp, err := wsDial(t, s, "/")
		if want {
			if err != nil {
				t.Fatalf("service %q route %q: %v", service, route, err)
			}
			c.Close()
			return
		}
		if !errors.Is(err, websocket.ErrBadHandshake) || resp.StatusCode != 400 {
			t.Fatalf("service %q route %q: %v %v", service, route, err, resp)
		}
		if h := o.lastHead(); h.Get("Upgrade") != "" || h.Get("Connection") != "" {
			t.Fatalf("service %q route %q: the origin got %v", service, route, h)
		}
	}
	f("", ", websocket: false", false)
	f(", websocket: false", "", false)
	f(", websocket: {enabled: false}", "", false)
	f(", websocket: false", ", websocket: true", true)
	f(", websocket: {enabled: true}", "", true)
}

// Shutting down sends WebSocket close frames with 1001 going away to both
// sides, and returns once the tunnels closed.
func TestWebSocketShutdownSendsGoingAway(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startWSOrigin(t, "a")
		s := wsEdge(t, engine, "", o)
		c, _, err := wsDial(t, s, "/")
		if err != nil {
			t.Fatal(err)
		}
		echo(t, c, "before")
		done := make(chan error, 1)
		start := time.Now()
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			done <- s.Shutdown(ctx)
		}()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, _, err = c.ReadMessage()
		var ce *websocket.CloseError
		if !errors.As(err, &ce) || ce.Code != websocket.CloseGoingAway {
			t.Fatalf("the client got %v, want a close frame with 1001", err)
		}
		if err := <-done; err != nil {
			t.Fatalf("shutdown: %v", err)
		}
		if d := time.Since(start); d > 15*time.Second {
			t.Fatalf("shutdown waited %s: the tunnel should close once both sides have the close frame", d)
		}
		waitFor(t, "the origin has its close frame", func() bool {
			cs := o.closeCodes()
			return len(cs) == 1 && cs[0] == websocket.CloseGoingAway
		})
	})
}

// A tunnel that is not WebSocket gets no close frame: it is cut at the end
// of the drain.
func TestNonWebSocketTunnelCutAtDrainEnd(t *testing.T) {
	o := startRecOrigin(t, func(c net.Conn, head string) {
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: chat\r\n\r\n")
		io.Copy(c, c)
	})
	s := startEdge(t, "services:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
	c := dialEdge(t, s)
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: chat\r\n\r\nabc")
	br := bufio.NewReader(c)
	var r fasthttp.Response
	if err := r.Read(br); err != nil || r.StatusCode() != 101 {
		t.Fatalf("%v %d", err, r.StatusCode())
	}
	got := make([]byte, 3)
	if _, err := io.ReadFull(br, got); err != nil || string(got) != "abc" {
		t.Fatalf("%q %v", got, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	s.Shutdown(ctx)
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Fatalf("after the drain: %q %v", rest, err)
	}
}

// rawUpgrade sends raw to s, reads the answer's head and returns it with
// the reader, for what follows it.
func rawUpgrade(t *testing.T, s *Server, raw string) (*fasthttp.Response, *bufio.Reader, net.Conn) {
	t.Helper()
	c := dialEdge(t, s)
	t.Cleanup(func() { c.Close() })
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp := &fasthttp.Response{}
	resp.SkipBody = strings.HasPrefix(raw, "HEAD")
	if err := resp.Header.Read(br); err != nil {
		t.Fatalf("%q: %v", raw, err)
	}
	if resp.StatusCode() != 101 {
		if err := resp.ReadBody(br, 0); err != nil {
			t.Fatalf("%q: body: %v", raw, err)
		}
	}
	return resp, br, c
}

// Bytes a client sends right after its upgrade request reach the backend
// only after the client has the 101.
func TestUpgradeBytesBeforeSwitchWait(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		early := make(chan string, 1)
		o := startRecOrigin(t, func(c net.Conn, head string) {
			// Anything read now came before the 101.
			c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			b := make([]byte, 64)
			n, _ := c.Read(b)
			early <- string(b[:n])
			c.SetReadDeadline(time.Time{})
			io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: chat\r\n\r\n")
			io.Copy(c, c)
		})
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
		resp, br, _ := rawUpgrade(t, s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: chat\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
		if resp.StatusCode() != 101 {
			t.Fatalf("status %d", resp.StatusCode())
		}
		if e := <-early; e != "" {
			t.Fatalf("the backend got %q before the client had the 101", e)
		}
		want := "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
		got := make([]byte, len(want))
		if _, err := io.ReadFull(br, got); err != nil || string(got) != want {
			t.Fatalf("echo after the 101: %q %v", got, err)
		}
	})
}

// What a client sends that is not an upgrade edgelb tunnels goes upstream
// as a plain request, without Upgrade, and an answer of 101 to it is the
// backend breaking the exchange (502): h2c (never tunnelled, as Envoy
// does), an upgrade with a body, Connection: upgrade without Upgrade,
// Upgrade without Connection: upgrade, two Upgrade headers, HTTP/1.0.
func TestUpgradesNotTunnelled(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		f := func(raw string) {
			t.Helper()
			plain := startRecOrigin(t, echoPath)
			s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+plain.addr+"], stale: {disabled: true}}\nroutes: [{service: web}]\n")
			resp, _, _ := rawUpgrade(t, s, raw)
			if resp.StatusCode() != 200 || string(resp.Body()) != "/u" {
				t.Fatalf("%q: %d %q", raw, resp.StatusCode(), resp.Body())
			}
			heads := plain.got()
			if len(heads) != 1 {
				t.Fatalf("%q: the origin got %q", raw, heads)
			}
			for _, h := range []string{"Upgrade", "Connection", "HTTP2-Settings"} {
				if v := headerValue(heads[0], h); v != "" {
					t.Fatalf("%q: the origin got %s: %s:\n%s", raw, h, v, heads[0])
				}
			}
			sw := startRecOrigin(t, func(c net.Conn, head string) {
				io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
			})
			s = startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+sw.addr+"], stale: {disabled: true}, retries: 0}\nroutes: [{service: web}]\n")
			resp, _, _ = rawUpgrade(t, s, raw)
			if resp.StatusCode() != 502 || string(resp.Header.Peek(HeaderError)) != "upstream_invalid_response" {
				t.Fatalf("%q answered 101: %d %q", raw, resp.StatusCode(), resp.Header.Peek(HeaderError))
			}
		}
		f("GET /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
		f("GET /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
		f("POST /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello")
		f("POST /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
		f("GET /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\r\n")
		f("GET /u HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
		f("GET /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nUpgrade: chat\r\n\r\n")
		f("GET /u HTTP/1.1\r\nHost: x\r\nConnection: close, Upgrade\r\nUpgrade: websocket\r\n\r\n")
		f("GET /u HTTP/1.0\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
	})
}

// A 101 to a protocol the client did not offer is an invalid response,
// counted against the backend, and never tunnelled.
func TestUpgradeToAnotherProtocolIsInvalid(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		for _, answer := range []string{"Upgrade: h2c\r\n", "Upgrade: websocket, chat\r\n", ""} {
			o := startRecOrigin(t, func(c net.Conn, head string) {
				io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"+answer+"\r\nRAW")
			})
			s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"], retries: 0}\nroutes: [{service: web}]\n")
			resp, _, _ := rawUpgrade(t, s, "GET /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
			if resp.StatusCode() != 502 || string(resp.Header.Peek(HeaderError)) != "upstream_invalid_response" {
				t.Fatalf("101 with %q: %d %q", answer, resp.StatusCode(), resp.Header.Peek(HeaderError))
			}
			if n := metricValue(t, s, `edgelb_backend_errors_total{service="web",backend="`+o.addr+`",cause="upstream_invalid_response"}`); n != 1 {
				t.Fatalf("101 with %q: invalid responses counted: %d", answer, n)
			}
		}
	})
}

// A half-close goes through: the client's end of stream reaches the
// backend, which can still answer.
func TestTunnelHalfClose(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, func(c net.Conn, head string) {
			io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: chat\r\n\r\nearly:")
			got, _ := io.ReadAll(c)
			fmt.Fprintf(c, "got %q, bye", got)
			c.(*net.TCPConn).CloseWrite()
			io.Copy(io.Discard, c)
		})
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
		resp, br, c := rawUpgrade(t, s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: chat\r\n\r\nping")
		if resp.StatusCode() != 101 || string(resp.Header.Peek("Upgrade")) != "chat" {
			t.Fatalf("%d %q", resp.StatusCode(), resp.Header.Peek("Upgrade"))
		}
		c.(*net.TCPConn).CloseWrite()
		rest, err := io.ReadAll(br)
		if err != nil || string(rest) != `early:got "ping", bye` {
			t.Fatalf("%q %v", rest, err)
		}
		waitFor(t, "closed", func() bool { return metricValue(t, s, `edgelb_tunnels_open{service="web"}`) == 0 })
		if n := metricValue(t, s, `edgelb_tunnels_closed_total{service="web",reason="client"}`); n != 1 {
			t.Fatalf("closes: %d", n)
		}
	})
}

// A backend that closes its tunnel ends it, and is counted so, even when
// the client then resets its connection rather than closing it, as
// browsers do once their WebSocket ended.
func TestTunnelClosedByBackendThenResetByClient(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, func(c net.Conn, head string) {
			io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: chat\r\n\r\nbye")
			c.Close()
		})
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
		resp, br, c := rawUpgrade(t, s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: chat\r\n\r\n")
		if resp.StatusCode() != 101 {
			t.Fatalf("%d", resp.StatusCode())
		}
		if rest, err := io.ReadAll(br); err != nil || string(rest) != "bye" {
			t.Fatalf("%q %v", rest, err)
		}
		c.(*net.TCPConn).SetLinger(0) // Close sends a reset
		c.Close()
		waitFor(t, "closed", func() bool { return metricValue(t, s, `edgelb_tunnels_open{service="web"}`) == 0 })
		if n := metricValue(t, s, `edgelb_tunnels_closed_total{service="web",reason="backend"}`); n != 1 {
			t.Fatalf("closes by the backend: %d, by the client: %d", n, metricValue(t, s, `edgelb_tunnels_closed_total{service="web",reason="client"}`))
		}
	})
}

// A backend that leaves the service keeps its tunnels.
func TestTunnelOutlivesItsBackendsRemoval(t *testing.T) {
	a, b := startWSOrigin(t, "a"), startWSOrigin(t, "b")
	s := startEdge(t, "services:\n  web: {static: ["+a.addr+"]}\nroutes: [{service: web}]\n")
	c, _, err := wsDial(t, s, "/")
	if err != nil {
		t.Fatal(err)
	}
	cfg := mustConfig(t, "listen: "+s.cfg.Listen+"\nadmin: "+s.cfg.Admin+"\nstate_dir: "+s.cfg.StateDir+"\nservices:\n  web: {static: ["+b.addr+"]}\nroutes: [{service: web}]\n")
	if err := s.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	if got := echo(t, c, "still"); got != "a: still" {
		t.Fatal(got)
	}
	if st := statusOfEdge(t, s); st.Services["web"].Tunnels != 1 {
		t.Fatalf("/status: %+v", st.Services["web"])
	}
	c2, _, err := wsDial(t, s, "/")
	if err != nil {
		t.Fatal(err)
	}
	if got := echo(t, c2, "new"); got != "b: new" {
		t.Fatal(got)
	}
}

// A client that closed its side of a tunnel whose backend never closes
// its own does not hold the tunnel open for the idle timeout (an hour by
// default): once nothing more comes for websocket.half_closed_timeout, the
// tunnel ends, counted as closed by the client.
func TestTunnelHalfClosedTimeout(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startRecOrigin(t, func(c net.Conn, head string) {
			io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: chat\r\n\r\n")
			// Reads to the end, then keeps its side open and quiet.
			io.Copy(io.Discard, c)
			time.Sleep(10 * time.Second)
		})
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+o.addr+"], websocket: {half_closed_timeout: 300ms}}\nroutes: [{service: web}]\n")
		resp, _, c := rawUpgrade(t, s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: chat\r\n\r\n")
		if resp.StatusCode() != 101 {
			t.Fatalf("%d", resp.StatusCode())
		}
		start := time.Now()
		c.Close()
		waitFor(t, "closed", func() bool { return metricValue(t, s, `edgelb_tunnels_open{service="web"}`) == 0 })
		if took := time.Since(start); took > 3*time.Second {
			t.Fatalf("the tunnel ended %v after the client closed; half_closed_timeout is 300ms", took)
		}
		if n := metricValue(t, s, `edgelb_tunnels_closed_total{service="web",reason="client"}`); n != 1 {
			t.Fatalf("closes by the client: %d", n)
		}
	})
}
