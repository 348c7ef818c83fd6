package balancer

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/discovery"
	"github.com/edgelb/edgelb/discovery/dnstest"
)

// startDNS starts a test DNS server, stopped when the test ends.
func startDNS(t *testing.T) *dnstest.Server {
	t.Helper()
	srv, err := dnstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	return srv
}

// startOriginsOnOnePort starts an origin on each of the loopback
// addresses 127.0.0.1, 127.0.0.2, ... (n of them), all on one port, as the
// addresses of one host name are; origin i answers "hello from oI" and
// fails its /health while sick[i] is set.
func startOriginsOnOnePort(t *testing.T, n int) (port int, origins []*origin) {
	t.Helper()
	for range 50 {
		lns := make([]net.Listener, 0, n)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns = append(lns, ln)
		port = ln.Addr().(*net.TCPAddr).Port
		for i := 2; i <= n; i++ {
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.%d:%d", i, port))
			if err != nil {
				break
			}
			lns = append(lns, l)
		}
		if len(lns) < n {
			for _, l := range lns {
				l.Close()
			}
			continue
		}
		for i, l := range lns {
			origins = append(origins, serveOrigin(t, l, fmt.Sprintf("o%d", i+1)))
		}
		return port, origins
	}
	t.Fatal("no port free on every loopback address")
	return 0, nil
}

// serveOrigin serves an origin answering "hello from NAME" on ln.
func serveOrigin(t *testing.T, ln net.Listener, name string) *origin {
	o := &origin{addr: ln.Addr().String(), ln: ln}
	h := func(ctx *fasthttp.RequestCtx) {
		ctx.SetContentType("text/plain")
		fmt.Fprintf(ctx, "hello from %s", name)
	}
	o.reply.Store(&h)
	o.srv = &fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) {
		o.hits.Add(1)
		(*o.reply.Load())(ctx)
	}}
	go o.srv.Serve(ln)
	t.Cleanup(o.stop)
	return o
}

