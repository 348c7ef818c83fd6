package balancer

import (
	"context"
	"crypto/tls"
	"strings"
	"testing"
	"time"

	"github.com/edgelb/edgelb/balancer/acme"
)

// startACMEEdge starts edgelb from a config with a tls.acme block for c,
// frequent certificate checks, and stops it when the test ends. The CA's
// validation is pointed at it unless another instance was.
func startACMEEdge(t *testing.T, c *testCA, yaml string, validate bool) *Server {
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
		c.validate(s.Addr(), s.TLSAddr())
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
		c := startTestCA(t, testCAOptions{ocsp: true})
		challenges := metricValue(t, startEdge(t, "services: {web: {static: ["+o.addr+"]}}\nroutes: [{path: /, service: web}]\n"), `edgelb_acme_challenges_total{type="http-01"}`)
		s := startACMEEdge(t, c, "server: {"+engine+"}\nservices: {web: {static: ["+o.addr+"]}}\n"+
			"routes: [{host: a.test, path: /, service: web, https_redirect: true}, {path: /, service: web}]\n"+
			acmeYAML(c, []string{"a.test"}, "challenges: [http-01]", "storage: dir"), true)

		st := waitServed(t, s, "a.test", c.roots, nil, 30*time.Second)
		leaf := st.PeerCertificates[0]
		if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != "a.test" {
			t.Fatalf("certificate names %v, want [a.test]", leaf.DNSNames)
		}
		if n := c.orders.Load(); n != 1 {
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
			st = waitServed(t, s, "a.test", c.roots, nil, 5*time.Second)
		}
		c.checkStaple(st)

		// Requests over TLS reach the backend; plain ones are redirected.
		cc := mustDialTLS(t, s, &tls.Config{ServerName: "a.test", RootCAs: c.roots})
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
