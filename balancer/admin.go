package balancer

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/edgelb/edgelb/discovery"
	"github.com/edgelb/edgelb/health"
	"github.com/edgelb/edgelb/internal/panics"
	"github.com/edgelb/edgelb/internal/version"
)

// adminServer serves the admin API: /metrics, /status, /healthz, /readyz,
// /cache/purge, /debug/pprof/ and the status page (/ and /ui). Every
// request passes the checks of ServeHTTP first.
type adminServer struct {
	s      *Server
	ln     net.Listener
	srv    *http.Server
	mux    *http.ServeMux
	access atomic.Pointer[adminAccess]
	// xorigin refuses writes that browsers mark as cross-origin.
	xorigin http.CrossOriginProtection
}

// HeaderAdmin is a request header that marks an admin API write as not
// coming from a web page (browsers cannot send it to another origin
// without CORS approval, which the admin API never gives). Any value will
// do.
const HeaderAdmin = "X-Edgelb-Admin"

// Refused admin requests by reason.
var (
	adminRefusedHost   = metrics.NewCounter(`edgelb_admin_requests_refused_total{reason="host"}`)
	adminRefusedToken  = metrics.NewCounter(`edgelb_admin_requests_refused_total{reason="token"}`)
	adminRefusedOrigin = metrics.NewCounter(`edgelb_admin_requests_refused_total{reason="cross_origin"}`)
)

func newAdminServer(s *Server) *adminServer {
	a := &adminServer{s: s, mux: http.NewServeMux()}
	a.setAccess(s.cfg)
	a.mux.HandleFunc("GET /metrics", a.metrics)
	a.mux.HandleFunc("GET /status", a.status)
	a.mux.HandleFunc("GET /healthz", a.healthz)
	a.mux.HandleFunc("GET /readyz", a.readyz)
	a.mux.HandleFunc("POST /cache/purge", a.purge)
	a.mux.HandleFunc("/debug/pprof/", pprof.Index)
	a.mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	a.mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	a.handleUI()
	// TYPE lines for /metrics. The switch is process-wide; /metrics is
	// the only caller of metrics.WritePrometheus.
	metrics.ExposeMetadata(true)
	a.srv = &http.Server{
		Handler:           a,
		ReadHeaderTimeout: 5 * time.Second,
		// net/http reports accept and connection errors here; handler
		// panics are recoverHandler's.
		ErrorLog: slog.NewLogLogger(s.log.With("server", "admin").Handler(), slog.LevelError),
	}
	return a
}

// setAccess applies the admin_token and admin_hosts of cfg to the
// requests that follow.
func (a *adminServer) setAccess(cfg *Config) { a.access.Store(newAdminAccess(cfg)) }

func (a *adminServer) start(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	a.ln = ln
	a.s.goSafe("admin", func() {
		if err := a.srv.Serve(ln); err != nil && err != http.ErrServerClosed {
			a.s.log.Error("admin server stopped", "err", err)
		}
	})
	return nil
}

func (a *adminServer) addr() string { return a.ln.Addr().String() }

func (a *adminServer) close() { a.srv.Close() }

// adminAccess says which requests the admin API takes. It is immutable;
// a reload swaps it.
type adminAccess struct {
	// names are the host names accepted in Host besides IP addresses.
	names map[string]bool
	// tokenHash is the SHA-256 of admin_token: comparing hashes takes the
	// same time whatever the lengths.
	tokenHash [sha256.Size]byte
	hasToken  bool
}

func newAdminAccess(cfg *Config) *adminAccess {
	acc := &adminAccess{names: map[string]bool{"localhost": true}}
	if host, _, err := net.SplitHostPort(cfg.Admin); err == nil {
		acc.names[strings.ToLower(host)] = true
	}
	for _, h := range cfg.AdminHosts {
		acc.names[strings.ToLower(h)] = true
	}
	if cfg.AdminToken != "" {
		acc.tokenHash, acc.hasToken = sha256.Sum256([]byte(cfg.AdminToken)), true
	}
	return acc
}

// hostAllowed reports whether a Host header names this admin API. A DNS
// rebinding attack sends the attacker's own host name, so an IP address,
// with any port, is always safe; names must be known.
func (acc *adminAccess) hostAllowed(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		host = strings.TrimSuffix(strings.TrimPrefix(hostport, "["), "]")
	}
	if host == "" {
		return false
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return true
	}
	return acc.names[strings.ToLower(host)]
}

