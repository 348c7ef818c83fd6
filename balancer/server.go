// Package balancer is edgelb's data plane: the client-facing server,
// routing, backend selection, forwarding with retries, and the admin API.
package balancer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"reflect"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/fleet"
	"github.com/edgelb/edgelb/balancer/h1"
	"github.com/edgelb/edgelb/balancer/stale"
	"github.com/edgelb/edgelb/discovery"
	"github.com/edgelb/edgelb/health"
	"github.com/edgelb/edgelb/internal/panics"
	"github.com/edgelb/edgelb/internal/version"
)

// Server is an edgelb instance: the client-facing listener, the admin API
// and the pools they route to.
//
// Start it with Start, change its config with Reload, and stop it with
// Shutdown. It is safe to call its methods from concurrently running
// goroutines.
type Server struct {
	log     *slog.Logger
	reg     *health.Registry
	checker *health.Checker
	store   *stale.Store
	// series are the per-service and per-backend metrics of the pools.
	series *seriesTable
	// live samples them for /status?rates=1.
	live liveRecorder
	// started is when Start was called, for /status.
	started time.Time

	routes atomic.Pointer[routeTable]
	// trusted is server.trusted_proxies; nil when empty.
	trusted atomic.Pointer[[]netip.Prefix]
	ready   atomic.Bool
	// ids is request_id; nil when off. fastIDs makes the fasthttp path's
	// request IDs.
	ids     atomic.Pointer[requestIDs]
	fastIDs sharedIDSource
	// alog is the access log.
	alog *accessLog

	srv *fasthttp.Server
	ln  net.Listener
	// With event loops, they accept on ln and hand the connections they
	// do not serve to srv through handoff.
	loops    []*loop
	handoff  *handoffListener
	loopFile *os.File
	// fastConns counts the open connections that goroutines serve: those
	// the loops handed over, and those the fasthttp server accepted
	// itself (TLS, or every one without loops). The loops do not batch
	// their waits while there are any: a loop sleeping holds its thread,
	// which these goroutines need.
	fastConns atomic.Int64
	// ringRefused is set once a loop could not set up its io_uring,
	// which is logged once.
	ringRefused atomic.Bool
	admin       *adminServer
	consul      *discovery.Consul
	// tls is the TLS listener and its certificates; nil without a tls
	// block.
	tls *tlsState
	// tunnels are the open WebSocket and other upgraded connections.
	tunnels *tunnelSet
	// dns resolves the static backends given by host name.
	dns *discovery.DNS
	// h2 serves HTTP/2 connections; nil with server.http2.disabled.
	h2 *h2Server
	// unrouted decides what a request matching no route gets while
	// Consul's tag routes are not known yet; nil without tag routes.
	unrouted atomic.Pointer[unroutedPolicy]

	// instance is the stable ID of the instance in its fleet. registrar
	// keeps it registered in Consul and peers follows the others (nil
	// without consul.register; guarded by mu); leaving is set once it
	// deregistered to stop. purges is the purge log shared with the
	// fleet; nil keeps purges local.
	instance  string
	registrar *fleet.Registrar
	peers     *fleet.Peers
	leaving   atomic.Pointer[LeavingStatus]
	purges    atomic.Pointer[fleet.Purges]
	// fill asks the peers for stored copies the store lacks, and answers
	// theirs (consul.peer_fill). secretWatch follows its secret in Consul
	// when the config gives none (guarded by mu).
	fill        *peerFill
	secretWatch *fleet.Secret

	// perIP counts client connections by address for
	// server.max_conns_per_ip; nil when there is no cap.
	perIP *ipConns
	// acceptTrouble is the latest run of accept failures for want of a
	// resource, for /readyz; acceptLog holds back their repeats.
	acceptTrouble acceptTrouble
	acceptLog     repeatLog

	// reloadMu serialises Start and Reload: the DNS source is configured
	// outside mu, as it waits for publications that take mu.
	reloadMu sync.Mutex
	// fileCfg is the config as its file gave it; cfg is the same with
	// the services and routes of consul.config_key once known. keyGood
	// is the key's value running (nil while the file's own services and
	// routes run). Guarded by reloadMu. keyWatch follows the key; it is
	// replaced under reloadMu.
	fileCfg  *Config
	keyGood  *fleet.KeyValue
	keyWatch atomic.Pointer[fleet.KeyWatch]
	// keyStatus is the config key in /status; keyPending is set while the
	// key's value is not known and the file has no routes of its own.
	keyStatus  atomic.Pointer[ConfigKeyStatus]
	keyPending atomic.Bool

	// mu guards the control plane below (slow path only).
	mu        sync.Mutex
	cfg       *Config
	pools     map[string]*Pool
	sets      map[string]*discovery.Set
	conflicts []string
	statics   map[string]bool
	// backups are the backup sets by service name, static or from Consul.
	backups map[string]*discovery.Set

	stop     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup
}

