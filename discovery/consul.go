package discovery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
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

	// Datacenter overrides ConsulConfig.Datacenter for this service: it
	// is the service's own datacenter.
	Datacenter string `yaml:"datacenter"`

	// Failover lists other Consul datacenters holding the same service,
	// in order of preference. The service is served from the first
	// datacenter, its own first, that has a passing instance; each is
	// watched with a blocking query of its own.
	Failover []string `yaml:"failover"`

	// FailoverHold is how long a datacenter earlier in the order must
	// keep passing instances before the service goes back to it, so that
	// the traffic does not flap. DefaultFailoverHold is used if not set.
	FailoverHold time.Duration `yaml:"failover_hold"`

	// Query names a Consul prepared query that finds the instances,
	// instead of Name: the query's own failover picks the datacenter.
	// Consul cannot block on a prepared query, so it is executed every
	// second.
	Query string `yaml:"query"`
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
	// restarts tells every watch of a datacenter when one saw signs of a
	// Consul restart there; keyed by the datacenter queried ("" for the
	// agent's own).
	restartsMu sync.Mutex
	restarts   map[string]*restartSignal

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

// watch follows one Consul service, in its own datacenter and in those
// it fails over to, and publishes the instances of the datacenter chosen.
type watch struct {
	name    string // edgelb service name
	svc     ConsulService
	tagged  bool // started for its tag routes, not from the config
	ctx     context.Context
	cancel  context.CancelFunc
	updates *metrics.Counter
	errors  *metrics.Counter
	// hold is the service's failover_hold.
	hold time.Duration

	// pubMu serializes choosing and publishing, so that sets reach the
	// publisher in the order they were chosen.
	pubMu sync.Mutex

	mu sync.Mutex
	// dcs are the datacenters in order of preference, the service's own
	// first. With a prepared query they are those its answers came from,
	// by the number of failovers that found them.
	dcs []*dcState
	// serving is the index in dcs of the datacenter published, -1 before
	// the first choice; servingDC is its name then.
	serving   int
	servingDC string
	since     time.Time
	reason    string
	// wake is when a datacenter's failover_hold ends; its watches ask
	// Consul again then, even if nothing changes.
	wake      time.Time
	last      *Set
	published bool
	// fromDisk is set while last came from state_dir.
	fromDisk bool

	// stopped and gauged belong to servingGauges.
	stopped bool
	gauged  []string
}

// NewClient returns a Consul API client for cfg: the one discovery uses,
// and other users of the same Consul (such as ACME storage) share its
// address, scheme, token and datacenter.
func (cfg ConsulConfig) NewClient() (*api.Client, error) {
	addr := cfg.Address
	if addr == "" {
		addr = DefaultConsulAddress
	}
	client, err := api.NewClient(&api.Config{Address: addr, Scheme: cfg.Scheme, Token: cfg.Token, Datacenter: cfg.Datacenter})
	if err != nil {
		return nil, fmt.Errorf("cannot create Consul client for %s: %w", addr, err)
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
		restarts:   make(map[string]*restartSignal),
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
	c.mu.Lock()
	for _, w := range c.watches {
		stopServing(w)
	}
	c.mu.Unlock()
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
		w.stop()
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
		out = append(out, w.statusLocked())
		w.mu.Unlock()
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Service < out[j].Service })
	return out
}

// statusLocked returns the freshness of the datacenter that serves, or
// before the first choice, of the service's own. The caller holds w.mu.
func (w *watch) statusLocked() Status {
	d := w.dcs[max(w.serving, 0)]
	st := d.status
	st.Problems = slices.Clone(st.Problems)
	st.Service = w.name
	if w.fromDisk {
		st.FromDisk, st.Stale = true, true
	}
	return st
}