// tokenOK reports whether the request carries the admin token as a
// bearer token, and whether it carries a bearer token at all.
func (acc *adminAccess) tokenOK(r *http.Request) (ok, present bool) {
	token, present := bearerToken(r)
	if !present {
		return false, false
	}
	h := sha256.Sum256([]byte(token))
	return subtle.ConstantTimeCompare(h[:], acc.tokenHash[:]) == 1, true
}

// bearerToken returns the token of an Authorization: Bearer header.
func bearerToken(r *http.Request) (string, bool) {
	scheme, cred, found := strings.Cut(r.Header.Get("Authorization"), " ")
	if !found || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	return strings.TrimSpace(cred), true
}

// ServeHTTP checks the Host, the token and the origin of an admin request
// before serving it.
func (a *adminServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	defer a.recoverHandler(r)
	if r.URL.Path == peerCopyPath {
		// Peers authenticate with the fleet's secret (see peerCopy).
		a.peerCopy(w, r)
		return
	}
	acc := a.access.Load()
	if !acc.hostAllowed(r.Host) {
		a.refuse(w, r, adminRefusedHost, http.StatusMisdirectedRequest,
			fmt.Sprintf("Host %q is not a name of this admin API; use its IP address or localhost, or list the name in admin_hosts", r.Host))
		return
	}
	if acc.hasToken && r.URL.Path != "/healthz" && !isUIAsset(r.URL.Path) {
		switch ok, present := acc.tokenOK(r); {
		case !present:
			w.Header().Set("WWW-Authenticate", `Bearer realm="edgelb admin"`)
			a.refuse(w, r, adminRefusedToken, http.StatusUnauthorized, "missing token: send Authorization: Bearer <admin_token>")
			return
		case !ok:
			w.Header().Set("WWW-Authenticate", `Bearer realm="edgelb admin", error="invalid_token"`)
			a.refuse(w, r, adminRefusedToken, http.StatusUnauthorized, "wrong token")
			return
		}
	}
	if err := a.checkOrigin(r); err != nil {
		a.refuse(w, r, adminRefusedOrigin, http.StatusForbidden, err.Error())
		return
	}
	a.mux.ServeHTTP(w, r)
}

// recoverHandler, deferred by ServeHTTP, counts and logs a handler's
// panic, then lets net/http abort the connection as it does for any
// handler panic; http.ErrAbortHandler keeps net/http from logging it again.
func (a *adminServer) recoverHandler(r *http.Request) {
	p := recover()
	if p == nil {
		return
	}
	if p != http.ErrAbortHandler {
		panics.Admin.Recovered(a.s.log, p, "panic in admin handler", "server", "admin", "method", r.Method, "path", r.URL.Path)
	}
	panic(http.ErrAbortHandler)
}

// checkOrigin refuses a request that changes state when a web page of
// another origin may have sent it, and profiles asked for by pages of other
// sites. Browsers mark such writes with Sec-Fetch-Site or Origin, which
// CrossOriginProtection checks. Old ones sent neither with an HTML form,
// whose Content-Type is always CORS-safelisted, so a write of that type must
// also carry what no page can send to another origin unapproved: a bearer
// token or HeaderAdmin. curl -X POST sends no Content-Type at all.
func (a *adminServer) checkOrigin(r *http.Request) error {
	if strings.HasPrefix(r.URL.Path, "/debug/pprof/") {
		// Profiles and traces cost CPU even when the page cannot read them.
		switch sfs := r.Header.Get("Sec-Fetch-Site"); sfs {
		case "cross-site", "same-site":
			return fmt.Errorf("profiles are not served to pages of other sites (Sec-Fetch-Site %q)", sfs)
		}
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return nil
	}
	if err := a.xorigin.Check(r); err != nil {
		return fmt.Errorf("%w (Sec-Fetch-Site %q, Origin %q, Host %q)", err, r.Header.Get("Sec-Fetch-Site"), r.Header.Get("Origin"), r.Host)
	}
	// A browser attaches Basic credentials on its own, never Bearer ones.
	if _, bearer := bearerToken(r); bearer || r.Header.Get("Origin") != "" || r.Header.Get(HeaderAdmin) != "" {
		return nil
	}
	for _, ct := range r.Header.Values("Content-Type") {
		if corsSafelistedType(ct) {
			return fmt.Errorf("a %s request with Content-Type %q and no Origin may come from a web page: send no body, or add the header %s: 1",
				r.Method, ct, HeaderAdmin)
		}
	}
	return nil
}

