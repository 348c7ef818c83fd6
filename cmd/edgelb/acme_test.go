package main

import (
	"crypto/tls"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/edgelb/edgelb/balancer/acme"
	"github.com/edgelb/edgelb/balancer/acme/acmetest"
	"github.com/edgelb/edgelb/discovery/consultest"
)

// acmeProcess is an edgelb process with a tls.acme block.
type acmeProcess struct {
	listen, tlsListen, admin string
	output                   func() string
}

// startACMEProcess runs edgelb with a tls.acme block for domain from ca,
// its storage in Consul at consulAddr, HTTP-01 only.
func startACMEProcess(t *testing.T, name, consulAddr string, ca *acmetest.CA, domain string) *acmeProcess {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	p := &acmeProcess{listen: freeAddr(t), tlsListen: freeAddr(t), admin: freeAddr(t)}
	path := filepath.Join(t.TempDir(), name+".yaml")
	writeConfig(t, path, fmt.Sprintf(`listen: %s
admin: %s
state_dir: %s
consul: {address: %s}
services: {web: {static: [127.0.0.1:1]}}
routes: [{service: web}]
tls:
  listen: %s
  acme: {email: ops@example.com, domains: [%s], ca: %q, ca_root: %s, challenges: [http-01]}
`, p.listen, p.admin, dir, consulAddr, p.tlsListen, domain, ca.Dir, ca.RootFile))
	cmd := exec.Command(edgelbBin, "-config", path)
	p.output = startLogged(t, t.TempDir(), cmd)
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitFor(t, name+" ready", func() bool { code, _ := get("http://" + p.admin + "/readyz"); return code == 200 })
	return p
}

// metric returns the value of one series in p's /metrics, or -1.
func (p *acmeProcess) metric(series string) int {
	_, body := get("http://" + p.admin + "/metrics")
	for _, l := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(l, series+" "); ok {
			n, _ := strconv.Atoi(v)
			return n
		}
	}
	return -1
}

// serves reports whether p serves a certificate for name that ca issued.
func (p *acmeProcess) serves(ca *acmetest.CA, name string) bool {
	conn, err := tls.Dial("tcp", p.tlsListen, &tls.Config{ServerName: name, RootCAs: ca.Roots})
	if err != nil {
		return false
	}
	conn.Close()
	return true
}

// TestACMEChallengeAnsweredFromConsul: of two edgelb processes on one
// Consul, the one holding the order's lock orders the certificate, and the
// CA's HTTP-01 validation reaches the other, which answers it from what
// the first put in Consul. Both then serve the one certificate.
func TestACMEChallengeAnsweredFromConsul(t *testing.T) {
	agent := consultest.Start(t)
	ca := acmetest.Start(t, acmetest.Options{})
	const domain = "fleet.test"
	orderer := startACMEProcess(t, "orderer", agent.Addr(), ca, domain)
	// It takes the lock, then waits on the CA, which answers only once
	// told where to validate.
	lockKey := acme.DefaultConsulPrefix + "locks/issue_cert_" + domain
	waitFor(t, "the orderer holding "+lockKey, func() bool {
		p, _, err := agent.Client.KV().Get(lockKey, nil)
		return err == nil && p != nil && p.Session != ""
	})
	answerer := startACMEProcess(t, "answerer", agent.Addr(), ca, domain)
	ca.Validate(answerer.listen, answerer.tlsListen)

	deadline := time.Now().Add(60 * time.Second)
	for !(orderer.serves(ca, domain) && answerer.serves(ca, domain)) {
		if time.Now().After(deadline) {
			t.Fatalf("not both serving a certificate for %s; orderer log:\n%s\nanswerer log:\n%s", domain, orderer.output(), answerer.output())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n := ca.Orders.Load(); n != 1 {
		t.Fatalf("%d orders at the CA, want 1", n)
	}
	for _, c := range []struct {
		p      *acmeProcess
		name   string
		series string
		want   func(int) bool
	}{
		{orderer, "orderer", "edgelb_acme_certificates_issued_total", func(n int) bool { return n == 1 }},
		{answerer, "answerer", "edgelb_acme_certificates_issued_total", func(n int) bool { return n == 0 }},
		{orderer, "orderer", `edgelb_acme_challenges_total{type="http-01"}`, func(n int) bool { return n == 0 }},
		{answerer, "answerer", `edgelb_acme_challenges_total{type="http-01"}`, func(n int) bool { return n >= 1 }},
	} {
		if n := c.p.metric(c.series); !c.want(n) {
			t.Errorf("%s: %s = %d", c.name, c.series, n)
		}
	}
	if !strings.Contains(answerer.output(), `distributed=true`) {
		t.Errorf("the answerer's log shows no challenge answered from the shared storage:\n%s", answerer.output())
	}
}
