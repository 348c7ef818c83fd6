package balancer

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"gopkg.in/yaml.v3"

	"github.com/edgelb/edgelb/balancer/fleet"
	"github.com/edgelb/edgelb/balancer/h1"
	"github.com/edgelb/edgelb/balancer/stale"
	"github.com/edgelb/edgelb/discovery"
	"github.com/edgelb/edgelb/health"
)

// Config is the edgelb configuration file. The zero value of every field
// selects its default, documented on the field.
type Config struct {
	// Listen is the client-facing address. DefaultListen is used if not set.
	Listen string `yaml:"listen"`

	// Admin is the admin API address. DefaultAdmin is used if not set.
	Admin string `yaml:"admin"`

	// AdminToken, when set, is the bearer token that every admin request
	// but GET /healthz must carry (Authorization: Bearer TOKEN). When
	// AdminTokenFile is set, LoadConfig and ParseConfig fill it from that
	// file. No token is required if neither is set.
	AdminToken string `yaml:"admin_token"`

	// AdminTokenFile names a file holding the admin token, so that the
	// token need not be written into the config; surrounding white space
	// is ignored. A relative path is relative to the working directory.
	AdminTokenFile string `yaml:"admin_token_file"`

	// AdminHosts are host names, besides localhost and the host of Admin,
	// that the admin API accepts in the Host header; IP addresses are
	// always accepted. Requests naming any other host are refused, which
	// keeps DNS rebinding away from the admin API.
	AdminHosts []string `yaml:"admin_hosts"`

	// StateDir holds the last-known-good discovery data and the stale
	// store across restarts. DefaultStateDir is used if not set.
	StateDir string `yaml:"state_dir"`

	// Consul enables discovery from Consul, and with it the fleet: the
	// instance's own registration, and purges that reach every instance.
	// Omit it to run on static services only.
	Consul *ConsulConfig `yaml:"consul"`

	// DNS says how static backends given by host name are resolved:
	// servers, interval, timeout, hosts file. Every field has a default.
	DNS discovery.DNSConfig `yaml:"dns"`

	// Server tunes the client-facing listener.
	Server ServerConfig `yaml:"server"`

	// TLS adds a listener serving HTTPS. Omit it to serve plain HTTP
	// only.
	TLS *TLSConfig `yaml:"tls"`

	// StaleStore sizes the store of responses served when origins fail.
	StaleStore stale.Config `yaml:"stale_store"`

	// Services by name.
	Services map[string]*ServiceConfig `yaml:"services"`

	// Routes map hosts and path prefixes to services. The longest matching
	// prefix wins; host "*" matches any host.
	Routes []RouteConfig `yaml:"routes"`

	// AccessLog writes a line per request. Off if not set.
	AccessLog *AccessLogConfig `yaml:"access_log"`

	// RequestID gives every request an ID, in a header both ways and in
	// the logs. "request_id: false" is short for "request_id: {enabled:
	// false}".
	RequestID RequestIDConfig `yaml:"request_id"`
}

// ConsulConfig is the consul block: where Consul is and what edgelb uses
// it for.
type ConsulConfig struct {
	// ConsulConfig is where Consul is (address, scheme, token,
	// datacenter) and whether tag routes are followed.
	discovery.ConsulConfig `yaml:",inline"`

	// Register registers the instance in Consul, with a check on its
	// admin /readyz, and deregisters it first when it stops. Off if not
	// set.
	Register *fleet.RegisterConfig `yaml:"register"`

	// Purge is where POST /cache/purge publishes purges for every
	// instance that shares the Consul and the prefix, and how long they
	// are kept there.
	Purge fleet.PurgeConfig `yaml:"purge"`

	// ConfigKey, when set, is a Consul KV key holding services and routes
	// in the YAML of this file. Once its value is known it replaces the
	// file's services and routes, and every change to it applies as a
	// reload does; a value that is not valid is refused and the running
	// config stays. The file's own services and routes serve only until
	// then.
	ConfigKey string `yaml:"config_key"`

	// PeerFill asks the other instances of the fleet for their stored
	// copy when this one has none to serve.
	PeerFill PeerFillConfig `yaml:"peer_fill"`
}

// configKey returns consul.config_key of cfg, or "".
func configKey(cfg *Config) string {
	if cfg.Consul == nil {
		return ""
	}
	return cfg.Consul.ConfigKey
}

// routingDoc is what consul.config_key holds: the services and routes of
// a config file.
type routingDoc struct {
	Services map[string]*ServiceConfig `yaml:"services"`
	Routes   []RouteConfig             `yaml:"routes"`
}

// withRouting returns file with the services and routes of data, the
// value of consul.config_key, in place of its own, checked by the rules
// ParseConfig applies to a file: unknown keys are errors, and every
// problem is listed with its key. file must come from ParseConfig and is
// not changed.
func withRouting(file *Config, data []byte) (*Config, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, fmt.Errorf("cannot parse YAML: %w", err)
	}
	if len(root.Content) == 0 {
		return nil, errors.New("empty: want services and routes")
	}
	var doc routingDoc
	var errs []error
	lines := make(map[int]string)
	top := root.Content[0]
	if top.Kind == yaml.MappingNode {
		fileKeys := yamlFields(reflect.TypeOf(Config{}))
		for i := 0; i+1 < len(top.Content); i += 2 {
			k := top.Content[i].Value
			if _, ok := fileKeys[k]; ok && k != "services" && k != "routes" {
				errs = append(errs, fmt.Errorf("%s: belongs in the config file; the key holds services and routes only", k))
			}
		}
	}
	var unknown []error
	checkKeys(top, reflect.TypeOf(doc), "", lines, &unknown)
	for _, e := range unknown {
		if k, _, _ := strings.Cut(e.Error(), ":"); !strings.Contains(k, ".") {
			if _, ok := yamlFields(reflect.TypeOf(Config{}))[k]; ok {
				continue // said above
			}
		}
		errs = append(errs, e)
	}
	if err := top.Decode(&doc); err != nil {
		errs = append(errs, decodeErrors(err, lines)...)
	}
	cfg := *file
	cfg.Services, cfg.Routes = doc.Services, doc.Routes
	for _, sc := range cfg.Services {
		sc.applyDefaults()
	}
	for i := range cfg.Routes {
		cfg.Routes[i].applyDefaults()
	}
	errs = append(errs, cfg.validateRouting()...)
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return &cfg, nil
}

