// Package acme gets and renews edgelb's certificates from an ACME CA (Let's
// Encrypt by default) with certmagic: it answers the CA's HTTP-01 and
// TLS-ALPN-01 challenges on edgelb's own listeners, keeps the certificates
// and their OCSP staples in a storage that edgelb instances can share
// (ConsulStorage, or a directory), and renews them in the background.
package acme

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/caddyserver/certmagic"
	"github.com/mholt/acmez/v3"
	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/internal/panics"
)

// Challenge types.
const (
	HTTP01    = "http-01"
	TLSALPN01 = "tls-alpn-01"
)

// ChallengePath is the path prefix of HTTP-01 challenge requests.
const ChallengePath = "/.well-known/acme-challenge/"

// ALPNProto is the application protocol of TLS-ALPN-01 challenge
// handshakes, which the TLS listener must offer.
const ALPNProto = acmez.ACMETLS1Protocol

// Defaults of Config.
const (
	// DefaultCA is Let's Encrypt's production directory.
	DefaultCA = certmagic.LetsEncryptProductionCA
	// StagingCA is Let's Encrypt's staging directory: untrusted
	// certificates, generous rate limits, for trying a setup out.
	StagingCA = certmagic.LetsEncryptStagingCA
	// DefaultRenewalWindow renews a certificate once a third of its
	// lifetime is left: 30 days of a 90-day certificate.
	DefaultRenewalWindow = certmagic.DefaultRenewalWindowRatio
	// DefaultRenewCheck is how often certificates are checked for
	// renewal.
	DefaultRenewCheck = certmagic.DefaultRenewCheckInterval
	// DefaultOCSPCheck is how often OCSP staples are refreshed.
	DefaultOCSPCheck = certmagic.DefaultOCSPCheckInterval
	// loadTimeout bounds loading the stored certificates at start, so
	// that a slow storage or OCSP responder does not hold edgelb up:
	// what is not loaded by then is loaded in the background.
	loadTimeout = 15 * time.Second
)

// Config configures a Manager.
type Config struct {
	// Email is the contact of the ACME account.
	Email string
	// Domains are the names to get certificates for, one certificate
	// each.
	Domains []string
	// CA is the ACME directory URL. DefaultCA is used if not set.
	CA string
	// Roots are the roots trusted for the CA's API; the system's if nil.
	Roots *x509.CertPool
	// Challenges are the challenge types answered: HTTP01, TLSALPN01.
	Challenges []string
	// HTTPAddr and TLSAddr are the addresses edgelb's plain and TLS
	// listeners are bound to: where the CA's challenges arrive (through
	// ports 80 and 443 of the domains' addresses).
	HTTPAddr, TLSAddr string
	// Storage holds accounts, certificates, keys and locks.
	Storage certmagic.Storage
	// RenewalWindow is the share of a certificate's lifetime left when
	// it is renewed. DefaultRenewalWindow is used if not set. A CA that
	// suggests a renewal time (ARI) may make it earlier.
	RenewalWindow float64
	// RenewCheck and OCSPCheck are how often certificates are checked
	// for renewal and staples refreshed. DefaultRenewCheck and
	// DefaultOCSPCheck are used if not set.
	RenewCheck, OCSPCheck time.Duration
	// Logger receives certmagic's messages; slog.Default() if nil.
	Logger *slog.Logger
}

// Metrics of all managers. Certificates are counted once, by the instance
// that got them from the CA.
var (
	issuedTotal    = metrics.NewCounter(`edgelb_acme_certificates_issued_total`)
	renewedTotal   = metrics.NewCounter(`edgelb_acme_certificates_renewed_total`)
	obtainFailures = metrics.NewCounter(`edgelb_acme_failures_total{op="obtain"}`)
	renewFailures  = metrics.NewCounter(`edgelb_acme_failures_total{op="renew"}`)
	httpChallenges = metrics.NewCounter(`edgelb_acme_challenges_total{type="http-01"}`)
	alpnChallenges = metrics.NewCounter(`edgelb_acme_challenges_total{type="tls-alpn-01"}`)
)

// ErrNotManaged is returned by GetCertificate for a name that is not one
// of the manager's domains.
var ErrNotManaged = errors.New("acme: name not managed")

// Manager gets and renews the certificates of its domains and serves them
// in TLS handshakes. Its methods are safe for concurrent use.
type Manager struct {
	cfg     Config
	log     *slog.Logger
	cache   *certmagic.Cache
	magic   *certmagic.Config
	issuer  *certmagic.ACMEIssuer
	domains map[string]bool
	http01  bool
	alpn01  bool

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once
}

