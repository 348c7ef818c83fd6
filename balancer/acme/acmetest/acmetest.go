// Package acmetest runs a local ACME CA for tests: pebble's web front end,
// CA and validation authority in the test process, with a DNS server of
// its own that resolves every name to 127.0.0.1, so that the validation
// does real HTTP-01 and TLS-ALPN-01 challenges against the listeners a
// test names.
package acmetest

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/letsencrypt/pebble/v2/ca"
	"github.com/letsencrypt/pebble/v2/db"
	"github.com/letsencrypt/pebble/v2/va"
	"github.com/letsencrypt/pebble/v2/wfe"
	"github.com/miekg/dns"
	"golang.org/x/crypto/ocsp"
)

// CA is a local ACME CA. Its validation authority does the real
// challenges against the listeners given to Validate. Its directory is
// served over HTTPS with a certificate of its own, which edgelb trusts
// through tls.acme.ca_root (RootFile); the certificates it issues chain
// to Roots. With Options.OCSP, an OCSP responder signs "good" for every
// certificate.
type CA struct {
	t testing.TB
	// Dir is the ACME directory URL, RootFile a PEM file of the
	// directory's HTTPS certificate (for tls.acme.ca_root).
	Dir      string
	RootFile string
	// Roots trust the certificates the CA issues.
	Roots *x509.CertPool

	// Orders counts new orders; OCSPAnswers the OCSP responses signed.
	Orders      atomic.Int64
	OCSPAnswers atomic.Int64

	validity time.Duration
	caImpl   *ca.CAImpl
	memDB    *db.MemoryStore
	dns      string
	logger   *log.Logger

	mu      sync.Mutex
	handler http.Handler
	ready   chan struct{}
	api     *httptest.Server
}

// Options tune a CA.
type Options struct {
	// Validity of the certificates; pebble's default (90 days) if 0.
	Validity time.Duration
	// OCSP puts an OCSP responder URL in the certificates and runs it.
	OCSP bool
}

// Start starts a test CA. Its API answers once Validate has said
// where edgelb listens: requests wait until then.
func Start(t testing.TB, o Options) *CA {
	t.Helper()
	// Pebble reads these when its parts are made: validate at once (no
	// random sleeps), reject no good nonce, reuse no authorization, so
	// that each order does its challenges.
	t.Setenv("PEBBLE_VA_NOSLEEP", "1")
	t.Setenv("PEBBLE_WFE_NONCEREJECT", "0")
	t.Setenv("PEBBLE_AUTHZREUSE", "0")
	c := &CA{t: t, ready: make(chan struct{}), validity: o.Validity}
	if testing.Verbose() {
		c.logger = log.New(os.Stderr, "pebble ", log.Lmicroseconds)
	} else {
		c.logger = log.New(io.Discard, "", 0)
	}
	c.dns = startDNS(t)

	var ocspURL string
	if o.OCSP {
		srv := httptest.NewServer(http.HandlerFunc(c.answerOCSP))
		t.Cleanup(srv.Close)
		ocspURL = srv.URL + "/"
	}
	profile := ca.Profile{Description: "test", ValidityPeriod: uint64(o.Validity / time.Second)}
	c.memDB = db.NewMemoryStore()
	c.caImpl = ca.New(c.logger, c.memDB, ocspURL, "rsa", 0, 1, map[string]ca.Profile{"default": profile})
	c.Roots = x509.NewCertPool()
	c.Roots.AddCert(c.caImpl.GetRootCert(0).Cert)

	c.api = httptest.NewUnstartedServer(http.HandlerFunc(c.serveAPI))
	c.api.StartTLS()
	t.Cleanup(func() {
		c.mu.Lock()
		select {
		case <-c.ready:
		default:
			close(c.ready)
		}
		c.mu.Unlock()
		c.api.Close()
	})
	c.Dir = c.api.URL + wfe.DirectoryPath
	c.RootFile = filepath.Join(t.TempDir(), "acme-api-root.pem")
	pemCert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.api.Certificate().Raw})
	if err := os.WriteFile(c.RootFile, pemCert, 0o600); err != nil {
		t.Fatal(err)
	}
	return c
}

