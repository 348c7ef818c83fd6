package balancer

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/edgelb/edgelb/balancer/acme"
	"github.com/edgelb/edgelb/balancer/acme/acmetest"
	"github.com/edgelb/edgelb/discovery/consultest"
)

// startACMEEdge starts edgelb from a config with a tls.acme block for c,
// frequent certificate checks, and stops it when the test ends. The CA's
// validation is pointed at it unless another instance was.
func startACMEEdge(t *testing.T, c *acmetest.CA, yaml string, validate bool) *Server {
	t.Helper()
	if !strings.Contains(yaml, "state_dir:") {
		yaml = "state_dir: " + t.TempDir() + "\n" + yaml
	}
	cfg := mustConfig(t, "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n"+yaml)
	shortChecks(cfg, 300*time.Millisecond)
	s := NewServer(cfg, quietLogger())
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
	})
	if validate {
		c.Validate(s.Addr(), s.TLSAddr())
	}
	return s
}

// TestACMEIssuesOverHTTP01 gets a certificate from a local ACME CA whose
// validation fetches the HTTP-01 answer from edgelb's plain listener, on
// both engines, before routing (the route redirects to HTTPS), and serves
// it over TLS with an OCSP staple.
func TestACMEIssuesOverHTTP01(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startOrigin(t, "web", nil)
		c := acmetest.Start(t, acmetest.Options{OCSP: true})
		challenges := metricValue(t, startEdge(t, "services: {web: {static: ["+o.addr+"]}}\nroutes: [{path: /, service: web}]\n"), `edgelb_acme_challenges_total{type="http-01"}`)
		s := startACMEEdge(t, c, "server: {"+engine+"}\nservices: {web: {static: ["+o.addr+"]}}\n"+
			"routes: [{host: a.test, path: /, service: web, https_redirect: true}, {path: /, service: web}]\n"+
			acmeYAML(c, []string{"a.test"}, "challenges: [http-01]", "storage: dir"), true)

		st := waitServed(t, s, "a.test", c.Roots, nil, 30*time.Second)
		leaf := st.PeerCertificates[0]
		if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != "a.test" {
			t.Fatalf("certificate names %v, want [a.test]", leaf.DNSNames)
		}
		if n := c.Orders.Load(); n != 1 {
			t.Fatalf("%d orders at the CA, want 1", n)
		}
		if got := metricValue(t, s, `edgelb_acme_challenges_total{type="http-01"}`); got <= challenges {
			t.Fatalf("edgelb_acme_challenges_total{type=\"http-01\"} still %d: the challenge was not answered by edgelb", got)
		}

		// The staple comes with the certificate once the responder
		// answered; the OCSP check runs every 300ms.
		deadline := time.Now().Add(10 * time.Second)
		for len(st.OCSPResponse) == 0 && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
			st = waitServed(t, s, "a.test", c.Roots, nil, 5*time.Second)
		}
		c.CheckStaple(st)

		// Requests over TLS reach the backend; plain ones are redirected.
		cc := mustDialTLS(t, s, &tls.Config{ServerName: "a.test", RootCAs: c.Roots})
		if resp := cc.get(t, "a.test", "/x"); resp.StatusCode() != 200 || string(resp.Body()) != "hello from web" {
			t.Fatalf("GET https://a.test/x: %d %q", resp.StatusCode(), resp.Body())
		}
		if resp := do(t, s, "GET", "a.test", "/x"); resp.StatusCode() != 308 {
			t.Fatalf("GET http://a.test/x: %d, want 308", resp.StatusCode())
		}
		// Challenge paths of other hosts, or unknown tokens, are routed.
		if resp := do(t, s, "GET", "other.test", acme.ChallengePath+"tok"); resp.StatusCode() != 200 || string(resp.Body()) != "hello from web" {
			t.Fatalf("GET http://other.test%stok: %d %q, want the backend's answer", acme.ChallengePath, resp.StatusCode(), resp.Body())
		}
		if resp := do(t, s, "GET", "a.test", acme.ChallengePath+"unknown"); resp.StatusCode() != 308 {
			t.Fatalf("GET http://a.test%sunknown: %d, want the route's 308", acme.ChallengePath, resp.StatusCode())
		}

		// /status lists the certificate, and the metrics count it.
		var found bool
		for _, cs := range getStatus(t, s).Certificates {
			if cs.Source == "acme" && len(cs.Names) == 1 && cs.Names[0] == "a.test" {
				found = true
				if !cs.NotAfter.Equal(leaf.NotAfter) || cs.Pending || !cs.OCSPStapled {
					t.Fatalf("/status certificate %+v, want not_after %v, stapled", cs, leaf.NotAfter)
				}
			}
		}
		if !found {
			t.Fatalf("/status lists no ACME certificate for a.test: %+v", getStatus(t, s).Certificates)
		}
		m := getMetrics(t, s)
		for _, want := range []string{`edgelb_tls_certificates{source="acme"} 1`, `edgelb_tls_certificate_expiry_seconds{source="acme",name="a.test"} `,
			"# HELP edgelb_acme_certificates_issued_total ", "# TYPE edgelb_tls_certificate_expiry_seconds gauge"} {
			if !strings.Contains(m, want) {
				t.Fatalf("/metrics lacks %q", want)
			}
		}
	})
}