// NewServer returns a server for cfg, which must come from LoadConfig or
// ParseConfig. logger may be nil for slog.Default().
func NewServer(cfg *Config, logger *slog.Logger) *Server {
	if logger == nil {
		logger = slog.Default()
	}
	sc := cfg.StaleStore
	sc.Logger = logger
	s := &Server{
		log:     logger,
		reg:     health.NewRegistry(logger),
		checker: health.NewChecker(logger),
		store:   stale.New(sc),
		series:  newSeriesTable(),
		cfg:     cfg,
		pools:   make(map[string]*Pool),
		sets:    make(map[string]*discovery.Set),
		statics: make(map[string]bool),
		backups: make(map[string]*discovery.Set),
		stop:    make(chan struct{}),
		perIP:   newIPConns(cfg.Server.MaxConnsPerIP),
	}
	s.fill = newPeerFill(s.store, logger)
	s.dns = discovery.NewDNS(s, logger)
	s.fastIDs.prefix = randomIDPrefix()
	n := runtime.GOMAXPROCS(0)
	s.alog = newAccessLog(logger, n, n)
	s.routes.Store(newRouteTable(nil))
	s.tunnels = newTunnelSet(func(r any, msg string, attrs ...any) { panics.Balancer.Recovered(s.log, r, msg, attrs...) })
	// ReadTimeout bounds the head: fasthttp arms it when a connection
	// opens and again at the first byte of each later request. Once the
	// head is in, the body gets the idle timeout.
	body := fasthttp.RequestConfig{ReadTimeout: cfg.Server.IdleTimeout}
	s.srv = &fasthttp.Server{
		Handler:       s.handle,
		ExpectHandler: s.expectStatus,
		ErrorHandler:  s.handleParseError,
		// No Server header of its own: a backend's answer goes out as the
		// backend sent it, from either engine.
		NoDefaultServerHeader:         true,
		NoDefaultContentType:          true,
		ReadBufferSize:                cfg.Server.MaxHeaderBytes,
		MaxRequestBodySize:            cfg.Server.MaxRequestBody,
		IdleTimeout:                   cfg.Server.IdleTimeout,
		ReadTimeout:                   cfg.Server.HeaderTimeout,
		HeaderReceived:                func(*fasthttp.RequestHeader) fasthttp.RequestConfig { return body },
		DisableHeaderNamesNormalizing: false,
		CloseOnShutdown:               true,
		Logger:                        fasthttpLogger{logger},
	}
	if !cfg.Server.HTTP2.Disabled {
		s.h2 = newH2Server(s, &cfg.Server)
		s.srv.NextProto(alpnH2, s.h2.serveTLS)
	}
	return s
}

// Start binds the listeners, builds the pools and routes and starts serving
// in the background. It returns once the listeners accept connections.
func (s *Server) Start() error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	s.started = time.Now()
	ln, err := listenTCP(s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("cannot listen on %s (listen): %w", s.cfg.Listen, err)
	}
	s.ln = ln
	if s.cfg.TLS != nil {
		if err := s.listenTLS(s.cfg.TLS); err != nil {
			ln.Close()
			return err
		}
	}
	s.setInstance(s.cfg)
	if err := s.alog.start(s.cfg.AccessLog); err != nil {
		s.closeListeners()
		return err
	}
	if err := s.store.LoadFrom(s.cfg.StateDir); err != nil {
		s.log.Error("stale store", "err", err)
	} else {
		s.log.Info("stale store loaded", "state_dir", s.cfg.StateDir)
	}
	// Purges published while the instance was away apply before it
	// serves what it loaded.
	if err := s.startPurges(s.cfg); err != nil {
		s.closeListeners()
		return err
	}
	// The services and routes of consul.config_key, when Consul or
	// state_dir has them, before anything is built.
	s.fileCfg = s.cfg
	s.cfg = s.startConfigKeyLocked(s.cfg)
	s.admin = newAdminServer(s)
	if err := s.admin.start(s.cfg.Admin); err != nil {
		s.closeListeners()
		s.alog.close(time.Now().Add(time.Second))
		return fmt.Errorf("cannot listen on %s (admin): %w", s.cfg.Admin, err)
	}
	s.mu.Lock()
	s.applyLocked(s.cfg)
	err = s.startConsulLocked(s.cfg)
	s.mu.Unlock()
	if err == nil {
		err = s.startACME(s.cfg)
	}
	if err != nil {
		s.closeListeners()
		s.admin.close()
		s.alog.close(time.Now().Add(time.Second))
		return err
	}
	// Host names are resolved before the first request is served, so
	// that their services start with backends; the listener queues
	// connections meanwhile.
	s.dns.Configure(s.cfg.StateDir, dnsServices(s.cfg))
	s.ready.Store(true)

	al := newAcceptListener(s, ln, "fasthttp")
	var serveLn net.Listener = al
	if s.cfg.Server.H2C {
		al.h2c = s.h2
	}
	if eventLoopSupported && s.cfg.Server.eventLoop() {
		s.handoff = newHandoffListener(ln.Addr())
		if s.cfg.Server.H2C {
			s.handoff.h2c = s.h2
		}
		if err := s.startLoops(ln, runtime.GOMAXPROCS(0)); err != nil {
			s.log.Warn("event loops not started; the fasthttp server takes every connection", "err", err)
			s.stopLoops(context.Background())
			s.handoff = nil
		} else {
			serveLn = s.handoff
		}
	}
	s.goSafe("serve", func() {
		if err := s.srv.Serve(serveLn); err != nil {
			s.log.Error("server stopped", "err", err)
		}
	})
	if s.tls != nil {
		s.serveTLS()
	}
	s.goSafe("reaper", func() { s.every(time.Second, s.reap) })
	s.goSafe("stale-persist", func() { s.every(StaleSaveInterval, func(time.Time) { s.saveStore() }) })
	s.goSafe("live", s.liveLoop)
	// Registered once serving, so that the first check can pass.
	s.mu.Lock()
	err = s.startFleetLocked(s.cfg)
	s.mu.Unlock()
	if err != nil {
		s.log.Error("cannot register in Consul", "err", err)
	}
	s.log.Info("edgelb started", "version", version.Version(), "listen", ln.Addr().String(), "tls_listen", s.TLSAddr(), "admin", s.admin.addr())
	return nil
}

