package balancer

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/fleet"
	"github.com/edgelb/edgelb/discovery/consultest"
)

// eventually polls cond every few milliseconds until it returns "" and
// fails the test with its last answer after d.
func eventually(t testing.TB, d time.Duration, what string, cond func() string) time.Duration {
	t.Helper()
	start := time.Now()
	last := ""
	for time.Since(start) < d {
		if last = cond(); last == "" {
			return time.Since(start)
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("%s: still %s after %s", what, last, d)
	return 0
}

// consulInstance returns the instance id of service name from Consul's
// health API, with its checks' aggregated status, or nil.
func consulInstance(t testing.TB, c *api.Client, name, id string) *api.ServiceEntry {
	t.Helper()
	entries, _, err := c.Health().Service(name, "", false, nil)
	if err != nil {
		return nil
	}
	for _, e := range entries {
		if e.Service.ID == id {
			return e
		}
	}
	return nil
}

// registrationOf returns the service ID s registered under.
func registrationOf(t testing.TB, s *Server) string {
	t.Helper()
	st := s.Status().Fleet
	if st == nil || st.Registration == nil {
		t.Fatalf("/status has no fleet registration: %+v", st)
	}
	return st.Registration.ServiceID
}

// waitPassing waits until Consul lists service id of name as passing.
func waitPassing(t testing.TB, c *api.Client, name, id string) *api.ServiceEntry {
	t.Helper()
	var e *api.ServiceEntry
	eventually(t, 20*time.Second, "instance "+id+" passing in Consul", func() string {
		if e = consulInstance(t, c, name, id); e == nil {
			return "not registered"
		}
		if st := e.Checks.AggregatedStatus(); st != api.HealthPassing {
			return fmt.Sprintf("%s (%s)", st, checkOutputs(e))
		}
		return ""
	})
	return e
}

func checkOutputs(e *api.ServiceEntry) string {
	var outs []string
	for _, c := range e.Checks {
		outs = append(outs, c.CheckID+": "+c.Status+" "+strings.TrimSpace(c.Output))
	}
	return strings.Join(outs, "; ")
}

// TestFleetRegistration registers an instance with a TLS listener and an
// admin token: Consul lists it passing (its check on /readyz carries the
// token), with its client-facing addresses, tags and meta, under an ID
// that survives a restart from the same state_dir.
func TestFleetRegistration(t *testing.T) {
	a := consultest.Start(t)
	o := startOrigin(t, "web", nil)
	pki := newTestPKI(t)
	cert, key := pki.issue("edge", "localhost")
	token := strings.Repeat("k", 24)
	dir := t.TempDir()
	yaml := fmt.Sprintf(`state_dir: %s
admin_token: %s
consul:
  address: %s
  register: {tags: [blue, v2], meta: {zone: z1}, check_interval: 1s, drain_delay: 0s}
%sservices:
  web: {static: [%s]}
routes: [{service: web}]
`, dir, token, a.Addr(), tlsYAML("", cert, key), o.addr)
	s := startEdge(t, yaml)
	id := registrationOf(t, s)
	e := waitPassing(t, a.Client, "edgelb", id)

	_, port := splitHostPort(s.Addr())
	_, tlsPort := splitHostPort(s.TLSAddr())
	if e.Service.Address != "127.0.0.1" || e.Service.Port != port {
		t.Errorf("service address %s:%d, want 127.0.0.1:%d (listen)", e.Service.Address, e.Service.Port, port)
	}
	if h := e.Service.TaggedAddresses[fleet.TaggedHTTPS]; h.Address != "127.0.0.1" || h.Port != tlsPort {
		t.Errorf("tagged address https %+v, want 127.0.0.1:%d (tls.listen)", h, tlsPort)
	}
	instance, _ := os.ReadFile(filepath.Join(dir, fleet.InstanceIDFile))
	m := e.Service.Meta
	if m["zone"] != "z1" || m[fleet.MetaVersion] == "" || m[fleet.MetaInstance] != strings.TrimSpace(string(instance)) ||
		m[fleet.MetaHTTPSPort] != strconv.Itoa(tlsPort) {
		t.Errorf("meta %v; instance_id file %q", m, instance)
	}
	if id != "edgelb-"+m[fleet.MetaInstance] {
		t.Errorf("service ID %q, want edgelb-INSTANCE", id)
	}
	if strings.Join(e.Service.Tags, ",") != "blue,v2" {
		t.Errorf("tags %q", e.Service.Tags)
	}
	if len(e.Checks) != 2 || !strings.Contains(checkOutputs(e), "200 OK") {
		t.Errorf("checks: %s", checkOutputs(e))
	}
	if st := s.Status().Fleet.Registration; !st.Registered || st.Registrations != 1 {
		t.Errorf("/status registration: %+v", st)
	}

	// The same state_dir, the same instance: the ID stays.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if e := consulInstance(t, a.Client, "edgelb", id); e != nil {
		t.Fatalf("still registered after Shutdown: %+v", e.Service)
	}
	s2 := startEdge(t, yaml)
	if id2 := registrationOf(t, s2); id2 != id {
		t.Fatalf("service ID after a restart from the same state_dir: %q, was %q", id2, id)
	}
	waitPassing(t, a.Client, "edgelb", id)
}

// TestFleetLeave deregisters first: while the drain delay runs, Consul no
// longer lists the instance, /readyz says why it is not ready, and
// clients are still served.
func TestFleetLeave(t *testing.T) {
	a := consultest.Start(t)
	o := startOrigin(t, "web", nil)
	s := startEdge(t, fmt.Sprintf(`consul: {address: %s, register: {check_interval: 1s, drain_delay: 3s}}
services:
  web: {static: [%s]}
routes: [{service: web}]
`, a.Addr(), o.addr))
	id := registrationOf(t, s)
	waitPassing(t, a.Client, "edgelb", id)

	left := make(chan time.Time, 1)
	start := time.Now()
	go func() {
		s.Leave(context.Background())
		left <- time.Now()
	}()
	eventually(t, 2*time.Second, "deregistration", func() string {
		if consulInstance(t, a.Client, "edgelb", id) != nil {
			return "still listed"
		}
		return ""
	})
	if resp := do(t, s, "GET", "x", "/"); resp.StatusCode() != 200 || string(resp.Body()) != "hello from web" {
		t.Fatalf("during the drain delay: %d %q", resp.StatusCode(), resp.Body())
	}
	if code, body := adminGet(t, s, "/readyz"); code != 503 || !strings.Contains(body, "leaving: deregistered from Consul") {
		t.Fatalf("/readyz during the drain delay: %d %q", code, body)
	}
	if st := s.Status().Fleet; st.Leaving == nil || st.Registration.Registered || !st.Registration.Left {
		t.Fatalf("/status fleet during the drain delay: %+v %+v", st, st.Registration)
	}
	select {
	case at := <-left:
		if d := at.Sub(start); d < 3*time.Second {
			t.Fatalf("Leave returned after %s, before the 3s drain delay", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Leave did not return")
	}
	if resp := do(t, s, "GET", "x", "/"); resp.StatusCode() != 200 {
		t.Fatalf("after Leave, before Shutdown: %d", resp.StatusCode())
	}
}

// TestFleetReregistersAfterAgentRestart restarts the Consul dev agent,
// which forgets every service: the instance registers again by itself.
func TestFleetReregistersAfterAgentRestart(t *testing.T) {
	a := consultest.Start(t)
	o := startOrigin(t, "web", nil)
	s := startEdge(t, fmt.Sprintf(`consul: {address: %s, register: {check_interval: 1s, drain_delay: 0s}}
services:
  web: {static: [%s]}
routes: [{service: web}]
`, a.Addr(), o.addr))
	id := registrationOf(t, s)
	waitPassing(t, a.Client, "edgelb", id)
	a.Restart()
	d := eventually(t, 20*time.Second, "registration after the agent's restart", func() string {
		if consulInstance(t, a.Client, "edgelb", id) == nil {
			return "not registered"
		}
		return ""
	})
	t.Logf("registered again %s after the new agent elected itself", d)
	waitPassing(t, a.Client, "edgelb", id)
	if st := s.Status().Fleet.Registration; st.Registrations < 2 || !st.Registered {
		t.Fatalf("/status registration after the restart: %+v", st)
	}
}

// TestFleetRegistrationACL registers through an agent whose ACLs deny
// everything: with the management token it works; with another token
// /status says the token was refused and edgelb keeps serving.
func TestFleetRegistrationACL(t *testing.T) {
	const mgmt = "0f3a1e6c-6c1e-4c55-9d6b-3b7c1a2f9e01"
	a := consultest.StartWithACL(t, mgmt)
	o := startOrigin(t, "web", nil)
	cfg := func(token string) string {
		return fmt.Sprintf(`consul: {address: %s, token: %s, register: {check_interval: 1s, drain_delay: 0s}}
services:
  web: {static: [%s]}
routes: [{service: web}]
`, a.Addr(), token, o.addr)
	}
	good := startEdge(t, cfg(mgmt))
	waitPassing(t, a.Client, "edgelb", registrationOf(t, good))

	bad := startEdge(t, cfg("6d2b3c1a-0000-4000-8000-000000000000"))
	eventually(t, 10*time.Second, "the refused token in /status", func() string {
		st := bad.Status().Fleet.Registration
		if st.Registered || !strings.Contains(st.LastError, "refused the token") {
			return fmt.Sprintf("%+v", st)
		}
		return ""
	})
	if resp := do(t, bad, "GET", "x", "/"); resp.StatusCode() != 200 {
		t.Fatalf("an instance Consul refused: GET / %d", resp.StatusCode())
	}

	// The purge log takes the token too: with the management token a
	// purge is published; with the refused one it is kept, and said so.
	if code, body := postPurge(t, good, ""); code != 200 || !strings.Contains(body, "published to the fleet") {
		t.Fatalf("purge with the management token: %d %q", code, body)
	}
	code, body := postPurge(t, bad, "")
	if code != 202 || !strings.Contains(body, "not yet published to the fleet") || !strings.Contains(body, "refused the token") {
		t.Fatalf("purge with a refused token: %d %q", code, body)
	}
	if st := bad.Status().Fleet.Purge; st.Pending != 1 || !strings.Contains(st.LastError, "refused the token") {
		t.Fatalf("/status fleet.purge with a refused token: %+v", st)
	}
}

// TestFleetReloadRegistration changes the tags on reload (the
// registration is updated in place), then removes consul.register (the
// instance is deregistered).
func TestFleetReloadRegistration(t *testing.T) {
	a := consultest.Start(t)
	o := startOrigin(t, "web", nil)
	base := fmt.Sprintf("services:\n  web: {static: [%s]}\nroutes: [{service: web}]\n", o.addr)
	s := startEdge(t, fmt.Sprintf("consul: {address: %s, register: {tags: [a], drain_delay: 0s}}\n", a.Addr())+base)
	id := registrationOf(t, s)
	waitPassing(t, a.Client, "edgelb", id)

	if err := s.Reload(mustConfig(t, sameAddrs(s, fmt.Sprintf("consul: {address: %s, register: {tags: [b], drain_delay: 0s}}\n", a.Addr())+base))); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "new tags", func() string {
		e := consulInstance(t, a.Client, "edgelb", id)
		if e == nil || strings.Join(e.Service.Tags, ",") != "b" {
			return "not yet"
		}
		return ""
	})
	if err := s.Reload(mustConfig(t, sameAddrs(s, fmt.Sprintf("consul: {address: %s}\n", a.Addr())+base))); err != nil {
		t.Fatal(err)
	}
	if e := consulInstance(t, a.Client, "edgelb", id); e != nil {
		t.Fatal("still registered after consul.register was removed")
	}
	if st := s.Status().Fleet; st == nil || st.Registration != nil {
		t.Fatalf("/status fleet: %+v", st)
	}
}

// TestFleetRegistrationAdvertisedAddress registers an instance listening
// on every address: without register.address Consul gets no service
// address (the node's is used), with it that address, and the check goes
// to the admin API on loopback.
func TestFleetRegistrationAdvertisedAddress(t *testing.T) {
	a := consultest.Start(t)
	o := startOrigin(t, "web", nil)
	cfg := mustConfig(t, fmt.Sprintf(`listen: 0.0.0.0:0
admin: 0.0.0.0:0
state_dir: %s
consul: {address: %s, register: {check_interval: 1s, drain_delay: 0s}}
services:
  web: {static: [%s]}
routes: [{service: web}]
`, t.TempDir(), a.Addr(), o.addr))
	s := NewServer(cfg, quietLogger())
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
	})
	e := waitPassing(t, a.Client, "edgelb", registrationOf(t, s))
	if e.Service.Address != "" {
		t.Errorf("service address %q, want none (the node's)", e.Service.Address)
	}
	reg := s.registration(mustConfig(t, fmt.Sprintf("listen: 0.0.0.0:0\nadmin: 0.0.0.0:0\nconsul: {register: {address: edge-1.internal}}\nservices:\n  web: {static: [%s]}\n", o.addr)))
	if reg.Address != "edge-1.internal" {
		t.Errorf("with register.address: service address %q", reg.Address)
	}
	if _, p := splitHostPort(s.AdminAddr()); reg.CheckURL != "http://"+net.JoinHostPort("127.0.0.1", strconv.Itoa(p))+"/readyz" {
		t.Errorf("check URL %q", reg.CheckURL)
	}
}