// Validate points the CA's validation authority at edgelb's listeners,
// httpAddr (HTTP-01) and tlsAddr (TLS-ALPN-01), and opens its API.
func (c *CA) Validate(httpAddr, tlsAddr string) {
	c.t.Helper()
	port := func(addr string) int {
		_, p, err := net.SplitHostPort(addr)
		if err != nil {
			c.t.Fatal(err)
		}
		n, _ := net.LookupPort("tcp", p)
		return n
	}
	vaImpl := va.New(c.logger, port(httpAddr), port(tlsAddr), false, c.dns, c.memDB)
	w := wfe.New(c.logger, c.memDB, vaImpl, c.caImpl, []string{"pebble.letsencrypt.org"}, false, false, 0, 0)
	c.mu.Lock()
	c.handler = w.Handler()
	close(c.ready)
	c.mu.Unlock()
}

// Stop closes the CA's API: connections to it are refused from now on.
func (c *CA) Stop() {
	c.api.Close()
}

// serveAPI serves the ACME API once Validate was called, counting orders.
func (c *CA) serveAPI(w http.ResponseWriter, r *http.Request) {
	select {
	case <-c.ready:
	case <-r.Context().Done():
		return
	}
	c.mu.Lock()
	h := c.handler
	c.mu.Unlock()
	if h == nil {
		http.Error(w, "test CA closed", http.StatusServiceUnavailable)
		return
	}
	if r.Method == http.MethodPost && r.URL.Path == "/order-plz" {
		c.Orders.Add(1)
	}
	h.ServeHTTP(w, r)
}

// answerOCSP signs a "good" OCSP response with the issuing intermediate,
// valid for half the certificates' validity (an hour at most).
func (c *CA) answerOCSP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	req, err := ocsp.ParseRequest(body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	issuer := c.caImpl.GetIntermediateCert(0).Cert
	key := c.caImpl.GetIntermediateKey(0)
	life := time.Hour
	if c.validity > 0 && c.validity/2 < life {
		life = c.validity / 2
	}
	now := time.Now().Add(-time.Minute)
	resp, err := ocsp.CreateResponse(issuer, issuer, ocsp.Response{
		Status:       ocsp.Good,
		SerialNumber: req.SerialNumber,
		ThisUpdate:   now,
		NextUpdate:   now.Add(life),
	}, crypto.Signer(key))
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	c.OCSPAnswers.Add(1)
	w.Header().Set("Content-Type", "application/ocsp-response")
	w.Write(resp)
}

// CheckStaple checks that st carries a stapled OCSP response saying the
// leaf is good.
func (c *CA) CheckStaple(st tls.ConnectionState) {
	c.t.Helper()
	if len(st.OCSPResponse) == 0 {
		c.t.Fatal("no OCSP response stapled")
	}
	resp, err := ocsp.ParseResponseForCert(st.OCSPResponse, st.PeerCertificates[0], c.caImpl.GetIntermediateCert(0).Cert)
	if err != nil {
		c.t.Fatalf("stapled OCSP response: %v", err)
	}
	if resp.Status != ocsp.Good || resp.SerialNumber.Cmp(st.PeerCertificates[0].SerialNumber) != 0 {
		c.t.Fatalf("stapled OCSP response: status %d for serial %v, want good for %v", resp.Status, resp.SerialNumber, st.PeerCertificates[0].SerialNumber)
	}
}

// startDNS serves DNS over TCP on loopback, answering 127.0.0.1 for
// the A record of every name and no AAAA record.
func startDNS(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{Listener: ln, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		for _, q := range r.Question {
			if q.Qtype == dns.TypeA {
				m.Answer = append(m.Answer, &dns.A{
					Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 0},
					A:   net.IPv4(127, 0, 0, 1),
				})
			}
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return ln.Addr().String()
}