// closeListeners closes the client-facing listeners.
func (s *Server) closeListeners() {
	s.ln.Close()
	if s.tls != nil {
		s.tls.ln.Close()
	}
}

// Addr returns the client-facing address the server listens on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// AdminAddr returns the admin API address.
func (s *Server) AdminAddr() string { return s.admin.addr() }

// Reload replaces the config. Pools whose service config is unchanged keep
// running untouched; changed ones are rebuilt, keeping the health state of
// their backends. New TLS handshakes get the certificates of cfg, which
// LoadConfig read anew; open connections keep theirs. Listener addresses
// cannot change without a restart, nor can the TLS listener come or go.
//
// With consul.config_key, cfg is the file's config: the services and
// routes of the key's value, once known, take the place of its own, and
// a reload whose file does not fit them (a route needing a tls block the
// file no longer has) is refused.
func (s *Server) Reload(cfg *Config) error {
	s.reloadMu.Lock()
	eff, err := s.withConfigKeyLocked(cfg)
	if err == nil {
		err = s.reloadLocked(eff)
	}
	var stopped *fleet.KeyWatch
	if err == nil {
		s.fileCfg = cfg
		stopped = s.switchConfigKeyLocked(cfg)
	}
	s.reloadMu.Unlock()
	// The old watch may be waiting for reloadMu to apply a value.
	if stopped != nil {
		stopped.Stop()
	}
	return err
}

// reloadLocked makes cfg, the file's config with the services and routes
// of consul.config_key if any, the running config. The caller holds
// reloadMu.
func (s *Server) reloadLocked(cfg *Config) error {
	s.mu.Lock()
	if cfg.Listen != s.cfg.Listen || cfg.Admin != s.cfg.Admin || tlsListen(cfg) != tlsListen(s.cfg) {
		reloadErrors.Inc()
		err := fmt.Errorf("cannot reload: listen, tls.listen and admin addresses need a restart (listen %s -> %s, tls.listen %q -> %q, admin %s -> %s)",
			s.cfg.Listen, cfg.Listen, tlsListen(s.cfg), tlsListen(cfg), s.cfg.Admin, cfg.Admin)
		s.mu.Unlock()
		return err
	}
	if err := s.alog.apply(cfg.AccessLog); err != nil {
		reloadErrors.Inc()
		s.mu.Unlock()
		return fmt.Errorf("cannot reload: %w", err)
	}
	s.mu.Unlock()
	// Before the pools are rebuilt, so that a service turned from names
	// to addresses gets no late publication of its names, and a service
	// with new names finds their addresses when its pool is built.
	s.dns.Configure(cfg.StateDir, dnsServices(cfg))
	s.mu.Lock()
	old := s.cfg
	s.applyLocked(cfg)
	if s.tls != nil {
		s.tls.apply(cfg.TLS)
		s.logCertificates(cfg.TLS, time.Now())
	}
	if s.admin != nil {
		s.admin.setAccess(cfg)
	}
	var stopped *discovery.Consul
	var err error
	if !reflect.DeepEqual(consulWatching(old), consulWatching(cfg)) || old.StateDir != cfg.StateDir {
		stopped, s.consul = s.consul, nil
		err = s.startConsulLocked(cfg)
	} else if s.consul != nil {
		s.consul.SetServices(consulServices(cfg))
	}
	s.setUnroutedLocked(cfg)
	if ferr := s.reloadFleetLocked(old, cfg); ferr != nil && err == nil {
		err = ferr
	}
	s.mu.Unlock()
	// The old watches may be waiting for s.mu to publish: stop them only
	// now.
	if stopped != nil {
		stopped.Stop()
	}
	if aerr := s.reloadACME(old, cfg); aerr != nil && err == nil {
		err = aerr
	}
	if perr := s.reloadPurges(old, cfg); perr != nil && err == nil {
		err = perr
	}
	if err != nil {
		reloadErrors.Inc()
		return err
	}
	reloadsTotal.Inc()
	s.log.Info("config reloaded", "services", len(cfg.Services), "routes", len(cfg.Routes))
	return nil
}

// ReopenAccessLog has the access log write out the lines it holds to its
// file and then open the file anew, by its path: after logrotate renamed
// the file, the lines before go to the renamed file and those after to a
// new one. It does nothing when the access log is off or goes to the
// standard output.
func (s *Server) ReopenAccessLog() error { return s.alog.reopen() }

// ReloadFile loads the config at path and reloads it (see Reload). A config
// that cannot be read or is invalid is refused and counted as a failed
// reload, as one that Reload refuses. It returns the config now running.
func (s *Server) ReloadFile(path string) (*Config, error) {
	cfg, err := LoadConfig(path)
	if err != nil {
		reloadErrors.Inc()
		return nil, err
	}
	if err := s.Reload(cfg); err != nil {
		return nil, err
	}
	return cfg, nil
}