// sameAddrs is the config rest with the listen, admin and state_dir of s,
// so that Reload takes it.
func sameAddrs(s *Server, rest string) string {
	return "listen: " + s.cfg.Listen + "\nadmin: " + s.cfg.Admin + "\nstate_dir: " + s.cfg.StateDir + "\n" + rest
}

// statusJSON returns /status as the admin API serves it.
func statusJSON(t testing.TB, s *Server) map[string]any {
	t.Helper()
	resp, err := http.Get("http://" + s.AdminAddr() + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		t.Fatal(err)
	}
	return m
}

// fleetEdge starts an instance with state_dir dir on Consul a; extra
// goes into its consul block, rest after it.
func fleetEdge(t testing.TB, a *consultest.Agent, dir, extra, rest string) *Server {
	t.Helper()
	return startEdge(t, fmt.Sprintf("state_dir: %s\nconsul: {address: %s%s}\n%s", dir, a.Addr(), extra, rest))
}

// postPurge sends POST /cache/purge with query q to s and returns the
// status and body.
func postPurge(t testing.TB, s *Server, q string) (int, string) {
	t.Helper()
	resp, err := http.Post("http://"+s.AdminAddr()+"/cache/purge"+q, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// staleState says how s answers GET path during the origin outage:
// "stale" for a stored copy, else the status and Edgelb-Error.
func staleState(t testing.TB, s *Server, path string) string {
	t.Helper()
	resp := do(t, s, "GET", "shop.example", path)
	if resp.StatusCode() == 200 && len(resp.Header.Peek("Cache-Status")) > 0 {
		return "stale"
	}
	return fmt.Sprintf("%d %s", resp.StatusCode(), resp.Header.Peek(HeaderError))
}

// TestFleetPurge purges one URL on instance A of three sharing a Consul,
// during an origin outage in which all of them serve stored copies: A and
// B stop serving it within a second, and C, down during the purge,
// never serves it after it comes back from its state_dir. A purge of
// everything on B then reaches all three. Each reports in /status the
// last purge it applied.
func TestFleetPurge(t *testing.T) {
	a := consultest.Start(t)
	o := startOrigin(t, "o", func(ctx *fasthttp.RequestCtx) {
		ctx.Response.Header.Set("Cache-Control", "public, max-age=1")
		fmt.Fprintf(ctx, "copy of %s", ctx.Path())
	})
	rest := fmt.Sprintf("services:\n  web: {static: [%s], health: {passive: {consecutive_gateway_failures: 1}}}\nroutes: [{service: web}]\n", o.addr)
	dirs := []string{t.TempDir(), t.TempDir(), t.TempDir()}
	A, B, C := fleetEdge(t, a, dirs[0], "", rest), fleetEdge(t, a, dirs[1], "", rest), fleetEdge(t, a, dirs[2], "", rest)
	paths := []string{"/a", "/b"}
	for _, s := range []*Server{A, B, C} {
		for _, p := range paths {
			if resp := do(t, s, "GET", "shop.example", p); resp.StatusCode() != 200 {
				t.Fatalf("priming %s: %d", p, resp.StatusCode())
			}
		}
	}
	o.stop()
	for i, s := range []*Server{A, B, C} {
		for _, p := range paths {
			if got := staleState(t, s, p); got != "stale" {
				t.Fatalf("instance %d, GET %s during the outage: %s", i, p, got)
			}
		}
	}

	// C goes away, its stale store saved in its state_dir.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := C.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	code, body := postPurge(t, A, "?url=http://shop.example/a")
	if code != 200 || !strings.Contains(body, "published to the fleet: edgelb/purge/log/") {
		t.Fatalf("purge on A: %d %q", code, body)
	}
	for i, s := range []*Server{A, B} {
		eventually(t, 10*time.Second, fmt.Sprintf("instance %d stops serving /a stale", i), func() string {
			if got := staleState(t, s, "/a"); got != "503 no_healthy_backend" {
				return got
			}
			return ""
		})
		if total := time.Since(start); total > time.Second {
			t.Errorf("instance %d served /a stale until %s after the purge on A, want within 1s", i, total)
		}
		if got := staleState(t, s, "/b"); got != "stale" {
			t.Errorf("instance %d lost /b to a purge of /a: %s", i, got)
		}
	}
	t.Logf("purge of /a on A applied by A and B %s after the POST", time.Since(start))

	// C back from its state_dir: the purge it missed applies before it
	// serves.
	C = fleetEdge(t, a, dirs[2], "", rest)
	if got := staleState(t, C, "/a"); got != "503 no_healthy_backend" {
		t.Fatalf("C back after the purge, first GET /a: %s, want no stale copy", got)
	}
	if got := staleState(t, C, "/b"); got != "stale" {
		t.Fatalf("C back after the purge, GET /b: %s", got)
	}

	// Each reports the purge it applied, with the same index.
	var index uint64
	for i, s := range []*Server{A, B, C} {
		st := s.Status().Fleet.Purge
		if st == nil || st.LastApplied == nil || st.LastApplied.URL != "http://shop.example/a" || st.LastApplied.AppliedAt.IsZero() ||
			st.LastApplied.By != A.instance || st.LastApplied.Index == 0 || (index != 0 && st.LastApplied.Index != index) {
			t.Fatalf("instance %d /status fleet.purge: %+v %+v", i, st, st.LastApplied)
		}
		index = st.LastApplied.Index
	}
	if m := statusJSON(t, B); !strings.Contains(fmt.Sprint(m["fleet"]), "last_applied") {
		t.Fatalf("/status JSON lacks fleet.purge.last_applied: %v", m["fleet"])
	}

	// Everything, from B.
	start = time.Now()
	if code, body := postPurge(t, B, ""); code != 200 || !strings.HasPrefix(body, "purged all on this instance and published") {
		t.Fatalf("purge of everything on B: %d %q", code, body)
	}
	for i, s := range []*Server{A, B, C} {
		eventually(t, 10*time.Second, fmt.Sprintf("instance %d stops serving /b stale", i), func() string {
			if got := staleState(t, s, "/b"); got != "503 no_healthy_backend" {
				return got
			}
			return ""
		})
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("the purge of everything took %s to reach all three, want within 1s", d)
	}
	for i, s := range []*Server{A, B, C} {
		if st := s.Status().Fleet.Purge.LastApplied; !st.All || st.Index <= index {
			t.Fatalf("instance %d last purge applied: %+v", i, st)
		}
	}
}

// TestFleetPurgeDisabled keeps purges local with consul.purge.disabled.
func TestFleetPurgeDisabled(t *testing.T) {
	a := consultest.Start(t)
	o := startOrigin(t, "o", func(ctx *fasthttp.RequestCtx) {
		ctx.Response.Header.Set("Cache-Control", "public, max-age=1")
		fmt.Fprintf(ctx, "copy of %s", ctx.Path())
	})
	rest := fmt.Sprintf("services:\n  web: {static: [%s], health: {passive: {consecutive_gateway_failures: 1}}}\nroutes: [{service: web}]\n", o.addr)
	A := fleetEdge(t, a, t.TempDir(), ", purge: {disabled: true}", rest)
	B := fleetEdge(t, a, t.TempDir(), ", purge: {disabled: true}", rest)
	for _, s := range []*Server{A, B} {
		do(t, s, "GET", "shop.example", "/a")
	}
	o.stop()
	if code, body := postPurge(t, A, ""); code != 200 || body != "purged all\n" {
		t.Fatalf("purge: %d %q", code, body)
	}
	if got := staleState(t, A, "/a"); got != "503 no_healthy_backend" {
		t.Fatalf("A after its purge: %s", got)
	}
	time.Sleep(200 * time.Millisecond)
	if got := staleState(t, B, "/a"); got != "stale" {
		t.Fatalf("B after a purge on A with the purge log off: %s", got)
	}
	if st := B.Status().Fleet; st.Purge != nil {
		t.Fatalf("/status fleet.purge with the purge log off: %+v", st.Purge)
	}
}

// putKey writes value under key in Consul.
func putKey(t testing.TB, a *consultest.Agent, key, value string) {
	t.Helper()
	if _, err := a.Client.KV().Put(&api.KVPair{Key: key, Value: []byte(value)}, nil); err != nil {
		t.Fatalf("put %s: %v", key, err)
	}
}

// answeredBy returns the body of GET path on s, or its status and
// Edgelb-Error.
func answeredBy(t testing.TB, s *Server, path string) string {
	t.Helper()
	resp := do(t, s, "GET", "shop.example", path)
	if resp.StatusCode() == 200 {
		return string(resp.Body())
	}
	return fmt.Sprintf("%d %s", resp.StatusCode(), resp.Header.Peek(HeaderError))
}

// TestFleetConfigKey keeps the services and routes of three instances in
// one Consul key: each starts with them, a new route reaches all three
// within a second, values that are not valid are refused and reported
// while the running config keeps serving, and a deleted key changes
// nothing.
func TestFleetConfigKey(t *testing.T) {
	a := consultest.Start(t)
	web, apiO := startOrigin(t, "web", nil), startOrigin(t, "api", nil)
	one := fmt.Sprintf("services:\n  web: {static: [%s]}\nroutes: [{service: web}]\n", web.addr)
	two := fmt.Sprintf("services:\n  web: {static: [%s]}\n  api: {static: [%s]}\nroutes: [{service: web}, {path: /api, service: api}]\n", web.addr, apiO.addr)
	putKey(t, a, "edgelb/config", one)
	dirs := []string{t.TempDir(), t.TempDir(), t.TempDir()}
	var edges []*Server
	for _, d := range dirs {
		edges = append(edges, fleetEdge(t, a, d, ", config_key: edgelb/config", ""))
	}
	for i, s := range edges {
		if got := answeredBy(t, s, "/api"); got != "hello from web" {
			t.Fatalf("instance %d at start: GET /api %q", i, got)
		}
		if st := s.Status().Fleet.Config; st == nil || st.Source != "consul" || st.Index == 0 || st.Error != "" {
			t.Fatalf("instance %d /status fleet.config: %+v", i, st)
		}
	}

	// A new route.
	start := time.Now()
	putKey(t, a, "edgelb/config", two)
	for i, s := range edges {
		eventually(t, 10*time.Second, fmt.Sprintf("instance %d routes /api", i), func() string {
			if got := answeredBy(t, s, "/api"); got != "hello from api" {
				return got
			}
			return ""
		})
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("the new route took %s to reach all three, want within 1s", d)
	}
	t.Logf("new route served by all three %s after the write", time.Since(start))
	good := edges[0].Status().Fleet.Config.Index

	// Values that are not valid: refused, reported, nothing changes.
	refused := configKeyRejected.Get()
	f := func(value string, wants ...string) {
		t.Helper()
		putKey(t, a, "edgelb/config", value)
		for i, s := range edges {
			var st *ConfigKeyStatus
			eventually(t, 10*time.Second, fmt.Sprintf("instance %d reports the refused value", i), func() string {
				st = s.Status().Fleet.Config
				for _, w := range wants {
					if !strings.Contains(st.Error, w) {
						return fmt.Sprintf("error %q, want %q", st.Error, w)
					}
				}
				return ""
			})
			if st.Index != good || st.ErrorIndex <= good || st.ErrorSince.IsZero() {
				t.Errorf("instance %d /status fleet.config: %+v", i, st)
			}
			for path, want := range map[string]string{"/": "hello from web", "/api": "hello from api"} {
				if got := answeredBy(t, s, path); got != want {
					t.Errorf("instance %d after a refused value: GET %s %q", i, path, got)
				}
			}
		}
	}
	f(strings.Replace(two, "api: {static", "api: {helth: {}, static", 1), "services.api.helth: unknown key")
	f("listen: 0.0.0.0:80\n"+two, "listen: belongs in the config file")
	f(two+"routes: [{service: nope}]\n", `mapping key "routes" already defined`)
	f("services: [\n", "cannot parse YAML")
	f(strings.Replace(two, "path: /api, service: api", "path: /api, service: apx", 1), `routes[1].service: unknown service "apx"`)
	f("services: {}\n", "services: no service defined")
	if n := configKeyRejected.Get() - refused; n < 18 {
		t.Errorf("edgelb_config_key_updates_total{result=\"rejected\"} grew by %d for 6 refused values on 3 instances", n)
	}
	since := edges[0].Status().Fleet.Config.ErrorSince

	// Deleted: the last good config stays.
	if _, err := a.Client.KV().Delete("edgelb/config", nil); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the deletion reported", func() string {
		st := edges[0].Status().Fleet.Config
		if !strings.Contains(st.Error, "no longer exists") || !st.ErrorSince.Equal(since) {
			return fmt.Sprintf("%+v", st)
		}
		return ""
	})
	if got := answeredBy(t, edges[0], "/api"); got != "hello from api" {
		t.Fatalf("after the key was deleted: GET /api %q", got)
	}

	// The good value back: the error goes, nothing reloads.
	reloads := reloadsTotal.Get()
	putKey(t, a, "edgelb/config", two)
	for i, s := range edges {
		eventually(t, 10*time.Second, fmt.Sprintf("instance %d clears the error", i), func() string {
			if st := s.Status().Fleet.Config; st.Error != "" || st.Index <= good || st.Source != "consul" {
				return fmt.Sprintf("%+v", st)
			}
			return ""
		})
	}
	if n := reloadsTotal.Get() - reloads; n != 0 {
		t.Errorf("the running value written again made %d reloads", n)
	}

	// An instance that starts while Consul is down serves the last good
	// value from its state_dir.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	edges[2].Shutdown(ctx)
	a.Stop()
	c := fleetEdge(t, a, dirs[2], ", config_key: edgelb/config", "")
	if got := answeredBy(t, c, "/api"); got != "hello from api" {
		t.Fatalf("started with Consul down: GET /api %q", got)
	}
	if st := c.Status().Fleet.Config; st.Source != "state_dir" {
		t.Fatalf("started with Consul down: /status fleet.config %+v", st)
	}
}