// corsSafelistedType reports whether a Content-Type is one that a web page
// may send to any origin without asking (the Fetch standard's list).
func corsSafelistedType(ct string) bool {
	essence, _, _ := strings.Cut(ct, ";")
	switch strings.ToLower(strings.TrimSpace(essence)) {
	case "application/x-www-form-urlencoded", "multipart/form-data", "text/plain":
		return true
	}
	return false
}

// refuse answers a refused admin request and logs why.
func (a *adminServer) refuse(w http.ResponseWriter, r *http.Request, c *metrics.Counter, code int, why string) {
	c.Inc()
	a.s.log.Warn("admin request refused", "method", r.Method, "path", r.URL.Path, "host", r.Host,
		"remote", r.RemoteAddr, "status", code, "why", why)
	http.Error(w, "edgelb admin: "+why, code)
}

func (a *adminServer) metrics(w http.ResponseWriter, _ *http.Request) {
	var buf bytes.Buffer
	metrics.WritePrometheus(&buf, true)
	a.s.writeCertMetrics(&buf, time.Now())
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	writeExposition(w, buf.Bytes())
}

// writeExposition writes the output of metrics.WritePrometheus with each
// metric family in one group under one HELP (from metricHelp) and one TYPE
// line. The metrics package writes metadata per Set, and edgelb has a Set
// per service and backend, so a family arrives in several groups with a
// TYPE line each, which the Prometheus text format forbids; its HELP lines
// carry no text, as the package has no way to give one.
func writeExposition(w io.Writer, in []byte) {
	lines := bytes.Split(in, []byte("\n"))
	types := make(map[string]string)
	for _, l := range lines {
		if rest, ok := bytes.CutPrefix(l, []byte("# TYPE ")); ok {
			name, typ, _ := strings.Cut(string(rest), " ")
			if types[name] == "" {
				types[name] = typ
			}
		}
	}
	for name, h := range metricHelp {
		if types[name] == "" && h.typ != "" {
			types[name] = h.typ
		}
	}
	samples := make(map[string][][]byte)
	for _, l := range lines {
		if len(l) == 0 || l[0] == '#' {
			continue
		}
		name := l
		if i := bytes.IndexAny(l, "{ "); i >= 0 {
			name = l[:i]
		}
		f := metricFamily(string(name), types)
		samples[f] = append(samples[f], l)
	}
	families := make([]string, 0, len(samples))
	for f := range samples {
		families = append(families, f)
	}
	sort.Strings(families)
	var out bytes.Buffer
	for _, f := range families {
		if h := metricHelp[f].help; h != "" {
			fmt.Fprintf(&out, "# HELP %s %s\n", f, h)
		}
		if t := types[f]; t != "" {
			fmt.Fprintf(&out, "# TYPE %s %s\n", f, t)
		}
		for _, l := range samples[f] {
			out.Write(l)
			out.WriteByte('\n')
		}
	}
	w.Write(out.Bytes())
}

// metricFamily returns the family of a sample name: itself, or for the
// _bucket, _sum and _count series of a histogram or summary, its base name.
func metricFamily(name string, types map[string]string) string {
	if types[name] != "" {
		return name
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suffix); ok {
			if t := types[base]; t == "histogram" || t == "summary" {
				return base
			}
		}
	}
	return name
}

