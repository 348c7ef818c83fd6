package discovery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/hashicorp/consul/api"

	"github.com/edgelb/edgelb/internal/panics"
)

// ConsulConfig says where Consul is and how edgelb uses it.
type ConsulConfig struct {
	// Address is host:port of the Consul HTTP API.
	// DefaultConsulAddress is used if not set.
	Address string `yaml:"address"`

	// Scheme is "http" or "https". "http" is used if not set.
	Scheme string `yaml:"scheme"`

	// Token is the ACL token, if Consul requires one.
	Token string `yaml:"token"`

	// Datacenter is the default datacenter of watched services; the
	// agent's own if not set.
	Datacenter string `yaml:"datacenter"`

	// TagRoutes routes every service whose instances carry an
	// `edge.route=HOST/PATH` tag, with no config.
	TagRoutes bool `yaml:"tag_routes"`
}

// ConsulService names a service in Consul.
type ConsulService struct {
	// Name is the Consul service name.
	Name string `yaml:"name"`

	// Tags keep only instances carrying all of them.
	Tags []string `yaml:"tags"`

	// Datacenter overrides ConsulConfig.Datacenter for this service.
	Datacenter string `yaml:"datacenter"`
}

// Defaults of the Consul source.
const (
	DefaultConsulAddress = "127.0.0.1:8500"

	// minCallInterval is the average spacing of the calls of one watch
	// that bring nothing new, so that a misbehaving index or a registry
	// changing elsewhere never turns a watch into a busy loop. Up to
	// callBurst of them may follow each other at once, and a call that
	// brought a change costs nothing: the next one blocks until the next
	// change, so that a change right after another is not held back.
	minCallInterval = time.Second
	callBurst       = 3
	// waitTime is how long a blocking query may wait for a change.
	waitTime = 30 * time.Second
	// maxBackoff caps the wait between failed calls.
	maxBackoff = 10 * time.Second
	// emptyHold is how long a set that turns empty right after Consul's
	// index went backwards (a restarted or rebuilt Consul) is not believed.
	emptyHold = 30 * time.Second
	// diskWait is how long a watch waits for Consul before publishing the
	// set persisted in state_dir.
	diskWait = 2 * time.Second
)

// Consul is a discovery source watching services in Consul with blocking
// queries. It publishes a Set per watched service whenever it changes, and
// keeps the last known sets through Consul outages.
//
// Methods are safe for concurrent use.
type Consul struct {
	cfg    ConsulConfig
	client *api.Client
	pub    Publisher
	log    *slog.Logger
	state  *stateFile

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	persistMu sync.Mutex

	// hold is emptyHold; tests shorten it.
	hold time.Duration
	// restarts tells every watch when one saw signs of a Consul restart.
	restarts restartSignal

	// routesKnown is set once the routes that Consul gives are known, from
	// Consul or from state_dir; see RoutesKnown.
	routesKnown atomic.Bool

	mu         sync.Mutex
	configured map[string]ConsulService // edgelb name -> Consul service
	watches    map[string]*watch        // edgelb name -> watch
	catalog    Status
	// catalogAnswered is set by the catalog's first answer, diskLoaded
	// when state_dir held a usable discovery state.
	catalogAnswered bool
	diskLoaded      bool
}

// watch follows one Consul service.
type watch struct {
	name    string // edgelb service name
	svc     ConsulService
	tagged  bool // started for its tag routes, not from the config
	cancel  context.CancelFunc
	updates *metrics.Counter
	errors  *metrics.Counter

	// problems is the malformed data last logged; only its
	// serviceFollower uses it, so that each problem is logged once, not on every answer.
	problems []string

	mu        sync.Mutex
	status    Status
	last      *Set
	published bool
}

// NewClient returns a Consul API client for c: its address (or
// DefaultConsulAddress), scheme, ACL token and datacenter.
func (c ConsulConfig) NewClient() (*api.Client, error) {
	if c.Address == "" {
		c.Address = DefaultConsulAddress
	}
	client, err := api.NewClient(&api.Config{Address: c.Address, Scheme: c.Scheme, Token: c.Token, Datacenter: c.Datacenter})
	if err != nil {
		return nil, fmt.Errorf("cannot create Consul client for %s: %w", c.Address, err)
	}
	return client, nil
}

// DescribeConsulErr words a Consul client error for logs and /status:
// refused tokens, timeouts and an unreachable agent are named as such.
func DescribeConsulErr(addr string, err error) string { return describeConsulErr(addr, err) }

