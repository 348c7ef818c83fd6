package balancer

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/discovery/consultest"
)

func originPort(t *testing.T, o *origin) int {
	_, p, _ := net.SplitHostPort(o.addr)
	var port int
	fmt.Sscan(p, &port)
	return port
}

// waitBody polls GET host/path until the body is want.
func waitBody(t *testing.T, s *Server, host, path, want string) time.Duration {
	t.Helper()
	start := time.Now()
	var got string
	for time.Since(start) < 20*time.Second {
		resp := do(t, s, "GET", host, path)
		got = fmt.Sprintf("%d %s %s (Cache-Status %q)", resp.StatusCode(), resp.Header.Peek(HeaderError), resp.Body(), resp.Header.Peek("Cache-Status"))
		if strings.Contains(got, want) {
			return time.Since(start)
		}
		time.Sleep(2 * time.Millisecond)
	}
	st, _ := json.Marshal(s.Status())
	t.Fatalf("GET %s%s: got %q, want %q; status: %s", host, path, got, want, st)
	return 0
}

func TestConsulRoutesEndToEnd(t *testing.T) {
	a := consultest.Start(t)
	web := startOrigin(t, "web", nil)
	api1 := startOrigin(t, "api", nil)
	other := startOrigin(t, "other", nil)
	s := startEdge(t, fmt.Sprintf(`
state_dir: %s
consul: {address: %s, tag_routes: true}
services:
  web: {consul: {name: web}}
routes:
  - {path: /, service: web}
`, t.TempDir(), a.Addr()))
	resp := do(t, s, "GET", "x", "/")
	if resp.StatusCode() != 503 || string(resp.Header.Peek(HeaderError)) != "no_healthy_backend" {
		t.Fatalf("before registration: %d %q", resp.StatusCode(), resp.Header.Peek(HeaderError))
	}
	a.Register("web-1", "web", originPort(t, web), nil, 0)
	waitBody(t, s, "x", "/", "hello from web")

	time.Sleep(1100 * time.Millisecond)
	check := a.Register("api-1", "api", originPort(t, api1), []string{"edge.route=*/api"}, 0)
	d := waitBody(t, s, "x", "/api/v1", "hello from api")
	t.Logf("tag route usable %s after registration", d)

	// Two services claiming one route: the first by name keeps it.
	a.Register("zzz-1", "zzz", originPort(t, other), []string{"edge.route=*/api"}, 0)
	start := time.Now()
	for time.Since(start) < 10*time.Second && len(s.Status().Conflicts) == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	if c := s.Status().Conflicts; len(c) != 1 || !strings.Contains(c[0], `"zzz"`) {
		t.Fatalf("conflicts: %q", c)
	}
	waitBody(t, s, "x", "/api", "hello from api")

	// No healthy instance: the route answers 503, never a shorter prefix.
	a.SetCheck(check, api.HealthCritical)
	for start := time.Now(); len(s.Status().Services["api"].Backends) != 0; {
		if time.Since(start) > 20*time.Second {
			t.Fatal("critical instance not removed")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if resp := do(t, s, "GET", "x", "/api/never-requested"); resp.StatusCode() != 503 || string(resp.Header.Peek(HeaderError)) != "no_healthy_backend" {
		t.Fatalf("no healthy instance: %d %q", resp.StatusCode(), resp.Header.Peek(HeaderError))
	}
	// What was answered before is served stale.
	if resp := do(t, s, "GET", "x", "/api/v1"); resp.StatusCode() != 200 || !strings.Contains(string(resp.Header.Peek("Cache-Status")), "detail=no_healthy_backend") {
		t.Fatalf("stale answer: %d %q %q", resp.StatusCode(), resp.Header.Peek("Cache-Status"), resp.Body())
	}
	a.SetCheck(check, api.HealthPassing)
	waitBody(t, s, "x", "/api", "hello from api")

	time.Sleep(1100 * time.Millisecond)
	a.Deregister("api-1")
	d = waitBody(t, s, "x", "/api", "hello from other")
	t.Logf("route handed to the other claimant %s after deregistration", d)
}

func TestConsulStopsWhileTrafficFlows(t *testing.T) {
	a := consultest.Start(t)
	o1 := startOrigin(t, "o1", nil)
	o2 := startOrigin(t, "o2", nil)
	state := t.TempDir()
	yaml := fmt.Sprintf("state_dir: %s\nconsul: {address: %s}\nservices:\n  web: {consul: {name: web}}\nroutes: [{service: web}]\n", state, a.Addr())
	s := startEdge(t, yaml)
	a.Register("o1", "web", originPort(t, o1), nil, 0)
	a.Register("o2", "web", originPort(t, o2), nil, 0)
	waitBody(t, s, "x", "/", "hello from")
	for len(s.Status().Services["web"].Backends) != 2 {
		time.Sleep(10 * time.Millisecond)
	}

	stop := make(chan struct{})
	ok, failed, wait := load(t, s, 4, stop)
	time.Sleep(200 * time.Millisecond)
	a.Stop()
	time.Sleep(1500 * time.Millisecond)
	close(stop)
	wait()
	if failed.Load() != 0 || ok.Load() == 0 {
		t.Fatalf("while Consul stopped: %d ok, %d failed", ok.Load(), failed.Load())
	}
	st := s.Status()
	stale := false
	for _, d := range st.Discovery {
		stale = stale || (d.Service == "web" && d.Stale && d.LastError != "")
	}
	if !stale {
		t.Fatalf("/status must show the Consul error: %+v", st.Discovery)
	}
	if code, body := adminGet(t, s, "/readyz"); code != 200 || !strings.Contains(body, "consul web: stale") {
		t.Fatalf("/readyz during the outage: %d %s", code, body)
	}

	// Restart edgelb while Consul is still down: it serves from state_dir.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	s.Shutdown(ctx)
	cancel()
	s2 := startEdge(t, yaml)
	d := waitBody(t, s2, "x", "/", "hello from")
	t.Logf("restarted edgelb served from state_dir %s after start, with Consul down", d)
}

// TestConsulRestartedEmpty restarts Consul as a new, empty agent on the same
// ports: a registration in it reaches /status within seconds (not the 30 s
// of a blocking query on the old agent's higher index), and /readyz shows
// what the new agent answers, not the outage.
func TestConsulRestartedEmpty(t *testing.T) {
	a := consultest.Start(t)
	o1 := startOrigin(t, "o1", nil)
	o2 := startOrigin(t, "o2", nil)
	s := startEdge(t, fmt.Sprintf("consul: {address: %s, tag_routes: true}\nservices:\n  web: {consul: {name: web}}\n", a.Addr()))
	a.Register("web-1", "web", originPort(t, o1), []string{"edge.route=*/"}, 0)
	waitBody(t, s, "x", "/", "hello from o1")

	a.Restart()
	a.Register("web-2", "web", originPort(t, o2), []string{"edge.route=*/"}, 0)
	registered := time.Now()
	backends := func() string {
		var addrs []string
		for _, b := range s.Status().Services["web"].Backends {
			addrs = append(addrs, b.Addr)
		}
		return strings.Join(addrs, ",")
	}
	for backends() != o2.addr {
		if time.Since(registered) > 20*time.Second {
			t.Fatalf("web-2, registered in the restarted Consul, is not in /status after 20s: backends %s", backends())
		}
		time.Sleep(5 * time.Millisecond)
	}
	d := time.Since(registered)
	t.Logf("registration in the restarted Consul in /status after %s", d)
	// Usually well under a second; the watch may still be backing off
	// from the failures of the outage.
	if d > 10*time.Second {
		t.Fatalf("registration in the restarted Consul took %s to reach /status", d)
	}
	waitBody(t, s, "x", "/", "hello from o2")
	// Each watch comes back at its own pace (one may still be waiting out
	// its backoff): /readyz shows every one fresh within seconds.
	var code int
	var body string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		code, body = adminGet(t, s, "/readyz")
		if code == 200 && strings.Contains(body, "consul web: fresh") && !strings.Contains(body, "unreachable") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz 10s after Consul came back: %d %s", code, body)
		}
	}
}

