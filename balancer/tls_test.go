package balancer

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/certs/localca"
)

// testPKI is a CA of the test's own and the certificates it issued, as
// files in a temporary directory.
type testPKI struct {
	t   testing.TB
	ca  *localca.CA
	dir string
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	ca, err := localca.New("edgelb test CA")
	if err != nil {
		t.Fatal(err)
	}
	return &testPKI{t: t, ca: ca, dir: t.TempDir()}
}

// issue writes a certificate for names, and its key, as NAME.pem and
// NAME-key.pem, and returns their paths.
func (p *testPKI) issue(name string, names ...string) (cert, key string) {
	p.t.Helper()
	cert, key = filepath.Join(p.dir, name+".pem"), filepath.Join(p.dir, name+"-key.pem")
	if err := p.ca.IssueFiles(cert, key, names, localca.Options{}); err != nil {
		p.t.Fatal(err)
	}
	return cert, key
}

// client returns a client config that trusts the CA and asks for sni.
func (p *testPKI) client(sni string) *tls.Config {
	return &tls.Config{RootCAs: p.ca.Pool(), ServerName: sni}
}

// tlsYAML returns a tls block listening on a free port with the given
// pairs (cert, key, cert, key...) and extra keys ("min_version: ...").
func tlsYAML(extra string, files ...string) string {
	var cs []string
	for i := 0; i+1 < len(files); i += 2 {
		cs = append(cs, fmt.Sprintf("{cert: %s, key: %s}", files[i], files[i+1]))
	}
	y := "tls:\n  listen: 127.0.0.1:0\n  certs: [" + strings.Join(cs, ", ") + "]\n"
	if extra != "" {
		y += "  " + extra + "\n"
	}
	return y
}

// tlsClientConn is a client's keep-alive connection to the TLS listener.
type tlsClientConn struct {
	*tls.Conn
	br *bufio.Reader
}