// NewConsul returns a Consul source for the services (keyed by edgelb
// service name). Sets are published to pub. stateDir, if not empty, keeps
// the last-known-good sets across restarts.
func NewConsul(cfg ConsulConfig, services map[string]ConsulService, stateDir string, pub Publisher, log *slog.Logger) (*Consul, error) {
	if cfg.Address == "" {
		cfg.Address = DefaultConsulAddress
	}
	if log == nil {
		log = slog.Default()
	}
	client, err := cfg.NewClient()
	if err != nil {
		return nil, err
	}
	c := &Consul{
		cfg:        cfg,
		client:     client,
		pub:        pub,
		log:        log.With("source", "consul"),
		configured: services,
		watches:    make(map[string]*watch),
		catalog:    Status{Source: "consul", Service: "(catalog)"},
		hold:       emptyHold,
	}
	if stateDir != "" {
		c.state = newStateFile(stateDir, c.log)
	}
	if !cfg.TagRoutes {
		c.routesKnown.Store(true)
	}
	return c, nil
}

// Start publishes the persisted sets if Consul does not answer quickly and
// starts the watches.
func (c *Consul) Start() {
	c.ctx, c.cancel = context.WithCancel(context.Background())
	var disk map[string]*Set
	loaded := false
	if c.state != nil {
		disk, loaded = c.state.load()
	}
	c.mu.Lock()
	c.diskLoaded = loaded
	for name, svc := range c.configured {
		c.startWatchLocked(name, svc, false, disk[name])
	}
	if c.cfg.TagRoutes {
		for name, set := range disk {
			if _, ok := c.configured[name]; !ok && len(set.Routes) > 0 {
				c.startWatchLocked(name, ConsulService{Name: name}, true, set)
			}
		}
		c.goSafe(c.ctx, "catalog", func() { c.follow(c.ctx, c.cfg.Datacenter, &catalogFollower{c: c}) })
	}
	c.mu.Unlock()
	c.noteDelivered()
}

// Stop ends every watch and waits for them.
func (c *Consul) Stop() {
	if c.cancel == nil {
		return
	}
	c.cancel()
	c.wg.Wait()
}

// RoutesKnown reports whether the routes that Consul's tags give are
// known: tag routes are off, or the catalog and every watched service have
// answered, from Consul or from the state persisted in state_dir. Until
// then a request that matches no route may be for a tag route not yet
// known. Once true it stays true: later outages keep the last routes.
//
// Fast path: one atomic load.
func (c *Consul) RoutesKnown() bool { return c.routesKnown.Load() }

// noteDelivered sets routesKnown once every watch has delivered.
func (c *Consul) noteDelivered() {
	if c.routesKnown.Load() {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.catalogAnswered && !c.diskLoaded {
		return
	}
	for _, w := range c.watches {
		w.mu.Lock()
		published := w.published
		w.mu.Unlock()
		if !published {
			return
		}
	}
	c.routesKnown.Store(true)
}

// SetServices replaces the configured services (on a config reload):
// watches of removed services stop, new ones start.
func (c *Consul) SetServices(services map[string]ConsulService) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.configured = services
	for name, w := range c.watches {
		svc, ok := services[name]
		if (ok && reflect.DeepEqual(svc, w.svc)) || (!ok && w.tagged) {
			continue
		}
		w.cancel()
		delete(c.watches, name)
	}
	for name, svc := range services {
		if c.watches[name] == nil {
			c.startWatchLocked(name, svc, false, nil)
		}
	}
}

// Status returns the freshness of every watch, sorted by service.
func (c *Consul) Status() []Status {
	c.mu.Lock()
	ws := make([]*watch, 0, len(c.watches))
	for _, w := range c.watches {
		ws = append(ws, w)
	}
	var out []Status
	if c.cfg.TagRoutes {
		out = append(out, c.catalog)
	}
	c.mu.Unlock()
	for _, w := range ws {
		w.mu.Lock()
		out = append(out, w.status)
		w.mu.Unlock()
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Service < out[j].Service })
	return out
}

