package balancer

import (
	"crypto/tls"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/edgelb/edgelb/balancer/certs"
)

// TLSConfig is the TLS listener: HTTPS (HTTP/1.1) served by the fasthttp
// server with certificates from files, from an ACME CA, or both, beside
// the plain listener.
type TLSConfig struct {
	// Listen is the address of the TLS listener. DefaultTLSListen is used
	// if not set.
	Listen string `yaml:"listen"`

	// Certs are the certificates served from files; at least one unless
	// ACME is set. A handshake gets the certificate whose DNS names
	// (subjectAltName) hold the name the client asked for (SNI): an exact
	// name before a wildcard (*.example.com, one label); else the ACME
	// certificate of that name; else the first listed, or without files
	// the ACME certificate of the first domain, when the client sent no
	// name or one that none holds.
	Certs []CertConfig `yaml:"certs"`

	// ACME gets certificates from an ACME CA such as Let's Encrypt and
	// renews them. Off if not set.
	ACME *ACMEConfig `yaml:"acme"`

	// MinVersion is the oldest TLS version accepted: "1.2" or "1.3".
	// DefaultTLSMinVersion is used if not set; TLS 1.0 and 1.1 are never
	// offered.
	MinVersion string `yaml:"min_version"`

	// SessionTickets tunes session resumption.
	SessionTickets SessionTicketsConfig `yaml:"session_tickets"`

	// certs are the loaded Certs, checked by validate, the first being
	// the default.
	certs *certs.Set
	// minVersion is MinVersion as a tls.Version* constant.
	minVersion uint16
}

// CertConfig is one certificate: a PEM file with the certificate chain,
// the server's certificate first, and a PEM file with its private key. A
// relative path is relative to the working directory.
type CertConfig struct {
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

// SessionTicketsConfig tunes TLS session resumption by session tickets. The
// keys that encrypt tickets are random per process: a restart, or another
// edgelb instance, makes clients do a full handshake.
type SessionTicketsConfig struct {
	// Disabled turns session tickets off: every connection does a full
	// handshake.
	Disabled bool `yaml:"disabled"`

	// Rotate is how often a new ticket key is made, which new tickets are
	// encrypted with. DefaultTicketRotate is used if not set.
	Rotate time.Duration `yaml:"rotate"`

	// Keys is how many ticket keys are accepted, the newest included: a
	// ticket resumes for up to Rotate times Keys. DefaultTicketKeys is
	// used if not set.
	Keys int `yaml:"keys"`
}

// HSTSConfig is the Strict-Transport-Security header of a route (RFC
// 6797), sent on its responses over TLS.
type HSTSConfig struct {
	// MaxAge is how long browsers go to the host over HTTPS only: a Go
	// duration, or whole days (d) or years (y, 365 days). 0 tells them to
	// forget the host. DefaultHSTSMaxAge is used if not set.
	MaxAge string `yaml:"max_age"`

	// IncludeSubdomains extends the policy to every subdomain.
	IncludeSubdomains bool `yaml:"include_subdomains"`

	// Preload asks for the host's inclusion in browsers' preload lists;
	// it needs IncludeSubdomains and a MaxAge of a year or more.
	Preload bool `yaml:"preload"`

	// value is the header's value, made by validate.
	value []byte
}

// Defaults of TLSConfig and HSTSConfig.
const (
	DefaultTLSListen     = "127.0.0.1:8443"
	DefaultTLSMinVersion = "1.2"
	DefaultTicketRotate  = time.Hour
	DefaultTicketKeys    = 4
	DefaultHSTSMaxAge    = "1y"
	// minTicketRotate bounds session_tickets.rotate from below: the
	// rotation runs on a minute tick.
	minTicketRotate = time.Minute
	maxTicketKeys   = 64
	year            = 365 * 24 * time.Hour
)

// tlsVersions maps min_version to crypto/tls.
var tlsVersions = map[string]uint16{"1.2": tls.VersionTLS12, "1.3": tls.VersionTLS13}

// applyDefaults fills in every unset field that has a default.
func (t *TLSConfig) applyDefaults() {
	setDefault(&t.Listen, DefaultTLSListen)
	setDefault(&t.MinVersion, DefaultTLSMinVersion)
	setDefault(&t.SessionTickets.Rotate, DefaultTicketRotate)
	setDefault(&t.SessionTickets.Keys, DefaultTicketKeys)
}

// validate checks t after applyDefaults and loads its certificates, so
// that a bad certificate or key refuses the config at start, in -check and
// on reload; haveConsul tells whether the top-level consul block is set.
// It returns every problem, each key under path.
func (t *TLSConfig) validate(path string, haveConsul bool) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	if err := checkAddr(t.Listen); err != nil {
		bad(".listen", "%v", err)
	}
	if v, ok := tlsVersions[t.MinVersion]; ok {
		t.minVersion = v
	} else {
		bad(".min_version", `must be "1.2" or "1.3" (got %q); TLS 1.0 and 1.1 are not offered`, t.MinVersion)
	}
	if st := t.SessionTickets; st.Rotate < minTicketRotate {
		bad(".session_tickets.rotate", "must be at least %v (got %v)", minTicketRotate, st.Rotate)
	}
	if k := t.SessionTickets.Keys; k < 1 || k > maxTicketKeys {
		bad(".session_tickets.keys", "must be from 1 to %d (got %d)", maxTicketKeys, k)
	}
	if t.ACME != nil {
		errs = append(errs, t.ACME.validate(path+".acme", haveConsul)...)
	}
	if len(t.Certs) == 0 {
		if t.ACME == nil {
			bad(".certs", "missing: %s.listen needs at least one certificate ({cert: FILE, key: FILE}) or %s.acme", path, path)
		}
		t.certs = nil
		return errs
	}
	loaded := make([]*tls.Certificate, 0, len(t.Certs))
	for i, cc := range t.Certs {
		k := fmt.Sprintf(".certs[%d]", i)
		if cc.Cert == "" || cc.Key == "" {
			bad(k, "needs both cert and key (got cert %q, key %q)", cc.Cert, cc.Key)
			continue
		}
		c, err := certs.Load(certs.Pair{Cert: cc.Cert, Key: cc.Key})
		if err != nil {
			bad(k, "%v", err)
			continue
		}
		if i > 0 && len(certs.Names(c)) == 0 {
			bad(k, "certificate %q holds no DNS name (subjectAltName), so no handshake could choose it; only the first certificate (the default) may", cc.Cert)
			continue
		}
		loaded = append(loaded, c)
	}
	if len(loaded) == len(t.Certs) {
		t.certs, _ = certs.NewSet(loaded)
	}
	return errs
}