// Defaults of Config and its parts.
const (
	DefaultListen             = "127.0.0.1:8080"
	DefaultAdmin              = "127.0.0.1:9901"
	DefaultStateDir           = "./state"
	DefaultConnectTimeout     = 1 * time.Second
	DefaultTryTimeout         = 5 * time.Second
	DefaultRequestTimeout     = 15 * time.Second
	DefaultRetries            = 2
	DefaultMaxConnsPerBackend = 1024
	DefaultMaxIdleConnTime    = 4 * time.Second
	DefaultMaxResponseBody    = 64 << 20
	DefaultMaxRequestBody     = 16 << 20
	DefaultMaxHeaderBytes     = 16 << 10
	DefaultIdleTimeout        = 60 * time.Second
	DefaultDrainTimeout       = 20 * time.Second
	DefaultBatchWait          = 25 * time.Microsecond
	DefaultHeaderTimeout      = 10 * time.Second
	// minHeaderTimeout bounds server.header_timeout from below: less
	// would cut off clients on a slow network.
	minHeaderTimeout = 100 * time.Millisecond
	// maxBatchWait bounds server.batch_wait: it is latency added under
	// load.
	maxBatchWait = time.Millisecond
)

// ServerConfig tunes the client-facing listener.
type ServerConfig struct {
	// MaxRequestBody is the largest accepted request body in bytes; larger
	// ones get 413. DefaultMaxRequestBody is used if not set.
	MaxRequestBody int `yaml:"max_request_body"`

	// MaxHeaderBytes is the largest accepted request header in bytes;
	// larger ones get 431. DefaultMaxHeaderBytes is used if not set.
	MaxHeaderBytes int `yaml:"max_header_bytes"`

	// TrustedProxies lists the networks (CIDR, or a bare IP) whose
	// X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host and Forwarded
	// headers edgelb believes and extends. From any other peer every
	// client copy of them is removed and edgelb writes its own. Empty by
	// default: no peer is trusted.
	TrustedProxies []string `yaml:"trusted_proxies"`
	// trusted is TrustedProxies parsed by validate.
	trusted []netip.Prefix

	// IdleTimeout closes idle client keep-alive connections.
	// DefaultIdleTimeout is used if not set.
	IdleTimeout time.Duration `yaml:"idle_timeout"`

	// DrainTimeout bounds how long SIGTERM waits for in-flight requests.
	// DefaultDrainTimeout is used if not set.
	DrainTimeout time.Duration `yaml:"drain_timeout"`

	// EventLoop serves GET and HEAD requests answered with a
	// Content-Length or chunked body from event loops, one per
	// GOMAXPROCS, and everything else from the fasthttp server. On by
	// default on Linux; false serves every connection from the fasthttp
	// server.
	EventLoop *bool `yaml:"event_loop"`

	// BatchWait is how long an event loop under load waits after a
	// short batch of events, so that its next wake-up gathers several:
	// it trades at most that much latency for fewer system calls and
	// wake-ups per request. A loop waits only while it handles at least
	// one event per BatchWait, its waits gather a full batch of events
	// (8) on average, and no connection is on the fasthttp server. If
	// not set, DefaultBatchWait where the loops send with io_uring, else
	// 0 (off).
	BatchWait *time.Duration `yaml:"batch_wait"`

	// IOUring has each event loop make the reads, and the sends, of one
	// batch of events in one io_uring system call each, where the kernel
	// allows it (Linux 5.6 and later, not forbidden by
	// kernel.io_uring_disabled or a seccomp profile); otherwise, or with
	// false, each read is its own recvfrom and each send its own sendto.
	// On by default.
	IOUring *bool `yaml:"io_uring"`

	// HeaderTimeout bounds how long a client may take to send the whole
	// head of a request: counted from the connection's opening for its
	// first request and from the head's first byte for the next ones. A
	// client too slow gets 408 and its connection closes. The body then
	// has IdleTimeout. DefaultHeaderTimeout is used if not set.
	HeaderTimeout time.Duration `yaml:"header_timeout"`

	// MaxConnsPerIP caps the open connections from one client address:
	// a connection over it is closed as soon as it is accepted. Off if
	// not set.
	MaxConnsPerIP int `yaml:"max_conns_per_ip"`

	// H2C serves HTTP/2 with prior knowledge on the plain listener: a
	// connection that opens with HTTP/2's preface ("PRI * HTTP/2.0") is
	// served as HTTP/2, any other as HTTP/1. Off by default: the preface
	// then gets 400, as any malformed request.
	H2C bool `yaml:"h2c"`

	// HTTP2 tunes HTTP/2, on the TLS listener and with h2c.
	HTTP2 HTTP2Config `yaml:"http2"`
}

// parsePrefix parses a CIDR network or a single IP address.
func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("want a CIDR network such as 10.0.0.0/8 or an IP address (got %q)", s)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("want a CIDR network such as 10.0.0.0/8 or an IP address (got %q)", s)
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// eventLoop reports whether the config asks for the event loops.
func (c *ServerConfig) eventLoop() bool { return c.EventLoop == nil || *c.EventLoop }

func (c *ServerConfig) ioUring() bool { return c.IOUring == nil || *c.IOUring }

// batchWait returns server.batch_wait, or its default for a loop that
// sends with io_uring (ring) or one sendto at a time: batched waits pay
// where the sends they gather go in one system call.
func (c *ServerConfig) batchWait(ring bool) time.Duration {
	switch {
	case c.BatchWait != nil:
		return *c.BatchWait
	case ring:
		return DefaultBatchWait
	}
	return 0
}

