package balancer

import (
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/edgelb/edgelb/balancer/acme"
	"github.com/edgelb/edgelb/balancer/certs"
)

// The TLS listener: HTTPS served by the fasthttp server, with the accept
// limits of the plain listener (acceptListener), certificates chosen by SNI
// (package certs), TLS 1.2 and 1.3 only, and session tickets whose keys
// rotate. Requests that come over it go through the same handler, and so
// the same vetting, forwarding core and stale store, as plain ones; the
// fasthttp server's ctx.IsTLS tells them apart (scheme).

// alpnProtocols returns the application protocols offered in ALPN under
// tc, in order of preference: HTTP/2 first unless server.http2.disabled.
// This is the one place they are listed. acme-tls/1 is offered for
// TLS-ALPN-01 challenges; only the CA's validation asks for it, and such a
// handshake serves no request.
func alpnProtocols(tc *TLSConfig, http2 bool) []string {
	protos := []string{"http/1.1"}
	if http2 {
		protos = []string{alpnH2, "http/1.1"}
	}
	if a := tc.ACME; a != nil && contains(a.Challenges, acme.TLSALPN01) {
		protos = append(protos, acme.ALPNProto)
	}
	return protos
}

// alpnH2 is HTTP/2 over TLS in ALPN.
const alpnH2 = "h2"

// tls12CipherSuites are the TLS 1.2 suites offered: ECDHE key exchange
// (forward secrecy) with an AEAD cipher only. TLS 1.3 suites are all of
// that kind and not configurable.
var tls12CipherSuites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
}

// handshakeConfig returns the tls.Config of the handshakes under tc, with
// certificates from src. It holds no session ticket keys: the listener's
// base config holds them (see tlsState), and they survive reloads.
func handshakeConfig(tc *TLSConfig, src certs.Source, http2 bool) *tls.Config {
	return &tls.Config{
		GetCertificate:         src.GetCertificate,
		MinVersion:             tc.minVersion,
		MaxVersion:             tls.VersionTLS13,
		CipherSuites:           tls12CipherSuites,
		NextProtos:             alpnProtocols(tc, http2),
		SessionTicketsDisabled: tc.SessionTickets.Disabled,
	}
}

// tlsState is a Server's TLS listener and what its handshakes use.
type tlsState struct {
	ln net.Listener
	// port is ":PORT" of the listener, or empty for 443: what an
	// https_redirect appends to the host.
	port []byte
	// base is the listener's tls.Config. Its GetConfigForClient gives
	// each handshake the config of the running TLS config (reloads
	// replace it); base itself holds only the session ticket keys.
	base *tls.Config
	// certs holds the certificates from tls.certs.
	certs certs.Store
	// acme gets and serves the certificates of tls.acme; nil without.
	acme atomic.Pointer[acme.Manager]
	// conf is the handshake config of the running TLS config.
	conf atomic.Pointer[tls.Config]
	// http2 offers HTTP/2 in ALPN.
	http2 bool

	// mu guards the session ticket keys and settings.
	mu sync.Mutex
	// tickets are the session ticket keys, newest first; rotated is when
	// the newest was made.
	tickets [][32]byte
	rotated time.Time
	// rotate and keep are session_tickets.rotate and .keys.
	rotate time.Duration
	keep   int
}

func newTLSState(ln net.Listener, http2 bool) *tlsState {
	t := &tlsState{ln: ln, http2: http2}
	if _, port, err := net.SplitHostPort(ln.Addr().String()); err == nil && port != "443" {
		t.port = []byte(":" + port)
	}
	t.base = &tls.Config{
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return t.conf.Load(), nil },
	}
	return t
}

// apply makes tc the running TLS config: its certificates for new
// handshakes (those in progress keep theirs), its versions, and its
// ticket settings, which take effect at the next rotation.
func (t *tlsState) apply(tc *TLSConfig) {
	t.certs.Set(tc.certs)
	t.conf.Store(handshakeConfig(tc, t, t.http2))
	t.mu.Lock()
	t.rotate, t.keep = tc.SessionTickets.Rotate, tc.SessionTickets.Keys
	t.mu.Unlock()
}

// GetCertificate implements certs.Source: a TLS-ALPN-01 challenge gets its
// challenge certificate; any other handshake the certificate from files
// that holds its name, else the ACME certificate of the name, else the
// default from files, else the ACME certificate of the first domain.
func (t *tlsState) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	m := t.acme.Load()
	if m != nil && m.IsChallenge(hello) {
		return m.GetCertificate(hello)
	}
	set := t.certs.Load()
	if set != nil {
		if c := set.Match(hello); c != nil {
			// Fast path: a certificate from files holds the name.
			return c, nil
		}
	}
	if m != nil && m.Manages(hello.ServerName) {
		if c, err := m.GetCertificate(hello); err == nil {
			return c, nil
		}
	}
	if set != nil {
		return set.Default(), nil
	}
	if m != nil {
		c, err := m.Default(hello)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", certs.ErrNoCertificate, err)
		}
		return c, nil
	}
	return nil, certs.ErrNoCertificate
}