// applyLocked makes cfg the running config: it builds pools for new or
// changed services, retires the others and rebuilds the route table.
func (s *Server) applyLocked(cfg *Config) {
	s.cfg = cfg
	s.ids.Store(newRequestIDs(&cfg.RequestID))
	if len(cfg.Server.trusted) > 0 {
		ps := cfg.Server.trusted
		s.trusted.Store(&ps)
	} else {
		s.trusted.Store(nil)
	}
	var retired []*Pool
	for name, p := range s.pools {
		sc, configured := cfg.Services[name]
		if (configured && reflect.DeepEqual(sc, p.cfg)) || (!configured && p.tagRouted) {
			continue
		}
		retired = append(retired, p)
		delete(s.pools, name)
	}
	for name, sc := range cfg.Services {
		if s.pools[name] != nil {
			continue
		}
		p := newPool(name, sc, s.reg, s.checker, s.store, s.series)
		p.fill = s.fill
		s.pools[name] = p
		switch {
		case len(sc.Static) > 0 && !sc.usesDNS():
			s.sets[name] = discovery.NewSet(name, "static", staticInstances(sc), time.Now())
			s.statics[name] = true
		case s.statics[name]:
			delete(s.statics, name)
			// A set published by the DNS source stays.
			if set := s.sets[name]; set != nil && set.Source == "static" {
				delete(s.sets, name)
			}
		}
		if set := s.sets[name]; set != nil {
			p.update(set)
		}
		s.applyBackupLocked(name, sc, p)
	}
	s.rebuildRoutesLocked()
	for _, p := range retired {
		s.retire(p)
	}
}

// applyBackupLocked gives the new pool p of service name its backup set:
// the static one of sc, or the last one Consul gave.
func (s *Server) applyBackupLocked(name string, sc *ServiceConfig, p *Pool) {
	switch b := sc.Backup; {
	case b == nil:
		delete(s.backups, name)
		return
	case len(b.Static) > 0:
		ins := make([]discovery.Instance, len(b.Static))
		for i, sb := range b.Static {
			ins[i] = discovery.Instance{Addr: sb.Addr, Weight: sb.Weight}
		}
		s.backups[name] = discovery.NewSet(backupName(name), "static", ins, time.Now())
	case s.backups[name] != nil && s.backups[name].Source == "static":
		delete(s.backups, name)
	}
	if set := s.backups[name]; set != nil {
		p.updateBackup(set)
	}
}

// backupOf returns the service whose Consul backup set is published as
// name, if any.
func (s *Server) backupOf(name string) (string, bool) {
	base, ok := strings.CutSuffix(name, backupSuffix)
	if !ok {
		return "", false
	}
	sc := s.cfg.Services[base]
	return base, sc != nil && sc.Backup != nil && sc.Backup.Consul != nil
}

// startConsulLocked starts watching Consul if cfg asks for it.
func (s *Server) startConsulLocked(cfg *Config) error {
	if cfg.Consul == nil {
		return nil
	}
	c, err := discovery.NewConsul(cfg.Consul.ConsulConfig, consulServices(cfg), cfg.StateDir, s, s.log)
	if err != nil {
		return err
	}
	s.consul = c
	s.setUnroutedLocked(cfg)
	// Start only spawns the watches; they publish from their own
	// goroutines, taking s.mu when the caller has released it.
	c.Start()
	return nil
}

// consulWatching returns what the discovery of cfg asks of Consul; nil
// without the consul block.
func consulWatching(cfg *Config) *discovery.ConsulConfig {
	if cfg.Consul == nil {
		return nil
	}
	return &cfg.Consul.ConsulConfig
}

// unroutedPolicy is what a request that matches no route gets while the
// tag routes of consul are not known yet.
type unroutedPolicy struct {
	consul *discovery.Consul
	// stale serves stored copies; the most lenient max_stale of the
	// services, since which one the URL belongs to is not known.
	stale stale.Policy
}

// setUnroutedLocked updates the unrouted policy for cfg and the running
// Consul source.
func (s *Server) setUnroutedLocked(cfg *Config) {
	if s.consul == nil || cfg.Consul == nil || !cfg.Consul.TagRoutes {
		s.unrouted.Store(nil)
		return
	}
	u := &unroutedPolicy{consul: s.consul, stale: stale.Policy{MaxStale: tagServiceConfig().Stale.MaxStale}}
	for _, sc := range cfg.Services {
		if !sc.Stale.Disabled {
			u.stale.MaxStale = max(u.stale.MaxStale, sc.Stale.MaxStale)
		}
	}
	s.unrouted.Store(u)
}

// staticInstances returns the static backends of sc as instances.
func staticInstances(sc *ServiceConfig) []discovery.Instance {
	ins := make([]discovery.Instance, len(sc.Static))
	for i, b := range sc.Static {
		ins[i] = discovery.Instance{Addr: b.Addr, Weight: b.Weight}
	}
	return ins
}

// dnsServices returns the services of cfg whose static backends include
// host names, with their resolution settings.
func dnsServices(cfg *Config) map[string]discovery.DNSService {
	m := make(map[string]discovery.DNSService)
	for name, sc := range cfg.Services {
		if sc.usesDNS() {
			m[name] = discovery.DNSService{Backends: staticInstances(sc), DNS: cfg.DNS.With(sc.DNS)}
		}
	}
	return m
}