// dialTLS opens a TLS connection to s with conf, a 10 s deadline for the
// test's exchanges, and the handshake done.
func dialTLS(t testing.TB, s *Server, conf *tls.Config) (*tlsClientConn, error) {
	t.Helper()
	raw, err := net.Dial("tcp", s.TLSAddr())
	if err != nil {
		t.Fatal(err)
	}
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	c := tls.Client(raw, conf)
	if err := c.Handshake(); err != nil {
		raw.Close()
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	return &tlsClientConn{Conn: c, br: bufio.NewReader(c)}, nil
}

func mustDialTLS(t testing.TB, s *Server, conf *tls.Config) *tlsClientConn {
	t.Helper()
	c, err := dialTLS(t, s, conf)
	if err != nil {
		t.Fatalf("TLS handshake with %q: %v", conf.ServerName, err)
	}
	return c
}

// get sends a GET for uri with Host host and reads the response.
func (c *tlsClientConn) get(t testing.TB, host, uri string, hdr ...string) *fasthttp.Response {
	t.Helper()
	req := "GET " + uri + " HTTP/1.1\r\nHost: " + host + "\r\n"
	for i := 0; i+1 < len(hdr); i += 2 {
		req += hdr[i] + ": " + hdr[i+1] + "\r\n"
	}
	if _, err := io.WriteString(c, req+"\r\n"); err != nil {
		t.Fatalf("GET %s over TLS: %v", uri, err)
	}
	resp := &fasthttp.Response{}
	if err := resp.Read(c.br); err != nil {
		t.Fatalf("GET %s over TLS: reading the response: %v", uri, err)
	}
	return resp
}

// serverCert returns the first DNS name of the certificate the server
// presented, or its CN.
func serverCert(c *tls.Conn) string {
	leaf := c.ConnectionState().PeerCertificates[0]
	if len(leaf.DNSNames) > 0 {
		return leaf.DNSNames[0]
	}
	return leaf.Subject.CommonName
}

// TestTLSServesThroughTheCore: a request over TLS goes through the same
// routing and forwarding as a plain one, and the origin learns it was
// HTTPS from X-Forwarded-Proto and Forwarded, whatever the client sent.
func TestTLSServesThroughTheCore(t *testing.T) {
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		fmt.Fprintf(ctx, "proto=%s\nforwarded=%s\nhost=%s\n", ctx.Request.Header.Peek("X-Forwarded-Proto"),
			ctx.Request.Header.Peek("Forwarded"), ctx.Request.Header.Peek("X-Forwarded-Host"))
	})
	pki := newTestPKI(t)
	cert, key := pki.issue("shop", "shop.example")
	s := startEdge(t, tlsYAML("", cert, key)+"services:\n  web: {static: ["+o.addr+"]}\nroutes: [{host: shop.example, service: web}]\n")

	c := mustDialTLS(t, s, pki.client("shop.example"))
	resp := c.get(t, "shop.example", "/p?x=1", "X-Forwarded-Proto", "http", "Forwarded", "proto=http")
	want := "proto=https\nforwarded=for=127.0.0.1;host=\"shop.example\";proto=https\nhost=shop.example\n"
	if resp.StatusCode() != 200 || string(resp.Body()) != want {
		t.Fatalf("over TLS: %d\n%s\nwant 200\n%s", resp.StatusCode(), resp.Body(), want)
	}
	// The plain listener still says http.
	if resp := do(t, s, "GET", "shop.example", "/p"); !strings.HasPrefix(string(resp.Body()), "proto=http\n") {
		t.Fatalf("plain: %s", resp.Body())
	}
	// No route and vetting answer over TLS as over plain HTTP.
	if resp := c.get(t, "other.example", "/"); resp.StatusCode() != 404 || string(resp.Header.Peek(HeaderError)) != "no_route" {
		t.Fatalf("no route over TLS: %d %q", resp.StatusCode(), resp.Header.Peek(HeaderError))
	}
	if resp := c.get(t, "shop.example", "/", "Transfer Encoding", "chunked"); resp.StatusCode() != 400 {
		t.Fatalf("a malformed header name over TLS: %d, want 400", resp.StatusCode())
	}
	if o.hits.Load() != 2 {
		t.Errorf("origin hit %d times, want 2", o.hits.Load())
	}
}

