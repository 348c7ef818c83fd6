package balancer

import (
	"math/rand/v2"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/stale"
	"github.com/edgelb/edgelb/discovery"
	"github.com/edgelb/edgelb/health"
)

// Backend is one instance of a service as the balancer uses it: its
// connection pool, its shared health state and its metrics.
//
// A Backend keeps its identity across discovery updates for as long as its
// address stays in the service.
type Backend struct {
	addr   string
	weight uint32
	target *health.Target
	client *fasthttp.HostClient
	m      *backendMetrics
	// slowFrom is when the backend joined a pool that already had
	// backends (unix nano), for slow start; 0 if it was there first.
	slowFrom int64
	// stopCheck ends the backend's active checks.
	stopCheck func()
	// ap is the address the event loops connect to; invalid when addr is
	// a name, which only the full path resolves.
	ap netip.AddrPort
	// idleFor is how long an idle connection to it is kept.
	idleFor time.Duration
	// maxConns caps the connections to it.
	maxConns int
	// loopSlots holds each event loop's connections to it; a copy of the
	// backend with another weight shares them.
	loopSlots *backendSlots
	// hedge is its service's hedging, which learns from its answers;
	// nil when off.
	hedge *hedger
	// backup is set when the backend is in its service's backup set;
	// backupAnswers then counts the answers it gives for the service.
	backup        bool
	backupAnswers *metrics.Counter
	// dc is the Consul datacenter it was found in; "" for one not from
	// Consul.
	dc string
}

// backendSlots is a backend's slots, one per event loop, made when a loop
// first needs them.
type backendSlots struct{ slots atomic.Pointer[[]loopSlot] }

// Addr returns the backend's host:port.
func (b *Backend) Addr() string { return b.addr }

// backendSet is an immutable snapshot of a pool's backends.
type backendSet struct {
	list []*Backend
	// cumWeight[i] is the sum of weights of list[:i+1]; nil when all
	// weights are equal.
	cumWeight []uint32
	// rr is the round-robin sequence of the set's role in its pool, kept
	// across updates; nil for an empty set.
	rr *atomic.Uint64
}

// Pool is the set of backends of one service and the policy that picks
// among them. Requests read its backends from an atomic snapshot; updates
// build a new snapshot.
type Pool struct {
	name    string
	cfg     *ServiceConfig
	reg     *health.Registry
	checker *health.Checker

	// tagRouted pools were created for a service found by its tag routes,
	// not named in the config.
	tagRouted bool

	// maxInflight caps concurrent requests per backend; 0 means no cap.
	maxInflight int32

	// ej compares the backends with each other, holds the ejection
	// budget and decides panic mode.
	ej *health.Ejector
	// bej does the same for the backup set, except panic mode; nil when
	// the service has none configured.
	bej *health.Ejector
	// panicThreshold is the percentage of available backends below which
	// the pool routes to all of them; 0 is off.
	panicThreshold int
	// slowStart is the ramp-up time of a returning backend in
	// nanoseconds; 0 is off.
	slowStart int64

	// store keeps responses to serve when backends fail; nil when the
	// service has stale serving disabled.
	store       *stale.Store
	stalePolicy stale.Policy
	staleOn     [numErrCodes]bool
	// staleOnStatus is indexed by status-500 for 500..504.
	staleOnStatus [5]bool
	// fill asks the fleet's other instances for a copy the store lacks;
	// nil in pools built without a Server.
	fill *peerFill

	// hedge is the service's hedging; nil when off.
	hedge *hedger

	// sel is the selection policy's fast path, resolved from
	// ServiceConfig.Balance when the pool is built.
	sel selector

	// set holds the primary backends, backup the backup set (empty when
	// there is none).
	set    atomic.Pointer[backendSet]
	backup atomic.Pointer[backendSet]
	// rr and backupRR are the round-robin sequences of the two sets.
	rr       atomic.Uint64
	backupRR atomic.Uint64
	m        *serviceMetrics
	series   *seriesTable

	// mu serializes updates (slow path).
	mu      sync.Mutex
	retired bool
	// byAddr holds the backends of both sets.
	byAddr   map[string]*Backend
	draining []drainingBackend
	// source and backupSource are the sets discovery last gave for the
	// primaries and the backups; nil until it gave one.
	source       atomic.Pointer[discovery.Set]
	backupSource atomic.Pointer[discovery.Set]
}