// ServiceConfig is one service: where its instances come from and how
// requests reach them.
type ServiceConfig struct {
	// Consul discovers the instances from Consul.
	Consul *discovery.ConsulService `yaml:"consul"`

	// Static lists the instances as host:port. A host given by name is
	// resolved (A and AAAA) at start and again on its records' TTL or the
	// DNS interval; each address is a backend.
	Static []StaticBackend `yaml:"static"`

	// Backup is a second set of backends that gets the service's
	// requests only while none of the primary ones (Consul or Static) is
	// available to them; see BackupConfig. None if not set.
	Backup *BackupConfig `yaml:"backup"`
	// DNS overrides, for this service's host names, the fields of the
	// top-level dns block that it sets.
	DNS *discovery.DNSConfig `yaml:"dns"`

	// Balance is the selection policy: "p2c" (power of two choices on
	// in-flight requests, the default), "round_robin" or "random".
	// All of them honour weights.
	Balance string `yaml:"balance"`

	// ConnectTimeout bounds a TCP connect. DefaultConnectTimeout is used
	// if not set.
	ConnectTimeout time.Duration `yaml:"connect_timeout"`

	// TryTimeout bounds one attempt on one backend. DefaultTryTimeout is
	// used if not set.
	TryTimeout time.Duration `yaml:"try_timeout"`

	// FirstByteTimeout bounds how long a try waits, once its request
	// went, for the first byte of the backend's answer: a try that gets
	// none in time fails as one past TryTimeout does. The rest of the
	// answer has until TryTimeout. It must be below TryTimeout; off
	// (only TryTimeout applies) if not set.
	FirstByteTimeout time.Duration `yaml:"first_byte_timeout"`

	// Timeout bounds the whole request, retries included.
	// DefaultRequestTimeout is used if not set.
	Timeout time.Duration `yaml:"timeout"`

	// Retries is how many other backends an idempotent request may be
	// retried on. DefaultRetries is used if not set; -1 disables retries.
	Retries int `yaml:"retries"`

	// MaxConns caps connections to each backend.
	// DefaultMaxConnsPerBackend is used if not set.
	MaxConns int `yaml:"max_conns"`

	// MaxIdleConnTime closes upstream keep-alive connections idle for
	// longer; keep it below the backends' own idle timeout.
	// DefaultMaxIdleConnTime is used if not set.
	MaxIdleConnTime time.Duration `yaml:"max_idle_conn_time"`

	// MaxResponseBody is the largest upstream response body in bytes.
	// DefaultMaxResponseBody is used if not set.
	MaxResponseBody int `yaml:"max_response_body"`

	// Health configures active checks and passive outlier detection.
	Health HealthConfig `yaml:"health"`

	// Stale configures serving stored responses when origins fail.
	Stale StaleConfig `yaml:"stale"`

	// Hedge sends an idempotent request's try that is slow to answer to
	// a second backend as well; off if not set.
	Hedge *HedgeConfig `yaml:"hedge"`

	// WebSocket configures WebSocket and other HTTP/1.1 upgrades to the
	// service's backends: whether they are tunnelled, and the limits of
	// the tunnels. "websocket: false" is short for "websocket: {enabled:
	// false}".
	WebSocket WebSocketConfig `yaml:"websocket"`
}

// WebSocketConfig configures the tunnels of a service: the connections a
// backend switched to another protocol (WebSocket, say) with 101 Switching
// Protocols, which edgelb then relays byte for byte.
type WebSocketConfig struct {
	// Enabled forwards upgrade requests (Connection: upgrade with an
	// Upgrade header) as such and tunnels the connection once a backend
	// switches protocols. When false they go upstream as plain requests,
	// without Upgrade. A route's own websocket key, when set, wins. On if
	// not set.
	Enabled *bool `yaml:"enabled"`

	// IdleTimeout closes a tunnel through which no byte went either way
	// for this long. DefaultTunnelIdleTimeout is used if not set.
	IdleTimeout time.Duration `yaml:"idle_timeout"`

	// HalfClosedTimeout closes a tunnel one side of which half-closed
	// (sent its end of stream) once no byte went the other way for this
	// long, so that a peer that never closes its side cannot hold a
	// tunnel open for the whole idle timeout (HAProxy's timeout
	// client-fin). DefaultTunnelHalfClosedTimeout is used if not set.
	HalfClosedTimeout time.Duration `yaml:"half_closed_timeout"`

	// MaxTunnels caps the tunnels open at once to the service's backends,
	// counting the upgrades under way; an upgrade request over it gets
	// 503 overloaded. DefaultMaxTunnels is used if not set.
	MaxTunnels int `yaml:"max_tunnels"`
}

// Defaults of WebSocketConfig.
const (
	// DefaultTunnelIdleTimeout is long enough for applications that ping
	// every minute or less, as WebSocket libraries do by default, and short
	// enough to let go of peers that vanished without a word.
	DefaultTunnelIdleTimeout = time.Hour
	// DefaultTunnelHalfClosedTimeout leaves a side that half-closed
	// time to receive the rest of what the other sends.
	DefaultTunnelHalfClosedTimeout = 30 * time.Second
	DefaultMaxTunnels              = 10000
)

// UnmarshalYAML accepts a bool, short for {enabled: BOOL}, as well as the
// mapping.
func (w *WebSocketConfig) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		var on bool
		if err := n.Decode(&on); err != nil {
			return err
		}
		*w = WebSocketConfig{Enabled: &on}
		return nil
	}
	type plain WebSocketConfig
	return n.Decode((*plain)(w))
}

// enabled reports whether the service tunnels upgrades.
func (w *WebSocketConfig) enabled() bool { return w.Enabled == nil || *w.Enabled }

// StaticBackend is one statically configured instance: either a plain
// "host:port" string or a mapping {addr, weight}.
type StaticBackend struct {
	Addr   string `yaml:"addr"`
	Weight int    `yaml:"weight"`
}

// UnmarshalYAML accepts "host:port" as well as {addr: host:port, weight: N}.
func (b *StaticBackend) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		b.Addr = n.Value
		return nil
	}
	type plain StaticBackend
	return n.Decode((*plain)(b))
}

// BackupConfig is a service's backup set: backends found as the service's
// own are, from Consul or a static list, checked, ejected and timed by
// the service's settings like its primary backends, and picked only when
// no primary is available to a try. In YAML it is either
// {static: [...]} or {consul: {name: ...}}, as the service's own
// backends, or a bare list, short for {static: [...]}.
type BackupConfig struct {
	// Consul discovers the backups from Consul.
	Consul *discovery.ConsulService `yaml:"consul"`

	// Static lists the backups as host:port.
	Static []StaticBackend `yaml:"static"`

	// list is set when the YAML gave the short form, a bare list, so that
	// errors name its keys as written.
	list bool
}