// TestTLSSNI: the certificate is chosen by SNI: exact name, then wildcard,
// else the first listed, which also goes to clients that send no SNI.
func TestTLSSNI(t *testing.T) {
	o := startOrigin(t, "a", nil)
	pki := newTestPKI(t)
	defCert, defKey := pki.issue("default", "default.example")
	wildCert, wildKey := pki.issue("wild", "*.shop.example")
	apiCert, apiKey := pki.issue("api", "api.shop.example")
	s := startEdge(t, tlsYAML("", defCert, defKey, wildCert, wildKey, apiCert, apiKey)+
		"services:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
	f := func(sni, want string) {
		t.Helper()
		conf := pki.client(sni)
		if sni == "" {
			// No SNI: the client checks the default certificate itself.
			conf.InsecureSkipVerify = true
		}
		c := mustDialTLS(t, s, conf)
		if got := serverCert(c.Conn); got != want {
			t.Errorf("SNI %q: certificate for %s, want %s", sni, got, want)
		}
		if resp := c.get(t, "x.example", "/"); resp.StatusCode() != 200 {
			t.Errorf("SNI %q: GET: %d", sni, resp.StatusCode())
		}
	}
	f("api.shop.example", "api.shop.example")
	f("www.shop.example", "*.shop.example")
	f("default.example", "default.example")
	f("", "default.example")
	// A name no certificate holds gets the default, which the client
	// then refuses.
	_, err := dialTLS(t, s, pki.client("a.www.shop.example"))
	var he x509.HostnameError
	if !errors.As(err, &he) || he.Certificate.DNSNames[0] != "default.example" {
		t.Errorf("a name no certificate holds: %v, want the default certificate refused by the client", err)
	}
}

// TestTLSVersions: TLS 1.2 with an ECDHE AEAD suite and TLS 1.3 work; TLS
// 1.1 and a TLS 1.2 client without such a suite are refused and counted;
// min_version 1.3 refuses TLS 1.2.
func TestTLSVersions(t *testing.T) {
	o := startOrigin(t, "a", nil)
	pki := newTestPKI(t)
	cert, key := pki.issue("shop", "shop.example")
	svc := "services:\n  web: {static: [" + o.addr + "]}\nroutes: [{service: web}]\n"
	s := startEdge(t, tlsYAML("", cert, key)+svc)
	conf := func(min, max uint16) *tls.Config {
		c := pki.client("shop.example")
		c.MinVersion, c.MaxVersion = min, max
		return c
	}
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		ok13 := tlsHandshakes[1][0].Get()
		c := mustDialTLS(t, s, conf(v, v))
		st := c.ConnectionState()
		if st.Version != v || st.NegotiatedProtocol != "" && st.NegotiatedProtocol != "http/1.1" {
			t.Errorf("%s: negotiated %s, ALPN %q", tls.VersionName(v), tls.VersionName(st.Version), st.NegotiatedProtocol)
		}
		if v == tls.VersionTLS12 && !strings.HasPrefix(tls.CipherSuiteName(st.CipherSuite), "TLS_ECDHE_") {
			t.Errorf("TLS 1.2 suite %s, want ECDHE", tls.CipherSuiteName(st.CipherSuite))
		}
		if resp := c.get(t, "shop.example", "/"); resp.StatusCode() != 200 {
			t.Errorf("%s: GET %d", tls.VersionName(v), resp.StatusCode())
		}
		if v == tls.VersionTLS13 && tlsHandshakes[1][0].Get() != ok13+1 {
			t.Errorf("edgelb_tls_handshakes_total{version=\"1.3\",resumed=\"false\"} did not count the handshake")
		}
	}
	// ALPN: h2 is preferred, http/1.1 for a client that offers only that;
	// with server.http2.disabled only http/1.1 is offered.
	sOff := startEdge(t, "server: {http2: {disabled: true}}\n"+tlsYAML("", cert, key)+svc)
	for _, a := range []struct {
		s      *Server
		offer  []string
		chosen string
	}{{s, []string{"http/1.1", "h2"}, "h2"}, {s, []string{"http/1.1"}, "http/1.1"}, {sOff, []string{"h2", "http/1.1"}, "http/1.1"}} {
		alpn := conf(tls.VersionTLS12, tls.VersionTLS13)
		alpn.NextProtos = a.offer
		if c := mustDialTLS(t, a.s, alpn); c.ConnectionState().NegotiatedProtocol != a.chosen {
			t.Errorf("ALPN %v (http2 disabled: %v): negotiated %q, want %s", a.offer, a.s == sOff, c.ConnectionState().NegotiatedProtocol, a.chosen)
		}
	}

	refusedBy := func(what string, s *Server, c *tls.Config, reason string) {
		t.Helper()
		before := tlsHandshakeErrors[reason].Get()
		if _, err := dialTLS(t, s, c); err == nil {
			t.Errorf("%s: handshake succeeded, want it refused", what)
		}
		waitFor(t, what+" counted as "+reason, func() bool { return tlsHandshakeErrors[reason].Get() == before+1 })
	}
	refused := func(what string, c *tls.Config, reason string) {
		t.Helper()
		refusedBy(what, s, c, reason)
	}
	refused("TLS 1.1", conf(tls.VersionTLS10, tls.VersionTLS11), "version")
	cbc := conf(tls.VersionTLS12, tls.VersionTLS12)
	cbc.CipherSuites = []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA, tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, tls.TLS_RSA_WITH_AES_128_GCM_SHA256}
	refused("TLS 1.2 with CBC and RSA key exchange only", cbc, "cipher")
	h2only := conf(tls.VersionTLS12, tls.VersionTLS13)
	h2only.NextProtos = []string{"h2"}
	refusedBy("ALPN h2 only with server.http2.disabled", sOff, h2only, "alpn")
	refused("a client that does not trust the CA", &tls.Config{ServerName: "shop.example"}, "cert_rejected")

	// Plain HTTP on the TLS port.
	before := tlsHandshakeErrors["not_tls"].Get()
	raw, err := net.Dial("tcp", s.TLSAddr())
	if err != nil {
		t.Fatal(err)
	}
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(raw, "GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")
	io.ReadAll(raw)
	raw.Close()
	waitFor(t, "plain HTTP counted as not_tls", func() bool { return tlsHandshakeErrors["not_tls"].Get() == before+1 })

	s13 := startEdge(t, tlsYAML(`min_version: "1.3"`, cert, key)+svc)
	if _, err := dialTLS(t, s13, conf(tls.VersionTLS12, tls.VersionTLS12)); err == nil {
		t.Error("min_version 1.3: a TLS 1.2 handshake succeeded")
	}
	mustDialTLS(t, s13, conf(tls.VersionTLS12, tls.VersionTLS13))
	if o.hits.Load() != 2 {
		t.Errorf("origin hit %d times, want 2", o.hits.Load())
	}
}