// dnsBlock is a top-level dns block that asks srv, with an empty hosts
// file.
func dnsBlock(t *testing.T, srv *dnstest.Server) string {
	hosts := filepath.Join(t.TempDir(), "hosts")
	if err := os.WriteFile(hosts, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("dns: {servers: [%s], timeout: 300ms, hosts_file: %s}\n", srv.Addr(), hosts)
}

// dnsStatus returns the discovery status of one name of a service.
func dnsStatus(t *testing.T, s *Server, service, name string) discovery.Status {
	t.Helper()
	for _, st := range s.DiscoveryStatus() {
		if st.Source == "dns" && st.Service == service && st.Name == name {
			return st
		}
	}
	t.Fatalf("no dns status for %s %s: %+v", service, name, s.DiscoveryStatus())
	return discovery.Status{}
}

// backendStates returns the backends of a service in /status as
// "addr=state", sorted by address.
func backendStates(s *Server, service string) string {
	ss := s.Status().Services[service]
	if ss == nil {
		return "-"
	}
	var out []string
	for _, b := range ss.Backends {
		out = append(out, b.Addr+"="+b.State)
	}
	return strings.Join(out, ",")
}

// TestDNSBackendsServeThroughAnOutage: a service given by host name is
// served by every address of the name, from both engines (the event loop
// itself: the addresses are IPs); when the DNS server stops, every request
// is still answered by the same backends, and /status and /readyz say
// that resolution fails and since when.
func TestDNSBackendsServeThroughAnOutage(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		port, origins := startOriginsOnOnePort(t, 2)
		srv := startDNS(t)
		srv.Set("web.outage.test", 1, "127.0.0.1", "127.0.0.2")
		s := startEdge(t, dnsBlock(t, srv)+"server: {"+engine+"}\n"+
			"services:\n  web: {static: [web.outage.test:"+strconv.Itoa(port)+"], balance: round_robin, retries: -1}\n"+
			"routes: [{service: web}]\n")
		want := fmt.Sprintf("127.0.0.1:%d=healthy,127.0.0.2:%d=healthy", port, port)
		if got := backendStates(s, "web"); got != want {
			t.Fatalf("backends %s, want %s", got, want)
		}
		if src := s.Status().Services["web"].Source; src != "dns" {
			t.Fatalf("source %q", src)
		}
		handoffs, fallbacks := loopHandoffs.Get(), loopFallbacks.Get()
		serveAll := func(when string) {
			t.Helper()
			h0, h1 := origins[0].hits.Load(), origins[1].hits.Load()
			for i := 0; i < 20; i++ {
				resp := do(t, s, "GET", "web.example", "/")
				if resp.StatusCode() != 200 || !strings.HasPrefix(string(resp.Body()), "hello from o") {
					t.Fatalf("%s: request %d: %d %q %s", when, i, resp.StatusCode(), resp.Body(), resp.Header.Peek(HeaderError))
				}
			}
			if origins[0].hits.Load() == h0 || origins[1].hits.Load() == h1 {
				t.Fatalf("%s: not every address served: %d and %d requests", when, origins[0].hits.Load()-h0, origins[1].hits.Load()-h1)
			}
		}
		serveAll("DNS up")

		stopped := time.Now()
		srv.Stop()
		waitFor(t, "two failed resolutions", func() bool { return dnsStatus(t, s, "web", "web.outage.test").Failures >= 2 })
		serveAll("DNS down")
		st := dnsStatus(t, s, "web", "web.outage.test")
		if !strings.Contains(st.LastError, srv.Addr()+" refused the connection") || st.FailingSince.Before(stopped) ||
			!st.Stale || strings.Join(st.Addrs, ",") != "127.0.0.1,127.0.0.2" {
			t.Fatalf("status %+v", st)
		}
		if got := backendStates(s, "web"); got != want {
			t.Fatalf("backends during the outage %s, want %s", got, want)
		}
		if strings.Contains(engine, "true") {
			if h, f := loopHandoffs.Get()-handoffs, loopFallbacks.Get()-fallbacks; h != 0 || f != 0 {
				t.Errorf("the event loop handed over %d connections and %d tries for backends given by name", h, f)
			}
		}

		// The JSON of /status, and /readyz, say it in words.
		_, body := adminGet(t, s, "/status")
		var doc struct {
			Discovery []map[string]any `json:"discovery"`
		}
		if err := json.Unmarshal([]byte(body), &doc); err != nil {
			t.Fatal(err)
		}
		found := false
		for _, d := range doc.Discovery {
			if d["name"] == "web.outage.test" {
				found = true
				for _, k := range []string{"addrs", "last_update", "last_error", "last_error_at", "failing_since", "failures", "stale", "answered_by"} {
					if _, ok := d[k]; !ok {
						t.Errorf("/status discovery entry lacks %s: %v", k, d)
					}
				}
			}
		}
		if !found {
			t.Errorf("/status has no entry for the name:\n%s", body)
		}
		if code, body := adminGet(t, s, "/readyz"); code != 200 || !strings.Contains(body, "dns web web.outage.test: stale") ||
			!strings.Contains(body, "refused the connection") || !strings.Contains(body, "failing for") {
			t.Errorf("/readyz: %d\n%s", code, body)
		}
		_, m := adminGet(t, s, "/metrics")
		for _, want := range []string{
			`edgelb_dns_resolutions_total{name="web.outage.test",result="ok"}`,
			`edgelb_dns_resolutions_total{name="web.outage.test",result="unreachable"}`,
			"# HELP edgelb_dns_resolutions_total Resolutions of the host names of static backends",
			`edgelb_discovery_errors_total{source="dns",service="web"}`,
		} {
			if !strings.Contains(m, want) {
				t.Errorf("/metrics lacks %s", want)
			}
		}
	})
}