// UnmarshalYAML accepts a bare list of backends as well as the
// {static: [...]} and {consul: {...}} mappings.
func (b *BackupConfig) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: want a list of host:port, {static: [...]} or {consul: {name: ...}} (got %q)", n.Line, n.Value)}}
	}
	if n.Kind == yaml.SequenceNode {
		b.list = true
		return n.Decode(&b.Static)
	}
	type plain BackupConfig
	return n.Decode((*plain)(b))
}

// staticKey returns the key of the i-th static backup under path, as the
// YAML wrote it.
func (b *BackupConfig) staticKey(path string, i int) string {
	if b.list {
		return fmt.Sprintf("%s.backup[%d]", path, i)
	}
	return fmt.Sprintf("%s.backup.static[%d]", path, i)
}

// backupSuffix makes the discovery name of a service's backup set, under
// which its Consul watch reports in /status and /metrics.
const backupSuffix = "/backup"

// backupName returns the discovery name of the backup set of service.
func backupName(service string) string { return service + backupSuffix }

// usesDNS reports whether a static backend of sc is given by host name.
func (sc *ServiceConfig) usesDNS() bool {
	for _, b := range sc.Static {
		if discovery.HostIsName(b.Addr) {
			return true
		}
	}
	return false
}

// HealthConfig configures how backends are judged.
type HealthConfig struct {
	// Active probes each backend periodically. Off if not set.
	Active *health.ActiveConfig `yaml:"active"`

	// Passive ejects backends from what live traffic shows.
	Passive health.PassiveConfig `yaml:"passive"`

	// MaxInflight caps concurrent requests to one backend; 0 means no cap.
	MaxInflight int `yaml:"max_inflight"`

	// PanicThreshold is the share of the service's backends, in percent,
	// that must be available; below it the checks may be wrong, and every
	// backend that is not draining and not refusing connections, timing
	// out or answering garbage right now gets traffic.
	// health.DefaultPanicThreshold is used if not set; -1 turns panic mode
	// off.
	PanicThreshold int `yaml:"panic_threshold"`

	// SlowStart ramps the traffic of a backend that comes back after an
	// ejection or failed checks, or joins a service that already has
	// backends, linearly from nothing to its full share over this time.
	// Off if not set.
	SlowStart time.Duration `yaml:"slow_start"`
}

// StaleConfig configures serving stored responses when origins fail.
type StaleConfig struct {
	// Disabled turns off storing and serving stale responses.
	Disabled bool `yaml:"disabled"`

	// MaxStale is how long past its freshness a stored response may be
	// served during failures; a response's stale-if-error can extend it.
	// DefaultMaxStale is used if not set.
	MaxStale time.Duration `yaml:"max_stale"`

	// On lists the failures that serve a stored response: Edgelb-Error
	// codes (no_healthy_backend, upstream_connect_failed, upstream_timeout,
	// upstream_invalid_response, upstream_response_too_large, overloaded)
	// and backend statuses (500, 502,
	// 503, 504). All of them if not set.
	On []string `yaml:"on"`

	// IgnoreRevalidate serves responses marked must-revalidate,
	// proxy-revalidate or no-cache during failures anyway.
	IgnoreRevalidate bool `yaml:"ignore_revalidate"`
}

// DefaultMaxStale is used if StaleConfig.MaxStale is not set.
const DefaultMaxStale = time.Hour

// defaultStaleOn are the failures that serve stale responses by default.
var defaultStaleOn = []string{"no_healthy_backend", "upstream_connect_failed", "upstream_timeout",
	"upstream_invalid_response", "upstream_response_too_large", "overloaded", "500", "502", "503", "504"}

// RouteConfig maps a host and path prefix to a service.
type RouteConfig struct {
	// Host is matched exactly (case-insensitive, port ignored); "*" or
	// empty matches any host.
	Host string `yaml:"host"`

	// Path is a path prefix starting with "/". "/api" matches "/api" and
	// "/api/x" but not "/apix". "/" is used if not set.
	Path string `yaml:"path"`

	// Service is the name of the service that answers.
	Service string `yaml:"service"`

	// HTTPSRedirect answers a request that came over plain HTTP with 308
	// Permanent Redirect to the same URL over HTTPS, on the port of
	// tls.listen. It needs the tls block.
	HTTPSRedirect bool `yaml:"https_redirect"`

	// HSTS, when set, adds Strict-Transport-Security to the route's
	// responses sent over TLS, in place of any the backend sent. It needs
	// the tls block.
	HSTS *HSTSConfig `yaml:"hsts"`

	// WebSocket, when set, says whether upgrade requests (WebSocket and
	// other protocols) on this route are tunnelled, whatever the
	// service's websocket.enabled says; when false they go upstream as
	// plain requests, without Upgrade. The service decides if not set.
	WebSocket *bool `yaml:"websocket"`
}

// upgrades reports whether a route whose websocket key is ws tunnels
// upgrades to the service configured by sc (nil for one not known).
func upgrades(ws *bool, sc *ServiceConfig) bool {
	if ws != nil {
		return *ws
	}
	return sc == nil || sc.WebSocket.enabled()
}

// LoadConfig reads and validates the config file at path. The error lists
// every problem found, each naming its key.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cannot read config %q: %w", path, err)
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		return nil, fmt.Errorf("invalid config %q:\n%w", path, err)
	}
	return cfg, nil
}

// ParseConfig decodes and validates a YAML config. Unknown keys are errors.
// The error lists every problem found, one per line, each naming its key.
func ParseConfig(data []byte) (*Config, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, fmt.Errorf("cannot parse YAML: %w", err)
	}
	cfg := &Config{}
	if len(root.Content) == 0 {
		return nil, errors.New("config is empty")
	}
	var errs []error
	lines := make(map[int]string)
	checkKeys(root.Content[0], reflect.TypeOf(cfg).Elem(), "", lines, &errs)
	if err := root.Content[0].Decode(cfg); err != nil {
		errs = append(errs, decodeErrors(err, lines)...)
	}
	cfg.applyDefaults()
	errs = append(errs, cfg.validate()...)
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return cfg, nil
}