func (c *Consul) startWatchLocked(name string, svc ConsulService, tagged bool, disk *Set) {
	ctx, cancel := context.WithCancel(c.ctx)
	l := fmt.Sprintf(`source="consul",service=%q`, name)
	w := &watch{
		name: name, svc: svc, tagged: tagged, cancel: cancel,
		updates: metrics.GetOrCreateCounter(`edgelb_discovery_updates_total{` + l + `}`),
		errors:  metrics.GetOrCreateCounter(`edgelb_discovery_errors_total{` + l + `}`),
		status:  Status{Source: "consul", Service: name, Stale: true},
	}
	c.watches[name] = w
	if disk != nil {
		c.goSafe(ctx, "disk "+name, func() {
			select {
			case <-ctx.Done():
			case <-time.After(diskWait):
				c.publishFromDisk(w, disk)
			}
		})
	}
	dc := svc.Datacenter
	if dc == "" {
		dc = c.cfg.Datacenter
	}
	c.goSafe(ctx, "watch "+name, func() { c.follow(ctx, dc, &serviceFollower{c: c, w: w, disk: disk}) })
}

// publishFromDisk publishes a persisted set unless Consul answered first.
func (c *Consul) publishFromDisk(w *watch, disk *Set) {
	w.mu.Lock()
	if w.published {
		w.mu.Unlock()
		return
	}
	w.published = true
	w.last = disk
	w.status.FromDisk, w.status.Stale = true, true
	w.mu.Unlock()
	c.log.Warn("Consul has not answered; serving the last known instances from state_dir",
		"service", w.name, "instances", len(disk.Instances), "saved_at", disk.UpdatedAt)
	c.pub.Publish(disk)
	c.noteDelivered()
}

// follower is what one blocking-query loop follows: the instances of a
// service (serviceFollower) or the tag-routed services of the catalog
// (catalogFollower). Only the loop's goroutine calls its methods.
type follower interface {
	// query makes one call and keeps its answer; it returns the answer's
	// index.
	query(q *api.QueryOptions) (index uint64, err error)
	// failed records the failures-th failed call in a row.
	failed(err error, failures int)
	// loses reports whether the kept answer drops what was last published:
	// every instance of the service, or tag-routed services.
	loses() bool
	// apply publishes the kept answer and reports whether it changed
	// anything. With holdUntil set, it keeps what was published instead
	// and says so until then.
	apply(now, holdUntil time.Time) (changed bool)
}

// follow runs the blocking-query loop of f until ctx ends.
//
// A Consul that restarted (a dev agent, a rebuilt cluster) has a lower
// index and, until its agents register again, no instances. A blocking
// call on an index from before the restart would wait the whole waitTime,
// so a watch asks without blocking (index 0) after its own failed call,
// after an answer whose index went backwards, after an answer that broke
// off the wait with nothing new (an agent shutting down), and when another
// watch of the source saw one of these (restarts). An answer that loses
// everything after that is held for the hold time, counted from the first
// such answer.
func (c *Consul) follow(ctx context.Context, dc string, f follower) {
	var (
		index    uint64 // the next call's wait index
		seen     uint64 // the last answer's index
		epoch    uint64 // the restarts this watch has reset for
		failures int
		limit    callLimiter
		// suspect is set by a failed call or a restart: until an answer is
		// believed, one that loses everything may come from a registry
		// that lost its state rather than from services that left.
		suspect bool
		// lossSince is when the held answers that lose everything began.
		lossSince time.Time
	)
	for {
		if !limit.wait(ctx) {
			return
		}
		wait := waitTime
		if !lossSince.IsZero() {
			// Wake up when the hold ends even if nothing changes.
			wait = min(wait, max(time.Until(lossSince.Add(c.hold)), time.Millisecond))
		}
		restarted, n := c.restarts.current()
		if n != epoch {
			// Another watch saw Consul restart.
			epoch, index, suspect = n, 0, true
		}
		qctx, cancel := context.WithCancel(ctx)
		go func() {
			select {
			case <-restarted:
				cancel()
			case <-qctx.Done():
			}
		}()
		start := time.Now()
		last, err := f.query((&api.QueryOptions{WaitIndex: index, WaitTime: wait, Datacenter: dc}).WithContext(qctx))
		cancel()
		if ctx.Err() != nil {
			return
		}
		select {
		case <-restarted:
			// Another watch saw Consul restart: this answer (or the
			// cancelled call) may come from before it. The next call
			// starts again from index 0.
			continue
		default:
		}
		if err != nil {
			failures++
			index, suspect = 0, true
			if failures == 1 {
				c.restarts.raise()
			}
			f.failed(err, failures)
			if !sleepCtx(ctx, backoff(failures)) {
				return
			}
			continue
		}
		failures = 0
		switch {
		case last < seen || last == 0:
			index, suspect = 0, true
			c.restarts.raise()
		case last == index && time.Since(start) < wait-wait/10:
			// The wait was broken off with nothing new: the agent may be
			// shutting down, and the next call reach its successor.
			index = 0
		default:
			index = last
		}
		seen = last
		now := time.Now()
		var holdUntil time.Time
		if suspect && f.loses() {
			if lossSince.IsZero() {
				lossSince = now
			}
			if end := lossSince.Add(c.hold); now.Before(end) {
				holdUntil = end
			}
		}
		if holdUntil.IsZero() {
			suspect, lossSince = false, time.Time{}
		}
		if f.apply(now, holdUntil) {
			limit.refund()
		}
	}
}