type drainingBackend struct {
	b     *Backend
	since time.Time
}

func newPool(name string, cfg *ServiceConfig, reg *health.Registry, checker *health.Checker, store *stale.Store, series *seriesTable) *Pool {
	p := &Pool{name: name, cfg: cfg, reg: reg, checker: checker, byAddr: make(map[string]*Backend), series: series, m: series.service(name)}
	p.set.Store(&backendSet{})
	p.backup.Store(&backendSet{})
	if p.sel = selectors[cfg.Balance]; p.sel == nil {
		panic("BUG: service " + name + " has balance " + strconv.Quote(cfg.Balance) + ": its config was not validated")
	}
	p.maxInflight = int32(cfg.Health.MaxInflight)
	p.panicThreshold = max(cfg.Health.PanicThreshold, 0)
	p.slowStart = int64(cfg.Health.SlowStart)
	p.ej = reg.NewEjector(name, cfg.Health.Passive, p.panicThreshold)
	p.hedge = newHedger(name, cfg.Hedge)
	if cfg.Backup != nil {
		p.bej = p.ej.NewBackup()
	}
	if !cfg.Stale.Disabled && store != nil {
		p.store = store
		p.stalePolicy = stale.Policy{MaxStale: cfg.Stale.MaxStale, IgnoreRevalidate: cfg.Stale.IgnoreRevalidate}
		for _, on := range cfg.Stale.On {
			for c := errCode(1); c < numErrCodes; c++ {
				if c.String() == on {
					p.staleOn[c] = true
				}
			}
			if n, err := strconv.Atoi(on); err == nil && n >= 500 && n <= 504 {
				p.staleOnStatus[n-500] = true
			}
		}
	}
	p.m.pool.Store(p)
	return p
}

// Name returns the service name.
func (p *Pool) Name() string { return p.name }

// update replaces the pool's primary instances with those of s. Backends
// whose address stays keep their connections, health state and metrics.
func (p *Pool) update(s *discovery.Set) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.source.Store(s)
	p.rebuildLocked(time.Now())
}

// updateBackup replaces the pool's backup instances with those of s, as
// update does the primaries. An address that is also a primary is a
// primary only.
func (p *Pool) updateBackup(s *discovery.Set) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.backupSource.Store(s)
	p.rebuildLocked(time.Now())
}

// rebuildLocked publishes both sets from the sources last given. A backend
// that leaves both drains; one that moves between them keeps everything
// but its role.
func (p *Pool) rebuildLocked(now time.Time) {
	// A backend joining a pool that already serves gets slow start; a
	// backup, one joining backups already there.
	hadBackups := len(p.backup.Load().list) > 0
	hadBackends := hadBackups || len(p.set.Load().list) > 0
	keep := make(map[string]bool)
	var primary, backup []*Backend
	if s := p.source.Load(); s != nil {
		primary = p.collectLocked(s.Instances, s.Datacenter, false, hadBackends, now, keep)
	}
	if s := p.backupSource.Load(); s != nil && p.bej != nil {
		backup = p.collectLocked(s.Instances, s.Datacenter, true, hadBackups, now, keep)
	}
	for addr, b := range p.byAddr {
		if !keep[addr] {
			delete(p.byAddr, addr)
			p.draining = append(p.draining, drainingBackend{b: b, since: now})
		}
	}
	p.set.Store(newBackendSet(primary, &p.rr))
	p.backup.Store(newBackendSet(backup, &p.backupRR))
	if !p.retired {
		p.ej.SetTargets(targetsOf(primary))
		if p.bej != nil {
			p.bej.SetTargets(targetsOf(backup))
		}
	}
	p.reapLocked(now, false)
}

