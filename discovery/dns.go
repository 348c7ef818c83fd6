package discovery

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"reflect"
	"runtime/debug"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

// DNSConfig says how the host names of static backends are resolved. The
// top-level `dns` block sets it for every service; a service's own `dns`
// block overrides the fields it sets.
type DNSConfig struct {
	// Servers are the DNS servers asked, in order, each an IP address with
	// an optional port (53 if left out). Validate writes them as ip:port.
	// The nameservers of ResolvConf are used if not set, with its search
	// domains and ndots; with servers of its own, a name is asked as
	// written.
	Servers []string `yaml:"servers"`

	// Interval is the longest time between two resolutions of a name. A
	// record's TTL brings the next one sooner, but never sooner than
	// MinDNSRefresh. DefaultDNSInterval is used if not set.
	Interval time.Duration `yaml:"interval"`

	// Timeout bounds one question to one server. DefaultDNSTimeout is
	// used if not set.
	Timeout time.Duration `yaml:"timeout"`

	// HostsFile is read before any server is asked, as the system
	// resolver does: a name it lists takes its addresses from it.
	// DefaultHostsFile is used if not set.
	HostsFile string `yaml:"hosts_file"`

	// ResolvConf gives the servers, search domains and ndots when Servers
	// is not set. DefaultResolvConf is used if not set.
	ResolvConf string `yaml:"resolv_conf"`
}

// Defaults and bounds of DNSConfig.
const (
	DefaultDNSInterval = 30 * time.Second
	DefaultDNSTimeout  = 2 * time.Second
	DefaultHostsFile   = "/etc/hosts"
	DefaultResolvConf  = "/etc/resolv.conf"

	// MinDNSRefresh is the shortest time between two resolutions of a
	// name, whatever its records' TTL (0 is common), and the shortest
	// interval.
	MinDNSRefresh = time.Second
)

// ApplyDefaults fills in every unset field that has a default.
func (c *DNSConfig) ApplyDefaults() {
	if c.Interval == 0 {
		c.Interval = DefaultDNSInterval
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultDNSTimeout
	}
	if c.HostsFile == "" {
		c.HostsFile = DefaultHostsFile
	}
	if c.ResolvConf == "" {
		c.ResolvConf = DefaultResolvConf
	}
}

// Validate checks the fields that are set and writes the servers as
// ip:port; it returns every problem, each key under path. A service's own
// block is validated as it is, before it is merged with With.
func (c *DNSConfig) Validate(path string) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	for i, s := range c.Servers {
		ap, err := parseServer(s)
		if err != nil {
			bad(fmt.Sprintf(".servers[%d]", i), "%v", err)
			continue
		}
		c.Servers[i] = ap.String()
	}
	if c.Interval != 0 && c.Interval < MinDNSRefresh {
		bad(".interval", "must be at least %v (got %v)", MinDNSRefresh, c.Interval)
	}
	if c.Timeout < 0 {
		bad(".timeout", "must be positive (got %v)", c.Timeout)
	}
	if c.Interval >= MinDNSRefresh && c.Timeout > c.Interval {
		bad(".timeout", "must not exceed interval (%v), got %v", c.Interval, c.Timeout)
	}
	for _, f := range []struct{ k, v string }{{".hosts_file", c.HostsFile}, {".resolv_conf", c.ResolvConf}} {
		if f.v == "" || f.v == DefaultHostsFile || f.v == DefaultResolvConf {
			// The defaults may be missing: then there are no entries.
			continue
		}
		if _, err := os.Stat(f.v); err != nil {
			bad(f.k, "cannot read %q: %v", f.v, err)
		}
	}
	return errs
}

// parseServer parses a DNS server address: an IP address with an optional
// port.
func parseServer(s string) (netip.AddrPort, error) {
	if a, err := netip.ParseAddr(strings.Trim(s, "[]")); err == nil {
		return netip.AddrPortFrom(a, 53), nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("want the IP address of a DNS server, with an optional port, such as 10.0.0.2 or 127.0.0.1:5353 (got %q)", s)
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q: a DNS server is given by its IP address, not a name (got %q)", s, host)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return netip.AddrPort{}, fmt.Errorf("%q: port must be a number from 1 to 65535", s)
	}
	return netip.AddrPortFrom(a, uint16(p)), nil
}