// checkKeys walks a YAML mapping alongside the Go type it decodes into,
// reporting unknown keys with their full dotted path. It records the path
// of every line so that decode errors can be reported by key too.
func checkKeys(n *yaml.Node, t reflect.Type, path string, lines map[int]string, errs *[]error) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if path != "" {
		if _, ok := lines[n.Line]; !ok {
			lines[n.Line] = path
		}
	}
	if n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	if t == reflect.TypeOf(time.Duration(0)) {
		// yaml.v3 takes a bare number as nanoseconds: 5 would be 5ns.
		if n.Kind == yaml.ScalarNode && (n.ShortTag() == "!!int" || n.ShortTag() == "!!float") {
			if n.Value != "0" {
				*errs = append(*errs, fmt.Errorf("%s: duration %s needs a unit (ms, s, m, h), e.g. %ss", path, n.Value, n.Value))
				return
			}
			// A bare 0 needs no unit; yaml.v3 refuses it, though.
			n.Tag, n.Value = "!!str", "0s"
		}
		return
	}
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		// yaml.v3 truncates a float into an integer field without a word.
		if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!float" {
			*errs = append(*errs, fmt.Errorf("%s: must be a whole number, got %s", path, n.Value))
		}
	case reflect.Struct:
		if t == reflect.TypeOf(BackupConfig{}) && n.Kind == yaml.SequenceNode {
			checkKeys(n, reflect.TypeOf([]StaticBackend{}), path, lines, errs)
			return
		}
		if n.Kind != yaml.MappingNode {
			if t == reflect.TypeOf(StaticBackend{}) || t == reflect.TypeOf(time.Time{}) {
				return
			}
			return // the decoder reports the type mismatch
		}
		fields := yamlFields(t)
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			kp := joinKey(path, k.Value)
			lines[k.Line] = kp
			ft, ok := fields[k.Value]
			if !ok {
				*errs = append(*errs, fmt.Errorf("%s: unknown key (known keys: %s)", kp, strings.Join(sortedKeys(fields), ", ")))
				continue
			}
			checkKeys(v, ft, kp, lines, errs)
		}
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			kp := joinKey(path, k.Value)
			lines[k.Line] = kp
			checkKeys(v, t.Elem(), kp, lines, errs)
		}
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			return
		}
		for i, v := range n.Content {
			checkKeys(v, t.Elem(), fmt.Sprintf("%s[%d]", path, i), lines, errs)
		}
	}
}

func yamlFields(t reflect.Type) map[string]reflect.Type {
	m := make(map[string]reflect.Type, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" || !f.IsExported() {
			continue
		}
		if opts == "inline" {
			for k, ft := range yamlFields(f.Type) {
				m[k] = ft
			}
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		m[name] = f.Type
	}
	return m
}

func sortedKeys(m map[string]reflect.Type) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func joinKey(path, k string) string {
	if path == "" {
		return k
	}
	return path + "." + k
}

var lineRe = regexp.MustCompile(`^\s*line (\d+): (.*)$`)

// decodeErrors turns yaml.v3's "line N: ..." messages into "key: ...".
func decodeErrors(err error, lines map[int]string) []error {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return []error{err}
	}
	errs := make([]error, 0, len(te.Errors))
	for _, msg := range te.Errors {
		if m := lineRe.FindStringSubmatch(msg); m != nil {
			line, _ := strconv.Atoi(m[1])
			if key, ok := lines[line]; ok {
				msg = key + ": " + m[2] + " (line " + m[1] + ")"
			}
		}
		errs = append(errs, errors.New(msg))
	}
	return errs
}

// Config, and each of its parts that has defaults, follows one convention:
// applyDefaults fills in the unset fields, then validate(path) checks every
// field and returns every problem, each naming its full dotted key under
// path. Where checking a value means parsing it, validate keeps the parsed
// form (trusted networks, canonical route hosts, the token read from
// admin_token_file), so that the runtime reads values resolved once.

// applyDefaults fills in every unset field that has a default.
func (c *Config) applyDefaults() {
	setDefault(&c.Listen, DefaultListen)
	setDefault(&c.Admin, DefaultAdmin)
	setDefault(&c.StateDir, DefaultStateDir)
	if c.Consul != nil {
		setDefault(&c.Consul.Address, discovery.DefaultConsulAddress)
		setDefault(&c.Consul.Scheme, "http")
		if c.Consul.Register != nil {
			c.Consul.Register.ApplyDefaults()
		}
		c.Consul.Purge.ApplyDefaults()
		c.Consul.PeerFill.applyDefaults()
	}
	c.Server.applyDefaults()
	if c.TLS != nil {
		c.TLS.applyDefaults()
		if c.TLS.ACME != nil {
			c.TLS.ACME.applyDefaults(c.Consul != nil, c.StateDir)
		}
	}
	c.DNS.ApplyDefaults()
	for _, sc := range c.Services {
		sc.applyDefaults()
	}
	for i := range c.Routes {
		c.Routes[i].applyDefaults()
	}
	c.AccessLog.applyDefaults()
	c.RequestID.applyDefaults()
}