// applyDefaults fills in every unset field that has a default.
func (h *HSTSConfig) applyDefaults() {
	setDefault(&h.MaxAge, DefaultHSTSMaxAge)
}

// validate checks h after applyDefaults and makes the header's value; it
// returns every problem, each key under path.
func (h *HSTSConfig) validate(path string) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	age, err := parseLongDuration(h.MaxAge)
	switch {
	case err != nil:
		bad(".max_age", "%v", err)
	case age < 0:
		bad(".max_age", "must not be negative (got %s)", h.MaxAge)
	case h.Preload && age < year:
		bad(".max_age", "must be at least 1y with preload (got %s)", h.MaxAge)
	}
	if h.Preload && !h.IncludeSubdomains {
		bad(".preload", "needs include_subdomains: true (preload lists take whole domains)")
	}
	v := "max-age=" + strconv.FormatInt(int64(age/time.Second), 10)
	if h.IncludeSubdomains {
		v += "; includeSubDomains"
	}
	if h.Preload {
		v += "; preload"
	}
	h.value = []byte(v)
	return errs
}

// parseLongDuration parses a Go duration, or a whole number of days (7d)
// or years (1y, 365 days), which time.ParseDuration lacks.
func parseLongDuration(s string) (time.Duration, error) {
	for _, u := range []struct {
		suffix string
		d      time.Duration
	}{{"d", 24 * time.Hour}, {"y", year}} {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			v, err := strconv.ParseInt(n, 10, 32)
			if err != nil {
				return 0, fmt.Errorf("invalid duration %q: want a whole number of days or years (7d, 1y) or a duration such as 12h", s)
			}
			return time.Duration(v) * u.d, nil
		}
	}
	if _, err := strconv.ParseFloat(s, 64); err == nil && s != "0" {
		return 0, fmt.Errorf("duration %s needs a unit (s, m, h, d, y), e.g. %sd", s, s)
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("invalid duration %q: want a duration such as 12h, or days or years (7d, 1y)", s)
	}
	return d, nil
}

// errTLSNeeded words what a route's https_redirect and hsts need.
var errTLSNeeded = errors.New("needs the tls block: edgelb serves no HTTPS without tls.listen and tls.certs or tls.acme")