// collectLocked returns the backends of the instances not already in keep
// and adds them to it, making the ones that are new (in slow start if
// slow is set, in Consul datacenter dc) and giving the others the weight
// and role asked for.
func (p *Pool) collectLocked(ins []discovery.Instance, dc string, backup, slow bool, now time.Time, keep map[string]bool) []*Backend {
	list := make([]*Backend, 0, len(ins))
	for _, in := range ins {
		if keep[in.Addr] {
			continue
		}
		keep[in.Addr] = true
		b := p.byAddr[in.Addr]
		if b == nil {
			b = p.newBackend(in.Addr)
			b.dc = dc
			if slow {
				b.slowFrom = now.UnixNano()
			}
			if backup {
				b.backup, b.backupAnswers = true, p.m.backupAnswers
			}
			p.byAddr[in.Addr] = b
		}
		w := uint32(max(in.Weight, 1))
		if b.weight != w || b.backup != backup {
			// A copy, so that requests under way keep the backend as
			// they picked it.
			nb := *b
			nb.weight, nb.backup, nb.backupAnswers = w, backup, nil
			if backup {
				nb.backupAnswers = p.m.backupAnswers
			}
			b = &nb
			p.byAddr[in.Addr] = b
		}
		b.m.backup.Store(backup)
		list = append(list, b)
	}
	return list
}

func targetsOf(list []*Backend) []*health.Target {
	ts := make([]*health.Target, len(list))
	for i, b := range list {
		ts[i] = b.target
	}
	return ts
}

// reapLocked releases draining backends that have finished their requests
// or whose address is back in the pool (under a Backend of its own), or all
// of them when force is set.
func (p *Pool) reapLocked(now time.Time, force bool) {
	kept := p.draining[:0]
	for _, d := range p.draining {
		if p.byAddr[d.b.addr] == nil && !force && d.b.target.Inflight() > 0 && now.Sub(d.since) < p.cfg.Timeout+time.Second {
			kept = append(kept, d)
			continue
		}
		p.releaseBackend(d.b)
	}
	clear(p.draining[len(kept):])
	p.draining = kept
}

func (p *Pool) releaseBackend(b *Backend) {
	if b.stopCheck != nil {
		b.stopCheck()
	}
	b.client.CloseIdleConnections()
	b.m.release()
	p.reg.Release(b.target)
}

// reap releases backends that left discovery once they are idle.
func (p *Pool) reap(now time.Time) {
	p.mu.Lock()
	p.reapLocked(now, false)
	p.mu.Unlock()
}

// retire stops the pool's outlier detection; requests still running finish
// normally. Its series carry on in the pool replacing it, if any.
func (p *Pool) retire() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.retired {
		return
	}
	p.retired = true
	p.ej.Close()
	if p.bej != nil {
		p.bej.Close()
	}
	p.m.pool.CompareAndSwap(p, nil)
}

// close releases every backend of the pool.
func (p *Pool) close() {
	p.retire()
	p.mu.Lock()
	defer p.mu.Unlock()
	for addr, b := range p.byAddr {
		p.releaseBackend(b)
		delete(p.byAddr, addr)
	}
	p.reapLocked(time.Now(), true)
	p.set.Store(&backendSet{})
	p.backup.Store(&backendSet{})
}

