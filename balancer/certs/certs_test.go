package certs

import (
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgelb/edgelb/balancer/certs/localca"
)

// issue writes a certificate for names issued by ca into dir and loads it.
func issue(t *testing.T, ca *localca.CA, dir, file string, o localca.Options, names ...string) *tls.Certificate {
	t.Helper()
	p := Pair{Cert: filepath.Join(dir, file+".pem"), Key: filepath.Join(dir, file+"-key.pem")}
	if err := ca.IssueFiles(p.Cert, p.Key, names, o); err != nil {
		t.Fatal(err)
	}
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func newCA(t *testing.T) *localca.CA {
	t.Helper()
	ca, err := localca.New("test CA")
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func TestSetChoose(t *testing.T) {
	ca, dir := newCA(t), t.TempDir()
	def := issue(t, ca, dir, "default", localca.Options{}, "default.example")
	wild := issue(t, ca, dir, "wild", localca.Options{}, "*.example.com")
	exact := issue(t, ca, dir, "exact", localca.Options{}, "api.example.com", "Other.Example.NET")
	set, err := NewSet([]*tls.Certificate{def, wild, exact})
	if err != nil {
		t.Fatal(err)
	}
	names := map[*tls.Certificate]string{def: "default", wild: "wildcard", exact: "exact"}
	f := func(sni, want string) {
		t.Helper()
		if got := names[set.Choose(&tls.ClientHelloInfo{ServerName: sni})]; got != want {
			t.Errorf("SNI %q: got the %s certificate, want the %s one", sni, got, want)
		}
	}
	f("", "default")
	f("default.example", "default")
	f("api.example.com", "exact")       // exact beats the wildcard
	f("API.Example.com.", "exact")      // case and a trailing dot do not matter
	f("other.example.net", "exact")     // the certificate's own name in upper case
	f("shop.example.com", "wildcard")   // one label under the wildcard
	f("a.shop.example.com", "default")  // a wildcard covers one label only
	f("example.com", "default")         // nor the parent itself
	f("unknown.example.org", "default") // nothing matches
	f("localhost", "default")
}

// TestSetChooseByKeyType: between certificates of one name, a client that
// supports only RSA gets the RSA one.
func TestSetChooseByKeyType(t *testing.T) {
	ca, dir := newCA(t), t.TempDir()
	ec := issue(t, ca, dir, "ec", localca.Options{}, "shop.example")
	rsa := issue(t, ca, dir, "rsa", localca.Options{RSA: true}, "shop.example")
	set, err := NewSet([]*tls.Certificate{ec, rsa})
	if err != nil {
		t.Fatal(err)
	}
	rsaOnly := &tls.ClientHelloInfo{
		ServerName:        "shop.example",
		SupportedVersions: []uint16{tls.VersionTLS12},
		CipherSuites:      []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256},
		SupportedCurves:   []tls.CurveID{tls.X25519},
		SupportedPoints:   []uint8{0},
		SignatureSchemes:  []tls.SignatureScheme{tls.PSSWithSHA256, tls.PKCS1WithSHA256},
	}
	if got := set.Choose(rsaOnly); got != rsa {
		t.Errorf("an RSA-only client got the ECDSA certificate")
	}
	if got := set.Choose(&tls.ClientHelloInfo{ServerName: "shop.example",
		SupportedVersions: []uint16{tls.VersionTLS13}, SignatureSchemes: []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256}}); got != ec {
		t.Errorf("an ECDSA client got the RSA certificate")
	}
}

func TestStore(t *testing.T) {
	var st Store
	if _, err := st.GetCertificate(&tls.ClientHelloInfo{}); err != ErrNoCertificate {
		t.Fatalf("an empty store: %v, want ErrNoCertificate", err)
	}
	ca, dir := newCA(t), t.TempDir()
	a := issue(t, ca, dir, "a", localca.Options{}, "a.example")
	b := issue(t, ca, dir, "b", localca.Options{}, "a.example")
	for _, c := range []*tls.Certificate{a, b} {
		set, _ := NewSet([]*tls.Certificate{c})
		st.Set(set)
		if got, err := st.GetCertificate(&tls.ClientHelloInfo{ServerName: "a.example"}); err != nil || got != c {
			t.Fatalf("got %p, %v; want the certificate just set", got, err)
		}
	}
	var _ Source = &st
}

// TestLoadErrors: every bad pair is refused with an error naming the file
// at fault.
func TestLoadErrors(t *testing.T) {
	ca, dir := newCA(t), t.TempDir()
	issue(t, ca, dir, "a", localca.Options{}, "a.example")
	issue(t, ca, dir, "b", localca.Options{}, "b.example")
	garbage := filepath.Join(dir, "garbage.pem")
	os.WriteFile(garbage, []byte("not PEM at all\n"), 0o644)
	cert, key := func(n string) string { return filepath.Join(dir, n+".pem") }, func(n string) string { return filepath.Join(dir, n+"-key.pem") }
	f := func(p Pair, want ...string) {
		t.Helper()
		_, err := Load(p)
		if err == nil {
			t.Fatalf("%+v: loaded, want an error", p)
		}
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%+v: error %q lacks %q", p, err, w)
			}
		}
	}
	f(Pair{Cert: cert("a"), Key: key("b")}, `key "`+key("b")+`" does not belong to certificate "`+cert("a")+`"`)
	f(Pair{Cert: filepath.Join(dir, "missing.pem"), Key: key("a")}, `cannot read certificate "`+filepath.Join(dir, "missing.pem")+`"`, "no such file")
	f(Pair{Cert: cert("a"), Key: filepath.Join(dir, "missing.pem")}, `cannot read key "`+filepath.Join(dir, "missing.pem")+`"`)
	f(Pair{Cert: garbage, Key: key("a")}, `certificate "`+garbage+`": holds no PEM certificate`)
	f(Pair{Cert: cert("a"), Key: garbage}, `key "`+garbage+`" holds no PEM private key`)
	f(Pair{Cert: key("a"), Key: cert("a")}, `certificate "`+key("a")+`": holds a private key, not a certificate (are cert and key swapped?)`)
	if _, err := Load(Pair{Cert: cert("a"), Key: key("a")}); err != nil {
		t.Errorf("a good pair: %v", err)
	}
}