// With returns c with the fields that o sets taken from o; o may be nil.
func (c DNSConfig) With(o *DNSConfig) DNSConfig {
	if o == nil {
		return c
	}
	if len(o.Servers) > 0 {
		c.Servers = o.Servers
	}
	if o.Interval != 0 {
		c.Interval = o.Interval
	}
	if o.Timeout != 0 {
		c.Timeout = o.Timeout
	}
	if o.HostsFile != "" {
		c.HostsFile = o.HostsFile
	}
	if o.ResolvConf != "" {
		c.ResolvConf = o.ResolvConf
	}
	return c
}

// DNSService is a service whose static backends include host names.
type DNSService struct {
	// Backends are the configured instances; the host of each Addr is a
	// name or an IP address.
	Backends []Instance

	// DNS is how its names are resolved: defaults applied, the service's
	// own settings merged, validated.
	DNS DNSConfig
}

// DNS is a discovery source for static backends given by host name. It
// resolves each name (A and AAAA) at start and again when its records'
// TTL runs out, or at the latest after the interval, and publishes a Set
// per service with one instance per address and port. When resolution
// fails, the last good addresses stay; at start, those persisted in
// state_dir stand in until the name resolves.
//
// Methods are safe for concurrent use. Configure and Stop wait for
// publications in progress: never call them while holding a lock that the
// Publisher takes.
type DNS struct {
	pub Publisher
	log *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc

	// ctl serialises Configure and Stop; disk is the state_dir's answers,
	// which only Configure reads.
	ctl  sync.Mutex
	disk map[string]dnsRecord

	persistMu sync.Mutex

	mu       sync.Mutex
	stateDir string
	services map[string]*dnsService
}

// dnsService resolves the names of one service and publishes its set.
type dnsService struct {
	d        *DNS
	name     string
	cfg      DNSService
	res      *resolver
	literals []Instance // the backends given by IP address
	watches  []*nameWatch

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	updates *metrics.Counter
	errors  *metrics.Counter

	// pubMu orders publications; last is the set last published.
	pubMu sync.Mutex
	last  *Set
}

// nameWatch follows one host name of a service.
type nameWatch struct {
	host string // lower case, no trailing dot
	// ports are the ports and weights of the backends named by host.
	ports []Instance
	// first is closed after the first resolution, or at once when the
	// watch took over the addresses of an earlier one.
	first     chan struct{}
	firstOnce sync.Once

	mu sync.Mutex
	st nameState
	// disk is the answer persisted in state_dir, used if the first
	// resolution fails.
	disk *dnsRecord
}

// nameState is what a watch knows of its name.
type nameState struct {
	// addrs are the addresses served: the last good answer.
	addrs        []netip.Addr
	resolvedAt   time.Time
	from         string
	fromDisk     bool
	lastErr      string
	lastErrAt    time.Time
	failingSince time.Time
	failures     int
	next         time.Time
}

// NewDNS returns a DNS source publishing to pub. It resolves nothing until
// Configure names services.
func NewDNS(pub Publisher, log *slog.Logger) *DNS {
	if log == nil {
		log = slog.Default()
	}
	d := &DNS{pub: pub, log: log.With("source", "dns"), services: make(map[string]*dnsService)}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	return d
}