func (p *Pool) newBackend(addr string) *Backend {
	cfg := p.cfg
	t := p.reg.Acquire(addr, cfg.Health.Passive)
	connectTimeout := cfg.ConnectTimeout
	b := &Backend{addr: addr, weight: 1, target: t, ap: parseAddrPort(addr), idleFor: cfg.MaxIdleConnTime, maxConns: cfg.MaxConns,
		loopSlots: &backendSlots{}, hedge: p.hedge}
	b.client = &fasthttp.HostClient{
		Addr: addr,
		Dial: func(addr string) (net.Conn, error) {
			c, err := fasthttp.DialTimeout(addr, connectTimeout)
			if err != nil {
				return nil, err
			}
			return newPeekConn(c), nil
		},
		// The balancer owns retries, on another backend, within one
		// deadline: the client must not retry behind its back.
		MaxIdemponentCallAttempts: 1,
		RetryIfErr:                func(*fasthttp.Request, int, error) (bool, bool) { return false, false },
		MaxConns:                  cfg.MaxConns,
		MaxIdleConnDuration:       cfg.MaxIdleConnTime,
		MaxResponseBodySize:       cfg.MaxResponseBody,
		ReadBufferSize:            DefaultMaxHeaderBytes,
		NoDefaultUserAgentHeader:  true,
		DisablePathNormalizing:    true,
		// The client gets the backend's header names as sent, and they are
		// not rewritten on every response; edgelb looks response headers
		// up case-insensitively.
		DisableHeaderNamesNormalizing: true,
	}
	b.m = p.series.acquireBackend(p.name, addr, t)
	if a := cfg.Health.Active; a != nil {
		b.stopCheck = p.checker.Watch(t, *a)
	}
	return b
}

func newBackendSet(list []*Backend, rr *atomic.Uint64) *backendSet {
	bs := &backendSet{list: list, rr: rr}
	equal := true
	for _, b := range list {
		if b.weight != list[0].weight {
			equal = false
		}
	}
	if !equal {
		bs.cumWeight = make([]uint32, len(list))
		var sum uint32
		for i, b := range list {
			sum += b.weight
			bs.cumWeight[i] = sum
		}
	}
	return bs
}

// maxTries bounds the attempts of one request.
const maxTries = 8

// tried is the set of backends a request has already used.
type tried struct {
	n  int
	bs [maxTries]*Backend
	// outOfRotation is set when panic mode sent a try to a backend that
	// was not available.
	outOfRotation bool
}

func (t *tried) has(b *Backend) bool {
	for i := 0; i < t.n; i++ {
		if t.bs[i] == b {
			return true
		}
	}
	return false
}

func (t *tried) add(b *Backend) {
	if t.n < maxTries {
		t.bs[t.n] = b
		t.n++
	}
}

// pick returns a backend for a new attempt, or nil when none is available.
// It takes no lock and allocates nothing.
//
// A try goes to an available primary backend; only when no primary is
// available to it (out of rotation, draining, at max_inflight or already
// tried by the request) does it go to a backup, and the last try a
// request's retries allow goes to a backup first. With backups, panic mode
// comes only when no backend of either set is available, and then tries
// the primaries before the backups.
func (p *Pool) pick(now int64, t *tried) *Backend {
	bs, bk := p.set.Load(), p.backup.Load()
	if len(bk.list) == 0 {
		if len(bs.list) == 0 {
			return nil
		}
		if p.ej.Panic() {
			return p.pickPanic(bs, now, t)
		}
		b, held, available := p.pickIn(bs, now, t)
		switch {
		case b != nil:
			return b
		case held != nil:
			return held
		case health.InPanic(available, len(bs.list), p.panicThreshold):
			// Backends went out since the last sweep: panic mode need not
			// wait for it.
			return p.pickPanic(bs, now, t)
		}
		return nil
	}
	return p.pickWithBackups(bs, bk, now, t)
}

// pickWithBackups is pick for a pool with backups. Once no primary is
// available, each pick scans the primaries before it samples the backups
// (slow path).
func (p *Pool) pickWithBackups(bs, bk *backendSet, now int64, t *tried) *Backend {
	if t.n > 0 && t.n == p.cfg.Retries {
		// The last try: a backup is the surest bet after primaries
		// failed this request, however many of them are left.
		if b, held, _ := p.pickIn(bk, now, t); b != nil {
			return b
		} else if held != nil {
			return held
		}
	}
	b, held, available := p.pickIn(bs, now, t)
	if b != nil {
		return b
	}
	bb, bheld, bavailable := p.pickIn(bk, now, t)
	switch {
	case bb != nil:
		return bb
	case held != nil:
		// Slow start ramps a returning primary's traffic up from the
		// backups' share.
		return held
	case bheld != nil:
		return bheld
	case health.InPanicWithBackups(available, len(bs.list), bavailable, len(bk.list), p.panicThreshold):
		if b := p.pickPanic(bs, now, t); b != nil {
			return b
		}
		return p.pickPanic(bk, now, t)
	}
	return nil
}