// New returns a manager for cfg; Start starts it.
func New(cfg Config) (*Manager, error) {
	if len(cfg.Domains) == 0 {
		return nil, errors.New("acme: no domains")
	}
	if cfg.Storage == nil {
		return nil, errors.New("acme: no storage")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.CA == "" {
		cfg.CA = DefaultCA
	}
	if cfg.RenewalWindow == 0 {
		cfg.RenewalWindow = DefaultRenewalWindow
	}
	m := &Manager{cfg: cfg, log: cfg.Logger, domains: make(map[string]bool)}
	for _, d := range cfg.Domains {
		m.domains[strings.ToLower(d)] = true
	}
	for _, c := range cfg.Challenges {
		switch c {
		case HTTP01:
			m.http01 = true
		case TLSALPN01:
			m.alpn01 = true
		default:
			return nil, fmt.Errorf("acme: unknown challenge type %q", c)
		}
	}
	if !m.http01 && !m.alpn01 {
		return nil, errors.New("acme: no challenge type")
	}
	zl := zapLogger(cfg.Logger)
	m.cache = certmagic.NewCache(certmagic.CacheOptions{
		GetConfigForCert:   func(certmagic.Certificate) (*certmagic.Config, error) { return m.magic, nil },
		RenewCheckInterval: cfg.RenewCheck,
		OCSPCheckInterval:  cfg.OCSPCheck,
		Logger:             zl,
	})
	m.magic = certmagic.New(m.cache, certmagic.Config{
		RenewalWindowRatio: cfg.RenewalWindow,
		Storage:            cfg.Storage,
		Logger:             zl,
		OnEvent:            m.onEvent,
		ShouldEmitFunc:     func(event string) bool { return event != "tls_get_certificate" },
	})
	tmpl := certmagic.ACMEIssuer{
		CA:                      cfg.CA,
		Email:                   cfg.Email,
		Agreed:                  true,
		DisableHTTPChallenge:    !m.http01,
		DisableTLSALPNChallenge: !m.alpn01,
		TrustedRoots:            cfg.Roots,
		Logger:                  zl,
	}
	// The challenge solvers want to listen on these addresses, find them
	// taken by edgelb, and leave the answers to edgelb's listeners.
	var err error
	if tmpl.ListenHost, tmpl.AltHTTPPort, err = splitAddr(cfg.HTTPAddr); err != nil && m.http01 {
		return nil, fmt.Errorf("acme: HTTP-01 address: %w", err)
	}
	if _, tmpl.AltTLSALPNPort, err = splitAddr(cfg.TLSAddr); err != nil && m.alpn01 {
		return nil, fmt.Errorf("acme: TLS-ALPN-01 address: %w", err)
	}
	m.issuer = certmagic.NewACMEIssuer(m.magic, tmpl)
	m.magic.Issuers = []certmagic.Issuer{m.issuer}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	return m, nil
}

func splitAddr(addr string) (host string, port int, err error) {
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err = strconv.Atoi(p)
	return h, port, err
}

// Start loads the certificates that storage holds for the domains, within
// a bound time, and starts getting the missing ones and renewing the rest
// in the background, retrying with backoff while the CA fails.
func (m *Manager) Start() {
	ctx, cancel := context.WithTimeout(m.ctx, loadTimeout)
	for _, d := range m.cfg.Domains {
		if _, err := m.magic.CacheManagedCertificate(ctx, d); err != nil && !errors.Is(err, fs.ErrNotExist) {
			m.log.Warn("cannot load stored ACME certificate; loading it in the background", "component", "acme", "domain", d, "err", err)
		}
	}
	cancel()
	if err := m.magic.ManageAsync(m.ctx, m.cfg.Domains); err != nil {
		m.log.Error("ACME certificate management not started", "component", "acme", "err", err)
	}
	// Certificates loaded above are left to the renewal checks: the
	// first would come only after RenewCheck.
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		panics.ACME.Run(func() {
			if err := m.cache.RenewManagedCertificates(m.ctx); err != nil {
				m.log.Error("ACME renewal check", "component", "acme", "err", err)
			}
		}, m.log, "panic in ACME renewal check")
	}()
}

// Stop stops getting and renewing certificates. Certificates already
// loaded are still served.
func (m *Manager) Stop() {
	m.once.Do(func() {
		m.cancel()
		m.cache.Stop()
		m.wg.Wait()
	})
}

// onEvent counts certmagic's events.
func (m *Manager) onEvent(_ context.Context, event string, data map[string]any) error {
	renewal, _ := data["renewal"].(bool)
	switch event {
	case "cert_obtained":
		if renewal {
			renewedTotal.Inc()
		} else {
			issuedTotal.Inc()
		}
	case "cert_failed":
		if renewal {
			renewFailures.Inc()
		} else {
			obtainFailures.Inc()
		}
	}
	return nil
}