// validate checks c after applyDefaults; it returns every problem.
func (c *Config) validate() []error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{key}, args...)...))
	}
	if err := checkAddr(c.Listen); err != nil {
		bad("listen", "%v", err)
	}
	if err := checkAddr(c.Admin); err != nil {
		bad("admin", "%v", err)
	}
	if c.Listen == c.Admin && !strings.HasSuffix(c.Listen, ":0") {
		bad("admin", "must differ from listen (%s)", c.Listen)
	}
	errs = append(errs, c.validateAdminAccess()...)
	if c.Consul != nil {
		if s := c.Consul.Scheme; s != "http" && s != "https" {
			bad("consul.scheme", "must be http or https (got %q)", s)
		}
		if err := checkAddr(c.Consul.Address); err != nil {
			bad("consul.address", "%v", err)
		}
		if r := c.Consul.Register; r != nil {
			errs = append(errs, r.Validate("consul.register")...)
		}
		errs = append(errs, c.Consul.Purge.Validate("consul.purge")...)
		errs = append(errs, c.Consul.PeerFill.validate("consul.peer_fill", c.Consul.Register != nil)...)
	}
	errs = append(errs, c.Server.validate("server")...)
	if t := c.TLS; t != nil {
		errs = append(errs, t.validate("tls", c.Consul != nil)...)
		for _, other := range []struct{ key, addr string }{{"listen", c.Listen}, {"admin", c.Admin}} {
			if t.Listen == other.addr && !strings.HasSuffix(t.Listen, ":0") {
				bad("tls.listen", "must differ from %s (%s)", other.key, other.addr)
			}
		}
	}
	errs = append(errs, c.StaleStore.Validate("stale_store")...)
	errs = append(errs, c.DNS.Validate("dns")...)
	if k := configKey(c); k != "" {
		if err := fleet.CheckKey(k); err != nil {
			bad("consul.config_key", "%v", err)
		}
		if strings.HasPrefix(k, c.Consul.Purge.Prefix) {
			bad("consul.config_key", "%q is under consul.purge.prefix (%s), which holds the purge log", k, c.Consul.Purge.Prefix)
		}
		// The key's services and routes come later; the file's, if any,
		// serve until then.
		if len(c.Services) == 0 && len(c.Routes) == 0 {
			return errs
		}
	}
	return append(errs, c.validateRouting()...)
}

// validateRouting checks the services and routes of c, after
// applyDefaults; it returns every problem.
func (c *Config) validateRouting() []error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{key}, args...)...))
	}
	if len(c.Services) == 0 && (c.Consul == nil || !c.Consul.TagRoutes) {
		bad("services", "no service defined (and consul.tag_routes is off): nothing to route to")
	}
	var consul *discovery.ConsulConfig
	if c.Consul != nil {
		consul = &c.Consul.ConsulConfig
	}
	for _, name := range sortedNames(c.Services) {
		errs = append(errs, c.Services[name].validate("services."+name, consul, c.DNS)...)
		if base, ok := strings.CutSuffix(name, backupSuffix); ok {
			if sc := c.Services[base]; sc != nil && sc.Backup != nil && sc.Backup.Consul != nil {
				bad("services."+name, "the name is taken: the Consul backup set of services.%s reports under it; rename the service", base)
			}
		}
	}
	seen := make(map[string]int)
	for i := range c.Routes {
		r := &c.Routes[i]
		key := fmt.Sprintf("routes[%d]", i)
		errs = append(errs, r.validate(key, c.Services, c.TLS != nil)...)
		id := r.Host + r.Path
		if j, ok := seen[id]; ok {
			bad(key, "host %q path %q already routed by routes[%d]", r.Host, r.Path, j)
		}
		seen[id] = i
	}
	errs = append(errs, c.AccessLog.validate("access_log")...)
	errs = append(errs, c.RequestID.validate("request_id", c.AccessLog != nil)...)
	return errs
}

// applyDefaults fills in every unset field that has a default.
func (s *ServerConfig) applyDefaults() {
	setDefault(&s.MaxRequestBody, DefaultMaxRequestBody)
	setDefault(&s.MaxHeaderBytes, DefaultMaxHeaderBytes)
	setDefault(&s.IdleTimeout, DefaultIdleTimeout)
	setDefault(&s.DrainTimeout, DefaultDrainTimeout)
	setDefault(&s.HeaderTimeout, DefaultHeaderTimeout)
	s.HTTP2.applyDefaults(s)
}

// validate checks s after applyDefaults and parses trusted_proxies; it
// returns every problem, each key under path.
func (s *ServerConfig) validate(path string) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	if s.MaxRequestBody < 0 {
		bad(".max_request_body", "must not be negative")
	}
	if w := s.batchWait(true); w < 0 || w > maxBatchWait {
		bad(".batch_wait", "must be between 0 (off) and %v (got %v)", maxBatchWait, w)
	}
	if s.HeaderTimeout < minHeaderTimeout {
		bad(".header_timeout", "must be at least %v (got %v)", minHeaderTimeout, s.HeaderTimeout)
	}
	if s.MaxConnsPerIP < 0 {
		bad(".max_conns_per_ip", "must not be negative (got %d); 0 or unset turns the cap off", s.MaxConnsPerIP)
	}
	if s.MaxHeaderBytes < 1024 {
		bad(".max_header_bytes", "must be at least 1024")
	}
	errs = append(errs, s.HTTP2.validate(path+".http2")...)
	if s.H2C && s.HTTP2.Disabled {
		bad(".h2c", "needs HTTP/2, which %s.http2.disabled turns off", path)
	}
	s.trusted = s.trusted[:0]
	for i, t := range s.TrustedProxies {
		pfx, err := parsePrefix(t)
		if err != nil {
			bad(fmt.Sprintf(".trusted_proxies[%d]", i), "%v", err)
			continue
		}
		s.trusted = append(s.trusted, pfx)
	}
	return errs
}

// applyDefaults fills in the host and path of a route that leaves them out.
func (r *RouteConfig) applyDefaults() {
	setDefault(&r.Host, "*")
	setDefault(&r.Path, "/")
	if r.HSTS != nil {
		r.HSTS.applyDefaults()
	}
}

// validate checks r after applyDefaults against the defined services and
// whether there is a TLS listener, and puts its host in canonical form; it
// returns every problem, each key under path.
func (r *RouteConfig) validate(path string, services map[string]*ServiceConfig, haveTLS bool) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	if r.Host != "*" {
		if k, ok := h1.HostKey(nil, []byte(r.Host)); ok {
			r.Host = string(k)
		} else {
			bad(".host", "must be a host name, an IP address or * (got %q)", r.Host)
		}
	}
	if !strings.HasPrefix(r.Path, "/") {
		bad(".path", "must start with / (got %q)", r.Path)
	}
	if r.Service == "" {
		bad(".service", "missing")
	} else if _, ok := services[r.Service]; !ok {
		bad(".service", "unknown service %q (defined: %s)", r.Service, strings.Join(sortedNames(services), ", "))
	}
	if r.HTTPSRedirect && !haveTLS {
		bad(".https_redirect", "%v", errTLSNeeded)
	}
	if r.HSTS != nil {
		if !haveTLS {
			bad(".hsts", "%v", errTLSNeeded)
		}
		errs = append(errs, r.HSTS.validate(path+".hsts")...)
	}
	return errs
}