// rotateTickets makes a new session ticket key, keeping the newest keep
// keys in all: tickets made with a dropped key no longer resume.
func (t *tlsState) rotateTickets(now time.Time) {
	var k [32]byte
	if _, err := io.ReadFull(rand.Reader, k[:]); err != nil {
		panic("BUG: crypto/rand failed: " + err.Error())
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.tickets = append([][32]byte{k}, t.tickets...)
	if len(t.tickets) > t.keep {
		t.tickets = t.tickets[:t.keep]
	}
	t.rotated = now
	t.base.SetSessionTicketKeys(t.tickets)
}

// ticketsDue reports whether the newest ticket key is due for rotation.
func (t *tlsState) ticketsDue(now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return now.Sub(t.rotated) >= t.rotate || len(t.tickets) > t.keep
}

// ticketTick is how often the ticket rotation checks whether a key is due.
const ticketTick = time.Minute

// rotateTicketsDue rotates the session ticket keys when one is due.
func (s *Server) rotateTicketsDue(now time.Time) {
	if s.tls.ticketsDue(now) {
		s.tls.rotateTickets(now)
	}
}

// tlsListener is the fasthttp server's listener of TLS connections: the
// accept limits of acceptListener, then TLS.
type tlsListener struct {
	*acceptListener
	t             *tlsState
	headerTimeout time.Duration
}

// Accept implements net.Listener.
func (l *tlsListener) Accept() (net.Conn, error) {
	c, err := l.acceptListener.Accept()
	if err != nil {
		return nil, err
	}
	tc := &tlsConn{Conn: tls.Server(c, l.t.base)}
	if l.headerTimeout > 0 {
		tc.headBy = time.Now().Add(l.headerTimeout)
	}
	return tc, nil
}

// tlsConn is a client connection of the TLS listener. It counts its
// handshake, and holds the handshake and the first request's head to one
// server.header_timeout from the accept, as the plain listener holds the
// head alone. fasthttp serves it as TLS: it has Handshake and
// ConnectionState. Only the goroutine serving it calls its methods but
// Close.
type tlsConn struct {
	*tls.Conn
	headBy time.Time
	// shook is set once the handshake was tried; got once a byte of a
	// request came.
	shook bool
	got   bool
}

// errChallengeDone ends the connection of a TLS-ALPN-01 challenge: its
// handshake was all the CA wanted (RFC 8737).
var errChallengeDone = errors.New("tls-alpn-01 challenge answered")

// Handshake runs the TLS handshake, if not done yet, and counts it.
func (c *tlsConn) Handshake() error {
	if c.shook {
		return c.Conn.Handshake()
	}
	c.shook = true
	err := c.Conn.Handshake()
	countHandshake(c.Conn, err)
	if err == nil && c.Conn.ConnectionState().NegotiatedProtocol == acme.ALPNProto {
		return errChallengeDone
	}
	return err
}

func (c *tlsConn) Read(p []byte) (int, error) {
	if !c.shook {
		if err := c.Handshake(); err != nil {
			return 0, err
		}
	}
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.got = true
	}
	return n, err
}

// sentAny reports whether the client sent any of a request (see
// headTimedOut): a handshake alone is not a request.
func (c *tlsConn) sentAny() bool { return c.got }

// SetReadDeadline implements net.Conn: until a request's first byte, no
// deadline goes past headBy, which fasthttp would set anew for the
// handshake and for the head.
func (c *tlsConn) SetReadDeadline(t time.Time) error {
	if !c.got && !c.headBy.IsZero() && (t.IsZero() || c.headBy.Before(t)) {
		t = c.headBy
	}
	return c.Conn.SetReadDeadline(t)
}

// Handshake counters: completed by version and resumption, failed by
// reason.
var (
	tlsHandshakes = [2][2]*metrics.Counter{ // [TLS 1.3][resumed]
		{metrics.NewCounter(`edgelb_tls_handshakes_total{version="1.2",resumed="false"}`),
			metrics.NewCounter(`edgelb_tls_handshakes_total{version="1.2",resumed="true"}`)},
		{metrics.NewCounter(`edgelb_tls_handshakes_total{version="1.3",resumed="false"}`),
			metrics.NewCounter(`edgelb_tls_handshakes_total{version="1.3",resumed="true"}`)},
	}
	tlsHandshakeErrors = func() map[string]*metrics.Counter {
		m := make(map[string]*metrics.Counter)
		for _, r := range handshakeErrorReasons {
			m[r] = metrics.NewCounter(`edgelb_tls_handshake_errors_total{reason="` + r + `"}`)
		}
		return m
	}()
)