// TestFleetConfigKeyFallback starts with no value in the key: the file's
// own services and routes serve until the key has one, which then
// replaces them. A reload of the file keeps the key's.
func TestFleetConfigKeyFallback(t *testing.T) {
	a := consultest.Start(t)
	web, apiO := startOrigin(t, "web", nil), startOrigin(t, "api", nil)
	file := fmt.Sprintf("services:\n  web: {static: [%s]}\nroutes: [{service: web}]\n", web.addr)
	s := fleetEdge(t, a, t.TempDir(), ", config_key: edgelb/config", file)
	if got := answeredBy(t, s, "/x"); got != "hello from web" {
		t.Fatalf("file's route: %q", got)
	}
	if st := s.Status().Fleet.Config; st.Source != "file" || !strings.Contains(st.Error, "does not exist") {
		t.Fatalf("/status fleet.config without a value: %+v", st)
	}
	putKey(t, a, "edgelb/config", fmt.Sprintf("services:\n  api: {static: [%s]}\nroutes: [{path: /api, service: api}]\n", apiO.addr))
	eventually(t, 10*time.Second, "the key's routes", func() string {
		if got := answeredBy(t, s, "/api"); got != "hello from api" {
			return got
		}
		return ""
	})
	if got := answeredBy(t, s, "/x"); got != "404 no_route" {
		t.Fatalf("the file's route after the key had a value: %q", got)
	}

	// SIGHUP with a changed file: the key's services and routes stay.
	cfg := mustConfig(t, sameAddrs(s, fmt.Sprintf("consul: {address: %s, config_key: edgelb/config}\nserver: {trusted_proxies: [10.0.0.0/8]}\n", a.Addr())+file))
	if err := s.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	if got := answeredBy(t, s, "/api"); got != "hello from api" {
		t.Fatalf("after a reload of the file: GET /api %q", got)
	}
	// Without config_key, the file's own again.
	if err := s.Reload(mustConfig(t, sameAddrs(s, fmt.Sprintf("consul: {address: %s}\n", a.Addr())+file))); err != nil {
		t.Fatal(err)
	}
	if got := answeredBy(t, s, "/x"); got != "hello from web" {
		t.Fatalf("after config_key was removed: GET /x %q", got)
	}
	if st := s.Status().Fleet.Config; st != nil {
		t.Fatalf("/status fleet.config without the key: %+v", st)
	}
}