// restartSignal tells the watches of a source that Consul may have
// restarted, so that each asks again without blocking.
type restartSignal struct {
	mu sync.Mutex
	ch chan struct{}
	n  uint64
}

// current returns a channel that the next raise closes, and how many
// raises there were.
func (r *restartSignal) current() (<-chan struct{}, uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ch == nil {
		r.ch = make(chan struct{})
	}
	return r.ch, r.n
}

// raise wakes every watch waiting on the current channel.
func (r *restartSignal) raise() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ch != nil {
		close(r.ch)
	}
	r.ch = make(chan struct{})
	r.n++
}

// serviceFollower follows the passing instances of one service.
type serviceFollower struct {
	c    *Consul
	w    *watch
	disk *Set // the set persisted in state_dir, if any

	set *Set // the last answer
	bad []string
}

func (f *serviceFollower) query(q *api.QueryOptions) (uint64, error) {
	entries, meta, err := f.c.client.Health().ServiceMultipleTags(f.w.svc.Name, f.w.svc.Tags, true, q)
	if err != nil {
		return 0, err
	}
	f.set, f.bad = f.c.setFromEntries(f.w.name, entries, time.Now())
	return meta.LastIndex, nil
}

func (f *serviceFollower) failed(err error, failures int) {
	f.c.watchFailed(f.w, err, failures, f.disk)
}

func (f *serviceFollower) loses() bool {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	prev := f.w.last
	return len(f.set.Instances) == 0 && prev != nil && len(prev.Instances) > 0
}

func (f *serviceFollower) apply(now, holdUntil time.Time) bool {
	c, w, set := f.c, f.w, f.set
	if !slices.Equal(f.bad, w.problems) {
		for _, b := range f.bad {
			c.log.Warn("ignoring malformed Consul data", "service", w.name, "problem", b)
		}
		w.problems = f.bad
	}
	w.mu.Lock()
	prev := w.last
	if !holdUntil.IsZero() {
		w.status.LastError = fmt.Sprintf("Consul at %s returned no instances right after an outage or index reset; keeping the last %d instances until %s",
			c.cfg.Address, len(prev.Instances), holdUntil.Format(time.RFC3339))
		w.status.LastErrorAt = now
		w.status.Stale = true
		w.mu.Unlock()
		return false
	}
	if len(set.Instances) == 0 && prev != nil {
		// Routes come from the tags of passing instances: keep them while
		// none passes, so that the route answers 503 instead of falling
		// through to a shorter prefix.
		set.Routes = prev.Routes
	}
	changed := prev == nil || !sameSet(prev, set)
	if changed {
		w.last = set
	}
	w.published = true
	w.status = Status{Source: "consul", Service: w.name, LastUpdate: now, Problems: f.bad}
	w.mu.Unlock()
	c.noteDelivered()
	if changed {
		w.updates.Inc()
		c.log.Info("instances updated", "service", w.name, "instances", len(set.Instances), "routes", len(set.Routes))
		c.pub.Publish(set)
		c.persist()
	}
	return changed
}

func (c *Consul) watchFailed(w *watch, err error, failures int, disk *Set) {
	w.errors.Inc()
	msg := describeConsulErr(c.cfg.Address, err)
	w.mu.Lock()
	w.status.LastError = msg
	w.status.LastErrorAt = time.Now()
	w.status.Stale = true
	first := !w.published
	w.mu.Unlock()
	if failures == 1 || failures%30 == 0 {
		c.log.Error("Consul watch failed; keeping the last known instances", "service", w.name, "err", msg, "failures", failures)
	}
	if first && disk != nil {
		c.publishFromDisk(w, disk)
	}
}