// Manages reports whether name is one of the manager's domains.
func (m *Manager) Manages(name string) bool {
	return m.domains[normalize(name)]
}

func normalize(name string) string {
	return strings.ToLower(strings.TrimSuffix(name, "."))
}

// IsChallenge reports whether hello is the handshake of a TLS-ALPN-01
// challenge (RFC 8737): the client offers acme-tls/1 alone.
func (m *Manager) IsChallenge(hello *tls.ClientHelloInfo) bool {
	return m.alpn01 && len(hello.SupportedProtos) == 1 && hello.SupportedProtos[0] == ALPNProto
}

// GetCertificate returns the certificate of hello's server name, if it is
// one of the domains and the certificate has been got, or the challenge
// certificate of a TLS-ALPN-01 challenge. Otherwise it returns an error,
// ErrNotManaged for other names.
func (m *Manager) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if m.IsChallenge(hello) {
		if !m.Manages(hello.ServerName) {
			return nil, ErrNotManaged
		}
		c, err := m.magic.GetCertificate(hello)
		if err == nil {
			alpnChallenges.Inc()
		}
		return c, err
	}
	if !m.Manages(hello.ServerName) {
		return nil, ErrNotManaged
	}
	return m.magic.GetCertificate(hello)
}

// Default returns the certificate of the first domain, for handshakes
// that asked for no name or one that nothing else serves.
func (m *Manager) Default(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	h := *hello
	h.ServerName = m.cfg.Domains[0]
	return m.magic.GetCertificate(&h)
}

// ServeHTTPChallenge answers ctx if it is an HTTP-01 challenge request for
// one of the domains whose challenge this instance, or another sharing its
// storage, has under way, and reports whether it did.
func (m *Manager) ServeHTTPChallenge(ctx *fasthttp.RequestCtx) bool {
	if !m.http01 || !ctx.IsGet() || !bytes.HasPrefix(ctx.Path(), []byte(ChallengePath)) {
		return false
	}
	host := string(ctx.Host())
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	if !m.Manages(host) {
		// Only the domains' challenges are looked up, so that requests
		// for other hosts cost the storage nothing.
		return false
	}
	r := (&http.Request{
		Method:     http.MethodGet,
		Host:       host,
		URL:        &url.URL{Path: string(ctx.Path())},
		RequestURI: string(ctx.RequestURI()),
		RemoteAddr: ctx.RemoteAddr().String(),
		Header:     http.Header{"User-Agent": {string(ctx.UserAgent())}},
	}).WithContext(m.ctx)
	var w responseWriter
	if !m.issuer.HandleHTTPChallenge(&w, r) {
		return false
	}
	httpChallenges.Inc()
	ctx.Response.Reset()
	ctx.SetStatusCode(w.status())
	for k, vs := range w.header {
		for _, v := range vs {
			ctx.Response.Header.Add(k, v)
		}
	}
	ctx.SetBody(w.body.Bytes())
	ctx.SetConnectionClose()
	return true
}

// responseWriter collects what certmagic's challenge handler writes.
type responseWriter struct {
	header http.Header
	code   int
	body   bytes.Buffer
}

func (w *responseWriter) Header() http.Header {
	if w.header == nil {
		w.header = make(http.Header)
	}
	return w.header
}

func (w *responseWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
}

func (w *responseWriter) Write(p []byte) (int, error) { return w.body.Write(p) }

func (w *responseWriter) status() int {
	if w.code == 0 {
		return http.StatusOK
	}
	return w.code
}

// Cert describes a certificate the manager serves.
type Cert struct {
	Names     []string
	NotAfter  time.Time
	Stapled   bool
	NotBefore time.Time
}

// Certificates returns the certificates loaded for the domains, by name.
func (m *Manager) Certificates() []Cert {
	var out []Cert
	seen := make(map[string]bool)
	for _, d := range m.cfg.Domains {
		for _, c := range m.cache.AllMatchingCertificates(normalize(d)) {
			if c.Leaf == nil || seen[c.Hash()] || !c.Leaf.NotAfter.After(time.Time{}) {
				continue
			}
			seen[c.Hash()] = true
			out = append(out, Cert{Names: c.Names, NotBefore: c.Leaf.NotBefore, NotAfter: c.Leaf.NotAfter, Stapled: len(c.OCSPStaple) > 0})
		}
	}
	sort.Slice(out, func(i, j int) bool { return strings.Join(out[i].Names, ",") < strings.Join(out[j].Names, ",") })
	return out
}

// Domains returns the managed names.
func (m *Manager) Domains() []string { return m.cfg.Domains }
