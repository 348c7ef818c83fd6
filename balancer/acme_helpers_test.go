package balancer

import (
	"bytes"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
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

// testCA is a local ACME CA: pebble's web front end, CA and validation
// authority in the test process. Its validation authority does the real
// challenges against edgelb's listeners (set by validate): a DNS server of
// the test's own resolves every name to 127.0.0.1. Its directory is served
// over HTTPS with a certificate of its own, which edgelb trusts through
// tls.acme.ca_root (rootFile); the certificates it issues chain to roots,
// which clients trust. An OCSP responder signs "good" for every
// certificate, when asked for with ocsp.
type testCA struct {
	t testing.TB
	// dir is the ACME directory URL, rootFile the PEM file of the
	// directory's HTTPS certificate.
	dir      string
	rootFile string
	roots    *x509.CertPool

	// orders counts new orders; ocspAnswers the OCSP responses signed.
	orders      atomic.Int64
	ocspAnswers atomic.Int64

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

// testCAOptions tune a testCA.
type testCAOptions struct {
	// validity of the certificates; pebble's default (90 days) if 0.
	validity time.Duration
	// ocsp puts an OCSP responder URL in the certificates and runs it.
	ocsp bool
}

// startTestCA starts a test CA. Its API answers once validate has said
// where edgelb listens: requests wait until then.
func startTestCA(t testing.TB, o testCAOptions) *testCA {
	t.Helper()
	// Pebble reads these when its parts are made: validate at once (no
	// random sleeps), reject no good nonce, reuse no authorization, so
	// that each order does its challenges.
	t.Setenv("PEBBLE_VA_NOSLEEP", "1")
	t.Setenv("PEBBLE_WFE_NONCEREJECT", "0")
	t.Setenv("PEBBLE_AUTHZREUSE", "0")
	c := &testCA{t: t, ready: make(chan struct{}), validity: o.validity}
	if testing.Verbose() {
		c.logger = log.New(os.Stderr, "pebble ", log.Lmicroseconds)
	} else {
		c.logger = log.New(io.Discard, "", 0)
	}
	c.dns = startTestDNS(t)

	var ocspURL string
	if o.ocsp {
		srv := httptest.NewServer(http.HandlerFunc(c.answerOCSP))
		t.Cleanup(srv.Close)
		ocspURL = srv.URL + "/"
	}
	profile := ca.Profile{Description: "test", ValidityPeriod: uint64(o.validity / time.Second)}
	c.memDB = db.NewMemoryStore()
	c.caImpl = ca.New(c.logger, c.memDB, ocspURL, "rsa", 0, 1, map[string]ca.Profile{"default": profile})
	c.roots = x509.NewCertPool()
	c.roots.AddCert(c.caImpl.GetRootCert(0).Cert)

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
	c.dir = c.api.URL + wfe.DirectoryPath
	c.rootFile = filepath.Join(t.TempDir(), "acme-api-root.pem")
	pemCert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.api.Certificate().Raw})
	if err := os.WriteFile(c.rootFile, pemCert, 0o600); err != nil {
		t.Fatal(err)
	}
	return c
}

// validate points the CA's validation authority at edgelb's listeners,
// httpAddr (HTTP-01) and tlsAddr (TLS-ALPN-01), and opens its API.
func (c *testCA) validate(httpAddr, tlsAddr string) {
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

// stop closes the CA's API: connections to it are refused from now on.
func (c *testCA) stop() {
	c.api.Close()
}

// serveAPI serves the ACME API once validate was called, counting orders.
func (c *testCA) serveAPI(w http.ResponseWriter, r *http.Request) {
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
		c.orders.Add(1)
	}
	h.ServeHTTP(w, r)
}

// answerOCSP signs a "good" OCSP response with the issuing intermediate,
// valid for half the certificates' validity (an hour at most).
func (c *testCA) answerOCSP(w http.ResponseWriter, r *http.Request) {
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
	c.ocspAnswers.Add(1)
	w.Header().Set("Content-Type", "application/ocsp-response")
	w.Write(resp)
}

// checkStaple checks that st carries a stapled OCSP response saying the
// leaf is good.
func (c *testCA) checkStaple(st tls.ConnectionState) {
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

// startTestDNS serves DNS over TCP on loopback, answering 127.0.0.1 for
// the A record of every name and no AAAA record.
func startTestDNS(t testing.TB) string {
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

// acmeYAML returns a tls block listening on a free port with an acme
// block for domains from ca, and extra acme keys ("storage: dir", ...).
func acmeYAML(c *testCA, domains []string, extra ...string) string {
	y := "tls:\n  listen: 127.0.0.1:0\n  acme:\n" +
		"    email: ops@example.com\n" +
		"    domains: [" + strings.Join(domains, ", ") + "]\n" +
		"    ca: " + c.dir + "\n" +
		"    ca_root: " + c.rootFile + "\n"
	for _, e := range extra {
		y += "    " + e + "\n"
	}
	return y
}

// shortChecks makes the certificate checks of s's config frequent, as
// tests need, before s starts.
func shortChecks(cfg *Config, every time.Duration) {
	cfg.TLS.ACME.renewCheck = every
	cfg.TLS.ACME.ocspCheck = every
}

// tlsState returns the connection state of a handshake with s's TLS
// listener asking for sni and trusting roots, or the handshake's error.
func handshakeACME(s *Server, sni string, roots *x509.CertPool) (tls.ConnectionState, error) {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", s.TLSAddr(), &tls.Config{ServerName: sni, RootCAs: roots, NextProtos: []string{"h2", "http/1.1"}})
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer conn.Close()
	return conn.ConnectionState(), nil
}

// waitServed waits until s serves, for sni, a certificate that roots trust
// and that differs from not (nil for any), and returns the handshake.
func waitServed(t testing.TB, s *Server, sni string, roots *x509.CertPool, not *big.Int, within time.Duration) tls.ConnectionState {
	t.Helper()
	deadline := time.Now().Add(within)
	var last error
	for time.Now().Before(deadline) {
		st, err := handshakeACME(s, sni, roots)
		if err == nil && (not == nil || st.PeerCertificates[0].SerialNumber.Cmp(not) != 0) {
			return st
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: no certificate for %s within %v (last handshake: %v)", s.TLSAddr(), sni, within, last)
	return tls.ConnectionState{}
}

// getStatus returns the /status document of s.
func getStatus(t testing.TB, s *Server) *Status {
	t.Helper()
	resp, err := http.Get("http://" + s.AdminAddr() + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	return &st
}

// getMetrics returns the /metrics text of s.
func getMetrics(t testing.TB, s *Server) string {
	t.Helper()
	resp, err := http.Get("http://" + s.AdminAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return b.String()
}