// describeConsulErr words a Consul client error for logs and /status.
func describeConsulErr(addr string, err error) string {
	s := err.Error()
	switch {
	case strings.Contains(s, "403") || strings.Contains(s, "Permission denied") || strings.Contains(s, "ACL not found"):
		return fmt.Sprintf("Consul at %s refused the token (permission denied): %v", addr, err)
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Sprintf("Consul at %s did not answer in time: %v", addr, err)
	case strings.Contains(s, "connection refused"):
		return fmt.Sprintf("Consul at %s is unreachable (connection refused)", addr)
	}
	return fmt.Sprintf("Consul at %s: %v", addr, err)
}

// setFromEntries turns health entries into a Set, keeping passing
// instances on nodes that are neither in maintenance nor failing serf.
func (c *Consul) setFromEntries(name string, entries []*api.ServiceEntry, now time.Time) (*Set, []string) {
	var bad []string
	ins := make([]Instance, 0, len(entries))
	routes := make(map[Route]bool)
	for _, e := range entries {
		if e.Service == nil || e.Node == nil || !entryUsable(e) {
			continue
		}
		host := e.Service.Address
		if host == "" {
			host = e.Node.Address
		}
		if host == "" || e.Service.Port <= 0 || e.Service.Port > 65535 {
			bad = append(bad, fmt.Sprintf("instance %q on node %q has no usable address (%q port %d)", e.Service.ID, e.Node.Node, host, e.Service.Port))
			continue
		}
		w := e.Service.Weights.Passing
		if w <= 0 {
			w = 1
		}
		ins = append(ins, Instance{Addr: net.JoinHostPort(host, strconv.Itoa(e.Service.Port)), Weight: w})
		if c.cfg.TagRoutes {
			rs, badTags := routesFromTags(e.Service.Tags)
			for _, r := range rs {
				routes[r] = true
			}
			for _, msg := range badTags {
				bad = append(bad, fmt.Sprintf("instance %q: %s", e.Service.ID, msg))
			}
		}
	}
	set := NewSet(name, "consul", ins, now)
	for r := range routes {
		set.Routes = append(set.Routes, r)
	}
	sortRoutes(set.Routes)
	return set, bad
}

// entryUsable reports whether every check of the entry passes and its node
// is not in maintenance.
func entryUsable(e *api.ServiceEntry) bool {
	for _, ch := range e.Checks {
		if ch.CheckID == "_node_maintenance" || strings.HasPrefix(ch.CheckID, "_service_maintenance:") {
			return false
		}
		if ch.CheckID == "serfHealth" && ch.Status == api.HealthCritical {
			return false
		}
		if ch.Status != api.HealthPassing {
			return false
		}
	}
	return true
}

// catalogFollower follows the list of Consul services and starts or stops
// watches of services with tag routes.
type catalogFollower struct {
	c        *Consul
	services map[string][]string // the last answer
}

func (f *catalogFollower) query(q *api.QueryOptions) (uint64, error) {
	services, meta, err := f.c.client.Catalog().Services(q)
	if err != nil {
		return 0, err
	}
	f.services = services
	return meta.LastIndex, nil
}

func (f *catalogFollower) failed(err error, failures int) {
	c := f.c
	msg := describeConsulErr(c.cfg.Address, err)
	c.mu.Lock()
	c.catalog.LastError, c.catalog.LastErrorAt, c.catalog.Stale = msg, time.Now(), true
	c.mu.Unlock()
	if failures == 1 || failures%30 == 0 {
		c.log.Error("Consul catalog watch failed; keeping the current tag routes", "err", msg, "failures", failures)
	}
}

// tagged returns the services of the last answer that carry route tags.
func (f *catalogFollower) tagged() map[string]bool {
	tagged := make(map[string]bool)
	for name, tags := range f.services {
		for _, t := range tags {
			if strings.HasPrefix(t, RouteTag) {
				tagged[name] = true
			}
		}
	}
	return tagged
}

// goneLocked returns the tag-routed watches that the last answer drops.
// The caller holds c.mu.
func (f *catalogFollower) goneLocked(tagged map[string]bool) []string {
	var gone []string
	for name, w := range f.c.watches {
		if w.tagged && !tagged[name] {
			gone = append(gone, name)
		}
	}
	return gone
}

func (f *catalogFollower) loses() bool {
	tagged := f.tagged()
	f.c.mu.Lock()
	defer f.c.mu.Unlock()
	return len(f.goneLocked(tagged)) > 0
}