// handshakeErrorReasons are the reasons of edgelb_tls_handshake_errors_total.
var handshakeErrorReasons = []string{"timeout", "closed", "not_tls", "version", "cipher", "alpn", "no_certificate", "cert_rejected", "client_alert", "other"}

// countHandshake counts a finished handshake of c, or one that failed with
// err.
func countHandshake(c *tls.Conn, err error) {
	if err != nil {
		tlsHandshakeErrors[handshakeErrorReason(err)].Inc()
		return
	}
	st := c.ConnectionState()
	v, r := 0, 0
	if st.Version == tls.VersionTLS13 {
		v = 1
	}
	if st.DidResume {
		r = 1
	}
	tlsHandshakes[v][r].Inc()
}

// handshakeErrorReason classifies a failed server handshake. crypto/tls
// has no error types for most of them, so its messages are matched (slow
// path: failures only).
func handshakeErrorReason(err error) string {
	var ne net.Error
	var rh tls.RecordHeaderError
	var op *net.OpError
	msg := err.Error()
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, certs.ErrNoCertificate):
		return "no_certificate"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, syscall.EPIPE), errors.Is(err, net.ErrClosed):
		return "closed"
	case errors.As(err, &rh):
		return "not_tls"
	case errors.As(err, &op) && op.Op == "remote error":
		// The client ended the handshake with an alert: most often it
		// does not trust the certificate.
		if a := op.Err.Error(); strings.Contains(a, "certificate") {
			return "cert_rejected"
		}
		return "client_alert"
	case strings.Contains(msg, "unsupported versions"), strings.Contains(msg, "older than TLS 1.3"),
		strings.Contains(msg, "protocol fallback"):
		return "version"
	case strings.Contains(msg, "no cipher suite"), strings.Contains(msg, "no key exchanges"):
		return "cipher"
	case strings.Contains(msg, "application protocol"):
		return "alpn"
	}
	return "other"
}

// listenTLS binds tls.listen.
func (s *Server) listenTLS(tc *TLSConfig) error {
	ln, err := listenTCP(tc.Listen)
	if err != nil {
		return fmt.Errorf("cannot listen on %s (tls.listen): %w", tc.Listen, err)
	}
	s.tls = newTLSState(ln, s.h2 != nil)
	s.tls.apply(tc)
	s.tls.rotateTickets(time.Now())
	return nil
}

// serveTLS serves the TLS listener from the fasthttp server.
func (s *Server) serveTLS() {
	s.logCertificates(s.cfg.TLS, time.Now())
	tl := &tlsListener{acceptListener: newAcceptListener(s, s.tls.ln, "tls"), t: s.tls, headerTimeout: s.cfg.Server.HeaderTimeout}
	s.goSafe("serve-tls", func() {
		if err := s.srv.Serve(tl); err != nil {
			s.log.Error("TLS server stopped", "err", err)
		}
	})
	s.goSafe("tls-tickets", func() { s.every(ticketTick, s.rotateTicketsDue) })
}

// logCertificates logs the certificates of tc from files and warns of those
// that a client would refuse today for their dates.
func (s *Server) logCertificates(tc *TLSConfig, now time.Time) {
	if tc.certs == nil {
		return
	}
	for i, c := range tc.certs.Certificates() {
		leaf, file := c.Leaf, tc.Certs[i].Cert
		names := strings.Join(certs.Names(c), ",")
		switch {
		case now.After(leaf.NotAfter):
			s.log.Warn("TLS certificate expired", "cert", file, "names", names, "not_after", leaf.NotAfter)
		case now.Before(leaf.NotBefore):
			s.log.Warn("TLS certificate not valid yet", "cert", file, "names", names, "not_before", leaf.NotBefore)
		default:
			s.log.Info("TLS certificate", "cert", file, "names", names, "not_after", leaf.NotAfter, "default", i == 0)
		}
	}
}

// TLSAddr returns the address of the TLS listener, or "" without one.
func (s *Server) TLSAddr() string {
	if s.tls == nil {
		return ""
	}
	return s.tls.ln.Addr().String()
}

// tlsListen returns the TLS listener address of cfg, or "" without one.
func tlsListen(cfg *Config) string {
	if cfg.TLS == nil {
		return ""
	}
	return cfg.TLS.Listen
}