// TestACMEIssuesOverTLSALPN01 gets a certificate whose validation does the
// TLS-ALPN-01 handshake (acme-tls/1) with edgelb's TLS listener.
func TestACMEIssuesOverTLSALPN01(t *testing.T) {
	c := acmetest.Start(t, acmetest.Options{})
	before := alpnChallengesServed(t)
	s := startACMEEdge(t, c, "services: {web: {static: [127.0.0.1:1]}}\n"+
		acmeYAML(c, []string{"b.test"}, "challenges: [tls-alpn-01]", "storage: dir"), true)
	st := waitServed(t, s, "b.test", c.Roots, nil, 30*time.Second)
	if names := st.PeerCertificates[0].DNSNames; len(names) != 1 || names[0] != "b.test" {
		t.Fatalf("certificate names %v, want [b.test]", names)
	}
	// acme-tls/1 is for the CA alone: a client offering h2 and
	// http/1.1 gets h2, as without tls.acme.
	if st.NegotiatedProtocol != "h2" {
		t.Fatalf("a client offering h2 and http/1.1 negotiated %q", st.NegotiatedProtocol)
	}
	if n := alpnChallengesServed(t) - before; n < 1 {
		t.Fatal("no TLS-ALPN-01 challenge answered by edgelb")
	}

	// A handshake asking for acme-tls/1 alone, with no challenge under
	// way, gets no certificate; nor does one for another name.
	if _, err := tls.Dial("tcp", s.TLSAddr(), &tls.Config{ServerName: "b.test", NextProtos: []string{acme.ALPNProto}, InsecureSkipVerify: true}); err == nil {
		t.Fatal("an acme-tls/1 handshake with no challenge under way succeeded")
	}
	if _, err := handshakeACME(s, "other.test", c.Roots); err == nil {
		t.Fatal("a handshake for a name with no certificate succeeded")
	}
}

// alpnChallengesServed reads edgelb_acme_challenges_total{type="tls-alpn-01"}.
func alpnChallengesServed(t *testing.T) int {
	t.Helper()
	return metricValue(t, startEdge(t, "services: {web: {static: [127.0.0.1:1]}}\nroutes: [{path: /, service: web}]\n"), `edgelb_acme_challenges_total{type="tls-alpn-01"}`)
}

// TestACMERenews renews short-lived certificates in the background: a new
// order, and the new certificate served on new handshakes, while the
// previous one served until then.
func TestACMERenews(t *testing.T) {
	c := acmetest.Start(t, acmetest.Options{Validity: 12 * time.Second})
	s := startACMEEdge(t, c, "services: {web: {static: [127.0.0.1:1]}}\n"+
		acmeYAML(c, []string{"r.test"}, "storage: dir", "renewal_window: 0.5"), true)
	first := waitServed(t, s, "r.test", c.Roots, nil, 30*time.Second).PeerCertificates[0]
	renewed := metricValue(t, s, "edgelb_acme_certificates_renewed_total")
	second := waitServed(t, s, "r.test", c.Roots, first.SerialNumber, 30*time.Second).PeerCertificates[0]
	if !second.NotAfter.After(first.NotAfter) {
		t.Fatalf("renewed certificate expires %v, not after the first's %v", second.NotAfter, first.NotAfter)
	}
	if n := c.Orders.Load(); n < 2 {
		t.Fatalf("%d orders at the CA, want a second for the renewal", n)
	}
	if got := metricValue(t, s, "edgelb_acme_certificates_renewed_total"); got <= renewed {
		t.Fatalf("edgelb_acme_certificates_renewed_total stayed %d", got)
	}
}