// TestDNSReResolutionKeepsHealth: an address that stays in the answer
// keeps its health state; a new one joins; one that leaves drains and
// goes. An NXDOMAIN answer then changes none of them.
func TestDNSReResolutionKeepsHealth(t *testing.T) {
	port, origins := startOriginsOnOnePort(t, 3)
	sick := func(ctx *fasthttp.RequestCtx) {
		if string(ctx.Path()) == "/health" {
			ctx.SetStatusCode(500)
			return
		}
		ctx.WriteString("hello from o2")
	}
	origins[1].reply.Store(&sick)
	srv := startDNS(t)
	srv.Set("web.health.test", 1, "127.0.0.1", "127.0.0.2")
	s := startEdge(t, dnsBlock(t, srv)+
		"services:\n  web: {static: [web.health.test:"+strconv.Itoa(port)+"], health: {active: {path: /health, interval: 100ms, fall: 1}}}\n"+
		"routes: [{service: web}]\n")
	p := func(i int) string { return fmt.Sprintf("127.0.0.%d:%d", i, port) }
	waitFor(t, "o2 unhealthy", func() bool { return backendStates(s, "web") == p(1)+"=healthy,"+p(2)+"=unhealthy" })
	var since time.Time
	for _, b := range s.Status().Services["web"].Backends {
		if b.Addr == p(2) {
			since = b.Since
		}
	}

	srv.Set("web.health.test", 1, "127.0.0.2", "127.0.0.3")
	waitFor(t, "the new answer", func() bool {
		st := backendStates(s, "web")
		return strings.HasPrefix(st, p(2)+"=unhealthy,"+p(3)+"=") && !strings.Contains(st, p(1)+"=healthy")
	})
	for _, b := range s.Status().Services["web"].Backends {
		if b.Addr == p(2) && !b.Since.Equal(since) {
			t.Errorf("o2's state was reset by the new answer: since %v, was %v", b.Since, since)
		}
	}
	waitFor(t, "o3 healthy and o1 gone", func() bool { return backendStates(s, "web") == p(2)+"=unhealthy,"+p(3)+"=healthy" })
	for i := 0; i < 10; i++ {
		if resp := do(t, s, "GET", "web.example", "/"); resp.StatusCode() != 200 || string(resp.Body()) != "hello from o3" {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode(), resp.Body())
		}
	}

	// A name that stops existing keeps its last addresses and states.
	srv.Fail("web.health.test", dns.RcodeNameError)
	waitFor(t, "NXDOMAIN seen", func() bool { return dnsStatus(t, s, "web", "web.health.test").Failures > 0 })
	if st := dnsStatus(t, s, "web", "web.health.test"); !strings.Contains(st.LastError, "web.health.test. does not exist (NXDOMAIN from "+srv.Addr()+")") {
		t.Fatalf("status %+v", st)
	}
	if got := backendStates(s, "web"); got != p(2)+"=unhealthy,"+p(3)+"=healthy" {
		t.Fatalf("backends after NXDOMAIN: %s", got)
	}
	for i := 0; i < 10; i++ {
		if resp := do(t, s, "GET", "web.example", "/"); resp.StatusCode() != 200 || string(resp.Body()) != "hello from o3" {
			t.Fatalf("request %d after NXDOMAIN: %d %q", i, resp.StatusCode(), resp.Body())
		}
	}
}

// TestDNSStartWithoutDNS: an edgelb started while DNS is down serves from
// the addresses it persisted in state_dir; without them, the name adds no
// backend: 503 no_healthy_backend, and /status says why.
func TestDNSStartWithoutDNS(t *testing.T) {
	port, origins := startOriginsOnOnePort(t, 1)
	srv := startDNS(t)
	srv.Set("web.start.test", 60, "127.0.0.1")
	stateDir := t.TempDir()
	cfg := "state_dir: " + stateDir + "\n" + dnsBlock(t, srv) +
		"services:\n  web: {static: [web.start.test:" + strconv.Itoa(port) + "], stale: {disabled: true}}\n" +
		"routes: [{service: web}]\n"
	first := startEdge(t, cfg)
	if resp := do(t, first, "GET", "web.example", "/"); resp.StatusCode() != 200 {
		t.Fatalf("first edge: %d", resp.StatusCode())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := first.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}

	srv.Stop()
	s := startEdge(t, cfg)
	if resp := do(t, s, "GET", "web.example", "/"); resp.StatusCode() != 200 || string(resp.Body()) != "hello from o1" {
		t.Fatalf("edge started from state_dir: %d %q %s", resp.StatusCode(), resp.Body(), resp.Header.Peek(HeaderError))
	}
	if st := dnsStatus(t, s, "web", "web.start.test"); !st.FromDisk || !strings.Contains(st.LastError, "refused the connection") {
		t.Fatalf("status %+v", st)
	}
	if origins[0].hits.Load() != 2 {
		t.Errorf("origin hits %d", origins[0].hits.Load())
	}

	bare := startEdge(t, strings.Replace(cfg, "state_dir: "+stateDir, "state_dir: "+t.TempDir(), 1))
	resp := do(t, bare, "GET", "web.example", "/")
	if resp.StatusCode() != 503 || string(resp.Header.Peek(HeaderError)) != "no_healthy_backend" {
		t.Fatalf("edge without state: %d %s", resp.StatusCode(), resp.Header.Peek(HeaderError))
	}
	if st := dnsStatus(t, bare, "web", "web.start.test"); len(st.Addrs) != 0 ||
		!strings.Contains(st.LastError, "no earlier answer (none in state_dir either): the name adds no backend") {
		t.Fatalf("status %+v", st)
	}
}