// consulServices returns the services that cfg discovers from Consul: the
// primaries of a service under its name, its backups under backupName.
func consulServices(cfg *Config) map[string]discovery.ConsulService {
	m := make(map[string]discovery.ConsulService)
	for name, sc := range cfg.Services {
		if sc.Consul != nil {
			m[name] = *sc.Consul
		}
		if sc.Backup != nil && sc.Backup.Consul != nil {
			m[backupName(name)] = *sc.Backup.Consul
		}
	}
	return m
}

// DiscoveryStatus returns the freshness of every discovery source.
func (s *Server) DiscoveryStatus() []discovery.Status {
	s.mu.Lock()
	c := s.consul
	var out []discovery.Status
	for _, name := range sortedNames(s.statics) {
		if set := s.sets[name]; set != nil {
			out = append(out, discovery.Status{Source: "static", Service: name, LastUpdate: set.UpdatedAt})
		}
	}
	for _, name := range sortedNames(s.backups) {
		if set := s.backups[name]; set.Source == "static" {
			out = append(out, discovery.Status{Source: "static", Service: set.Service, LastUpdate: set.UpdatedAt})
		}
	}
	s.mu.Unlock()
	if c != nil {
		out = append(out, c.Status()...)
	}
	return append(out, s.dns.Status()...)
}

// retire closes a pool that no longer serves once its requests are done.
func (s *Server) retire(p *Pool) {
	p.retire()
	d := p.cfg.Timeout + time.Second
	s.goSafe("retire", func() {
		select {
		case <-time.After(d):
		case <-s.stop:
		}
		p.close()
	})
}

// Publish implements discovery.Publisher: it replaces the instances of
// set.Service, or the backup set of the service it is the backupName of,
// creating a pool for a newly tag-routed service.
func (s *Server) Publish(set *discovery.Set) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if name, ok := s.backupOf(set.Service); ok {
		// A backup set routes nothing of its own: its instances' route
		// tags are the primaries' business.
		s.backups[name] = set
		if p := s.pools[name]; p != nil {
			p.updateBackup(set)
		}
		return
	}
	prev := s.sets[set.Service]
	s.sets[set.Service] = set
	p := s.pools[set.Service]
	if p == nil && len(set.Routes) > 0 {
		p = newPool(set.Service, tagServiceConfig(), s.reg, s.checker, s.store, s.series)
		p.fill = s.fill
		p.tagRouted = true
		s.pools[set.Service] = p
	}
	if p != nil {
		p.update(set)
	}
	if prev == nil || !reflect.DeepEqual(prev.Routes, set.Routes) {
		s.rebuildRoutesLocked()
	}
}

// Remove implements discovery.Publisher: a tag-routed service that is gone
// loses its routes and pool. A configured service keeps its pool, empty.
func (s *Server) Remove(service string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.sets, service)
	p := s.pools[service]
	if p == nil {
		return
	}
	if _, configured := s.cfg.Services[service]; configured {
		p.update(discovery.NewSet(service, "consul", nil, time.Now()))
		return
	}
	delete(s.pools, service)
	s.rebuildRoutesLocked()
	s.retire(p)
}

// tagServiceConfig is the config of services routed by Consul tags.
func tagServiceConfig() *ServiceConfig {
	sc := &ServiceConfig{Consul: &discovery.ConsulService{}}
	sc.applyDefaults()
	return sc
}