// TestFleetConfigKeyUnknownAtStart starts an instance whose file has no
// routes while Consul is down and state_dir holds no value: requests get
// 503 no_healthy_backend (not a 404 caches would keep) and /readyz 503,
// until Consul answers with the key.
func TestFleetConfigKeyUnknownAtStart(t *testing.T) {
	a := consultest.Start(t)
	web := startOrigin(t, "web", nil)
	a.Stop()
	s := fleetEdge(t, a, t.TempDir(), ", config_key: edgelb/config", "")
	if got := answeredBy(t, s, "/"); got != "503 no_healthy_backend" {
		t.Fatalf("routes not known yet: %q", got)
	}
	if code, _ := adminGet(t, s, "/readyz"); code != 503 {
		t.Fatalf("/readyz with no routes: %d", code)
	}
	a.Restart()
	putKey(t, a, "edgelb/config", fmt.Sprintf("services:\n  web: {static: [%s]}\nroutes: [{service: web}]\n", web.addr))
	eventually(t, 20*time.Second, "the key's routes once Consul answers", func() string {
		if got := answeredBy(t, s, "/"); got != "hello from web" {
			return got
		}
		return ""
	})
	if code, body := adminGet(t, s, "/readyz"); code != 200 {
		t.Fatalf("/readyz: %d %s", code, body)
	}
}