// Failover returns which datacenter serves service, since when and why;
// nil for a service without failover datacenters or prepared query.
func (c *Consul) Failover(service string) *Failover {
	c.mu.Lock()
	w := c.watches[service]
	c.mu.Unlock()
	if w == nil || !w.svc.hasFailover() {
		return nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	f := &Failover{Since: w.since, Reason: w.reason, Hold: w.hold.String(), Datacenters: make([]DatacenterStatus, 0, len(w.dcs))}
	if w.serving >= 0 {
		f.Datacenter = dcLabel(w.dcs[w.serving].name)
	}
	for _, d := range w.dcs {
		ds := DatacenterStatus{Name: d.name, Passing: d.passing(), LastUpdate: d.status.LastUpdate,
			LastError: d.status.LastError, LastErrorAt: d.status.LastErrorAt, Ignored: d.ignored}
		if ds.Passing > 0 {
			ds.PassingSince = d.upSince
		}
		f.Datacenters = append(f.Datacenters, ds)
	}
	return f
}

// stop ends the watch.
func (w *watch) stop() {
	w.cancel()
	stopServing(w)
}

func (c *Consul) startWatchLocked(name string, svc ConsulService, tagged bool, disk *Set) {
	ctx, cancel := context.WithCancel(c.ctx)
	l := fmt.Sprintf(`source="consul",service=%q`, name)
	w := &watch{
		name: name, svc: svc, tagged: tagged, ctx: ctx, cancel: cancel,
		updates: metrics.GetOrCreateCounter(`edgelb_discovery_updates_total{` + l + `}`),
		errors:  metrics.GetOrCreateCounter(`edgelb_discovery_errors_total{` + l + `}`),
		hold:    svc.failoverHold(),
		serving: -1,
	}
	dc := svc.Datacenter
	if dc == "" {
		dc = c.cfg.Datacenter
	}
	for _, name := range append([]string{dc}, svc.Failover...) {
		w.dcs = append(w.dcs, &dcState{name: name, status: Status{Source: "consul", Service: w.name, Stale: true}})
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
	if svc.Query != "" {
		c.goSafe(ctx, "query "+name, func() { c.follow(ctx, dc, &queryFollower{c: c, w: w, disk: disk}) })
		return
	}
	for i, d := range w.dcs {
		dctx, dcancel := context.WithCancel(ctx)
		d.cancel = dcancel
		task := "watch " + name
		if i > 0 {
			task += " in " + d.name
		}
		c.goSafe(dctx, task, func() { c.follow(dctx, d.name, &serviceFollower{c: c, w: w, i: i, disk: disk}) })
	}
}

// publishFromDisk publishes a persisted set unless Consul answered first.
func (c *Consul) publishFromDisk(w *watch, disk *Set) {
	if c.publishDisk(w, disk) {
		c.noteDelivered()
	}
}

func (c *Consul) publishDisk(w *watch, disk *Set) bool {
	w.pubMu.Lock()
	defer w.pubMu.Unlock()
	w.mu.Lock()
	if w.published || w.ctx.Err() != nil {
		w.mu.Unlock()
		return false
	}
	w.published = true
	w.last = disk
	w.fromDisk = true
	w.mu.Unlock()
	c.log.Warn("Consul has not answered; serving the last known instances from state_dir",
		"service", w.name, "instances", len(disk.Instances), "datacenter", disk.Datacenter, "saved_at", disk.UpdatedAt)
	c.pub.Publish(disk)
	return true
}

// follower is what one blocking-query loop follows: the instances of a
// service in one datacenter (serviceFollower), the answers of a prepared
// query (queryFollower) or the tag-routed services of the catalog
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
	// wake returns when the follower wants an answer even if nothing
	// changes (a failover_hold ending), or zero.
	wake() time.Time
}

// follow runs the blocking-query loop of f, on datacenter dc ("" for the
// agent's own), until ctx ends.
//
// A Consul that restarted (a dev agent, a rebuilt cluster) has a lower
// index and, until its agents register again, no instances. A blocking
// call on an index from before the restart would wait the whole waitTime,
// so a watch asks without blocking (index 0) after its own failed call,
// after an answer whose index went backwards, after an answer that broke
// off the wait with nothing new (an agent shutting down), and when another
// watch of the same datacenter saw one of these (restarts). An answer that
// loses everything after that is held for the hold time, counted from the
// first such answer.
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
	restarts := c.restartSignal(dc)
	for {
		if !limit.wait(ctx) {
			return
		}
		wait := waitTime
		if !lossSince.IsZero() {
			// Wake up when the hold ends even if nothing changes.
			wait = min(wait, max(time.Until(lossSince.Add(c.hold)), time.Millisecond))
		}
		if at := f.wake(); !at.IsZero() {
			wait = min(wait, max(time.Until(at), time.Millisecond))
		}
		restarted, n := restarts.current()
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
				restarts.raise()
			}
			f.failed(err, failures)
			if !SleepCtx(ctx, backoff(failures)) {
				return
			}
			continue
		}
		failures = 0
		switch {
		case last < seen || last == 0:
			index, suspect = 0, true
			restarts.raise()
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

// restartSignal returns the restart signal of the watches of datacenter
// dc: each datacenter's servers have an index of their own, and one
// unreachable says nothing of the others.
func (c *Consul) restartSignal(dc string) *restartSignal {
	c.restartsMu.Lock()
	defer c.restartsMu.Unlock()
	r := c.restarts[dc]
	if r == nil {
		r = &restartSignal{}
		c.restarts[dc] = r
	}
	return r
}

// restartSignal tells the watches of a datacenter that Consul may have
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

// serviceFollower follows the passing instances of one service in one
// datacenter.
type serviceFollower struct {
	c    *Consul
	w    *watch
	i    int  // the datacenter's index in w.dcs
	disk *Set // the set persisted in state_dir, if any
	self bool // the agent's datacenter name is asked for no more

	set *Set // the last answer
	bad []string
}

func (f *serviceFollower) query(q *api.QueryOptions) (uint64, error) {
	w, d := f.w, f.w.dcs[f.i]
	if f.i == 0 && len(w.dcs) > 1 && !f.self {
		f.learnDatacenter(q)
	}
	entries, meta, err := f.c.client.Health().ServiceMultipleTags(w.svc.Name, w.svc.Tags, true, q)
	if err != nil {
		return 0, err
	}
	f.set, f.bad = f.c.setFromEntries(w.name, entries, time.Now())
	w.mu.Lock()
	f.set.Datacenter = d.name
	w.mu.Unlock()
	return meta.LastIndex, nil
}

// learnDatacenter asks the agent for the name of its datacenter, the
// service's own when none is configured: the metrics and /status name it,
// and a failover list that names it is a mistake.
func (f *serviceFollower) learnDatacenter(q *api.QueryOptions) {
	w := f.w
	w.mu.Lock()
	known := w.dcs[0].name != ""
	w.mu.Unlock()
	if known {
		f.self = true
		return
	}
	var self struct{ Config struct{ Datacenter string } }
	if _, err := f.c.client.Raw().Query("/v1/agent/self", &self, (&api.QueryOptions{}).WithContext(q.Context())); err != nil {
		// Without agent:read the name stays unknown ("local"); other
		// errors fail the query that follows as well.
		if strings.Contains(err.Error(), "403") || strings.Contains(err.Error(), "Permission denied") {
			f.self = true
			f.c.log.Warn("cannot learn the agent's datacenter (no agent:read); calling it local", "service", w.name, "err", err)
		}
		return
	}
	f.self = true
	name := self.Config.Datacenter
	if name == "" {
		return
	}
	w.mu.Lock()
	w.dcs[0].name = name
	var cancels []func()
	for _, d := range w.dcs[1:] {
		if d.name == name && d.ignored == "" {
			d.ignored = "is the service's own datacenter (the agent's): consul.failover should list only other datacenters"
			d.known = false
			cancels = append(cancels, d.cancel)
		}
	}
	w.mu.Unlock()
	for _, cancel := range cancels {
		f.c.log.Error("consul.failover lists the service's own datacenter; ignoring that entry", "service", w.name, "datacenter", name)
		cancel()
	}
}

func (f *serviceFollower) failed(err error, failures int) {
	f.c.watchFailed(f.w, f.i, err, failures, f.disk)
}

func (f *serviceFollower) loses() bool {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	return f.w.losesLocked(f.i, f.set)
}

// losesLocked reports whether set drops every instance that the
// datacenter at index i had, or, before its first answer, that the set
// published from state_dir had. The caller holds w.mu.
func (w *watch) losesLocked(i int, set *Set) bool {
	prev := w.dcs[i].set
	if prev == nil && w.fromDisk && (i == 0 || w.last.Datacenter == w.dcs[i].name) {
		prev = w.last
	}
	return len(set.Instances) == 0 && prev != nil && len(prev.Instances) > 0
}

func (f *serviceFollower) apply(now, holdUntil time.Time) bool {
	c, w := f.c, f.w
	w.mu.Lock()
	d := w.dcs[f.i]
	if d.ignored != "" {
		w.mu.Unlock()
		return false
	}
	if !slices.Equal(f.bad, d.problems) {
		for _, b := range f.bad {
			c.log.Warn("ignoring malformed Consul data", "service", w.name, "datacenter", d.name, "problem", b)
		}
		d.problems = f.bad
	}
	if !holdUntil.IsZero() {
		prev := d.set
		if prev == nil {
			prev = w.last
		}
		d.status.LastError = fmt.Sprintf("Consul at %s returned no instances%s right after an outage or index reset; keeping the last %d instances until %s",
			c.cfg.Address, inDatacenter(d.name, f.i), len(prev.Instances), holdUntil.Format(time.RFC3339))
		d.status.LastErrorAt = now
		d.status.Stale = true
		w.mu.Unlock()
		return false
	}
	changed := d.take(f.set, now)
	d.status = Status{Source: "consul", Service: w.name, LastUpdate: now, Problems: f.bad}
	w.mu.Unlock()
	c.decide(w, now)
	return changed
}

func (f *serviceFollower) wake() time.Time {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	return f.w.wake
}

// inDatacenter words where a failover datacenter's answer came from; ""
// for the service's own.
func inDatacenter(name string, i int) string {
	if i == 0 {
		return ""
	}
	return " in " + name
}

// queryFollower follows the answers of a prepared query. Consul runs the
// query's failover: an answer comes from the first datacenter, in the
// query's order, that has instances, and says how many it tried before.
type queryFollower struct {
	c    *Consul
	w    *watch
	disk *Set
	// last is when the last call started.
	last time.Time

	set *Set // the last answer
	bad []string
	// dc is the answer's datacenter and rank the datacenters Consul tried
	// before it (Failovers).
	dc   string
	rank int
}

func (f *queryFollower) query(q *api.QueryOptions) (uint64, error) {
	if !f.last.IsZero() {
		// Consul cannot block on a prepared query: poll.
		if !SleepCtx(q.Context(), time.Until(f.last.Add(queryPollInterval))) {
			return 0, q.Context().Err()
		}
	}
	f.last = time.Now()
	nq := (&api.QueryOptions{Datacenter: q.Datacenter}).WithContext(q.Context())
	resp, meta, err := f.c.client.PreparedQuery().Execute(f.w.svc.Query, nq)
	if err != nil {
		return 0, err
	}
	if len(resp.Nodes) == 0 && f.rank > 0 && f.dc != "" {
		if err := f.reachable(q, resp.Service); err != nil {
			return 0, err
		}
	}
	entries := make([]*api.ServiceEntry, len(resp.Nodes))
	for i := range resp.Nodes {
		entries[i] = &resp.Nodes[i]
	}
	f.set, f.bad = f.c.setFromEntries(f.w.name, entries, time.Now())
	f.set.Datacenter = resp.Datacenter
	f.dc, f.rank = resp.Datacenter, resp.Failovers
	if len(f.set.Instances) == 0 {
		// Found nothing anywhere: counted as the query's own
		// datacenter's answer, whose name Consul does not reliably give
		// then (it may name another datacenter it tried).
		f.dc, f.rank = "", 0
	}
	// The index of an execution is not a raft index that can be waited
	// on; Consul sets it to 1 at least.
	return max(meta.LastIndex, 1), nil
}

// reachable checks, when a query that served from a failover datacenter
// (f.dc) finds no instance at all, that the datacenter can still be
// reached. Consul answers a query whose failover datacenters it cannot
// reach as if they had no instance; asked directly for the service, the
// datacenter's servers answer, or Consul says they cannot be reached. An
// error here is a failed query, which keeps the last instances, as a
// Consul outage does: a WAN link cut between Consul servers says nothing
// of the instances themselves, which health checks judge.
func (f *queryFollower) reachable(q *api.QueryOptions, service string) error {
	if service == "" {
		return nil
	}
	dq := (&api.QueryOptions{Datacenter: f.dc}).WithContext(q.Context())
	_, _, err := f.c.client.Health().Service(service, "", true, dq)
	if se, ok := errors.AsType[api.StatusError](err); ok && se.Code == http.StatusForbidden {
		// The datacenter answered, refusing a token that may execute
		// the query but not read the service: in reach, and the empty
		// answer stands.
		return nil
	}
	if err != nil {
		return &unreachableDC{dc: f.dc, rank: f.rank, err: err}
	}
	return nil
}

// unreachableDC is a failover datacenter of a prepared query, dc, that
// cannot be asked, rank the datacenters the query tries before it.
type unreachableDC struct {
	dc   string
	rank int
	err  error
}

func (e *unreachableDC) Error() string { return e.err.Error() }
func (e *unreachableDC) Unwrap() error { return e.err }

func (f *queryFollower) failed(err error, failures int) {
	// A failover datacenter out of reach is that datacenter's failure;
	// anything else is the query's.
	i := 0
	if ue, ok := errors.AsType[*unreachableDC](err); ok {
		// The answer that named it may not have been applied (one
		// dropped for a Consul restart seen meanwhile).
		i = ue.rank
		f.w.mu.Lock()
		if d := f.dcAt(i); d.name == "" {
			d.name = ue.dc
		}
		f.w.mu.Unlock()
	}
	f.c.watchFailed(f.w, i, err, failures, f.disk)
}

// dcAt returns the state of the datacenter the query tries after rank
// others, made if no answer came from that far yet. w.mu is held.
func (f *queryFollower) dcAt(rank int) *dcState {
	w := f.w
	for len(w.dcs) <= rank {
		w.dcs = append(w.dcs, &dcState{status: Status{Source: "consul", Service: w.name, Stale: true}})
	}
	return w.dcs[rank]
}

func (f *queryFollower) loses() bool {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	prev := f.w.last
	return len(f.set.Instances) == 0 && prev != nil && len(prev.Instances) > 0
}

func (f *queryFollower) apply(now, holdUntil time.Time) bool {
	c, w := f.c, f.w
	w.mu.Lock()
	d := f.dcAt(f.rank)
	if !slices.Equal(f.bad, d.problems) {
		for _, b := range f.bad {
			c.log.Warn("ignoring malformed Consul data", "service", w.name, "query", w.svc.Query, "problem", b)
		}
		d.problems = f.bad
	}
	if !holdUntil.IsZero() {
		w.dcs[0].status.LastError = fmt.Sprintf("Consul at %s returned no instances for prepared query %q right after an outage or index reset; keeping the last %d instances until %s",
			c.cfg.Address, w.svc.Query, len(w.last.Instances), holdUntil.Format(time.RFC3339))
		w.dcs[0].status.LastErrorAt = now
		w.dcs[0].status.Stale = true
		w.mu.Unlock()
		return false
	}
	// The datacenters Consul tried before the answer's had nothing; with
	// no instance at all, it tried every one.
	tried := w.dcs[:f.rank]
	if len(f.set.Instances) == 0 {
		tried = w.dcs[1:]
	}
	changed := false
	for _, o := range tried {
		empty := NewSet(w.name, "consul", nil, now)
		empty.Datacenter = o.name
		changed = o.take(empty, now) || changed
		o.status = Status{Source: "consul", Service: w.name, LastUpdate: now}
	}
	if f.dc != "" {
		d.name = f.dc
	}
	changed = d.take(f.set, now) || changed
	d.status = Status{Source: "consul", Service: w.name, LastUpdate: now, Problems: f.bad}
	w.mu.Unlock()
	c.decide(w, now)
	return changed
}

func (f *queryFollower) wake() time.Time { return time.Time{} }

// decide chooses the datacenter w serves from and publishes its
// instances if they differ from those published.
func (c *Consul) decide(w *watch, now time.Time) {
	decided, changed := c.choosePublish(w, now)
	if decided {
		c.noteDelivered()
	}
	if changed {
		c.persist()
	}
}

// choosePublish is decide's part under w.pubMu; it reports whether a
// datacenter was chosen, and whether what was published changed.
func (c *Consul) choosePublish(w *watch, now time.Time) (decided, changed bool) {
	w.pubMu.Lock()
	// Deferred: a publisher that panics must not leave the watch, which
	// starts again, locked out.
	defer w.pubMu.Unlock()
	w.mu.Lock()
	if w.ctx.Err() != nil {
		w.mu.Unlock()
		return false, false
	}
	ch := choose(w.dcs, w.serving, w.hold, now)
	w.wake = ch.wake
	if ch.next < 0 {
		w.reason = ch.reason
		w.mu.Unlock()
		return false, false
	}
	d := w.dcs[ch.next]
	set := d.set
	prev := w.last
	if len(set.Instances) == 0 && prev != nil && len(prev.Routes) > 0 && !slices.Equal(set.Routes, prev.Routes) {
		// Routes come from the tags of passing instances: keep them while
		// none passes, so that the route answers 503 instead of falling
		// through to a shorter prefix.
		s := *set
		s.Routes = prev.Routes
		set = &s
	}
	// With a prepared query, the datacenter at an index may change.
	from, fromDC := w.serving, w.servingDC
	switched := from != ch.next || (w.svc.Query != "" && fromDC != d.name)
	if switched {
		w.since = now
	}
	w.serving, w.servingDC = ch.next, d.name
	w.reason = ch.reason
	changed = prev == nil || !sameSet(prev, set)
	if changed {
		w.last = set
	}
	w.published, w.fromDisk = true, false
	var names []string
	if w.svc.hasFailover() {
		for _, o := range w.dcs {
			names = append(names, o.name)
		}
	}
	w.mu.Unlock()
	if names != nil {
		setServing(w, names, d.name)
		if switched && from >= 0 {
			failovers(w.name, fromDC, d.name).Inc()
			msg := "failing over to another datacenter"
			if ch.next < from {
				msg = "going back to a preferred datacenter"
			}
			c.log.Warn(msg, "service", w.name, "from", dcLabel(fromDC), "to", dcLabel(d.name), "reason", ch.reason)
		}
	}
	if changed {
		w.updates.Inc()
		c.log.Info("instances updated", "service", w.name, "datacenter", d.name, "instances", len(set.Instances), "routes", len(set.Routes))
		c.pub.Publish(set)
	}
	return true, changed
}

// failovers returns the counter of switches of service from one
// datacenter to another.
func failovers(service, from, to string) *metrics.Counter {
	return metrics.GetOrCreateCounter(fmt.Sprintf(`edgelb_discovery_failovers_total{service=%q,from=%q,to=%q}`, service, dcLabel(from), dcLabel(to)))
}

func (c *Consul) watchFailed(w *watch, i int, err error, failures int, disk *Set) {
	w.errors.Inc()
	w.mu.Lock()
	d := w.dcs[i]
	name := d.name
	msg := describeConsulErr(c.cfg.Address, err)
	if i > 0 && strings.Contains(err.Error(), "Unexpected response code: 5") {
		// The agent answered; what failed lies beyond it.
		msg = fmt.Sprintf("Consul at %s cannot query datacenter %s: %v", c.cfg.Address, name, err)
	}
	d.status.LastError = msg
	d.status.LastErrorAt = time.Now()
	d.status.Stale = true
	// A datacenter that fails before its first answer has, as far as
	// anyone knows, no instance: the others need not wait for it.
	first := !d.known
	d.known = d.known || d.ignored == ""
	published := w.published
	w.mu.Unlock()
	if failures == 1 || failures%30 == 0 {
		c.log.Error("Consul watch failed; keeping the last known instances", "service", w.name, "datacenter", name, "err", msg, "failures", failures)
	}
	if !published && disk != nil {
		c.publishFromDisk(w, disk)
	}
	if first || failures == 1 {
		// The reason shown in /status names the failure.
		c.decide(w, time.Now())
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

func (f *catalogFollower) wake() time.Time { return time.Time{} }

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
	stopped := make([]*watch, 0, len(gone))
	for _, name := range gone {
		w := c.watches[name]
		w.stop()
		stopped = append(stopped, w)
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
	for i, name := range gone {
		// Under the watch's publishing lock: a publication that began
		// before the watch stopped ends before the removal, and none
		// begins after it (choosePublish checks the watch's context).
		w := stopped[i]
		w.pubMu.Lock()
		c.pub.Remove(name)
		w.pubMu.Unlock()
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
			if !SleepCtx(ctx, backoff(n)) {
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
		if !SleepCtx(ctx, d) {
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

// SleepCtx sleeps for d and reports whether ctx is still alive.
func SleepCtx(ctx context.Context, d time.Duration) bool {
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

// sameSet reports whether two sets route the same way, from the same
// datacenter.
func sameSet(a, b *Set) bool {
	return reflect.DeepEqual(a.Instances, b.Instances) && reflect.DeepEqual(a.Routes, b.Routes) && a.Datacenter == b.Datacenter
}