// pickIn picks among the backends of bs: the least loaded usable one that
// slow start lets through (b), else the least loaded one it holds back
// (held), and how many backends of bs are available. The count is only
// made when the policy's sample is not taken. It allocates nothing.
func (p *Pool) pickIn(bs *backendSet, now int64, t *tried) (b, held *Backend, available int) {
	n := len(bs.list)
	if n == 0 {
		return nil, nil, 0
	}
	// Fast path: the policy's sample, the less loaded one if it took two,
	// if it is usable.
	x, y := p.sel(p, bs)
	if y == x {
		y = nil
	}
	ux := p.usable(x, now, t) && p.warm(x, now)
	uy := y != nil && p.usable(y, now, t) && p.warm(y, now)
	switch {
	case ux && uy:
		return lessLoaded(x, y), nil, 1
	case ux:
		return x, nil, 1
	case uy:
		return y, nil, 1
	}
	// Slow path: scan from a random start for the least loaded usable
	// one, passing over backends that slow start holds back unless
	// nothing else is left. A usable backend of the sample was held back
	// already: one draw per backend and pick keeps slow start's share.
	start := int(rand.Uint64() % uint64(n))
	for i := 0; i < n; i++ {
		c := bs.list[(start+i)%n]
		if !c.target.Available(now) {
			continue
		}
		available++
		if !p.usable(c, now, t) {
			continue
		}
		if c != x && c != y && p.warm(c, now) {
			if b == nil || lessLoaded(c, b) == c {
				b = c
			}
		} else if held == nil || lessLoaded(c, held) == c {
			held = c
		}
	}
	return b, held, available
}

// Which set of backends serves a pool's new requests, as /status and
// edgelb_serving say.
const (
	servingPrimary = "primary"
	servingBackup  = "backup"
	servingPanic   = "panic"
	servingNone    = "none"
)

var servingSets = [...]string{servingPrimary, servingBackup, servingPanic, servingNone}

// serving returns which set serves new requests at now, from the health
// of the backends (not their load): the primaries while one is available,
// else the backups while one is, else panic mode, else none. Without
// backups, panic mode starts below panic_threshold (slow path).
func (p *Pool) serving(now int64) string {
	bs, bk := p.set.Load(), p.backup.Load()
	avail, bavail := countAvailable(bs, now), countAvailable(bk, now)
	switch {
	case health.InPanicWithBackups(avail, len(bs.list), bavail, len(bk.list), p.panicThreshold):
		return servingPanic
	case avail > 0:
		return servingPrimary
	case bavail > 0:
		return servingBackup
	}
	return servingNone
}

func countAvailable(bs *backendSet, now int64) int {
	n := 0
	for _, b := range bs.list {
		if b.target.Available(now) {
			n++
		}
	}
	return n
}

// selector is a selection policy: it samples the backends a new try may
// go to, one, or two that pick compares by load (b nil if one). Each pool
// resolves its policy into one when it is built. It takes nothing of the
// request: a pointer passed through this indirect call would escape.
type selector func(p *Pool, bs *backendSet) (a, b *Backend)

// selectors are the selection policies by their services.NAME.balance name.
var selectors = map[string]selector{
	"p2c":         (*Pool).selectP2C,
	"round_robin": (*Pool).selectRoundRobin,
	"random":      (*Pool).selectRandom,
}

// policyNames lists the selectors for error messages.
const policyNames = "p2c, round_robin, random"

