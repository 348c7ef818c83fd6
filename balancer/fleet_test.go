package balancer

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

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