// metricHelp is the HELP text of each edgelb metric family, and the type of
// those written without metadata.
var metricHelp = map[string]struct{ typ, help string }{
	"edgelb_requests_refused_total":            {help: "Client requests edgelb answered itself without forwarding, by reason: a malformed method, target, Host, header name or framing, an unsupported version or expectation, a method not allowed (CONNECT, TRACE), a body over max_request_body, or OPTIONS * answered here."},
	"edgelb_backend_conns_discarded_total":     {help: "Backend connections closed instead of reused: stale (the backend closed it, or left bytes on it, while idle) or surplus (bytes followed a response)."},
	"edgelb_client_conns_rejected_total":       {help: "Client connections closed at accept, by reason (max_conns_per_ip)."},
	"edgelb_accept_errors_total":               {help: "Failed accepts of client connections, by cause (emfile, enfile, enobufs, enomem, other); accepting pauses briefly after each."},
	"edgelb_client_timeouts_total":             {help: "Client connections closed with 408 because the request head (server.header_timeout) or body (server.idle_timeout) did not arrive in time."},
	"edgelb_admin_requests_refused_total":      {help: "Admin API requests refused, by reason: host (Host not accepted), token (missing or wrong admin_token), cross_origin (a request a web page of another origin may have sent)."},
	"edgelb_backend_errors_total":              {help: "Tries on a backend that failed, by cause."},
	"edgelb_backend_inflight":                  {help: "Requests in flight to a backend."},
	"edgelb_backend_backup":                    {help: "1 while the backend is in its service's backup set, 0 while it is a primary."},
	"edgelb_backup_requests_total":             {help: "Answers the service's backup backends gave (tries on a backup that got an HTTP response, retries included)."},
	"edgelb_serving":                           {help: "1 for the set of backends that serves the service's new requests now (set: primary, backup, panic or none), 0 for the others."},
	"edgelb_backend_request_duration_seconds":  {typ: "histogram", help: "Duration of tries on a backend."},
	"edgelb_backend_requests_total":            {help: "Tries sent to a backend, retries included."},
	"edgelb_backend_responses_total":           {help: "Responses from a backend, by status class."},
	"edgelb_backend_state_changes_total":       {help: "Backend health state changes, by the state entered."},
	"edgelb_config_reloads_total":              {help: "Config reloads, by result: from SIGHUP, and from changes of consul.config_key."},
	"edgelb_config_key_updates_total":          {help: "Values of consul.config_key applied, and refused (invalid, not fitting the file, or the key deleted) while the running services and routes stayed."},
	"edgelb_config_key_watch_errors_total":     {help: "Failed calls watching consul.config_key in Consul."},
	"edgelb_consul_registered":                 {help: "1 while the Consul agent holds the instance's registration (consul.register), else 0."},
	"edgelb_consul_registrations_total":        {help: "Registrations of the instance in Consul: the first, and each after the agent forgot it (a restarted agent)."},
	"edgelb_consul_registration_errors_total":  {help: "Failed calls keeping the instance registered in Consul (agent unreachable, token refused)."},
	"edgelb_discovery_errors_total":            {help: "Failed discovery queries, by source and service."},
	"edgelb_discovery_failovers_total":         {help: "Switches of a Consul service from one datacenter to another (consul.failover or a prepared query), by service and the datacenters it left (from) and went to (to); going back to the service's own datacenter counts too."},
	"edgelb_discovery_datacenter_serving":      {help: "1 for the Consul datacenter that a service with failover datacenters or a prepared query is served from, 0 for its other datacenters; local is the agent's own when its name is not known."},
	"edgelb_discovery_updates_total":           {help: "Discovery answers that changed a service's instances, by source and service."},
	"edgelb_dns_resolutions_total":             {help: "Resolutions of the host names of static backends, by name and result: ok (a DNS server answered), hosts (the hosts file did), nxdomain, nodata (no A or AAAA record), servfail, refused, timeout, unreachable (nothing listens at the server's address), error."},
	"edgelb_ejections_refused_total":           {help: "Ejections not made because max_ejection_percent of the service's backends were held out already."},
	"edgelb_event_loop_accept_errors_total":    {help: "Errors accepting client connections in the event loops."},
	"edgelb_event_loop_batch_waits_total":      {help: "Waits of server.batch_wait that event loops made to gather events."},
	"edgelb_event_loop_sends_total":            {help: "Sends (answers to clients, requests to backends) the event loops made."},
	"edgelb_event_loop_send_calls_total":       {help: "System calls that made the event loops' sends: one io_uring_enter for a batch of them, or one sendto each."},
	"edgelb_event_loop_reads_ahead_total":      {help: "Reads the event loops made for a poll's events before handling them, several in one io_uring_enter."},
	"edgelb_event_loop_read_ahead_calls_total": {help: "io_uring_enter system calls that made the event loops' reads ahead."},
	"edgelb_event_loop_fallbacks_total":        {help: "Backend tries an event loop left to the fasthttp server."},
	"edgelb_event_loop_handoff_drops_total":    {help: "Connections an event loop handed over that the fasthttp server did not take."},
	"edgelb_event_loop_handoffs_total":         {help: "Client connections an event loop handed to the fasthttp server."},
	"edgelb_fleet_peers":                       {help: "Other instances of the fleet registered in Consul under consul.register.name, by state: ready (every check passing) or not_ready."},
	"edgelb_fleet_peers_watch_errors_total":    {help: "Failed calls following the fleet's instances in Consul's health API."},
	"edgelb_peer_fills_total":                  {help: "Requests this instance had no stored copy for and asked its fleet's peers about (consul.peer_fill), by result: hit (a peer's copy was stored and served), miss (no peer asked had one), timeout (consul.peer_fill.timeout came first), error (a peer could not be asked, or sent what could not be stored), refused (a peer refused: another secret, or peer fill off there)."},
	"edgelb_peer_fill_requests_total":          {help: "Requests of peers for a stored copy that this instance answered from its stale store, by result: hit (a copy sent), miss (none stored), refused (no secret or another one, or peer fill off here)."},
	"edgelb_generated_errors_total":            {help: "Responses edgelb generated because no backend answered, by Edgelb-Error code."},
	"edgelb_hedges_total":                      {help: "Hedged tries sent (sent), and hedges due that waited because the hedge budget was spent (over_budget)."},
	"edgelb_outlier_ejections_total":           {help: "Backends ejected by outlier detection, by rule."},
	"edgelb_panic_mode":                        {help: "1 while the service is in panic mode (too few backends available, so all get traffic), else 0."},
	"edgelb_panic_mode_entries_total":          {help: "Times the service entered panic mode."},
	"edgelb_panics_total":                      {help: "Panics recovered in edgelb's goroutines and handlers, by component: balancer (request handling in both engines, background tasks), admin (admin API handlers), discovery (Consul watches), health (active probes, outlier detection), stale (saving and loading the stale store), acme (getting and renewing certificates), fleet (the Consul registration, the purge log, the config key, the peer list)."},
	"edgelb_purges_published_total":            {help: "Purges of the stale store this instance published to the fleet's purge log in Consul (consul.purge)."},
	"edgelb_purges_applied_total":              {help: "Purges of the fleet's purge log this instance applied to its stale store, its own included, and whole-store purges for purges it may have missed."},
	"edgelb_purges_collected_total":            {help: "Records older than consul.purge.retention this instance removed from the purge log."},
	"edgelb_purge_log_errors_total":            {help: "Failed calls to the purge log in Consul, by op: publish (the purge is kept and published later), watch, gc."},
	"edgelb_request_duration_seconds":          {typ: "histogram", help: "Duration of client requests, retries included."},
	"edgelb_requests_total":                    {help: "Client requests routed to the service."},
	"edgelb_retries_total":                     {help: "Retries on another backend."},
	"edgelb_stale_bytes":                       {help: "Bytes held by the stale store."},
	"edgelb_stale_entries":                     {help: "Entries in the stale store."},
	"edgelb_stale_evicted_bytes_total":         {help: "Bytes the stale store evicted to make room."},
	"edgelb_stale_max_bytes":                   {help: "Capacity of the stale store in bytes."},
	"edgelb_stale_misses_total":                {help: "Failures with no stored copy to serve, by reason."},
	"edgelb_stale_responses_total":             {help: "Stored copies served instead of an error, by service."},
	"edgelb_stale_served_total":                {help: "Stored copies served instead of an error."},
	"edgelb_stale_stored_total":                {help: "Responses written to the stale store."},
	"edgelb_tls_handshakes_total":              {help: "TLS handshakes completed on tls.listen, by version (1.2, 1.3) and whether a session ticket resumed them."},
	"edgelb_tls_handshake_errors_total":        {help: "TLS handshakes failed on tls.listen, by reason: timeout (not done within server.header_timeout), closed (the client went away), not_tls (not a TLS client, such as plain HTTP), version (only TLS 1.1 or older, or below tls.min_version), cipher (no shared cipher suite or key exchange), alpn (no shared application protocol), no_certificate (no certificate to serve: the ACME one not got yet, and none from files), cert_rejected (the client refused the certificate), client_alert (the client aborted otherwise), other."},
	"edgelb_tls_certificates":                  {typ: "gauge", help: "Certificates the TLS listener serves, by source: file (tls.certs) or acme (tls.acme, those got so far)."},
	"edgelb_tls_certificate_expiry_seconds":    {typ: "gauge", help: "Seconds until a served certificate expires (negative once expired), by source, first DNS name and, for files, certificate file."},
	"edgelb_acme_certificates_issued_total":    {help: "Certificates this instance got from the ACME CA for a domain that had none (an instance sharing the storage counts those it got)."},
	"edgelb_acme_certificates_renewed_total":   {help: "Certificates this instance renewed at the ACME CA."},
	"edgelb_acme_failures_total":               {help: "Failed attempts to get (op=obtain) or renew (op=renew) a certificate from the ACME CA; they are retried with backoff."},
	"edgelb_acme_challenges_total":             {help: "ACME challenges answered, by type: http-01 (on listen) and tls-alpn-01 (on tls.listen)."},
	"edgelb_https_redirects_total":             {help: "Plain HTTP requests answered with 308 to HTTPS on routes with https_redirect."},
	"edgelb_tunnels_open":                      {help: "Open tunnels (WebSocket and other upgraded connections) to the service's backends."},
	"edgelb_tunnels_total":                     {help: "Upgrade requests by result: opened (a backend switched protocols), declined (it answered otherwise), failed (no backend answered), overloaded (websocket.max_tunnels open, or shutting down: 503)."},
	"edgelb_tunnels_closed_total":              {help: "Tunnels closed, by reason: client or backend (the side that closed or failed first), idle_timeout (websocket.idle_timeout), shutdown."},
	"edgelb_tunnel_bytes_total":                {help: "Bytes relayed through tunnels, by direction (to_backend, to_client)."},
	"edgelb_http2_connections_total":           {help: "HTTP/2 client connections served, by transport: tls (ALPN h2 on tls.listen) or h2c (prior knowledge on listen, with server.h2c)."},
	"edgelb_http2_connections_open":            {help: "HTTP/2 client connections open."},
	"edgelb_http2_streams_total":               {help: "HTTP/2 streams whose request edgelb served (each also counts as a request of its service), by transport."},
	"edgelb_http2_streams_reset_total":         {help: "HTTP/2 streams that ended before their answer was sent: reset by the client, or for its errors, or with their connection."},
	"edgelb_http2_conns_closed_total":          {help: "HTTP/2 connections edgelb closed with GOAWAY ENHANCE_YOUR_CALM for going over a limit, by reason: resets (server.http2.max_resets_per_second, rapid reset), control_frames (server.http2.max_control_frames_per_second: SETTINGS, PING, PRIORITY, RST_STREAM and empty frames), header_block (a header block in too many CONTINUATION frames)."},
	"edgelb_http2_errors_total":                {help: "HTTP/2 protocol errors of clients that Go's HTTP/2 server answered, by scope (conn: GOAWAY, the connection closes; stream: RST_STREAM) and error code."},
	"edgelb_access_log_lines_total":            {help: "Access log lines written to the file."},
	"edgelb_access_log_dropped_total":          {help: "Access log lines dropped: a producer's buffer was full because the writer fell behind, or writing failed."},
	"edgelb_access_log_write_errors_total":     {help: "Failed writes to the access log file; their lines count as dropped."},
}