// minAdminTokenLen is the shortest admin token accepted: shorter ones
// can be guessed.
const minAdminTokenLen = 16

// validateAdminAccess reads admin_token_file, checks the admin token and
// normalises admin_hosts. Errors never quote the token.
func (c *Config) validateAdminAccess() []error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{key}, args...)...))
	}
	key := "admin_token"
	if c.AdminTokenFile != "" {
		key = "admin_token_file"
		if c.AdminToken != "" {
			bad("admin_token", "set either admin_token or admin_token_file, not both")
		} else if data, err := os.ReadFile(c.AdminTokenFile); err != nil {
			bad(key, "cannot read the token: %v", err)
		} else if c.AdminToken = strings.TrimSpace(string(data)); c.AdminToken == "" {
			bad(key, "%q is empty", c.AdminTokenFile)
		}
	}
	if t := c.AdminToken; t != "" {
		if err := checkBearerToken(t); err != nil {
			bad(key, "%v", err)
		}
	}
	for i, h := range c.AdminHosts {
		k := fmt.Sprintf("admin_hosts[%d]", i)
		h = strings.ToLower(h)
		c.AdminHosts[i] = h
		if _, err := netip.ParseAddr(h); err == nil {
			continue // IP addresses are accepted anyway
		}
		if name, port, err := net.SplitHostPort(h); err == nil && port != "" && strings.Trim(port, "0123456789") == "" {
			bad(k, "%q: want a host name without a port, such as %q (the port is not checked)", h, name)
			continue
		}
		if h == "" || strings.HasPrefix(h, ".") || strings.Trim(h, "abcdefghijklmnopqrstuvwxyz0123456789.-_") != "" {
			bad(k, "%q is not a host name (letters, digits, '-', '_' and '.')", h)
		}
	}
	return errs
}

// checkBearerToken checks that t is a usable bearer token (RFC 6750
// b64token) of at least minAdminTokenLen characters.
func checkBearerToken(t string) error {
	body := strings.TrimRight(t, "=")
	for i := 0; i < len(body); i++ {
		ch := body[i]
		ok := ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || strings.IndexByte("-._~+/", ch) >= 0
		if !ok {
			what := "not ASCII"
			if ch < utf8.RuneSelf {
				what = fmt.Sprintf("%q", ch)
			}
			return fmt.Errorf("character %d of the token is %s; a bearer token holds only letters, digits, - . _ ~ + / and a trailing =", i+1, what)
		}
	}
	if body == "" {
		return errors.New("the token must hold more than =")
	}
	if len(t) < minAdminTokenLen {
		return fmt.Errorf("the token has %d characters; use at least %d, e.g. from openssl rand -hex 32", len(t), minAdminTokenLen)
	}
	return nil
}

// applyDefaults fills in every unset field of sc that has a default; a
// service left empty in the YAML (nil) is reported by validate.
func (sc *ServiceConfig) applyDefaults() {
	if sc == nil {
		return
	}
	setDefault(&sc.Balance, "p2c")
	setDefault(&sc.ConnectTimeout, DefaultConnectTimeout)
	setDefault(&sc.TryTimeout, DefaultTryTimeout)
	setDefault(&sc.Timeout, DefaultRequestTimeout)
	setDefault(&sc.Retries, DefaultRetries)
	setDefault(&sc.MaxConns, DefaultMaxConnsPerBackend)
	setDefault(&sc.MaxIdleConnTime, DefaultMaxIdleConnTime)
	setDefault(&sc.MaxResponseBody, DefaultMaxResponseBody)
	sc.Health.applyDefaults()
	sc.Stale.applyDefaults()
	sc.Hedge.applyDefaults()
	setDefault(&sc.WebSocket.IdleTimeout, DefaultTunnelIdleTimeout)
	setDefault(&sc.WebSocket.HalfClosedTimeout, DefaultTunnelHalfClosedTimeout)
	setDefault(&sc.WebSocket.MaxTunnels, DefaultMaxTunnels)
}