// TestTLSResumption: a client that kept its session resumes with TLS 1.2
// and 1.3; after the ticket keys rotated past session_tickets.keys, it
// does a full handshake; with session tickets disabled it never resumes.
func TestTLSResumption(t *testing.T) {
	o := startOrigin(t, "a", nil)
	pki := newTestPKI(t)
	cert, key := pki.issue("shop", "shop.example")
	svc := "services:\n  web: {static: [" + o.addr + "]}\nroutes: [{service: web}]\n"
	s := startEdge(t, tlsYAML("session_tickets: {keys: 2}", cert, key)+svc)
	// connect makes one request on a new connection and says whether it
	// resumed: a TLS 1.3 ticket comes after the handshake, so the client
	// reads before it closes.
	connect := func(s *Server, v uint16, cache tls.ClientSessionCache) bool {
		t.Helper()
		conf := pki.client("shop.example")
		conf.MinVersion, conf.MaxVersion, conf.ClientSessionCache = v, v, cache
		c := mustDialTLS(t, s, conf)
		defer c.Close()
		if resp := c.get(t, "shop.example", "/"); resp.StatusCode() != 200 {
			t.Fatalf("GET: %d", resp.StatusCode())
		}
		return c.ConnectionState().DidResume
	}
	for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		t.Run(tls.VersionName(v), func(t *testing.T) {
			cache := tls.NewLRUClientSessionCache(8)
			if connect(s, v, cache) {
				t.Fatal("the first connection resumed")
			}
			resumed := tlsHandshakes[v-tls.VersionTLS12][1].Get()
			if !connect(s, v, cache) {
				t.Fatal("the second connection did not resume")
			}
			if tlsHandshakes[v-tls.VersionTLS12][1].Get() != resumed+1 {
				t.Error("the resumption was not counted")
			}
			// One rotation: the ticket's key is still accepted.
			s.tls.rotateTickets(time.Now())
			if !connect(s, v, cache) {
				t.Error("after one rotation (2 keys kept) the connection did not resume")
			}
			// The ticket now held was made with the newest key; two
			// more rotations drop it.
			s.tls.rotateTickets(time.Now())
			s.tls.rotateTickets(time.Now())
			if connect(s, v, cache) {
				t.Error("a ticket whose key was rotated out resumed")
			}
		})
	}
	off := startEdge(t, tlsYAML("session_tickets: {disabled: true}", cert, key)+svc)
	cache := tls.NewLRUClientSessionCache(8)
	connect(off, tls.VersionTLS13, cache)
	if connect(off, tls.VersionTLS13, cache) {
		t.Error("session_tickets.disabled: a connection resumed")
	}
}

