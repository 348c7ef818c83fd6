package localca

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"testing"
)

// TestEnsure: the first call makes a CA and a certificate that verifies
// against it; later calls keep both, unless the names change.
func TestEnsure(t *testing.T) {
	dir := t.TempDir()
	names := []string{"localhost", "127.0.0.1"}
	f, created, err := Ensure(dir, names)
	if err != nil || !created {
		t.Fatalf("first Ensure: created %v, %v", created, err)
	}
	verify := func(name string) error {
		c, err := tls.LoadX509KeyPair(f.Cert, f.Key)
		if err != nil {
			return err
		}
		ca, err := os.ReadFile(f.CA)
		if err != nil {
			return err
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(ca)
		_, err = c.Leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: pool})
		return err
	}
	for _, n := range names {
		if err := verify(n); err != nil {
			t.Errorf("%s: %v", n, err)
		}
	}
	before, _ := os.ReadFile(f.Cert)
	if _, created, err := Ensure(dir, names); err != nil || created {
		t.Fatalf("second Ensure: created %v, %v; want the files kept", created, err)
	}
	if after, _ := os.ReadFile(f.Cert); string(after) != string(before) {
		t.Error("the second Ensure rewrote the certificate")
	}
	caBefore, _ := os.ReadFile(f.CA)
	if _, created, err := Ensure(dir, []string{"localhost", "edgelb.localhost"}); err != nil || !created {
		t.Fatalf("Ensure with another name: created %v, %v; want a new certificate", created, err)
	}
	if err := verify("edgelb.localhost"); err != nil {
		t.Error(err)
	}
	if caAfter, _ := os.ReadFile(f.CA); string(caAfter) != string(caBefore) {
		t.Error("a new certificate came with a new CA; clients trusting the old one would fail")
	}
}