// Configure makes services (by edgelb service name) the services resolved,
// with stateDir keeping their last good addresses across restarts ("" for
// none). Unchanged services carry on; the watches of changed or removed
// ones stop, and a new watch of a name that an earlier one resolved starts
// from its addresses. It returns once every new name has been resolved
// once, or its resolution failed, or a little longer than its timeout has
// passed; names left without addresses then take those of state_dir. The
// new services are published before it returns.
func (d *DNS) Configure(stateDir string, services map[string]DNSService) {
	d.ctl.Lock()
	defer d.ctl.Unlock()
	if d.ctx.Err() != nil {
		return
	}
	if stateDir != d.stateDir || d.disk == nil {
		d.disk = loadDNSState(stateDir, d.log)
	}
	d.mu.Lock()
	d.stateDir = stateDir
	old := d.services
	next := make(map[string]*dnsService, len(services))
	var started, stopped []*dnsService
	for name, svc := range services {
		if o := old[name]; o != nil && reflect.DeepEqual(o.cfg, svc) {
			next[name] = o
			continue
		}
		s := d.newService(name, svc, old)
		next[name] = s
		started = append(started, s)
	}
	for name, o := range old {
		if next[name] != o {
			stopped = append(stopped, o)
		}
	}
	d.services = next
	d.mu.Unlock()
	// Stopped first, so that no publication of theirs follows one of
	// their successors.
	for _, s := range stopped {
		s.stop()
	}
	wait := time.Duration(0)
	for _, s := range started {
		s.start()
		wait = max(wait, s.cfg.DNS.Timeout+s.cfg.DNS.Timeout/2)
	}
	wctx, cancel := context.WithTimeout(d.ctx, wait)
	defer cancel()
	for _, s := range started {
		for _, w := range s.watches {
			select {
			case <-w.first:
			case <-wctx.Done():
			}
		}
	}
	if d.ctx.Err() != nil {
		return
	}
	for _, s := range started {
		for _, w := range s.watches {
			w.useDisk(s)
		}
		s.publish()
	}
}

// Stop ends every watch, waits for them and writes the last addresses to
// state_dir.
func (d *DNS) Stop() {
	d.ctl.Lock()
	defer d.ctl.Unlock()
	if d.ctx.Err() != nil {
		return
	}
	d.cancel()
	d.mu.Lock()
	services := d.services
	d.mu.Unlock()
	for _, s := range services {
		s.stop()
	}
	d.persist()
	d.mu.Lock()
	d.services = map[string]*dnsService{}
	d.mu.Unlock()
}

// Status returns the state of every name of every service, sorted by
// service and name.
func (d *DNS) Status() []Status {
	d.mu.Lock()
	services := make([]*dnsService, 0, len(d.services))
	for _, s := range d.services {
		services = append(services, s)
	}
	d.mu.Unlock()
	var out []Status
	for _, s := range services {
		for _, w := range s.watches {
			out = append(out, w.status(s.name))
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Service != out[j].Service {
			return out[i].Service < out[j].Service
		}
		return out[i].Name < out[j].Name
	})
	return out
}

// newService builds the watches of a service; a name that a watch of old
// follows starts from its state. The caller holds d.mu.
func (d *DNS) newService(name string, svc DNSService, old map[string]*dnsService) *dnsService {
	res, note := newResolver(svc.DNS)
	if note != "" {
		d.log.Warn("no usable resolv.conf", "service", name, "detail", note)
	}
	l := fmt.Sprintf(`source="dns",service=%q`, name)
	s := &dnsService{
		d: d, name: name, cfg: svc, res: res,
		updates: metrics.GetOrCreateCounter(`edgelb_discovery_updates_total{` + l + `}`),
		errors:  metrics.GetOrCreateCounter(`edgelb_discovery_errors_total{` + l + `}`),
	}
	s.ctx, s.cancel = context.WithCancel(d.ctx)
	byHost := make(map[string]*nameWatch)
	for _, b := range svc.Backends {
		host, port, err := net.SplitHostPort(b.Addr)
		if err != nil {
			continue // validated by the config: cannot happen
		}
		if !HostIsName(b.Addr) {
			s.literals = append(s.literals, b)
			continue
		}
		host = strings.ToLower(strings.TrimSuffix(host, "."))
		p, _ := strconv.ParseUint(port, 10, 16)
		w := byHost[host]
		if w == nil {
			w = &nameWatch{host: host, first: make(chan struct{})}
			byHost[host] = w
			s.watches = append(s.watches, w)
		}
		w.ports = append(w.ports, Instance{Addr: strconv.FormatUint(p, 10), Weight: b.Weight})
	}
	sort.Slice(s.watches, func(i, j int) bool { return s.watches[i].host < s.watches[j].host })
	for _, w := range s.watches {
		if prev := findWatch(old, w.host); prev != nil {
			prev.mu.Lock()
			w.st = prev.st
			prev.mu.Unlock()
		}
		if rec, ok := d.disk[w.host]; ok && w.st.addrs == nil {
			w.disk = &rec
		}
	}
	return s
}