// TestTLSTicketRotationSchedule: a key is due every rotate, and a reload
// that lowers keys drops the oldest at the next tick.
func TestTLSTicketRotationSchedule(t *testing.T) {
	pki := newTestPKI(t)
	cert, key := pki.issue("shop", "shop.example")
	o := startOrigin(t, "a", nil)
	svc := "services:\n  web: {static: [" + o.addr + "]}\nroutes: [{service: web}]\n"
	s := startEdge(t, tlsYAML("session_tickets: {rotate: 1h, keys: 3}", cert, key)+svc)
	t0 := s.tls.rotated
	if s.tls.ticketsDue(t0.Add(59 * time.Minute)) {
		t.Error("a key is due after 59 minutes of a 1h rotation")
	}
	if !s.tls.ticketsDue(t0.Add(time.Hour)) {
		t.Fatal("no key is due after 1h")
	}
	for i := 1; i <= 4; i++ {
		s.tls.rotateTickets(t0.Add(time.Duration(i) * time.Hour))
	}
	if n := len(s.tls.tickets); n != 3 {
		t.Fatalf("%d keys kept, want 3", n)
	}
	if err := s.Reload(mustConfig(t, "listen: "+s.cfg.Listen+"\nadmin: "+s.cfg.Admin+"\nstate_dir: "+s.cfg.StateDir+"\n"+
		tlsYAML("session_tickets: {rotate: 1h, keys: 1}", cert, key)+svc)); err != nil {
		t.Fatal(err)
	}
	if !s.tls.ticketsDue(s.tls.rotated) {
		t.Fatal("keys lowered from 3 to 1: no rotation due")
	}
	s.tls.rotateTickets(time.Now())
	if n := len(s.tls.tickets); n != 1 {
		t.Fatalf("%d keys kept, want 1", n)
	}
}

// reloadYAML is the config of s with the TLS block and rest replaced: the
// same addresses, so that Reload takes it.
func reloadYAML(s *Server, rest string) string {
	return "listen: " + s.cfg.Listen + "\nadmin: " + s.cfg.Admin + "\nstate_dir: " + s.cfg.StateDir + "\n" +
		strings.Replace(rest, "listen: 127.0.0.1:0", "listen: "+s.cfg.TLS.Listen, 1)
}

// TestTLSReloadSwapsCertificate: a reload with new certificate files gives
// new handshakes the new certificate, while a keep-alive connection opened
// before goes on serving requests; a reload with a bad pair is refused,
// names the file, and the running certificate stays.
func TestTLSReloadSwapsCertificate(t *testing.T) {
	o := startOrigin(t, "a", nil)
	pki := newTestPKI(t)
	cert, key := pki.issue("shop", "shop.example", "old.shop.example")
	svc := "services:\n  web: {static: [" + o.addr + "]}\nroutes: [{service: web}]\n"
	yaml := tlsYAML("", cert, key) + svc
	s := startEdge(t, yaml)

	old := mustDialTLS(t, s, pki.client("shop.example"))
	if resp := old.get(t, "shop.example", "/1"); resp.StatusCode() != 200 {
		t.Fatalf("before the reload: %d", resp.StatusCode())
	}
	oldSerial := old.ConnectionState().PeerCertificates[0].SerialNumber

	// New files in place of the old ones, as a renewal leaves them.
	pki.issue("shop", "shop.example", "new.shop.example")
	if err := s.Reload(mustConfig(t, reloadYAML(s, yaml))); err != nil {
		t.Fatal(err)
	}
	fresh := mustDialTLS(t, s, pki.client("shop.example"))
	if got := fresh.ConnectionState().PeerCertificates[0].DNSNames; len(got) != 2 || got[1] != "new.shop.example" {
		t.Fatalf("after the reload a new connection got the certificate for %v", got)
	}
	if resp := fresh.get(t, "shop.example", "/2"); resp.StatusCode() != 200 {
		t.Fatalf("new connection after the reload: %d", resp.StatusCode())
	}
	for i := 0; i < 3; i++ {
		if resp := old.get(t, "shop.example", "/old"); resp.StatusCode() != 200 {
			t.Fatalf("the connection opened before the reload: %d", resp.StatusCode())
		}
	}
	if old.ConnectionState().PeerCertificates[0].SerialNumber.Cmp(oldSerial) != 0 {
		t.Fatal("the old connection's certificate changed")
	}

	// A key that does not belong to the certificate: refused, named.
	_, otherKey := pki.issue("other", "other.example")
	errs := reloadErrors.Get()
	bad := strings.Replace(yaml, key, otherKey, 1)
	_, err := ParseConfig([]byte(reloadYAML(s, bad)))
	if err == nil || !strings.Contains(err.Error(), "tls.certs[0]: key \""+otherKey+"\" does not belong to certificate \""+cert+"\"") {
		t.Fatalf("a mismatched pair: %v", err)
	}
	path := filepath.Join(t.TempDir(), "edgelb.yaml")
	os.WriteFile(path, []byte(reloadYAML(s, bad)), 0o644)
	if _, err := s.ReloadFile(path); err == nil || !strings.Contains(err.Error(), otherKey) {
		t.Fatalf("ReloadFile with a mismatched pair: %v", err)
	}
	if reloadErrors.Get() != errs+1 {
		t.Error("the failed reload was not counted in edgelb_config_reloads_total{result=\"error\"}")
	}
	still := mustDialTLS(t, s, pki.client("new.shop.example"))
	if resp := still.get(t, "shop.example", "/3"); resp.StatusCode() != 200 {
		t.Fatalf("after a refused reload: %d", resp.StatusCode())
	}

	// The TLS listener cannot move or go on reload.
	if err := s.Reload(mustConfig(t, "listen: "+s.cfg.Listen+"\nadmin: "+s.cfg.Admin+"\n"+svc)); err == nil ||
		!strings.Contains(err.Error(), "tls.listen") {
		t.Errorf("a reload without the tls block: %v, want refused", err)
	}
}