// validate checks sc after applyDefaults against the top-level consul
// block (nil without one); it returns every problem, each key under path.
// Retries -1 (none) becomes 0, the count the proxy uses. dns is the
// top-level dns block, which sc.DNS overrides.
func (sc *ServiceConfig) validate(path string, consul *discovery.ConsulConfig, dns discovery.DNSConfig) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	if sc == nil {
		return []error{fmt.Errorf("%s: empty service; set consul or static", path)}
	}
	switch {
	case sc.Consul != nil && len(sc.Static) > 0:
		bad("", "set either consul or static, not both")
	case sc.Consul == nil && len(sc.Static) == 0:
		bad("", "no backends: set consul: {name: ...} or static: [host:port, ...]")
	case sc.Consul != nil && consul == nil:
		bad(".consul", "needs the top-level consul block")
	case sc.Consul != nil:
		errs = append(errs, sc.Consul.Validate(path+".consul", consul.Datacenter)...)
	}
	for i, b := range sc.Static {
		k := fmt.Sprintf(".static[%d]", i)
		if err := checkAddr(b.Addr); err != nil {
			bad(k, "%v", err)
		} else if host, _, _ := net.SplitHostPort(b.Addr); discovery.HostIsName(b.Addr) {
			if err := discovery.CheckHostName(host); err != nil {
				bad(k, "%q: %v", b.Addr, err)
			}
		}
		if b.Weight < 0 {
			bad(k+".weight", "must not be negative")
		}
	}
	if sc.Backup != nil {
		errs = append(errs, sc.validateBackup(path, consul != nil)...)
	}
	if sc.DNS != nil {
		if !sc.usesDNS() {
			bad(".dns", "set, but no static backend is given by host name: it would change nothing")
		}
		errs = append(errs, sc.DNS.Validate(path+".dns")...)
		// Validate has said so when the service sets both.
		if m := dns.With(sc.DNS); m.Interval >= discovery.MinDNSRefresh && m.Timeout > m.Interval && !(sc.DNS.Interval > 0 && sc.DNS.Timeout > sc.DNS.Interval) {
			bad(".dns", "timeout (%v) must not exceed interval (%v)", m.Timeout, m.Interval)
		}
	}
	if _, ok := selectors[sc.Balance]; !ok {
		bad(".balance", "unknown policy %q (one of %s)", sc.Balance, policyNames)
	}
	switch {
	case sc.Retries < -1:
		bad(".retries", "must be -1 (no retries) or more, got %d", sc.Retries)
	case sc.Retries > maxTries-1:
		bad(".retries", "must be at most %d (a request tries at most %d backends), got %d", maxTries-1, maxTries, sc.Retries)
	case sc.Retries == -1:
		sc.Retries = 0
	}
	errs = append(errs, sc.Hedge.validate(path+".hedge", sc.Retries)...)
	for _, d := range []struct {
		k string
		v time.Duration
	}{{".connect_timeout", sc.ConnectTimeout}, {".try_timeout", sc.TryTimeout}, {".first_byte_timeout", sc.FirstByteTimeout},
		{".timeout", sc.Timeout}, {".max_idle_conn_time", sc.MaxIdleConnTime}} {
		if d.v < 0 {
			bad(d.k, "must not be negative")
		}
	}
	if sc.TryTimeout > sc.Timeout {
		bad(".try_timeout", "must not exceed timeout (%s)", sc.Timeout)
	}
	if sc.FirstByteTimeout > 0 && sc.FirstByteTimeout >= sc.TryTimeout {
		bad(".first_byte_timeout", "must be below try_timeout (%s), which would end the try first: it would never fire", sc.TryTimeout)
	}
	if sc.MaxConns < 0 {
		bad(".max_conns", "must not be negative")
	}
	if sc.WebSocket.IdleTimeout < 0 {
		bad(".websocket.idle_timeout", "must not be negative")
	}
	if sc.WebSocket.HalfClosedTimeout < 0 {
		bad(".websocket.half_closed_timeout", "must not be negative")
	}
	if sc.WebSocket.MaxTunnels < 0 {
		bad(".websocket.max_tunnels", "must not be negative (got %d); unset for the default, %d", sc.WebSocket.MaxTunnels, DefaultMaxTunnels)
	}
	errs = append(errs, sc.Health.validate(path+".health")...)
	errs = append(errs, sc.Stale.validate(path+".stale")...)
	return errs
}

// validateBackup checks sc.Backup; it returns every problem, each key
// under path.
func (sc *ServiceConfig) validateBackup(path string, haveConsul bool) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{k}, args...)...))
	}
	b := sc.Backup
	k := path + ".backup"
	switch {
	case b.Consul != nil && len(b.Static) > 0:
		bad(k, "set either consul or static, not both")
	case b.Consul == nil && len(b.Static) == 0:
		bad(k, "no backends: set consul: {name: ...}, static: [host:port, ...] or a list of host:port")
	case b.Consul != nil && !haveConsul:
		bad(k+".consul", "needs the top-level consul block")
	case b.Consul != nil && b.Consul.Name == "":
		bad(k+".consul.name", "missing")
	case b.Consul != nil && sc.Consul != nil && reflect.DeepEqual(*b.Consul, *sc.Consul):
		bad(k+".consul", "watches the same Consul service as %s.consul: a backend is a primary or a backup, not both; "+
			"tell the sets apart by name, tags or datacenter", path)
	}
	primary := make(map[string]int, len(sc.Static))
	for i, p := range sc.Static {
		primary[p.Addr] = i
	}
	seen := make(map[string]int, len(b.Static))
	for i, s := range b.Static {
		key := b.staticKey(path, i)
		if err := checkAddr(s.Addr); err != nil {
			bad(key, "%v", err)
			continue
		}
		if s.Weight < 0 {
			bad(key+".weight", "must not be negative")
		}
		if j, ok := primary[s.Addr]; ok {
			bad(key, "%s is also a primary backend (%s.static[%d]); a backend is a primary or a backup, not both", s.Addr, path, j)
		}
		if j, ok := seen[s.Addr]; ok {
			bad(key, "%s is listed twice (also %s)", s.Addr, b.staticKey(path, j))
		}
		seen[s.Addr] = i
	}
	return errs
}

// applyDefaults fills in every unset field of h that has a default. The
// passive and active checks apply their own defaults where they are used.
func (h *HealthConfig) applyDefaults() {
	setDefault(&h.PanicThreshold, health.DefaultPanicThreshold)
}

// validate checks h after applyDefaults; it returns every problem, each
// key under path.
func (h *HealthConfig) validate(path string) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	if h.MaxInflight < 0 {
		bad(".max_inflight", "must not be negative")
	}
	if pt := h.PanicThreshold; pt != -1 && (pt < 1 || pt > 100) {
		bad(".panic_threshold", "must be a percentage from 1 to 100, or -1 to turn panic mode off (got %d)", pt)
	}
	if h.SlowStart < 0 {
		bad(".slow_start", "must not be negative")
	}
	errs = append(errs, h.Passive.Validate(path+".passive")...)
	if a := h.Active; a != nil {
		errs = append(errs, a.Validate(path+".active")...)
	}
	return errs
}

// applyDefaults fills in every unset field of s that has a default.
func (s *StaleConfig) applyDefaults() {
	setDefault(&s.MaxStale, DefaultMaxStale)
	if len(s.On) == 0 {
		s.On = defaultStaleOn
	}
}

// validate checks s after applyDefaults; it returns every problem, each
// key under path.
func (s *StaleConfig) validate(path string) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	if s.MaxStale < 0 {
		bad(".max_stale", "must not be negative")
	}
	for i, on := range s.On {
		if !contains(defaultStaleOn, on) {
			bad(fmt.Sprintf(".on[%d]", i), "unknown trigger %q (one of %s)", on, strings.Join(defaultStaleOn, ", "))
		}
	}
	return errs
}

func setDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

func checkAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("invalid address %q: want host:port", addr)
	}
	if host == "" {
		return fmt.Errorf("invalid address %q: missing host", addr)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
		return fmt.Errorf("invalid address %q: port must be a number up to 65535", addr)
	}
	return nil
}

func sortedNames[V any](m map[string]V) []string {
	ns := make([]string, 0, len(m))
	for n := range m {
		ns = append(ns, n)
	}
	sort.Strings(ns)
	return ns
}