func (a *adminServer) healthz(w http.ResponseWriter, _ *http.Request) {
	w.Write([]byte("ok\n"))
}

func (a *adminServer) readyz(w http.ResponseWriter, _ *http.Request) {
	if ok, why := a.s.Ready(); !ok {
		http.Error(w, "not ready: "+why, http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintln(w, "ready")
	now := time.Now()
	for _, st := range a.s.DiscoveryStatus() {
		what := st.Service
		if st.Name != "" {
			what += " " + st.Name
		}
		fmt.Fprintf(w, "%s %s: %s\n", st.Source, what, describeFreshness(st, now))
	}
}

// describeFreshness words a discovery status for /readyz.
func describeFreshness(st discovery.Status, now time.Time) string {
	var b strings.Builder
	switch {
	case st.FromDisk:
		b.WriteString("stale, loaded from state_dir")
	case st.Stale:
		b.WriteString("stale")
	default:
		b.WriteString("fresh")
	}
	if !st.LastUpdate.IsZero() {
		fmt.Fprintf(&b, ", last update %s ago", now.Sub(st.LastUpdate).Round(time.Millisecond))
	}
	if st.LastError != "" {
		fmt.Fprintf(&b, ", last error %s ago: %s", now.Sub(st.LastErrorAt).Round(time.Millisecond), st.LastError)
	}
	if !st.FailingSince.IsZero() {
		fmt.Fprintf(&b, ", failing for %s (%d tries)", now.Sub(st.FailingSince).Round(time.Millisecond), st.Failures)
	}
	return b.String()
}

// purge purges the stale store of this instance at once and, with the
// purge log, publishes the purge for every instance of the fleet: 200 once
// Consul took it, 202 when it is kept to be published when Consul answers.
func (a *adminServer) purge(w http.ResponseWriter, r *http.Request) {
	u := r.URL.Query().Get("url")
	what := "all"
	if u == "" {
		a.s.store.PurgeAll()
		a.s.log.Info("stale store purged")
	} else {
		if err := a.s.store.Purge(u); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		what = u
		a.s.log.Info("stale store purged", "url", u)
	}
	p := a.s.purges.Load()
	if p == nil {
		fmt.Fprintln(w, "purged", what)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), purgePublishTimeout)
	defer cancel()
	rec, err := p.Publish(ctx, u)
	if err != nil {
		w.WriteHeader(http.StatusAccepted)
		fmt.Fprintf(w, "purged %s on this instance; not yet published to the fleet (%s): kept, and published when Consul answers\n", what, err)
		return
	}
	fmt.Fprintf(w, "purged %s on this instance and published to the fleet: %s (index %d)\n", what, rec.Key, rec.Index)
}

// purgePublishTimeout bounds how long POST /cache/purge waits for Consul.
const purgePublishTimeout = 3 * time.Second

// status serves /status, and with ?rates=1 the live view the status page
// polls (compact, as it comes every second); since=UNIX_MS limits its
// history to the samples after that time.
func (a *adminServer) status(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	live := q.Get("rates") != "" && q.Get("rates") != "0"
	var since int64
	if v := q.Get("since"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			http.Error(w, fmt.Sprintf("since=%q: want unix milliseconds, as in samples.times", v), http.StatusBadRequest)
			return
		}
		since = n
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	if !live {
		enc.SetIndent("", "  ")
		enc.Encode(a.s.Status())
		return
	}
	enc.Encode(a.s.LiveStatus(since))
}

// Ready reports whether routes are loaded and the server accepts requests,
// and if not, why. Accepting connections failed for want of file
// descriptors or memory within the last few seconds is not ready.
func (s *Server) Ready() (bool, string) {
	if !s.ready.Load() {
		return false, "starting or shutting down"
	}
	now := time.Now()
	if why := s.leavingReason(now); why != "" {
		return false, why
	}
	if why := s.acceptTrouble.describe(now); why != "" {
		return false, why
	}
	rt := s.routes.Load()
	if len(rt.any) == 0 && len(rt.byHost) == 0 {
		return false, "no routes loaded"
	}
	return true, ""
}

// Status is the JSON document of GET /status.
type Status struct {
	// Version is the running build's (edgelb -version).
	Version   string                    `json:"version"`
	StartedAt time.Time                 `json:"started_at"`
	Ready     bool                      `json:"ready"`
	Services  map[string]*ServiceStatus `json:"services"`
	Routes    []RouteStatus             `json:"routes"`
	Conflicts []string                  `json:"conflicts,omitempty"`
	Discovery []discovery.Status        `json:"discovery,omitempty"`
	// Samples are the times of the History series, with ?rates=1 only.
	Samples *Samples `json:"samples,omitempty"`
	// Certificates are those of the TLS listener, from files and ACME.
	Certificates []CertStatus `json:"certificates,omitempty"`
	// Fleet is the instance's part in its fleet; absent without the
	// consul block.
	Fleet *FleetStatus `json:"fleet,omitempty"`
}

// ServiceStatus is one service in /status.
type ServiceStatus struct {
	Source    string    `json:"source"`
	UpdatedAt time.Time `json:"updated_at,omitzero"`
	// Backends lists the primary backends, then the backup ones.
	Backends []BackendStatus `json:"backends"`
	// Available counts the healthy primary backends.
	Available int `json:"available"`
	// Panic is set while too few backends are available and every one
	// that is not draining or failing to answer gets traffic.
	Panic      bool      `json:"panic"`
	PanicSince time.Time `json:"panic_since,omitzero"`
	// Tunnels counts the open WebSocket and other upgraded connections,
	// those of backends no longer listed included.
	Tunnels int64 `json:"tunnels"`
	// Serving says which set serves new requests: "primary", "backup",
	// "panic" or "none".
	Serving string `json:"serving"`
	// BackupSource and BackupUpdatedAt describe the backup set's
	// discovery, BackupAvailable counts its healthy backends; absent
	// without a backup set.
	BackupSource    string    `json:"backup_source,omitempty"`
	BackupUpdatedAt time.Time `json:"backup_updated_at,omitzero"`
	BackupAvailable int       `json:"backup_available,omitempty"`
	// Rates and History, with ?rates=1 only.
	Rates   *ServiceRates   `json:"rates,omitempty"`
	History *ServiceHistory `json:"history,omitempty"`
	// Failover says which Consul datacenter serves, since when and why;
	// only for services with failover datacenters or a prepared query.
	Failover *discovery.Failover `json:"failover,omitempty"`
}

// BackendStatus is one backend in /status.
type BackendStatus struct {
	health.TargetStatus
	Weight uint32 `json:"weight"`
	// SlowStart is the share of its traffic, in percent, that slow start
	// gives a returning backend; absent when it is not held back.
	SlowStart int `json:"slow_start_percent,omitempty"`
	// Tunnels counts the backend's open WebSocket and other upgraded
	// connections; ejection does not close them.
	Tunnels int64 `json:"tunnels"`
	// Backup is set for a backend of the service's backup set.
	Backup bool `json:"backup,omitempty"`
	// Rates and History, with ?rates=1 only.
	Rates   *BackendRates   `json:"rates,omitempty"`
	History *BackendHistory `json:"history,omitempty"`
}

// RouteStatus is one route in /status.
type RouteStatus struct {
	Host    string `json:"host"`
	Path    string `json:"path"`
	Service string `json:"service"`
}

// Status returns what GET /status shows.
func (s *Server) Status() *Status { return s.status(false, 0) }

// LiveStatus returns what GET /status?rates=1&since=SINCE shows: Status
// with each service's and backend's rates over the last seconds and their
// per-second history after since (unix milliseconds; 0 for all of it).
func (s *Server) LiveStatus(since int64) *Status { return s.status(true, since) }

func (s *Server) status(live bool, since int64) *Status {
	now := time.Now()
	st := &Status{Version: version.Version(), StartedAt: s.started, Services: make(map[string]*ServiceStatus)}
	st.Ready, _ = s.Ready()
	// The series of each service and backend listed, for the live view.
	type liveService struct {
		ss *ServiceStatus
		m  *serviceMetrics
	}
	type liveBackend struct {
		ss *ServiceStatus
		i  int
		m  *backendMetrics
	}
	var liveServices []liveService
	var liveBackends []liveBackend
	s.mu.Lock()
	consul := s.consul
	s.mu.Unlock()
	for _, p := range s.poolsSorted() {
		ss := &ServiceStatus{Backends: []BackendStatus{}}
		liveServices = append(liveServices, liveService{ss, p.m})
		if set := p.source.Load(); set != nil {
			ss.Source = set.Source
			ss.UpdatedAt = set.UpdatedAt
		}
		if set := p.backupSource.Load(); set != nil && p.bej != nil {
			ss.BackupSource = set.Source
			ss.BackupUpdatedAt = set.UpdatedAt
		}
		ss.Panic, ss.PanicSince = p.ej.Panic(), p.ej.PanicSince()
		if consul != nil {
			ss.Failover = consul.Failover(p.name)
		}
		ss.Tunnels = p.m.tunnelsOpen.Load()
		ss.Serving = p.serving(now.UnixNano())
		primary, backup := p.set.Load().list, p.backup.Load().list
		for _, b := range slices.Concat(primary, backup) {
			bs := BackendStatus{TargetStatus: b.target.Status(now), Weight: b.weight, Tunnels: b.m.tunnels.Load(), Backup: b.backup}
			if bs.State == health.StateHealthy.String() {
				if b.backup {
					ss.BackupAvailable++
				} else {
					ss.Available++
				}
				if pct := p.slowStartPercent(b, now.UnixNano()); pct < 100 {
					bs.SlowStart = pct
				}
			}
			liveBackends = append(liveBackends, liveBackend{ss, len(ss.Backends), b.m})
			ss.Backends = append(ss.Backends, bs)
		}
		p.mu.Lock()
		for _, d := range p.draining {
			bs := BackendStatus{TargetStatus: d.b.target.Status(now), Weight: d.b.weight, Tunnels: d.b.m.tunnels.Load(), Backup: d.b.backup}
			bs.State = health.StateDraining.String()
			bs.Reason = "removed from discovery; finishing in-flight requests"
			bs.Since = d.since
			liveBackends = append(liveBackends, liveBackend{ss, len(ss.Backends), d.b.m})
			ss.Backends = append(ss.Backends, bs)
		}
		p.mu.Unlock()
		st.Services[p.name] = ss
	}
	rt := s.routes.Load()
	for _, r := range rt.any {
		st.Routes = append(st.Routes, RouteStatus{Host: r.host, Path: r.path, Service: r.service})
	}
	for _, h := range sortedNames(rt.byHost) {
		for _, r := range rt.byHost[h] {
			if r.host != "*" {
				st.Routes = append(st.Routes, RouteStatus{Host: r.host, Path: r.path, Service: r.service})
			}
		}
	}
	s.mu.Lock()
	st.Conflicts = append([]string(nil), s.conflicts...)
	s.mu.Unlock()
	st.Discovery = s.DiscoveryStatus()
	if live {
		s.live.mu.Lock()
		v := s.live.view(since)
		st.Samples = v.samples()
		for _, l := range liveServices {
			l.ss.Rates, l.ss.History = v.service(l.m.live)
		}
		for _, l := range liveBackends {
			bs := &l.ss.Backends[l.i]
			bs.Rates, bs.History = v.backend(l.m.live)
		}
		s.live.mu.Unlock()
	}
	st.Certificates = s.Certificates()
	st.Fleet = s.fleetStatus()
	return st
}