// TestTLSAcceptLimits: the TLS listener holds clients to the plain
// listener's limits: server.max_conns_per_ip counts connections of both
// listeners, and a handshake that does not come within
// server.header_timeout is cut and counted.
func TestTLSAcceptLimits(t *testing.T) {
	o := startOrigin(t, "a", nil)
	pki := newTestPKI(t)
	cert, key := pki.issue("shop", "shop.example")
	s := startEdge(t, "server: {max_conns_per_ip: 2, header_timeout: 300ms}\n"+tlsYAML("", cert, key)+
		"services:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")

	plain := dialEdge(t, s)
	defer plain.Close()
	// A first byte, for the connection to be accepted (and counted) now.
	io.WriteString(plain, "G")
	waitFor(t, "the plain connection counted", func() bool { return s.perIP.size() == 1 })
	c := mustDialTLS(t, s, pki.client("shop.example"))
	rejected := connsOverIPLimit.Get()
	third, err := net.Dial("tcp", s.TLSAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	third.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tls.Client(third, pki.client("shop.example")).Handshake(); err == nil {
		t.Fatal("a third connection from one address (cap 2) completed a handshake")
	}
	if connsOverIPLimit.Get() != rejected+1 {
		t.Errorf("the connection over the cap was not counted")
	}
	c.Close()
	plain.Close()
	waitFor(t, "connections released", func() bool { return s.perIP.size() == 0 })

	// A client that connects and sends nothing is cut after header_timeout.
	timeouts := tlsHandshakeErrors["timeout"].Get()
	idle, err := net.Dial("tcp", s.TLSAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	idle.SetDeadline(time.Now().Add(10 * time.Second))
	start := time.Now()
	if n, err := idle.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("an idle client read %d bytes, %v", n, err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the idle client was cut after %v, want about 300ms after its accept", d)
	}
	waitFor(t, "the handshake timeout counted", func() bool { return tlsHandshakeErrors["timeout"].Get() == timeouts+1 })

	// The handshake's time counts against the head's: a client that
	// shakes hands and then sends half a head gets 408 within the one
	// header_timeout.
	c2 := mustDialTLS(t, s, pki.client("shop.example"))
	start = time.Now()
	io.WriteString(c2, "GET / HTTP/1.1\r\nHost: sh")
	resp := &fasthttp.Response{}
	if err := resp.Read(c2.br); err != nil || resp.StatusCode() != 408 {
		t.Fatalf("a slow head over TLS: %v %d, want 408", err, resp.StatusCode())
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("408 after %v, want about 300ms", d)
	}
}

// TestTLSStaleKeyedByScheme: the stale store keeps what was answered over
// HTTPS apart from what was answered over HTTP: during an outage each URL
// is served stale only on the scheme it was stored from.
func TestTLSStaleKeyedByScheme(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
			ctx.Response.Header.Set("Cache-Control", "max-age=0")
			fmt.Fprintf(ctx, "%s stored over %s", ctx.Path(), ctx.Request.Header.Peek("X-Forwarded-Proto"))
		})
		pki := newTestPKI(t)
		cert, key := pki.issue("shop", "shop.example")
		s := startEdge(t, "server: {"+engine+"}\n"+tlsYAML("", cert, key)+"services:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
		c := mustDialTLS(t, s, pki.client("shop.example"))
		if resp := c.get(t, "shop.example", "/s"); resp.StatusCode() != 200 {
			t.Fatalf("priming over TLS: %d", resp.StatusCode())
		}
		if resp := do(t, s, "GET", "shop.example", "/p"); resp.StatusCode() != 200 {
			t.Fatalf("priming over plain HTTP: %d", resp.StatusCode())
		}
		o.stop()
		stale := func(what string, resp *fasthttp.Response, want string) {
			t.Helper()
			got := ""
			if len(resp.Header.Peek("Cache-Status")) > 0 {
				got = string(resp.Body())
			}
			if got != want {
				t.Errorf("%s: %d %q (Cache-Status %q), want stale %q", what, resp.StatusCode(), resp.Body(), resp.Header.Peek("Cache-Status"), want)
			}
		}
		stale("/s over TLS", c.get(t, "shop.example", "/s"), "/s stored over https")
		stale("/p over TLS", c.get(t, "shop.example", "/p"), "")
		stale("/s over plain HTTP", do(t, s, "GET", "shop.example", "/s"), "")
		stale("/p over plain HTTP", do(t, s, "GET", "shop.example", "/p"), "/p stored over http")

		// A purge names the scheme: http:// leaves the HTTPS copy.
		for _, u := range []string{"http://shop.example/s", "https://shop.example/s"} {
			resp, err := http.Post("http://"+s.AdminAddr()+"/cache/purge?url="+url.QueryEscape(u), "", nil)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			want := "/s stored over https"
			if strings.HasPrefix(u, "https") {
				want = ""
			}
			stale("/s over TLS after purging "+u, c.get(t, "shop.example", "/s"), want)
		}
	})
}