// TestACMEFilesWin serves a certificate from files for the names it holds
// and the ACME one for its domain; the file one is the default.
func TestACMEFilesWin(t *testing.T) {
	pki := newTestPKI(t)
	cert, key := pki.issue("files", "files.test", "both.test")
	c := acmetest.Start(t, acmetest.Options{})
	cfg := "services: {web: {static: [127.0.0.1:1]}}\n" + acmeYAML(c, []string{"acme.test", "both.test"}, "storage: dir") +
		"  certs: [{cert: " + cert + ", key: " + key + "}]\n"
	s := startACMEEdge(t, c, cfg, true)
	waitServed(t, s, "acme.test", c.Roots, nil, 30*time.Second)
	waitFor(t, "both ACME certificates", func() bool { return c.Orders.Load() == 2 && len(acmeCerts(s)) == 2 })
	for _, tc := range []struct {
		sni   string
		roots *x509.CertPool
	}{{"files.test", pki.ca.Pool()}, {"both.test", pki.ca.Pool()}, {"", pki.ca.Pool()}, {"acme.test", c.Roots}} {
		st, err := handshakeACME(s, tc.sni, tc.roots)
		if err != nil && tc.sni != "" {
			t.Fatalf("SNI %q: %v", tc.sni, err)
		}
		if tc.sni == "" {
			// No name to verify: check which certificate came.
			conn, err := tls.Dial("tcp", s.TLSAddr(), &tls.Config{InsecureSkipVerify: true})
			if err != nil {
				t.Fatal(err)
			}
			st = conn.ConnectionState()
			conn.Close()
			if names := st.PeerCertificates[0].DNSNames; names[0] != "files.test" {
				t.Fatalf("no SNI: got the certificate of %v, want the file one", names)
			}
		}
	}
}

// acmeCerts returns the ACME certificates in s's /status.
func acmeCerts(s *Server) []CertStatus {
	var out []CertStatus
	for _, c := range s.Certificates() {
		if c.Source == "acme" && !c.Pending {
			out = append(out, c)
		}
	}
	return out
}