// rebuildRoutesLocked publishes a new route table from the configured
// routes and the tag routes of discovered services. Configured routes win
// over tag routes; between services claiming one tag route, the name that
// sorts first wins, and the conflict is reported.
func (s *Server) rebuildRoutesLocked() {
	var rs []route
	owner := make(map[string]string)
	for _, rc := range s.cfg.Routes {
		r := route{host: rc.Host, path: rc.Path, service: rc.Service, pool: s.pools[rc.Service], httpsRedirect: rc.HTTPSRedirect,
			upgrade: upgrades(rc.WebSocket, s.cfg.Services[rc.Service])}
		if rc.HSTS != nil {
			r.hsts = rc.HSTS.value
		}
		rs = append(rs, r)
		owner[routeID(rc.Host, rc.Path)] = "config"
	}
	var conflicts []string
	for _, name := range sortedNames(s.sets) {
		set := s.sets[name]
		for _, r := range set.Routes {
			id := routeID(r.Host, r.Path)
			if o, taken := owner[id]; taken {
				conflicts = append(conflicts, fmt.Sprintf("route %s claimed by service %q is already routed to %s; ignored", id, name, o))
				continue
			}
			owner[id] = fmt.Sprintf("service %q", name)
			p := s.pools[name]
			var sc *ServiceConfig
			if p != nil {
				sc = p.cfg
			}
			rs = append(rs, route{host: r.Host, path: r.Path, service: name, pool: p, upgrade: upgrades(nil, sc)})
		}
	}
	for _, c := range conflicts {
		if !contains(s.conflicts, c) {
			s.log.Warn("route conflict", "detail", c)
		}
	}
	s.conflicts = conflicts
	s.routes.Store(newRouteTable(rs))
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// Shutdown stops accepting connections, waits up to the drain timeout for
// in-flight requests and stops all background work. Tunnels are told to go
// away (WebSocket close frames) and closed when ctx is done, if not before.
func (s *Server) Shutdown(ctx context.Context) error {
	s.ready.Store(false)
	s.stopFleet()
	s.stopConfigKey()
	s.tunnels.drain()
	if s.handoff != nil {
		// The loops accept on a duplicate of ln, which stopLoops closes
		// as soon as none accepts: with ln closed, that is the socket's
		// last descriptor, and new connections are refused while the
		// requests in flight drain, as the fasthttp server refuses them
		// once it closes its own listener.
		s.ln.Close()
	}
	loopErr := s.stopLoops(ctx)
	if s.handoff != nil {
		s.handoff.waitTaken(ctx)
	}
	var err error
	if s.h2 != nil {
		// HTTP/2 connections get GOAWAY and drain with the rest.
		err = s.h2.shutdown(ctx, s.srv)
	} else {
		err = s.srv.ShutdownWithContext(ctx)
	}
	if s.handoff != nil {
		// fasthttp closes its own listener only when it accepted on one.
		s.handoff.Close()
	}
	// Also when Serve had not yet taken ln when Shutdown came, which
	// fasthttp cannot close then: Serve would wait on it for ever.
	s.closeListeners()
	if err == nil {
		err = loopErr
	}
	if cut := s.tunnels.wait(ctx); cut > 0 {
		s.log.Info("tunnels still open at the end of the drain were closed", "tunnels", cut)
	}
	// Every request is answered: the last lines go out.
	deadline, ok := ctx.Deadline()
	if !ok || time.Until(deadline) < time.Second {
		deadline = time.Now().Add(time.Second)
	}
	s.alog.close(deadline)
	s.mu.Lock()
	c := s.consul
	s.mu.Unlock()
	if c != nil {
		c.Stop()
	}
	s.dns.Stop()
	s.stopACME()
	if p := s.purges.Load(); p != nil {
		p.Stop()
	}
	s.stopOnce.Do(func() { close(s.stop) })
	if s.admin != nil {
		s.admin.close()
	}
	s.wg.Wait()
	s.saveStore()
	s.mu.Lock()
	for name, p := range s.pools {
		p.close()
		delete(s.pools, name)
	}
	s.mu.Unlock()
	s.checker.Close()
	s.series.close()
	s.reg.Close()
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("drain timeout: some requests were cut: %w", err)
	}
	return err
}

// stopLoops stops the event loops: they stop accepting, finish the
// requests in flight and close their connections. Their descriptor of the
// listening socket closes as soon as none accepts on it.
func (s *Server) stopLoops(ctx context.Context) error {
	for _, l := range s.loops {
		l.stop()
	}
	var err error
	for _, l := range s.loops {
		select {
		case <-l.deaf:
		case <-l.done:
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	if err == nil {
		s.closeLoopFile()
	}
	for _, l := range s.loops {
		select {
		case <-l.done:
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	s.loops = nil
	s.closeLoopFile()
	return err
}

// closeLoopFile closes the loops' descriptor of the listening socket.
func (s *Server) closeLoopFile() {
	if s.loopFile != nil {
		s.loopFile.Close()
		s.loopFile = nil
	}
}

// every calls f every d until s stops.
func (s *Server) every(d time.Duration, f func(now time.Time)) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case now := <-t.C:
			f(now)
		}
	}
}

// reap releases, once a second, the backends that left their pools.
func (s *Server) reap(now time.Time) {
	s.mu.Lock()
	pools := make([]*Pool, 0, len(s.pools))
	for _, p := range s.pools {
		pools = append(pools, p)
	}
	s.mu.Unlock()
	for _, p := range pools {
		p.reap(now)
	}
}

// StaleSaveInterval is how often the stale store is written to state_dir,
// besides at shutdown.
const StaleSaveInterval = time.Minute

func (s *Server) saveStore() {
	s.mu.Lock()
	dir := s.cfg.StateDir
	s.mu.Unlock()
	// The copy holds every purge of the log up to the cursor read before
	// it: a restart applies the log again from there.
	p := s.purges.Load()
	var cursor uint64
	if p != nil {
		cursor = p.Cursor()
	}
	if err := s.store.Persist(dir); err == nil && p != nil {
		p.StoreSaved(cursor)
	}
}

// goSafe runs f in a goroutine; a panic in f is counted and logged, and
// ends that goroutine only.
func (s *Server) goSafe(name string, f func()) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		panics.Balancer.Run(f, s.log, "panic in background task", "task", name)
	}()
}

// handle is the root request handler.
func (s *Server) handle(ctx *fasthttp.RequestCtx) {
	var rl reqLog
	defer s.endRequest(ctx, &rl)
	s.route(ctx, &rl)
}