// TestTagRoutesWithoutDiscoveryState runs a config whose routes all come
// from Consul tags (as configs/demo.yaml) with Consul down: a damaged
// state_dir/discovery.json falls back to discovery.json.old, and with both
// unusable, stored URLs are answered stale and others get 503
// no_healthy_backend, never 404 no_route. Both engines answer alike.
func TestTagRoutesWithoutDiscoveryState(t *testing.T) {
	a := consultest.Start(t)
	o1 := startOrigin(t, "o1", nil)
	o2 := startOrigin(t, "o2", nil)
	state := t.TempDir()
	yaml := fmt.Sprintf("state_dir: %s\nconsul: {address: %s, tag_routes: true}\nservices:\n  web: {consul: {name: web}, stale: {max_stale: 24h}}\n", state, a.Addr())
	s := startEdge(t, yaml)
	a.Register("web-1", "web", originPort(t, o1), []string{"edge.route=*/"}, 0)
	waitBody(t, s, "x", "/page", "hello from o1")
	time.Sleep(1100 * time.Millisecond)
	a.Register("web-2", "web", originPort(t, o2), []string{"edge.route=*/"}, 0)
	for len(s.Status().Services["web"].Backends) != 2 {
		time.Sleep(5 * time.Millisecond)
	}
	// The stale store keeps /page; discovery.json web-1 and web-2, and
	// discovery.json.old web-1 alone.
	waitBody(t, s, "x", "/page", "hello from")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	s.Shutdown(ctx)
	cancel()
	a.Stop()

	path := filepath.Join(state, "discovery.json")
	os.WriteFile(path, []byte(`{"version": 1, "sets": {"web": {"serv`), 0o644)
	s = startEdge(t, yaml)
	waitBody(t, s, "x", "/other", "200  hello from o1 (Cache-Status \"\")")
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	s.Shutdown(ctx)
	cancel()

	os.WriteFile(path+".old", nil, 0o644)
	for _, loop := range []bool{true, false} {
		s := startEdge(t, fmt.Sprintf("server: {event_loop: %v}\n%s", loop, yaml))
		f := func(uri string, wantStatus int, wantError, wantCacheStatus, wantBody string) {
			t.Helper()
			resp := do(t, s, "GET", "x", uri)
			if resp.StatusCode() != wantStatus || string(resp.Header.Peek(HeaderError)) != wantError ||
				!strings.Contains(string(resp.Header.Peek("Cache-Status")), wantCacheStatus) || !strings.Contains(string(resp.Body()), wantBody) {
				t.Fatalf("event_loop %v: GET %s: %d %q %q %q, want %d %q %q %q", loop, uri, resp.StatusCode(), resp.Header.Peek(HeaderError),
					resp.Header.Peek("Cache-Status"), resp.Body(), wantStatus, wantError, wantCacheStatus, wantBody)
			}
		}
		f("/page", 200, "", "detail=no_healthy_backend", "hello from")
		f("/never-stored", 503, "no_healthy_backend", "", "no healthy backend")
		if code, body := adminGet(t, s, "/readyz"); code != 503 || !strings.Contains(body, "no routes loaded") {
			t.Fatalf("/readyz: %d %s", code, body)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s.Shutdown(ctx)
		cancel()
	}
}

// TestFlappingBackendKeepsItsHealth deregisters a dead backend from Consul
// and registers it again every 200 ms under traffic: it comes back with
// its health state each time, never "healthy (discovered)", and its
// ejections grow longer as for a backend that stayed.
func TestFlappingBackendKeepsItsHealth(t *testing.T) {
	a := consultest.Start(t)
	live := startOrigin(t, "live", nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	s := startEdge(t, fmt.Sprintf(`consul: {address: %s}
services:
  web:
    consul: {name: web}
    health: {passive: {base_ejection_time: 1s, max_ejection_time: 10s}}
routes: [{service: web}]
`, a.Addr()))
	a.Register("live", "web", originPort(t, live), nil, 0)
	_, deadPort, _ := net.SplitHostPort(dead)
	var port int
	fmt.Sscan(deadPort, &port)
	deadReg := &api.AgentServiceRegistration{ID: "dead", Name: "web", Address: "127.0.0.1", Port: port,
		Check: &api.AgentServiceCheck{CheckID: "check-dead", TTL: "10m", Status: api.HealthPassing}}
	if err := a.Client.Agent().ServiceRegister(deadReg); err != nil {
		t.Fatal(err)
	}
	waitBody(t, s, "x", "/", "hello from live")

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var failed atomic.Int64
	wg.Add(2)
	go func() { // traffic
		defer wg.Done()
		c := &fasthttp.Client{}
		for {
			select {
			case <-stop:
				return
			default:
			}
			code, _, err := c.GetTimeout(nil, "http://"+s.Addr()+"/", 10*time.Second)
			if err != nil || code != 200 {
				failed.Add(1)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	go func() { // flapping
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			a.Client.Agent().ServiceDeregister("dead")
			time.Sleep(100 * time.Millisecond)
			a.Client.Agent().ServiceRegister(deadReg)
		}
	}()
	defer func() {
		close(stop)
		wg.Wait()
	}()

	ejectedFor := regexp.MustCompile(`ejected for ([0-9.]+[µmns]+)`)
	var lengths []time.Duration
	var since time.Time
	ejected := false
	for start := time.Now(); len(lengths) == 0 || lengths[len(lengths)-1] < 2700*time.Millisecond; {
		if time.Since(start) > 40*time.Second {
			t.Fatalf("the flapping backend's ejections after 40s: %v", lengths)
		}
		for _, b := range s.Status().Services["web"].Backends {
			if b.Addr != dead {
				continue
			}
			if ejected && b.Reason == "discovered" {
				t.Fatalf("the flapping backend came back %s (%s) after %d ejections %v", b.State, b.Reason, len(lengths), lengths)
			}
			m := ejectedFor.FindStringSubmatch(b.Reason)
			if m == nil || b.Since.Equal(since) {
				continue
			}
			d, err := time.ParseDuration(m[1])
			if err != nil {
				t.Fatal(err)
			}
			ejected, since = true, b.Since
			lengths = append(lengths, d)
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("ejections of the flapping backend: %v; %d client requests failed", lengths, failed.Load())
	for i := 1; i < len(lengths); i++ {
		if lengths[i] <= lengths[i-1] {
			t.Fatalf("ejections do not grow: %v", lengths)
		}
	}
}
