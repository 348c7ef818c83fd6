package balancer

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/edgelb/edgelb/balancer/acme"
)

// ACMEConfig gets certificates for the TLS listener from an ACME CA (Let's
// Encrypt by default) and renews them in the background. The CA checks
// that edgelb answers for each domain: on port 80 (http-01, answered on
// listen) or 443 (tls-alpn-01, answered on tls.listen) of the domain's
// address.
type ACMEConfig struct {
	// Email is the contact address of the ACME account. Required.
	Email string `yaml:"email"`

	// Domains are the names to get certificates for, one certificate
	// each. Required. Wildcards are not supported: they need the dns-01
	// challenge.
	Domains []string `yaml:"domains"`

	// CA is the URL of the CA's ACME directory. acme.DefaultCA (Let's
	// Encrypt production) is used if not set; acme.StagingCA is Let's
	// Encrypt's staging directory.
	CA string `yaml:"ca"`

	// CARoot names a PEM file of root certificates trusted, besides the
	// system's, for the CA's own HTTPS API: for a private or test CA.
	CARoot string `yaml:"ca_root"`

	// Challenges are the challenge types offered to the CA: http-01 and
	// tls-alpn-01. Both if not set.
	Challenges []string `yaml:"challenges"`

	// Storage is where accounts, certificates, keys and locks are kept:
	// "consul" (the Consul KV store of the top-level consul block, shared
	// by every edgelb using it) or "dir" (StorageDir). "consul" is used if
	// the consul block is set, else "dir".
	Storage string `yaml:"storage"`

	// StorageDir is the directory of storage "dir". STATE_DIR/certmagic
	// is used if not set.
	StorageDir string `yaml:"storage_dir"`

	// ConsulPrefix is the KV folder of storage "consul".
	// acme.DefaultConsulPrefix is used if not set.
	ConsulPrefix string `yaml:"consul_prefix"`

	// RenewalWindow is the share of a certificate's lifetime left when it
	// is renewed, between 0 and 1. acme.DefaultRenewalWindow (a third:
	// 30 days of a 90-day certificate) is used if not set. A CA that
	// suggests renewal times (ARI, as Let's Encrypt does) may make it
	// earlier.
	RenewalWindow float64 `yaml:"renewal_window"`

	// roots are the system roots and CARoot's, when CARoot is set;
	// rootsPEM is CARoot's content, which tells reloads apart.
	roots    *x509.CertPool
	rootsPEM []byte
	// renewCheck and ocspCheck are how often certificates are checked
	// for renewal and their staples refreshed (acme's defaults if not
	// set): tests make them short.
	renewCheck, ocspCheck time.Duration
}

// defaultChallenges are the challenge types offered if not set.
var defaultChallenges = []string{acme.HTTP01, acme.TLSALPN01}

// applyDefaults fills in every unset field that has a default; storage
// depends on whether there is a consul block, and storage_dir on
// state_dir.
func (a *ACMEConfig) applyDefaults(haveConsul bool, stateDir string) {
	setDefault(&a.CA, acme.DefaultCA)
	if a.Challenges == nil {
		a.Challenges = defaultChallenges
	}
	if haveConsul {
		setDefault(&a.Storage, "consul")
	} else {
		setDefault(&a.Storage, "dir")
	}
	setDefault(&a.StorageDir, filepath.Join(stateDir, "certmagic"))
	setDefault(&a.ConsulPrefix, acme.DefaultConsulPrefix)
	setDefault(&a.RenewalWindow, acme.DefaultRenewalWindow)
}

