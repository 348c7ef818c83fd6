package balancer

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/fleet"
	"github.com/edgelb/edgelb/discovery/consultest"
)

// peerSecret is the fleet's shared secret in these tests.
var peerSecret = strings.Repeat("p", 24)

// peerFillOrigin starts an origin whose answers may be stored: "copy of
// PATH", and on /v a greeting that varies with Accept-Language.
func peerFillOrigin(t *testing.T) *origin {
	return startOrigin(t, "o", func(ctx *fasthttp.RequestCtx) {
		ctx.Response.Header.Set("Cache-Control", "public, max-age=1")
		if string(ctx.Path()) == "/v" {
			ctx.Response.Header.Set("Vary", "Accept-Language")
			switch string(ctx.Request.Header.Peek("Accept-Language")) {
			case "fr":
				ctx.WriteString("Bonjour")
			case "de":
				ctx.WriteString("Hallo")
			default:
				ctx.WriteString("Hello")
			}
			return
		}
		fmt.Fprintf(ctx, "copy of %s", ctx.Path())
	})
}

// peerFillExtra is the consul block's registration and peer fill with
// secret and timeout.
func peerFillExtra(secret string, timeout time.Duration) string {
	if secret == "" {
		return fmt.Sprintf(", register: {check_interval: 1s, drain_delay: 0s}, peer_fill: {timeout: %s}", timeout)
	}
	return fmt.Sprintf(", register: {check_interval: 1s, drain_delay: 0s}, peer_fill: {secret: %s, timeout: %s}", secret, timeout)
}

// waitPeerFill waits until s lists a ready peer that answers peer fills
// at the admin address of each of want.
func waitPeerFill(t *testing.T, s *Server, want ...string) {
	t.Helper()
	eventually(t, 20*time.Second, "ready peers answering peer fills", func() string {
		have := map[string]bool{}
		for _, p := range s.Peers() {
			if p.Ready {
				have[p.PeerFill] = true
			}
		}
		for _, w := range want {
			if !have[w] {
				return fmt.Sprintf("%v lacks %s", s.Peers(), w)
			}
		}
		return ""
	})
}

// fills returns s's fill and peer request counts as "fills hit=N ...;
// requests hit=N ...", the results that are not 0 only.
func fills(s *Server) string {
	st := s.fill.status()
	var f, r []string
	for _, n := range fillResultNames {
		if v := st.Fills[n]; v > 0 {
			f = append(f, fmt.Sprintf("%s=%d", n, v))
		}
	}
	for _, n := range copyResultNames {
		if v := st.Requests[n]; v > 0 {
			r = append(r, fmt.Sprintf("%s=%d", n, v))
		}
	}
	return "fills " + strings.Join(f, " ") + "; requests " + strings.Join(r, " ")
}