// TestFleetPeers registers three instances, one of them not ready (its
// routes are to come from a key that has no value): each lists the two
// others in /status with their readiness, and /metrics counts them.
func TestFleetPeers(t *testing.T) {
	a := consultest.Start(t)
	o := startOrigin(t, "web", nil)
	rest := fmt.Sprintf("services:\n  web: {static: [%s]}\nroutes: [{service: web}]\n", o.addr)
	reg := ", register: {check_interval: 1s, drain_delay: 0s}"
	A := fleetEdge(t, a, t.TempDir(), reg, rest)
	B := fleetEdge(t, a, t.TempDir(), reg, rest)
	C := fleetEdge(t, a, t.TempDir(), reg+", config_key: edgelb/nothing-here", "")
	ids := map[*Server]string{A: registrationOf(t, A), B: registrationOf(t, B), C: registrationOf(t, C)}
	for _, s := range []*Server{A, B, C} {
		eventually(t, 20*time.Second, "peers of "+ids[s], func() string {
			st := s.Status().Fleet.Peers
			var got []string
			for _, p := range st.Peers {
				got = append(got, fmt.Sprintf("%s %s %v", p.ID, p.Status, p.Ready))
			}
			var want []string
			for _, other := range []*Server{A, B, C} {
				if other == s {
					continue
				}
				if other == C {
					want = append(want, ids[other]+" critical false")
				} else {
					want = append(want, ids[other]+" passing true")
				}
			}
			slices.Sort(want)
			if strings.Join(got, ", ") != strings.Join(want, ", ") {
				return fmt.Sprintf("%q, want %q", got, want)
			}
			return ""
		})
	}
	for _, p := range A.Peers() {
		switch p.ID {
		case ids[B]:
			if p.Addr != B.Addr() || p.Instance != B.instance || p.Version == "" || p.Why != "" {
				t.Errorf("A's peer B: %+v (B listens on %s)", p, B.Addr())
			}
		}
	}
	for _, p := range A.Peers() {
		if p.ID == ids[C] && !strings.HasPrefix(p.Why, "edgelb ready: critical") {
			t.Errorf("why A's peer C is not ready: %q", p.Why)
		}
	}
	if st := A.Status().Fleet.Peers; st.Service != "edgelb" || st.Ready != 1 || st.UpdatedAt.IsZero() {
		t.Errorf("A's peers: %+v", st)
	}
	// Process-wide: A and B see one ready peer and C, C sees two ready.
	_, m := adminGet(t, A, "/metrics")
	for _, want := range []string{`edgelb_fleet_peers{state="ready"} 4`, `edgelb_fleet_peers{state="not_ready"} 2`} {
		if !strings.Contains(m, want+"\n") {
			t.Errorf("/metrics lacks %q", want)
		}
	}

	// B leaves: the others drop it.
	B.Leave(context.Background())
	eventually(t, 10*time.Second, "B gone from A's peers", func() string {
		for _, p := range A.Peers() {
			if p.ID == ids[B] {
				return "still listed"
			}
		}
		return ""
	})
}