func (f *catalogFollower) apply(now, holdUntil time.Time) bool {
	c := f.c
	tagged := f.tagged()
	c.mu.Lock()
	var gone []string
	if holdUntil.IsZero() {
		gone = f.goneLocked(tagged)
		c.catalog = Status{Source: "consul", Service: "(catalog)", LastUpdate: now}
	} else {
		c.catalog.LastError = fmt.Sprintf("Consul at %s lost %d tag-routed services right after an outage or index reset; keeping their routes until %s",
			c.cfg.Address, len(f.goneLocked(tagged)), holdUntil.Format(time.RFC3339))
		c.catalog.LastErrorAt, c.catalog.Stale = now, true
	}
	c.catalogAnswered = true
	for _, name := range gone {
		w := c.watches[name]
		w.cancel()
		delete(c.watches, name)
		c.log.Info("tag-routed service left Consul; removing its routes", "service", name)
	}
	found := false
	for name := range tagged {
		if c.watches[name] != nil || c.configuredName(name) {
			continue
		}
		c.log.Info("tag-routed service found in Consul", "service", name)
		c.startWatchLocked(name, ConsulService{Name: name}, true, nil)
		found = true
	}
	c.mu.Unlock()
	for _, name := range gone {
		c.pub.Remove(name)
	}
	if len(gone) > 0 {
		c.persist()
	}
	c.noteDelivered()
	return found || len(gone) > 0
}

// configuredName reports whether a configured service already watches the
// Consul service name.
func (c *Consul) configuredName(consulName string) bool {
	for name, svc := range c.configured {
		if name == consulName || svc.Name == consulName {
			return true
		}
	}
	return false
}

// persist writes the last known sets to state_dir.
func (c *Consul) persist() {
	if c.state == nil {
		return
	}
	// Gathering and writing under one lock keeps an older snapshot from
	// overwriting a newer one.
	c.persistMu.Lock()
	defer c.persistMu.Unlock()
	c.mu.Lock()
	sets := make(map[string]*Set, len(c.watches))
	for name, w := range c.watches {
		w.mu.Lock()
		if w.last != nil {
			sets[name] = w.last
		}
		w.mu.Unlock()
	}
	c.mu.Unlock()
	c.state.save(sets)
}

// goSafe runs f in a goroutine. A panic in f is counted and logged, and f
// runs again after a backoff while ctx lasts: a watch that panicked starts
// again from a non-blocking query instead of leaving its service unwatched.
func (c *Consul) goSafe(ctx context.Context, name string, f func()) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for n := 1; ; n++ {
			start := time.Now()
			if panics.Discovery.Run(f, c.log, "panic in Consul watch; restarting it", "task", name) == nil {
				return
			}
			if time.Since(start) > maxBackoff {
				// f ran a while: not a panic loop, so wait as after a
				// first panic.
				n = 1
			}
			if !sleepCtx(ctx, backoff(n)) {
				return
			}
		}
	}()
}

// backoff returns the jittered wait after n consecutive failures.
func backoff(n int) time.Duration {
	d := 250 * time.Millisecond << min(n-1, 6)
	if d > maxBackoff {
		d = maxBackoff
	}
	return d/2 + time.Duration(rand.Int64N(int64(d)))
}

// callLimiter paces the calls of one watch: a token bucket of callBurst
// calls, refilled at one call per minCallInterval; a call that brought a
// change gives its token back. Only its watch's goroutine uses it.
type callLimiter struct {
	tokens float64
	last   time.Time
}

// wait blocks until the next call may start and reports whether ctx is
// still alive.
func (l *callLimiter) wait(ctx context.Context) bool {
	return l.waitAt(ctx, time.Now())
}

func (l *callLimiter) waitAt(ctx context.Context, now time.Time) bool {
	if l.last.IsZero() {
		l.tokens = callBurst
	} else {
		l.tokens = min(callBurst, l.tokens+float64(now.Sub(l.last))/float64(minCallInterval))
	}
	l.last = now
	if l.tokens < 1 {
		d := time.Duration((1 - l.tokens) * float64(minCallInterval))
		if !sleepCtx(ctx, d) {
			return false
		}
		l.tokens, l.last = 1, now.Add(d)
	}
	l.tokens--
	return ctx.Err() == nil
}

// refund gives back the token of a call that brought a change.
func (l *callLimiter) refund() {
	l.tokens = min(callBurst, l.tokens+1)
}

// sleepCtx sleeps for d and reports whether ctx is still alive.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// sameSet reports whether two sets route the same way.
func sameSet(a, b *Set) bool {
	return reflect.DeepEqual(a.Instances, b.Instances) && reflect.DeepEqual(a.Routes, b.Routes)
}