// findWatch returns a watch of host among services, the one that resolved
// it last.
func findWatch(services map[string]*dnsService, host string) *nameWatch {
	var found *nameWatch
	var at time.Time
	for _, s := range services {
		for _, w := range s.watches {
			if w.host != host {
				continue
			}
			w.mu.Lock()
			t := w.st.resolvedAt
			w.mu.Unlock()
			if found == nil || t.After(at) {
				found, at = w, t
			}
		}
	}
	return found
}

// start starts the watches of s.
func (s *dnsService) start() {
	for _, w := range s.watches {
		w.mu.Lock()
		carried := w.st.addrs != nil
		w.mu.Unlock()
		if carried {
			w.firstDone()
		}
		s.goSafe(w.host, func() { s.follow(w) })
	}
}

// stop ends the watches of s and waits for them.
func (s *dnsService) stop() {
	s.cancel()
	s.wg.Wait()
}

// follow resolves w's name until s stops: after a success when the
// records' TTL runs out (not sooner than MinDNSRefresh, not later than the
// interval), after a failure sooner, backing off up to the interval.
func (s *dnsService) follow(w *nameWatch) {
	defer w.firstDone()
	interval := s.cfg.DNS.Interval
	for {
		ans, rerr := s.res.resolve(s.ctx, w.host)
		if s.ctx.Err() != nil {
			return
		}
		now := time.Now()
		var changed bool
		var wait time.Duration
		if rerr == nil {
			changed, wait = w.succeeded(s, ans, now, interval)
		} else {
			changed, wait = w.failed(s, rerr, now, interval)
		}
		w.firstDone()
		if changed {
			s.publish()
			s.d.persist()
		}
		if !SleepCtx(s.ctx, wait) {
			return
		}
	}
}

func (w *nameWatch) firstDone() { w.firstOnce.Do(func() { close(w.first) }) }

// succeeded records an answer; it reports whether the addresses changed
// and how long to wait for the next resolution.
func (w *nameWatch) succeeded(s *dnsService, ans answer, now time.Time, interval time.Duration) (bool, time.Duration) {
	resolutionCounter(w.host, ans.result).Inc()
	wait := interval
	if ans.ttl >= 0 {
		wait = min(max(ans.ttl, MinDNSRefresh), interval)
	}
	w.mu.Lock()
	prev := w.st
	changed := !slices.Equal(prev.addrs, ans.addrs)
	w.st = nameState{addrs: ans.addrs, resolvedAt: now, from: ans.from, next: now.Add(wait)}
	w.disk = nil
	w.mu.Unlock()
	if prev.failures > 0 {
		s.d.log.Info("name resolves again", "service", s.name, "name", w.host, "failures", prev.failures,
			"failing_for", now.Sub(prev.failingSince).Round(time.Millisecond), "addrs", addrList(ans.addrs))
	}
	if changed {
		s.d.log.Info("addresses updated", "service", s.name, "name", w.host, "addrs", addrList(ans.addrs), "from", ans.from)
	}
	return changed, wait
}