// route serves the request in ctx; rl gets its record.
func (s *Server) route(ctx *fasthttp.RequestCtx, rl *reqLog) {
	now := ctx.Time()
	ids := s.ids.Load()
	var idName []byte
	if ids != nil {
		idName = ids.lower
	}
	in := requestSize(&ctx.Request)
	var hb [h1.MaxHostLen]byte
	host, flags, why := vetRequest(&ctx.Request, hb[:0], idName)
	ip, _ := netip.AddrFromSlice(ctx.RemoteIP())
	trusted := s.trustedPeer(ip)
	if att := peekAttempt(ctx); att != nil {
		// Slow path: the event loop began the request, and gave it its
		// ID, which backends have seen already.
		*rl = att.rl
	} else {
		rl.begin(now.UnixNano(), ids)
		if ids != nil {
			s.takeRequestID(&ctx.Request, ids, flags, trusted, &rl.id)
		}
	}
	rl.bytesIn, rl.http10 = in, !ctx.Request.Header.IsHTTP11()
	if why != refuseNone {
		refuse(ctx, why)
		rl.source = srcEdgelb
		if why != answerOptionsStar {
			rl.reason = refusalNames[why]
		}
		return
	}
	if s.tls != nil && bytes.HasPrefix(ctx.Path(), acmeChallengePath) {
		// Slow path: maybe the ACME CA checking a domain (HTTP-01),
		// answered before routing and any https_redirect.
		if m := s.tls.acme.Load(); m != nil && m.ServeHTTPChallenge(ctx) {
			return
		}
	}
	r := s.routes.Load().match(host, ctx.Path())
	if r == nil || r.pool == nil {
		s.serveUnrouted(ctx, now, rl)
		return
	}
	var up *upgrade
	if flags&sawUpgrade != 0 {
		// Slow path: the client may ask to switch protocols.
		up = s.upgradeOf(&ctx.Request, r)
	}
	if r.httpsRedirect && !ctx.IsTLS() && !(trusted && forwardedHTTPS(&ctx.Request.Header)) {
		// Slow path: a route served over HTTPS only.
		s.redirectHTTPS(ctx, host)
		rl.source, rl.reason = srcEdgelb, reasonHTTPSRedirect
		return
	}
	r.pool.serve(ctx, now, flags, trusted, takeAttempt(ctx), up, rl)
	if r.hsts != nil && ctx.IsTLS() {
		setHSTS(&ctx.Response.Header, r.hsts)
	}
}

// Why edgelb answered a request itself, besides refusals.
const (
	reasonHTTPSRedirect = "https_redirect"
	reasonPanic         = "panic"
)

// takeRequestID gives a request its ID: a trusted peer's, when it sent one
// well-formed, else a new one.
func (s *Server) takeRequestID(req *fasthttp.Request, ids *requestIDs, flags int, trusted bool, id *reqID) {
	if trusted && flags&sawRequestID != 0 {
		if v, dup := peekRequestID(&req.Header, ids); !dup && validRequestID(v) {
			id.set(v)
			return
		}
	}
	s.fastIDs.next(id)
}

// requestSize is the size of a request as received, head and body; 0 for
// one built in memory.
func requestSize(req *fasthttp.Request) int64 {
	h := &req.Header
	raw := h.RawHeaders()
	if len(raw) == 0 {
		return 0
	}
	// The request line, which fasthttp does not keep: "METHOD URI PROTO\r\n".
	return int64(len(h.Method()) + len(h.RequestURI()) + len(h.Protocol()) + 4 + len(raw) + len(req.Body()))
}

// endRequest, deferred by the root handler, answers a request whose
// handling panicked with 500 and closes its connection, whose state is
// unknown; then it gives the answer the request's ID and logs it.
func (s *Server) endRequest(ctx *fasthttp.RequestCtx, rl *reqLog) {
	if r := recover(); r != nil {
		if rl.start == 0 {
			rl.begin(time.Now().UnixNano(), nil)
		}
		panics.Balancer.Recovered(s.log, r, "panic while serving request", "uri", string(ctx.RequestURI()), "request_id", rl.id.String())
		ctx.Response.Reset()
		ctx.Error("edgelb: internal error\n", fasthttp.StatusInternalServerError)
		ctx.SetConnectionClose()
		rl.source, rl.code, rl.reason = srcEdgelb, errNone, reasonPanic
	}
	if rl.ids != nil {
		setResponseID(&ctx.Response.Header, rl.ids, rl.id.bytes())
	}
	s.logRequest(ctx, rl, true)
}

// answeredEarly gives an ID to, and logs, a request that the fasthttp
// server answers without the root handler, for reason; head tells whether
// its head was read.
func (s *Server) answeredEarly(ctx *fasthttp.RequestCtx, reason string, head bool) {
	var rl reqLog
	rl.begin(time.Now().UnixNano(), s.ids.Load())
	rl.source, rl.reason = srcEdgelb, reason
	if head {
		rl.bytesIn, rl.http10 = requestSize(&ctx.Request), !ctx.Request.Header.IsHTTP11()
	}
	if rl.ids != nil {
		s.fastIDs.next(&rl.id)
		setResponseID(&ctx.Response.Header, rl.ids, rl.id.bytes())
	}
	s.logRequest(ctx, &rl, head)
}