// TestFleetPeerFill: every origin is gone, instance A has stored copies,
// and D, started during the outage with an empty state_dir, serves them
// from A, with either engine: the first answer says it came from a peer
// and has the Age A would give, the next comes from D's own store. Each
// Vary variant goes to the request it answers, HEAD gets the GET's copy,
// and a URL that A has no copy of gets D's error. A is asked and never
// asks anyone itself.
func TestFleetPeerFill(t *testing.T) {
	a := consultest.Start(t)
	o := peerFillOrigin(t)
	// e answers, and then fails with 500 to every instance.
	e := peerFillOrigin(t)
	rest := fmt.Sprintf("services:\n  web: {static: [%s], health: {passive: {consecutive_gateway_failures: 1}}}\n  err: {static: [%s], health: {passive: {consecutive_5xx: 100}}}\n"+
		"routes: [{service: web}, {path: /e, service: err}]\n", o.addr, e.addr)
	extra := peerFillExtra(peerSecret, 5*time.Second)
	A := fleetEdge(t, a, t.TempDir(), extra, rest)
	for _, p := range []struct{ path, lang string }{{"/a", ""}, {"/b", ""}, {"/v", "fr"}, {"/v", "de"}, {"/e/1", ""}} {
		if resp := do(t, A, "GET", "shop.example", p.path, "Accept-Language", p.lang); resp.StatusCode() != 200 {
			t.Fatalf("priming %s on A: %d", p.path, resp.StatusCode())
		}
	}
	o.stop()
	broken := func(ctx *fasthttp.RequestCtx) {
		ctx.SetStatusCode(500)
		ctx.WriteString("broken")
	}
	e.reply.Store(&broken)
	if got := staleState(t, A, "/a"); got != "stale" {
		t.Fatalf("A during the outage: %s", got)
	}

	bothEngines(t, func(t *testing.T, engine string) {
		D := fleetEdge(t, a, t.TempDir(), extra, "server: {"+engine+"}\n"+rest)
		waitPeerFill(t, D, A.AdminAddr())
		aBefore := A.fill.status()
		handoffs := loopHandoffs.Get()

		get := func(method, path string, hdr ...string) *fasthttp.Response {
			t.Helper()
			return do(t, D, method, "shop.example", path, hdr...)
		}
		resp := get("GET", "/a")
		cs := string(resp.Header.Peek("Cache-Status"))
		if resp.StatusCode() != 200 || string(resp.Body()) != "copy of /a" || !strings.Contains(cs, "; detail=peer/") {
			t.Fatalf("D, GET /a from A: %d %q Cache-Status %q %s", resp.StatusCode(), resp.Body(), cs, resp.Header.Peek(HeaderError))
		}
		aResp := do(t, A, "GET", "shop.example", "/a")
		dAge, _ := strconv.Atoi(string(resp.Header.Peek("Age")))
		aAge, _ := strconv.Atoi(string(aResp.Header.Peek("Age")))
		if len(resp.Header.Peek("Age")) == 0 || aAge-dAge > 1 || dAge > aAge {
			t.Errorf("Age on D %q, on A a moment later %q: want A's", resp.Header.Peek("Age"), aResp.Header.Peek("Age"))
		}
		t.Logf("from a peer: Cache-Status %q, Age %d", cs, dAge)
		// Stored on D: the next answer is D's own.
		resp = get("GET", "/a")
		if cs := string(resp.Header.Peek("Cache-Status")); resp.StatusCode() != 200 || strings.Contains(cs, "peer") || !strings.Contains(cs, "detail=") {
			t.Fatalf("D, GET /a again: %d Cache-Status %q", resp.StatusCode(), cs)
		}
		if got := fills(D); got != "fills hit=1; requests " {
			t.Fatalf("D after two GET /a: %s", got)
		}

		// HEAD gets the GET's copy: its length, no body; a GET then finds
		// the body in D's store.
		resp = get("HEAD", "/b")
		if resp.StatusCode() != 200 || resp.Header.ContentLength() != len("copy of /b") || len(resp.Body()) != 0 ||
			!strings.Contains(string(resp.Header.Peek("Cache-Status")), "detail=peer/") {
			t.Fatalf("D, HEAD /b: %d length %d body %q Cache-Status %q", resp.StatusCode(), resp.Header.ContentLength(), resp.Body(), resp.Header.Peek("Cache-Status"))
		}
		if resp = get("GET", "/b"); string(resp.Body()) != "copy of /b" || strings.Contains(string(resp.Header.Peek("Cache-Status")), "peer") {
			t.Fatalf("D, GET /b after HEAD: %q Cache-Status %q", resp.Body(), resp.Header.Peek("Cache-Status"))
		}

		// Vary: each variant for its own request; none for a language
		// A never stored.
		for _, v := range []struct{ lang, want string }{{"fr", "Bonjour"}, {"de", "Hallo"}, {"fr", "Bonjour"}} {
			resp = get("GET", "/v", "Accept-Language", v.lang)
			if resp.StatusCode() != 200 || string(resp.Body()) != v.want {
				t.Fatalf("D, GET /v in %s: %d %q", v.lang, resp.StatusCode(), resp.Body())
			}
		}
		if resp = get("GET", "/v", "Accept-Language", "en"); resp.StatusCode() != 503 || string(resp.Header.Peek(HeaderError)) != "no_healthy_backend" {
			t.Fatalf("D, GET /v in en (no copy anywhere): %d %q %s", resp.StatusCode(), resp.Body(), resp.Header.Peek(HeaderError))
		}
		if resp = get("GET", "/never"); resp.StatusCode() != 503 {
			t.Fatalf("D, GET /never: %d", resp.StatusCode())
		}
		// A backend's 500, which the service serves stale on: a peer's
		// copy if there is one, else the 500 as the backend sent it.
		resp = get("GET", "/e/1")
		if cs := string(resp.Header.Peek("Cache-Status")); resp.StatusCode() != 200 || string(resp.Body()) != "copy of /e/1" ||
			!strings.Contains(cs, "detail=peer/upstream_status_500") {
			t.Fatalf("D, GET /e/1 answered 500 by its backend: %d %q Cache-Status %q", resp.StatusCode(), resp.Body(), cs)
		}
		if resp = get("GET", "/e/2"); resp.StatusCode() != 500 || string(resp.Body()) != "broken" {
			t.Fatalf("D, GET /e/2 (no copy anywhere) answered 500 by its backend: %d %q", resp.StatusCode(), resp.Body())
		}
		if got := fills(D); got != "fills hit=5 miss=3; requests " {
			t.Errorf("D: %s", got)
		}
		// The event loop handed each request that needed a fill to the
		// fasthttp path, and served the others itself.
		want := uint64(0)
		if engine == "event_loop: true" {
			want = 8
		}
		if got := loopHandoffs.Get() - handoffs; got != want {
			t.Errorf("%s: %d connections handed over, want %d", engine, got, want)
		}
		// A answered D eight times (five copies, three misses) and asked
		// nobody: a fill is one hop.
		aAfter := A.fill.status()
		if aAfter.Requests["hit"]-aBefore.Requests["hit"] != 5 || aAfter.Requests["miss"]-aBefore.Requests["miss"] != 3 {
			t.Errorf("A answered D: before %v, after %v", aBefore.Requests, aAfter.Requests)
		}
		for _, n := range fillResultNames {
			if aAfter.Fills[n] != 0 {
				t.Errorf("A asked its peers (%s): %v", n, aAfter.Fills)
			}
		}
		if st := D.Status().Fleet.PeerFill; !st.Enabled || st.Advertised != D.AdminAddr() {
			t.Errorf("D's /status fleet.peer_fill: %+v", st)
		}
	})
	_, m := adminGet(t, A, "/metrics")
	for _, want := range []string{`edgelb_peer_fills_total{result="hit"}`, `edgelb_peer_fill_requests_total{result="miss"}`} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// TestFleetPeerFillRefused: peers with another secret, or none, get 401
// and no copy; the instance that asked answers with its own error and
// counts the refusal.
func TestFleetPeerFillRefused(t *testing.T) {
	a := consultest.Start(t)
	o := peerFillOrigin(t)
	rest := fmt.Sprintf("services:\n  web: {static: [%s], health: {passive: {consecutive_gateway_failures: 1}}}\nroutes: [{service: web}]\n", o.addr)
	A := fleetEdge(t, a, t.TempDir(), peerFillExtra(peerSecret, 5*time.Second), rest)
	do(t, A, "GET", "shop.example", "/a")
	o.stop()
	W := fleetEdge(t, a, t.TempDir(), peerFillExtra(strings.Repeat("w", 24), 5*time.Second), rest)
	waitPeerFill(t, W, A.AdminAddr())
	resp := do(t, W, "GET", "shop.example", "/a")
	if resp.StatusCode() != 503 || len(resp.Header.Peek("Cache-Status")) != 0 {
		t.Fatalf("W with the wrong secret: %d %q Cache-Status %q", resp.StatusCode(), resp.Body(), resp.Header.Peek("Cache-Status"))
	}
	if got := fills(W); got != "fills refused=1; requests " {
		t.Errorf("W: %s", got)
	}

	// By hand: no secret, a wrong one, no marker.
	post := func(auth, marker string) (int, string) {
		req, _ := http.NewRequest("POST", "http://"+A.AdminAddr()+peerCopyPath+"?scheme=http", strings.NewReader("GET /a HTTP/1.1\r\nHost: shop.example\r\n\r\n"))
		if auth != "" {
			req.Header.Set("Authorization", "Bearer "+auth)
		}
		if marker != "" {
			req.Header.Set(HeaderPeerFill, marker)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, c := range []struct {
		auth, marker string
		code         int
		body         string
	}{
		{"", "x", 401, "missing secret"},
		{strings.Repeat("w", 24), "x", 401, "wrong secret"},
		{peerSecret, "", 400, "not a peer request"},
		{peerSecret, "x", 200, ""},
	} {
		if code, body := post(c.auth, c.marker); code != c.code || !strings.Contains(body, c.body) {
			t.Errorf("auth %q marker %q: %d %q, want %d %q", c.auth, c.marker, code, body, c.code, c.body)
		}
	}
	if st := A.fill.status(); st.Requests["refused"] != 3 || st.Requests["hit"] != 1 {
		t.Errorf("A's peer requests: %v, want 3 refused (W, then two by hand), 1 hit", st.Requests)
	}
	// The admin API's own endpoints still want the admin Host rules and
	// token; the peer endpoint does not open them.
	if code, _ := adminGet(t, A, "/status"); code != 200 {
		t.Errorf("/status: %d", code)
	}
}

// TestFleetPeerFillHangingPeer: a peer that accepts and never answers
// costs a request the fill's timeout, and no more.
func TestFleetPeerFillHangingPeer(t *testing.T) {
	a := consultest.Start(t)
	hung := make(chan net.Conn, 16)
	hang := serveRaw(t, func(c net.Conn) {
		hung <- c
		io.Copy(io.Discard, c)
	})
	if err := a.Client.Agent().ServiceRegister(&api.AgentServiceRegistration{ID: "edgelb-hung", Name: "edgelb", Address: "127.0.0.1", Port: 1,
		Meta: map[string]string{fleet.MetaPeerFill: hang}}); err != nil {
		t.Fatal(err)
	}
	dead := deadAddr(t)
	rest := fmt.Sprintf("services:\n  web: {static: [%s], health: {passive: {consecutive_gateway_failures: 1}}}\nroutes: [{service: web}]\n", dead)
	const timeout = 300 * time.Millisecond
	bothEngines(t, func(t *testing.T, engine string) {
		D := fleetEdge(t, a, t.TempDir(), peerFillExtra(peerSecret, timeout), "server: {"+engine+"}\n"+rest)
		waitPeerFill(t, D, hang)
		start := time.Now()
		resp := do(t, D, "GET", "shop.example", "/a")
		took := time.Since(start)
		if resp.StatusCode() < 502 || len(resp.Header.Peek(HeaderError)) == 0 || len(resp.Header.Peek("Cache-Status")) != 0 {
			t.Fatalf("D with a hung peer: %d %s", resp.StatusCode(), resp.Header.Peek(HeaderError))
		}
		if took < timeout || took > timeout+2*time.Second {
			t.Errorf("the answer took %s, want the peer fill timeout %s and little more", took, timeout)
		}
		if got := fills(D); got != "fills timeout=1; requests " {
			t.Errorf("D: %s", got)
		}
		t.Logf("answered after %s with a hung peer (timeout %s)", took, timeout)
	})
	if len(hung) == 0 {
		t.Error("the hung peer was never asked")
	}
}

// TestPeerFillConfig checks consul.peer_fill: its defaults, and every
// problem named with its key.
func TestPeerFillConfig(t *testing.T) {
	base := "services:\n  web: {static: [127.0.0.1:1]}\nroutes: [{service: web}]\n"
	cfg := mustConfig(t, "consul: {register: {}, peer_fill: {secret: "+peerSecret+"}}\n"+base)
	pf := cfg.Consul.PeerFill
	if pf.Timeout != DefaultPeerFillTimeout || pf.MaxPeers != DefaultPeerFillMaxPeers || !pf.on(true) {
		t.Errorf("defaults: %+v", pf)
	}
	if cfg := mustConfig(t, "consul: {register: {}}\n"+base); !cfg.Consul.PeerFill.on(true) || cfg.Consul.PeerFill.SecretKey != fleet.DefaultSecretKey {
		t.Errorf("peer fill with consul.register and no peer_fill block: %+v, want on, its secret in Consul", cfg.Consul.PeerFill)
	}
	if cfg := mustConfig(t, "consul: {register: {}, peer_fill: {disabled: true}}\n"+base); cfg.Consul.PeerFill.on(true) {
		t.Error("peer fill on with disabled: true")
	}
	f := func(consul, want string) {
		t.Helper()
		_, err := ParseConfig([]byte("consul: {" + consul + "}\n" + base))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("consul {%s}: %v, want %q", consul, err, want)
		}
	}
	f("register: {}, peer_fill: {secret: "+peerSecret+", timeout: 11s}", "consul.peer_fill.timeout: must be above 0 and at most 10s")
	f("register: {}, peer_fill: {secret: "+peerSecret+", max_peers: 17}", "consul.peer_fill.max_peers: must be between 1 and 16")
	f("register: {}, peer_fill: {secret: short}", "consul.peer_fill.secret: the secret has 5 characters")
	f("register: {}, peer_fill: {secret: "+peerSecret+", secret_file: /nonexistent}", "consul.peer_fill.secret: set either secret or secret_file")
	f("register: {}, peer_fill: {secret_file: /nonexistent/secret}", "consul.peer_fill.secret_file: cannot read the secret")
	f("register: {}, peer_fill: {secret: "+peerSecret+", address: 10.0.0.1:9901}", "consul.peer_fill.address")
	f("peer_fill: {secret: "+peerSecret+"}", "consul.peer_fill: needs consul.register")
	f("register: {meta: {peer_fill: x}}", "consul.register.meta.peer_fill: set by edgelb itself")
	f("register: {}, peer_fill: {secret_key: /x}", "consul.peer_fill.secret_key")
}

// TestFleetPeerFillSecretFromConsul: with no secret in the config, the
// first instance writes one to Consul and every instance takes it from
// there; a changed one reaches them all.
func TestFleetPeerFillSecretFromConsul(t *testing.T) {
	a := consultest.Start(t)
	o := peerFillOrigin(t)
	rest := fmt.Sprintf("services:\n  web: {static: [%s], health: {passive: {consecutive_gateway_failures: 1}}}\nroutes: [{service: web}]\n", o.addr)
	extra := peerFillExtra("", 5*time.Second)
	A := fleetEdge(t, a, t.TempDir(), extra, rest)
	do(t, A, "GET", "shop.example", "/a")
	do(t, A, "GET", "shop.example", "/b")
	o.stop()
	D := fleetEdge(t, a, t.TempDir(), extra, rest)
	waitPeerFill(t, D, A.AdminAddr())
	eventually(t, 10*time.Second, "both instances have the secret", func() string {
		for _, s := range []*Server{A, D} {
			if st := s.fill.status(); st.Secret != "consul "+fleet.DefaultSecretKey {
				return fmt.Sprintf("%+v", st)
			}
		}
		return ""
	})
	pair, _, err := a.Client.KV().Get(fleet.DefaultSecretKey, nil)
	if err != nil || pair == nil || len(pair.Value) != 64 {
		t.Fatalf("the secret in Consul: %+v %v", pair, err)
	}
	if resp := do(t, D, "GET", "shop.example", "/a"); resp.StatusCode() != 200 || !strings.Contains(string(resp.Header.Peek("Cache-Status")), "detail=peer/") {
		t.Fatalf("D, GET /a: %d %q", resp.StatusCode(), resp.Header.Peek("Cache-Status"))
	}
	// A rotation: both take the new secret, and fills go on.
	putKey(t, a, fleet.DefaultSecretKey, strings.Repeat("r", 32))
	eventually(t, 10*time.Second, "both instances take the new secret", func() string {
		for _, s := range []*Server{A, D} {
			if sec := s.fill.secret.Load(); sec == nil || sec.auth != "Bearer "+strings.Repeat("r", 32) {
				return "old secret"
			}
		}
		return ""
	})
	if resp := do(t, D, "GET", "shop.example", "/b"); resp.StatusCode() != 200 || !strings.Contains(string(resp.Header.Peek("Cache-Status")), "detail=peer/") {
		t.Fatalf("D, GET /b after the rotation: %d %q", resp.StatusCode(), resp.Header.Peek("Cache-Status"))
	}
	if got := fills(D); got != "fills hit=2; requests " {
		t.Errorf("D: %s", got)
	}
}