// failed records a failed resolution; the addresses stay. It reports
// whether they changed (the first failure of a name known from state_dir
// only) and how long to wait for the next try.
func (w *nameWatch) failed(s *dnsService, rerr *resolveError, now time.Time, interval time.Duration) (bool, time.Duration) {
	resolutionCounter(w.host, rerr.result).Inc()
	s.errors.Inc()
	w.mu.Lock()
	st := &w.st
	st.failures++
	if st.failingSince.IsZero() {
		st.failingSince = now
	}
	st.lastErr, st.lastErrAt = rerr.msg, now
	wait := min(max(backoff(st.failures), MinDNSRefresh), interval)
	st.next = now.Add(wait)
	failures, kept := st.failures, len(st.addrs)
	w.mu.Unlock()
	changed := w.useDisk(s)
	if failures == 1 || failures%30 == 0 {
		if kept > 0 || changed {
			s.d.log.Error("cannot resolve; keeping the last good addresses", "service", s.name, "name", w.host, "err", rerr.msg, "failures", failures)
		} else {
			s.d.log.Error("cannot resolve, and no earlier answer is known: the name adds no backend", "service", s.name, "name", w.host, "err", rerr.msg, "failures", failures)
		}
	}
	return changed, wait
}

// useDisk makes a name that has no addresses take those persisted in
// state_dir, and reports whether it did.
func (w *nameWatch) useDisk(s *dnsService) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.st.addrs != nil || w.disk == nil {
		return false
	}
	rec := w.disk
	w.disk = nil
	w.st.addrs, w.st.resolvedAt, w.st.fromDisk, w.st.from = rec.Addrs, rec.ResolvedAt, true, "state_dir"
	s.d.log.Warn("name not resolved yet; serving the addresses persisted in state_dir", "service", s.name, "name", w.host,
		"addrs", addrList(rec.Addrs), "resolved_at", rec.ResolvedAt)
	return true
}

// status returns w's state as /status shows it.
func (w *nameWatch) status(service string) Status {
	w.mu.Lock()
	defer w.mu.Unlock()
	st := w.st
	out := Status{
		Source: "dns", Service: service, Name: w.host, Addrs: addrList(st.addrs),
		LastUpdate: st.resolvedAt, LastErrorAt: st.lastErrAt, FailingSince: st.failingSince, Failures: st.failures,
		Stale: st.failures > 0 || st.fromDisk, FromDisk: st.fromDisk, AnsweredBy: st.from, NextResolve: st.next,
	}
	if st.failures > 0 {
		out.LastError = st.lastErr
		if len(st.addrs) == 0 {
			out.LastError += "; no earlier answer (none in state_dir either): the name adds no backend"
		}
	}
	return out
}

// publish publishes the set of s built from the current addresses of its
// names, if it changed.
func (s *dnsService) publish() {
	s.pubMu.Lock()
	defer s.pubMu.Unlock()
	if s.ctx.Err() != nil {
		// Stopped: a successor, or nothing, owns the service now.
		return
	}
	ins := slices.Clone(s.literals)
	for _, w := range s.watches {
		w.mu.Lock()
		addrs := w.st.addrs
		w.mu.Unlock()
		for _, p := range w.ports {
			port, _ := strconv.ParseUint(p.Addr, 10, 16)
			for _, a := range addrs {
				ins = append(ins, Instance{Addr: netip.AddrPortFrom(a, uint16(port)).String(), Weight: p.Weight})
			}
		}
	}
	set := NewSet(s.name, "dns", ins, time.Now())
	if s.last != nil && sameSet(s.last, set) {
		return
	}
	s.last = set
	s.updates.Inc()
	s.d.pub.Publish(set)
}

func (s *dnsService) goSafe(name string, f func()) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer func() {
			if r := recover(); r != nil {
				s.d.log.Error("panic in DNS watch", "service", s.name, "name", name, "panic", r, "stack", string(debug.Stack()))
			}
		}()
		f()
	}()
}

// resolutionCounter returns the counter of the resolutions of host with
// the given result. Resolutions are rare (one per TTL or interval), so
// the lookup by name costs nothing that matters.
func resolutionCounter(host, result string) *metrics.Counter {
	return metrics.GetOrCreateCounter(fmt.Sprintf(`edgelb_dns_resolutions_total{name=%q,result=%q}`, host, result))
}

func addrList(addrs []netip.Addr) []string {
	out := make([]string, len(addrs))
	for i, a := range addrs {
		out[i] = a.String()
	}
	return out
}