// TestTLSListenerPausesOnResourceErrors: the TLS listener accepts through
// the plain listener's acceptListener: out of file descriptors, it pauses
// and tries again instead of stopping.
func TestTLSListenerPausesOnResourceErrors(t *testing.T) {
	s := NewServer(mustConfig(t, "services:\n  web: {static: [127.0.0.1:1]}\n"), quietLogger())
	emfile := &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	stub := &stubListener{errs: []error{emfile, emfile}, conns: []net.Conn{c1}, closed: make(chan struct{})}
	defer close(stub.closed)
	l := &tlsListener{acceptListener: newAcceptListener(s, stub, "tls"), t: newTLSState(stub, false)}
	e0 := acceptErrEMFILE.Get()
	start := time.Now()
	c, err := l.Accept()
	tc, ok := c.(*tlsConn)
	if err != nil || !ok || tc.NetConn().(*clientConn).Conn != c1 {
		t.Fatalf("Accept after EMFILE: %T %v", c, err)
	}
	if took := time.Since(start); took < 2*acceptPause {
		t.Errorf("two EMFILE errors retried within %v: the listener does not pause", took)
	}
	if n := acceptErrEMFILE.Get() - e0; n != 2 {
		t.Errorf("edgelb_accept_errors_total{cause=\"emfile\"} went up by %d, want 2", n)
	}
}