// validate checks a after applyDefaults, reads ca_root and puts the
// domains in lower case; it returns every problem, each key under path.
func (a *ACMEConfig) validate(path string, haveConsul bool) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	if err := checkEmail(a.Email); err != nil {
		bad(".email", "%v", err)
	}
	if len(a.Domains) == 0 {
		bad(".domains", "missing: list the names to get certificates for, such as [example.com, www.example.com]")
	}
	seen := make(map[string]int)
	for i, d := range a.Domains {
		k := fmt.Sprintf(".domains[%d]", i)
		d = strings.ToLower(strings.TrimSuffix(d, "."))
		a.Domains[i] = d
		if err := checkDomain(d); err != nil {
			bad(k, "%v", err)
			continue
		}
		if j, ok := seen[d]; ok {
			bad(k, "%q is listed already (domains[%d])", d, j)
		}
		seen[d] = i
	}
	if u, err := url.Parse(a.CA); err != nil || u.Scheme != "https" || u.Host == "" {
		bad(".ca", "must be the https:// URL of an ACME directory, such as %s (got %q)", acme.DefaultCA, a.CA)
	}
	a.roots, a.rootsPEM = nil, nil
	if a.CARoot != "" {
		if pool, data, err := loadRoots(a.CARoot); err != nil {
			bad(".ca_root", "%v", err)
		} else {
			a.roots, a.rootsPEM = pool, data
		}
	}
	if len(a.Challenges) == 0 {
		bad(".challenges", "must list at least one of %s, %s (or leave it out for both)", acme.HTTP01, acme.TLSALPN01)
	}
	for i, c := range a.Challenges {
		if c != acme.HTTP01 && c != acme.TLSALPN01 {
			bad(fmt.Sprintf(".challenges[%d]", i), "unknown challenge type %q (one of %s, %s; dns-01 is not supported)", c, acme.HTTP01, acme.TLSALPN01)
		}
	}
	switch a.Storage {
	case "consul":
		if !haveConsul {
			bad(".storage", "consul needs the top-level consul block (or use storage: dir)")
		}
		if strings.HasPrefix(a.ConsulPrefix, "/") {
			bad(".consul_prefix", "must not start with / (got %q)", a.ConsulPrefix)
		}
	case "dir":
	default:
		bad(".storage", "must be consul or dir (got %q)", a.Storage)
	}
	if w := a.RenewalWindow; w <= 0 || w >= 1 {
		bad(".renewal_window", "must be between 0 and 1, the share of a certificate's lifetime left when it is renewed (got %v)", w)
	}
	return errs
}

// checkEmail checks that s looks like an email address.
func checkEmail(s string) error {
	if s == "" {
		return fmt.Errorf("missing: the CA's account needs a contact address")
	}
	local, domain, ok := strings.Cut(s, "@")
	if !ok || local == "" || !strings.Contains(domain, ".") || strings.ContainsAny(s, " \t,;<>") || strings.HasPrefix(s, "mailto:") {
		return fmt.Errorf("%q is not an email address", s)
	}
	return nil
}

// checkDomain checks that d, in lower case, is a name an ACME CA can
// validate with http-01 or tls-alpn-01.
func checkDomain(d string) error {
	if strings.HasPrefix(d, "*.") {
		return fmt.Errorf("%q: wildcard certificates need the dns-01 challenge, which edgelb does not do; list each name", d)
	}
	if _, err := netip.ParseAddr(strings.Trim(d, "[]")); err == nil {
		return fmt.Errorf("%q: certificates for IP addresses are not supported; use a DNS name", d)
	}
	if strings.Contains(d, "://") || strings.ContainsAny(d, ":/") {
		return fmt.Errorf("%q: want a host name such as example.com, without scheme, port or path", d)
	}
	if !strings.Contains(d, ".") || len(d) > 253 {
		return fmt.Errorf("%q is not a fully qualified domain name such as example.com", d)
	}
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' ||
			strings.Trim(label, "abcdefghijklmnopqrstuvwxyz0123456789-") != "" {
			return fmt.Errorf("%q is not a valid domain name (labels of letters, digits and -, for internationalised names the xn-- form)", d)
		}
	}
	return nil
}

// loadRoots reads a PEM file of certificates into the system roots.
func loadRoots(file string) (*x509.CertPool, []byte, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, nil, fmt.Errorf("cannot read %q: %w", file, err)
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	n := 0
	for rest := data; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, nil, fmt.Errorf("%q: cannot parse certificate %d: %w", file, n+1, err)
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		return nil, nil, fmt.Errorf("%q holds no PEM certificate", file)
	}
	return pool, data, nil
}

// sameACME reports whether a and b get the same certificates the same way
// (ca_root's content included), so that a reload can keep the running
// manager.
func sameACME(a, b *ACMEConfig) bool {
	if a == nil || b == nil {
		return a == b
	}
	x, y := *a, *b
	if !bytes.Equal(x.rootsPEM, y.rootsPEM) {
		return false
	}
	x.roots, y.roots, x.rootsPEM, y.rootsPEM = nil, nil, nil, nil
	return fmt.Sprintf("%#v", x) == fmt.Sprintf("%#v", y)
}