// selectP2C samples two distinct backends by weight (power of two
// choices).
func (p *Pool) selectP2C(bs *backendSet) (*Backend, *Backend) {
	n := len(bs.list)
	r := rand.Uint64()
	a, b := bs.at(r), bs.at(r>>32)
	if a == b && n > 1 {
		b = bs.list[(indexOf(bs, a)+1+int((r>>16)%uint64(n-1)))%n]
	}
	return a, b
}

// selectRoundRobin takes the next backend in turn, by weight.
func (p *Pool) selectRoundRobin(bs *backendSet) (*Backend, *Backend) {
	return bs.at(bs.rr.Add(1)), nil
}

// selectRandom takes a backend at random, by weight.
func (p *Pool) selectRandom(bs *backendSet) (*Backend, *Backend) {
	return bs.at(rand.Uint64()), nil
}

// pickPanic picks in panic mode: the least loaded backend not yet tried,
// whatever its checks say, except draining ones and those whose recent
// requests could not connect, timed out or got garbage (slow path).
func (p *Pool) pickPanic(bs *backendSet, now int64, t *tried) *Backend {
	var best *Backend
	n := len(bs.list)
	start := int(rand.Uint64() % uint64(n))
	for i := 0; i < n; i++ {
		b := bs.list[(start+i)%n]
		if t.has(b) || !b.target.PanicUsable(now) || p.full(b) {
			continue
		}
		if best == nil || lessLoaded(b, best) == b {
			best = b
		}
	}
	if best != nil && !best.target.Available(now) {
		t.outOfRotation = true
	}
	return best
}

// warm reports whether b takes a request now under slow start: a backend
// back in rotation for less than slow_start takes a share of its traffic
// that grows linearly with the time it has been back.
func (p *Pool) warm(b *Backend, now int64) bool {
	ss := p.slowStart
	if ss == 0 {
		return true
	}
	back := b.backFor(now)
	if back >= ss {
		return true
	}
	return back > 0 && rand.Int64N(ss) < back
}

// slowStartPercent returns the share of its traffic, in percent, that
// slow start gives b at now; 100 when it is not held back.
func (p *Pool) slowStartPercent(b *Backend, now int64) int {
	if p.slowStart == 0 {
		return 100
	}
	back := b.backFor(now)
	if back >= p.slowStart {
		return 100
	}
	return int(max(back, 0) * 100 / p.slowStart)
}

// backFor returns how long, in nanoseconds, b has been in rotation at now:
// since it joined the pool or last came back, whichever is later.
func (b *Backend) backFor(now int64) int64 {
	return now - max(b.slowFrom, b.target.AvailableSince())
}

// at maps a random or sequence number to a backend, by weight.
func (bs *backendSet) at(r uint64) *Backend {
	if bs.cumWeight == nil {
		return bs.list[r%uint64(len(bs.list))]
	}
	total := bs.cumWeight[len(bs.cumWeight)-1]
	x := uint32(r % uint64(total))
	i := sort.Search(len(bs.cumWeight), func(i int) bool { return bs.cumWeight[i] > x })
	return bs.list[i]
}

func indexOf(bs *backendSet, b *Backend) int {
	for i, x := range bs.list {
		if x == b {
			return i
		}
	}
	return 0
}

func (p *Pool) usable(b *Backend, now int64, t *tried) bool {
	return !p.full(b) && b.target.Available(now) && !t.has(b)
}

// full reports whether b is at the pool's max_inflight cap.
func (p *Pool) full(b *Backend) bool {
	return p.maxInflight > 0 && b.target.Inflight() >= p.maxInflight
}

// lessLoaded returns whichever of a and b has fewer in-flight requests per
// unit of weight.
func lessLoaded(a, b *Backend) *Backend {
	la := int64(a.target.Inflight()+1) * int64(b.weight)
	lb := int64(b.target.Inflight()+1) * int64(a.weight)
	if lb < la {
		return b
	}
	return a
}

// parseAddrPort parses an IP host:port; it returns the zero AddrPort for a
// name.
func parseAddrPort(addr string) netip.AddrPort {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return netip.AddrPort{}
	}
	return ap
}
