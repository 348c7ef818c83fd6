package balancer

import (
	"bytes"
	"fmt"
	"io"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/edgelb/edgelb/balancer/acme"
	"github.com/edgelb/edgelb/balancer/certs"
)

// Certificates from an ACME CA (tls.acme): package acme gets and renews
// them; the TLS listener serves them (tlsState.GetCertificate) and answers
// TLS-ALPN-01 challenges; the plain listener answers HTTP-01 challenges
// before routing, on both engines (the event loop hands those requests to
// the fasthttp server).

// acmeChallengePath is the path prefix of HTTP-01 challenge requests.
var acmeChallengePath = []byte(acme.ChallengePath)

// newACME returns the ACME manager of cfg, whose listeners s has bound.
func (s *Server) newACME(cfg *Config) (*acme.Manager, error) {
	a := cfg.TLS.ACME
	var store certmagic.Storage
	switch a.Storage {
	case "consul":
		client, err := cfg.Consul.NewClient()
		if err != nil {
			return nil, fmt.Errorf("tls.acme.storage: %w", err)
		}
		store = acme.NewConsulStorage(client, a.ConsulPrefix)
	default:
		store = &certmagic.FileStorage{Path: a.StorageDir}
	}
	return acme.New(acme.Config{
		Email:         a.Email,
		Domains:       a.Domains,
		CA:            a.CA,
		Roots:         a.roots,
		Challenges:    a.Challenges,
		HTTPAddr:      s.ln.Addr().String(),
		TLSAddr:       s.tls.ln.Addr().String(),
		Storage:       store,
		RenewalWindow: a.RenewalWindow,
		RenewCheck:    a.renewCheck,
		OCSPCheck:     a.ocspCheck,
		Logger:        s.log,
	})
}

// startACME starts getting the certificates of cfg's tls.acme, once the
// certificates already stored are loaded.
func (s *Server) startACME(cfg *Config) error {
	if cfg.TLS == nil || cfg.TLS.ACME == nil {
		return nil
	}
	m, err := s.newACME(cfg)
	if err != nil {
		return err
	}
	m.Start()
	s.tls.acme.Store(m)
	s.log.Info("ACME certificates", "domains", strings.Join(m.Domains(), ","), "ca", cfg.TLS.ACME.CA, "storage", cfg.TLS.ACME.Storage)
	return nil
}

// reloadACME makes cfg's tls.acme the running one, if it changed from
// old's: a new manager takes over once it has loaded the stored
// certificates, so that handshakes never lack one.
func (s *Server) reloadACME(old, cfg *Config) error {
	if s.tls == nil {
		return nil
	}
	var oa, na *ACMEConfig
	if old.TLS != nil {
		oa = old.TLS.ACME
	}
	if cfg.TLS != nil {
		na = cfg.TLS.ACME
	}
	if sameACME(oa, na) && (na == nil || na.Storage != "consul" || reflect.DeepEqual(old.Consul, cfg.Consul)) {
		return nil
	}
	var m *acme.Manager
	if na != nil {
		var err error
		if m, err = s.newACME(cfg); err != nil {
			return err
		}
		m.Start()
	}
	if prev := s.tls.acme.Swap(m); prev != nil {
		prev.Stop()
	}
	return nil
}

// stopACME stops getting and renewing certificates.
func (s *Server) stopACME() {
	if s.tls == nil {
		return
	}
	if m := s.tls.acme.Load(); m != nil {
		m.Stop()
	}
}

// CertStatus is one certificate of the TLS listener in /status.
type CertStatus struct {
	Names []string `json:"names"`
	// Source is "file" (tls.certs) or "acme" (tls.acme).
	Source string `json:"source"`
	// File is the certificate file of a certificate from files.
	File      string    `json:"file,omitempty"`
	NotBefore time.Time `json:"not_before,omitzero"`
	NotAfter  time.Time `json:"not_after,omitzero"`
	// OCSPStapled is set when an OCSP response is stapled to the
	// certificate (ACME certificates whose CA runs OCSP).
	OCSPStapled bool `json:"ocsp_stapled,omitempty"`
	// Pending is set for an ACME domain whose certificate is not got
	// yet.
	Pending bool `json:"pending,omitempty"`
}

// Certificates returns the certificates of the TLS listener: from files in
// config order, then from ACME by name, with the ACME domains still
// waiting for one.
func (s *Server) Certificates() []CertStatus {
	if s.tls == nil {
		return nil
	}
	var out []CertStatus
	s.mu.Lock()
	files := s.cfg.TLS.Certs
	s.mu.Unlock()
	if set := s.tls.certs.Load(); set != nil {
		for i, c := range set.Certificates() {
			cs := CertStatus{Names: certs.Names(c), Source: "file", NotBefore: c.Leaf.NotBefore, NotAfter: c.Leaf.NotAfter}
			if i < len(files) {
				cs.File = files[i].Cert
			}
			out = append(out, cs)
		}
	}
	m := s.tls.acme.Load()
	if m == nil {
		return out
	}
	got := make(map[string]bool)
	for _, c := range m.Certificates() {
		out = append(out, CertStatus{Names: c.Names, Source: "acme", NotBefore: c.NotBefore, NotAfter: c.NotAfter, OCSPStapled: c.Stapled})
		for _, n := range c.Names {
			got[n] = true
		}
	}
	for _, d := range m.Domains() {
		if !got[d] {
			out = append(out, CertStatus{Names: []string{d}, Source: "acme", Pending: true})
		}
	}
	return out
}

// writeCertMetrics writes the certificate gauges, made at scrape time from
// the certificates served then.
func (s *Server) writeCertMetrics(w io.Writer, now time.Time) {
	cs := s.Certificates()
	if s.tls == nil {
		return
	}
	count := map[string]int{"file": 0, "acme": 0}
	var lines []string
	for _, c := range cs {
		if c.Pending {
			continue
		}
		count[c.Source]++
		name := c.File
		if len(c.Names) > 0 {
			name = c.Names[0]
		}
		labels := `source="` + c.Source + `",name="` + escapeLabel(name) + `"`
		if c.File != "" {
			labels += `,file="` + escapeLabel(c.File) + `"`
		}
		lines = append(lines, "edgelb_tls_certificate_expiry_seconds{"+labels+"} "+strconv.FormatFloat(c.NotAfter.Sub(now).Seconds(), 'f', 0, 64))
	}
	sort.Strings(lines)
	var b bytes.Buffer
	for _, src := range []string{"acme", "file"} {
		fmt.Fprintf(&b, "edgelb_tls_certificates{source=%q} %d\n", src, count[src])
	}
	for _, l := range lines {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	w.Write(b.Bytes())
}

// escapeLabel escapes a Prometheus label value.
func escapeLabel(v string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(v)
}