// TestACMECADown: with the CA gone, a restarted edgelb serves the
// certificates stored before, counts its failure to get the one of a new
// domain, lists that domain as pending, and serves the rest as usual.
func TestACMECADown(t *testing.T) {
	stateDir := t.TempDir()
	c := acmetest.Start(t, acmetest.Options{})
	yaml := "state_dir: " + stateDir + "\nservices: {web: {static: [127.0.0.1:1]}}\n"
	first := startACMEEdge(t, c, yaml+acmeYAML(c, []string{"d.test"}, "storage: dir"), true)
	waitServed(t, first, "d.test", c.Roots, nil, 30*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	first.Shutdown(ctx)
	cancel()
	c.Stop()

	failures := metricValue(t, startEdge(t, "services: {web: {static: [127.0.0.1:1]}}\nroutes: [{path: /, service: web}]\n"), `edgelb_acme_failures_total{op="obtain"}`)
	s := startACMEEdge(t, c, yaml+acmeYAML(c, []string{"d.test", "n.test"}, "storage: dir"), false)
	// Served at once from storage, without the CA.
	if _, err := handshakeACME(s, "d.test", c.Roots); err != nil {
		t.Fatalf("stored certificate of d.test not served with the CA down: %v", err)
	}
	waitFor(t, "the failed order counted", func() bool {
		return metricValue(t, s, `edgelb_acme_failures_total{op="obtain"}`) > failures
	})
	var pending []string
	for _, cs := range getStatus(t, s).Certificates {
		if cs.Pending {
			pending = append(pending, cs.Names...)
		}
	}
	if len(pending) != 1 || pending[0] != "n.test" {
		t.Fatalf("/status pending domains %v, want [n.test]", pending)
	}
	if _, err := handshakeACME(s, "n.test", c.Roots); err == nil {
		t.Fatal("a handshake for n.test verified, with no certificate for it")
	}
}

// TestACMESharedConsul: an instance gets a certificate into Consul; a
// second instance on the same Consul serves it from its start, with no
// order of its own.
func TestACMESharedConsul(t *testing.T) {
	agent := consultest.Start(t)
	c := acmetest.Start(t, acmetest.Options{})
	issued := issuedCount(t)
	yaml := "consul: {address: " + agent.Addr() + "}\nservices: {web: {static: [127.0.0.1:1]}}\n" + acmeYAML(c, []string{"shared.test"})
	a := startACMEEdge(t, c, yaml, true)
	first := waitServed(t, a, "shared.test", c.Roots, nil, 30*time.Second).PeerCertificates[0]
	if keys, _, err := agent.Client.KV().Keys(acme.DefaultConsulPrefix+"certificates/", "", nil); err != nil || len(keys) == 0 {
		t.Fatalf("no certificate under %scertificates/ in Consul: %v %v", acme.DefaultConsulPrefix, keys, err)
	}

	b := startACMEEdge(t, c, yaml, false)
	st, err := handshakeACME(b, "shared.test", c.Roots)
	if err != nil {
		t.Fatalf("second instance: %v", err)
	}
	if got := st.PeerCertificates[0]; got.SerialNumber.Cmp(first.SerialNumber) != 0 {
		t.Fatalf("second instance serves serial %v, want the first's %v", got.SerialNumber, first.SerialNumber)
	}
	// Give the second instance's management time to go wrong.
	time.Sleep(time.Second)
	if n := c.Orders.Load(); n != 1 {
		t.Fatalf("%d orders at the CA, want 1", n)
	}
	if n := issuedCount(t) - issued; n != 1 {
		t.Fatalf("edgelb_acme_certificates_issued_total went up by %d, want 1", n)
	}
	if cs := acmeCerts(b); len(cs) != 1 || cs[0].Names[0] != "shared.test" {
		t.Fatalf("second instance's /status certificates %+v", cs)
	}
}

// TestACMEConsulLockIssuesOnce starts two instances on one Consul at once:
// the Consul lock lets one order the certificate, and both serve it.
func TestACMEConsulLockIssuesOnce(t *testing.T) {
	agent := consultest.Start(t)
	c := acmetest.Start(t, acmetest.Options{})
	issued := issuedCount(t)
	yaml := "consul: {address: " + agent.Addr() + "}\nservices: {web: {static: [127.0.0.1:1]}}\n" + acmeYAML(c, []string{"once.test"})
	servers := make([]*Server, 2)
	done := make(chan int)
	for i := range servers {
		go func() {
			defer func() { done <- i }()
			servers[i] = startACMEEdge(t, c, yaml, false)
		}()
	}
	<-done
	<-done
	if servers[0] == nil || servers[1] == nil {
		t.FailNow()
	}
	// Both are managing the name by now, each waiting on the CA.
	c.Validate(servers[0].Addr(), servers[0].TLSAddr())
	var serials []*big.Int
	for _, s := range servers {
		serials = append(serials, waitServed(t, s, "once.test", c.Roots, nil, 60*time.Second).PeerCertificates[0].SerialNumber)
	}
	if serials[0].Cmp(serials[1]) != 0 {
		t.Fatalf("the instances serve serials %v and %v, want one certificate", serials[0], serials[1])
	}
	if n := c.Orders.Load(); n != 1 {
		t.Fatalf("%d orders at the CA, want 1", n)
	}
	if n := issuedCount(t) - issued; n != 1 {
		t.Fatalf("edgelb_acme_certificates_issued_total went up by %d, want 1", n)
	}
}

// issuedCount reads edgelb_acme_certificates_issued_total, which every
// instance of the test process shares.
func issuedCount(t *testing.T) int {
	t.Helper()
	return metricValue(t, startEdge(t, "services: {web: {static: [127.0.0.1:1]}}\nroutes: [{path: /, service: web}]\n"), "edgelb_acme_certificates_issued_total")
}

// TestACMEReload: a reload that adds a domain gets its certificate while
// the running one serves on, with no new order for it; one that leaves
// tls.acme unchanged keeps the manager; one that drops it stops serving
// the ACME certificates.
func TestACMEReload(t *testing.T) {
	c := acmetest.Start(t, acmetest.Options{})
	stateDir := t.TempDir()
	svc := "services: {web: {static: [127.0.0.1:1]}}\n"
	s := startACMEEdge(t, c, "state_dir: "+stateDir+"\n"+svc+acmeYAML(c, []string{"one.test"}), true)
	waitServed(t, s, "one.test", c.Roots, nil, 30*time.Second)
	running := s.tls.acme.Load()

	same := mustConfig(t, reloadYAML(s, svc+acmeYAML(c, []string{"one.test"})))
	shortChecks(same, 300*time.Millisecond)
	if err := s.Reload(same); err != nil {
		t.Fatal(err)
	}
	if s.tls.acme.Load() != running {
		t.Fatal("a reload with the same tls.acme replaced the manager")
	}

	cfg := mustConfig(t, reloadYAML(s, svc+acmeYAML(c, []string{"one.test", "two.test"})))
	shortChecks(cfg, 300*time.Millisecond)
	if err := s.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := handshakeACME(s, "one.test", c.Roots); err != nil {
		t.Fatalf("one.test right after the reload: %v", err)
	}
	waitServed(t, s, "two.test", c.Roots, nil, 30*time.Second)
	if n := c.Orders.Load(); n != 2 {
		t.Fatalf("%d orders at the CA, want 2 (one per domain)", n)
	}

	pki := newTestPKI(t)
	cert, key := pki.issue("files", "files.test")
	if err := s.Reload(mustConfig(t, reloadYAML(s, svc+tlsYAML("", cert, key)))); err != nil {
		t.Fatal(err)
	}
	if _, err := handshakeACME(s, "one.test", c.Roots); err == nil {
		t.Fatal("one.test still served from ACME after tls.acme was dropped")
	}
	if cs := s.Certificates(); len(cs) != 1 || cs[0].Source != "file" {
		t.Fatalf("certificates after dropping tls.acme: %+v", cs)
	}
}