// TestDNSHostsFile: a name of the hosts file takes its addresses from it,
// with no DNS server asked; localhost works as it does for the system
// resolver.
func TestDNSHostsFile(t *testing.T) {
	o := startOrigin(t, "a", nil)
	_, port, _ := net.SplitHostPort(o.addr)
	srv := startDNS(t)
	hosts := filepath.Join(t.TempDir(), "hosts")
	if err := os.WriteFile(hosts, []byte("127.0.0.1 localhost\n::1 localhost ip6-localhost\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	s := startEdge(t, fmt.Sprintf("dns: {servers: [%s], hosts_file: %s}\nservices:\n  web: {static: [localhost:%s]}\nroutes: [{service: web}]\n", srv.Addr(), hosts, port))
	if resp := do(t, s, "GET", "web.example", "/"); resp.StatusCode() != 200 {
		t.Fatalf("%d", resp.StatusCode())
	}
	st := dnsStatus(t, s, "web", "localhost")
	if strings.Join(st.Addrs, ",") != "127.0.0.1,::1" || st.AnsweredBy != "hosts file "+hosts || srv.Queries("localhost") != 0 {
		t.Fatalf("status %+v, %d DNS questions", st, srv.Queries("localhost"))
	}
}

// TestDNSReloadTurnsNamesIntoAddresses: a reload may give a service names
// instead of addresses and back; each time the backends follow at once.
func TestDNSReloadTurnsNamesIntoAddresses(t *testing.T) {
	port, _ := startOriginsOnOnePort(t, 2)
	srv := startDNS(t)
	srv.Set("web.reload.test", 60, "127.0.0.2")
	block := dnsBlock(t, srv)
	p := func(i int) string { return fmt.Sprintf("127.0.0.%d:%d", i, port) }
	s := startEdge(t, block+"services:\n  web: {static: ["+p(1)+"]}\nroutes: [{service: web}]\n")
	f := func(static, want string) {
		t.Helper()
		cfg := mustConfig(t, "listen: "+s.Addr()+"\nadmin: "+s.AdminAddr()+"\nstate_dir: "+s.cfg.StateDir+"\n"+block+
			"services:\n  web: {static: ["+static+"]}\nroutes: [{service: web}]\n")
		cfg.Listen, cfg.Admin = s.cfg.Listen, s.cfg.Admin
		if err := s.Reload(cfg); err != nil {
			t.Fatal(err)
		}
		if got := backendStates(s, "web"); !strings.HasPrefix(got, want) {
			t.Fatalf("after reload to %s: backends %s, want %s", static, got, want)
		}
		if resp := do(t, s, "GET", "web.example", "/"); resp.StatusCode() != 200 {
			t.Fatalf("after reload to %s: %d", static, resp.StatusCode())
		}
	}
	f("web.reload.test:"+strconv.Itoa(port), p(2)+"=healthy")
	f(p(1), p(1)+"=healthy")
	f("web.reload.test:"+strconv.Itoa(port)+", "+p(1), p(1)+"=healthy,"+p(2)+"=healthy")
}

func TestDNSConfig(t *testing.T) {
	base := "services:\n  web: {static: [api.internal:8080]}\nroutes: [{service: web}]\n"
	cfg := mustConfig(t, base)
	if d := cfg.DNS; d.Interval != discovery.DefaultDNSInterval || d.Timeout != discovery.DefaultDNSTimeout ||
		d.HostsFile != "/etc/hosts" || d.ResolvConf != "/etc/resolv.conf" || len(d.Servers) != 0 {
		t.Fatalf("defaults %+v", d)
	}
	cfg = mustConfig(t, "dns: {servers: [10.0.0.2, '[fd00::1]:5353'], interval: 10s}\n"+
		"services:\n  web: {static: [api.internal:8080, 127.0.0.1:81], dns: {interval: 5s, servers: [127.0.0.1:5300]}}\n  b: {static: [b.internal:80]}\n"+
		"routes: [{service: web}, {path: /b, service: b}]\n")
	m := dnsServices(cfg)
	if got := fmt.Sprintf("%v %v %v", m["web"].DNS.Servers, m["web"].DNS.Interval, m["web"].DNS.Timeout); got != "[127.0.0.1:5300] 5s 2s" {
		t.Errorf("web's dns: %s", got)
	}
	if got := fmt.Sprintf("%v %v", m["b"].DNS.Servers, m["b"].DNS.Interval); got != "[10.0.0.2:53 [fd00::1]:5353] 10s" {
		t.Errorf("b's dns: %s", got)
	}

	f := func(yaml, want string) {
		t.Helper()
		_, err := ParseConfig([]byte(yaml))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("got %v, want %q", err, want)
		}
	}
	svc := func(static string) string {
		return "services:\n  web: {static: [" + static + "]}\nroutes: [{service: web}]\n"
	}
	f(svc("api..internal:8080"), `services.web.static[0]: "api..internal:8080": host name "api..internal" has an empty label`)
	f(svc("-api.internal:8080"), `services.web.static[0]: "-api.internal:8080": host name "-api.internal" has a label starting or ending with '-'`)
	f(svc("api_internal!:8080"), `services.web.static[0]: "api_internal!:8080": host name "api_internal!" has the character '!'`)
	f(svc("10.0.0.300:80"), `services.web.static[0]: "10.0.0.300:80": "10.0.0.300" is not an IP address`)
	f(svc("api.internal"), `services.web.static[0]: invalid address "api.internal": want host:port`)
	f("dns: {servers: [dns.example:53]}\n"+svc("api.internal:80"), `dns.servers[0]: "dns.example:53": a DNS server is given by its IP address, not a name`)
	f("dns: {servers: [10.0.0.2:0]}\n"+svc("api.internal:80"), `dns.servers[0]: "10.0.0.2:0": port must be a number from 1 to 65535`)
	f("dns: {servers: [nameserver]}\n"+svc("api.internal:80"), `dns.servers[0]: want the IP address of a DNS server`)
	f("dns: {interval: 100ms}\n"+svc("api.internal:80"), "dns.interval: must be at least 1s (got 100ms)")
	f("dns: {interval: 5}\n"+svc("api.internal:80"), "dns.interval: duration 5 needs a unit")
	f("dns: {timeout: 1m}\n"+svc("api.internal:80"), "dns.timeout: must not exceed interval (30s), got 1m0s")
	f("dns: {hosts_file: /nonexistent/hosts}\n"+svc("api.internal:80"), `dns.hosts_file: cannot read "/nonexistent/hosts"`)
	f("dns: {resolv_conf: /nonexistent/resolv.conf}\n"+svc("api.internal:80"), `dns.resolv_conf: cannot read "/nonexistent/resolv.conf"`)
	f("dns: {server: [10.0.0.2]}\n"+svc("api.internal:80"), "dns.server: unknown key (known keys: hosts_file, interval, resolv_conf, servers, timeout)")
	f("services:\n  web: {static: [127.0.0.1:80], dns: {interval: 5s}}\nroutes: [{service: web}]\n",
		"services.web.dns: set, but no static backend is given by host name")
	f("services:\n  web: {static: [a.internal:80], dns: {servers: [a.internal]}}\nroutes: [{service: web}]\n",
		`services.web.dns.servers[0]: want the IP address of a DNS server`)
	f("dns: {interval: 5s}\nservices:\n  web: {static: [a.internal:80], dns: {timeout: 10s}}\nroutes: [{service: web}]\n",
		"services.web.dns: timeout (10s) must not exceed interval (5s)")
}
