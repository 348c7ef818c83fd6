package balancer

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"math/big"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/edgelb/edgelb/balancer/acme/acmetest"
)

// acmeYAML returns a tls block listening on a free port with an acme
// block for domains from ca, and extra acme keys ("storage: dir", ...).
func acmeYAML(c *acmetest.CA, domains []string, extra ...string) string {
	y := "tls:\n  listen: 127.0.0.1:0\n  acme:\n" +
		"    email: ops@example.com\n" +
		"    domains: [" + strings.Join(domains, ", ") + "]\n" +
		"    ca: " + c.Dir + "\n" +
		"    ca_root: " + c.RootFile + "\n"
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