// logRequest writes the access log line of the request in ctx, whose
// record is rl; head tells whether its head was read.
func (s *Server) logRequest(ctx *fasthttp.RequestCtx, rl *reqLog, head bool) {
	set := s.alog.set.Load()
	if set == nil {
		return
	}
	resp := &ctx.Response
	e := logEntry{rl: rl, status: resp.StatusCode(), service: rl.service, tls: ctx.IsTLS()}
	if ctx.Hijacked() {
		e.status = fasthttp.StatusSwitchingProtocols
	}
	if !set.keep(e.forced()) {
		return
	}
	e.end = time.Now().UnixNano()
	if a, ok := ctx.RemoteAddr().(*net.TCPAddr); ok {
		e.client = a.AddrPort()
	}
	if head {
		h := &ctx.Request.Header
		e.method, e.host, e.uri, e.proto = h.Method(), h.Host(), h.RequestURI(), h.Protocol()
		if rl.http10 {
			e.proto = strHTTP10
		}
		if !h.IsHead() && !ctx.Hijacked() {
			e.out = len(resp.Body())
		}
		if !set.json {
			e.referer, e.ua = h.Referer(), h.UserAgent()
		}
	} else {
		e.out = len(resp.Body())
	}
	if rl.source == srcStale {
		e.cacheStatus = peekFold(&resp.Header, strCacheStatus)
	}
	s.alog.add(s.alog.fastShard(ctx.ConnID()), set, &e)
}

// serveUnrouted answers a request that matches no route: 404 no_route,
// unless Consul's tag routes, or the services and routes of
// consul.config_key, are not known yet (Consul unreachable and no usable
// state in state_dir). Then the request may well be for one of
// them: it gets a stored copy if there is one, else 503
// no_healthy_backend, which clients retry and caches do not keep.
func (s *Server) serveUnrouted(ctx *fasthttp.RequestCtx, now time.Time, rl *reqLog) {
	clientClose := ctx.Request.Header.ConnectionClose()
	if s.routesKnown() {
		noRouteTotal.Inc()
		writeError(&ctx.Response, errNoRoute, clientClose)
		rl.source, rl.code = srcError, errNoRoute
		return
	}
	// Without tag routes, the config key's services are not known yet.
	pol := stale.Policy{MaxStale: DefaultMaxStale}
	if u := s.unrouted.Load(); u != nil {
		pol = u.stale
	}
	if s.store.Serve(now, scheme(ctx), &ctx.Request, &ctx.Response, pol, errCodeValues[errNoHealthyBackend]) {
		unroutedStaleTotal.Inc()
		if clientClose {
			ctx.Response.SetConnectionClose()
		}
		rl.source = srcStale
		return
	}
	unroutedUnknownTotal.Inc()
	writeError(&ctx.Response, errNoHealthyBackend, clientClose)
	rl.source, rl.code = srcError, errNoHealthyBackend
}

// routesKnown reports whether a request that matches no route is known to
// have none: unless Consul's tag routes, or the config key's routes, are
// not known yet.
func (s *Server) routesKnown() bool {
	if s.keyPending.Load() {
		return false
	}
	u := s.unrouted.Load()
	return u == nil || u.consul.RoutesKnown()
}

// handleParseError answers requests that fasthttp could not parse.
func (s *Server) handleParseError(ctx *fasthttp.RequestCtx, err error) {
	var small *fasthttp.ErrSmallBuffer
	var ne net.Error
	reason, head := "malformed", false
	switch {
	case errors.As(err, &small):
		ctx.Error("edgelb: request header too large\n", fasthttp.StatusRequestHeaderFieldsTooLarge)
		reason = "header_too_large"
	case errors.Is(err, fasthttp.ErrBodyTooLarge):
		ctx.Error("edgelb: request body too large\n", fasthttp.StatusRequestEntityTooLarge)
		reason, head = refusalNames[refuseBodyTooLarge], true
	case errors.As(err, &ne) && ne.Timeout():
		if headTimedOut(ctx, err) {
			clientHeadTimeouts.Inc()
			reason = "head_timeout"
		} else {
			clientBodyTimeouts.Inc()
			reason, head = "body_timeout", true
		}
		ctx.Error("edgelb: request timeout\n", fasthttp.StatusRequestTimeout)
	default:
		ctx.Error("edgelb: malformed request\n", fasthttp.StatusBadRequest)
	}
	ctx.SetConnectionClose()
	s.answeredEarly(ctx, reason, head)
}

// fasthttpLogger sends fasthttp's own messages to slog.
type fasthttpLogger struct{ l *slog.Logger }

func (l fasthttpLogger) Printf(format string, args ...any) {
	l.l.Debug(fmt.Sprintf(format, args...), "component", "fasthttp")
}

// poolsSorted returns the pools by name (slow path).
func (s *Server) poolsSorted() []*Pool {
	s.mu.Lock()
	defer s.mu.Unlock()
	ps := make([]*Pool, 0, len(s.pools))
	for _, p := range s.pools {
		ps = append(ps, p)
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].name < ps[j].name })
	return ps
}

// Handler returns the client-facing request handler, for serving edgelb on
// a listener of one's own or driving it in benchmarks.
func (s *Server) Handler() fasthttp.RequestHandler { return s.handle }

// listenTCP listens on addr with plain TCP, for listen and tls.listen. Go
// listens with Multipath TCP by default where the kernel has it, and an
// MPTCP listener costs every accepted connection a detour through the
// MPTCP layer even when the client speaks plain TCP, as nearly all HTTP
// clients do. Where the system has it, a connection is accepted once its
// first bytes have come (see deferAccept).
func listenTCP(addr string) (net.Listener, error) {
	lc := net.ListenConfig{Control: deferAccept}
	lc.SetMultipathTCP(false)
	return lc.Listen(context.Background(), "tcp", addr)
}
