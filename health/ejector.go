package health

import (
	"fmt"
	"log/slog"
	"math"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/edgelb/edgelb/internal/panics"
)

// maxWindowBuckets bounds the intervals a window may span.
const maxWindowBuckets = 120

// DefaultPanicThreshold is the share of available backends, in percent,
// below which a pool enters panic mode, when the caller does not choose.
const DefaultPanicThreshold = 50

// Ejector compares the backends of one pool with each other. Every
// PassiveConfig.Interval it ejects the outliers that live traffic shows
// (success rate, failure percentage, latency), and decides panic mode. It
// also holds the pool's ejection budget (max_ejection_percent), which every
// budgeted ejection of the pool's targets respects.
//
// The request path only reads Panic; Target.Done feeds the counters the
// Ejector reads. All methods are safe for concurrent use.
type Ejector struct {
	service        string
	cfg            PassiveConfig
	panicThreshold int
	log            *slog.Logger
	// panicLog is log without the component, which the panic log names
	// itself.
	panicLog *slog.Logger

	panic      atomic.Bool
	panicSince atomic.Int64
	targets    atomic.Pointer[[]*Target]
	// backup is the Ejector of the pool's backup set, if it has one: panic
	// mode then waits until no backend of either set is available.
	backup atomic.Pointer[Ejector]

	// lastRefusalLog rate-limits the log of refused ejections (unix nano).
	lastRefusalLog atomic.Int64

	// mu guards the fields below (slow path).
	mu      sync.Mutex
	windows map[*Target]*window
	running bool
	closed  bool

	m    *ejectorMetrics
	stop chan struct{}
	done chan struct{}
}

// NewEjector returns the Ejector of service's pool. panicThreshold is the
// percentage of available backends below which the pool is in panic mode;
// 0 turns panic mode off. Its work starts with the first SetTargets and
// ends with Close.
func (r *Registry) NewEjector(service string, cfg PassiveConfig, panicThreshold int) *Ejector {
	log := r.log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	e := &Ejector{
		service:        service,
		cfg:            cfg,
		panicThreshold: panicThreshold,
		log:            log.With("component", "health", "service", service),
		panicLog:       log,
		windows:        make(map[*Target]*window),
		m:              r.ejectorMetrics(service),
		stop:           make(chan struct{}),
		done:           make(chan struct{}),
	}
	e.targets.Store(&[]*Target{})
	e.m.current.Store(e)
	return e
}

// NewBackup returns the Ejector of the backup set of e's pool: it compares
// the backups with each other, holds their own ejection budget and counts
// into e's series. It never decides panic mode; e does, counting the
// backups' targets too (see InPanicWithBackups). Close it as e.
func (e *Ejector) NewBackup() *Ejector {
	b := &Ejector{
		service: e.service,
		cfg:     e.cfg,
		log:     e.log.With("set", "backup"),
		windows: make(map[*Target]*window),
		m:       e.m,
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	b.targets.Store(&[]*Target{})
	e.backup.Store(b)
	return b
}

// ejectorMetrics are the series of a service's outlier detection. The
// Registry keeps them until it is closed, shared by the successive
// Ejectors of the service (a reload builds the new pool before it retires
// the old one), so that the counters only ever grow.
type ejectorMetrics struct {
	set          *metrics.Set
	ejections    [numRules]*metrics.Counter
	refusals     *metrics.Counter
	panicEntered *metrics.Counter
	// current is the Ejector whose panic mode the gauge shows.
	current atomic.Pointer[Ejector]
}

// ejectorMetrics returns the series of service, made on first use.
func (r *Registry) ejectorMetrics(service string) *ejectorMetrics {
	r.mu.Lock()
	defer r.mu.Unlock()
	if m := r.series[service]; m != nil {
		return m
	}
	s := metrics.NewSet()
	m := &ejectorMetrics{
		set:          s,
		refusals:     s.NewCounter(fmt.Sprintf(`edgelb_ejections_refused_total{service=%q}`, service)),
		panicEntered: s.NewCounter(fmt.Sprintf(`edgelb_panic_mode_entries_total{service=%q}`, service)),
	}
	for r := rule(0); r < numRules; r++ {
		m.ejections[r] = s.NewCounter(fmt.Sprintf(`edgelb_outlier_ejections_total{service=%q,rule=%q}`, service, r))
	}
	s.NewGauge(fmt.Sprintf(`edgelb_panic_mode{service=%q}`, service), func() float64 {
		if e := m.current.Load(); e != nil && e.panic.Load() {
			return 1
		}
		return 0
	})
	if !r.closed {
		metrics.RegisterSet(s)
	}
	r.series[service] = m
	return m
}

// Panic reports whether the pool is in panic mode: too few of its
// backends are available, so every backend gets traffic.
//
// Fast path: one atomic load.
func (e *Ejector) Panic() bool { return e.panic.Load() }

// PanicSince returns when the current panic mode began; zero if none.
func (e *Ejector) PanicSince() time.Time {
	if !e.panic.Load() {
		return time.Time{}
	}
	return time.Unix(0, e.panicSince.Load())
}

// SetTargets replaces the targets of the pool (slow path) and starts the
// background comparison on the first call. The pool starts the active
// checks of its targets first: a target that failed active checks and has
// none left to revise that verdict (resumed after a reload that removed
// them, say) is readmitted, instead of staying out for good.
func (e *Ejector) SetTargets(ts []*Target) {
	for _, t := range ts {
		if t.probes.Load() == 0 && t.activeFailing.Load() {
			t.setActive(true, "no active check left to confirm that active checks failed")
		}
	}
	ts = append([]*Target(nil), ts...)
	ejectMu.Lock()
	for _, t := range *e.targets.Load() {
		t.leave(e)
	}
	for _, t := range ts {
		t.join(e)
	}
	e.targets.Store(&ts)
	ejectMu.Unlock()

	e.mu.Lock()
	defer e.mu.Unlock()
	for _, t := range ts {
		if e.windows[t] == nil {
			e.windows[t] = newWindow(e.cfg, t)
		}
	}
	if !e.closed && !e.running {
		e.running = true
		go e.run()
	}
}

// Close stops the comparison and drops the pool's ejection budget; the
// panic gauge stops showing it. Panic keeps its last value.
func (e *Ejector) Close() {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return
	}
	e.closed = true
	running := e.running
	close(e.stop)
	e.mu.Unlock()
	if running {
		<-e.done
	}
	ejectMu.Lock()
	for _, t := range *e.targets.Load() {
		t.leave(e)
	}
	ejectMu.Unlock()
	e.m.current.CompareAndSwap(e, nil)
}

// join and leave add and remove a pool's Ejector; the caller holds ejectMu.
func (t *Target) join(e *Ejector) {
	var gs []*Ejector
	if old := t.groups.Load(); old != nil {
		gs = append(gs, *old...)
	}
	gs = append(gs, e)
	t.groups.Store(&gs)
}

func (t *Target) leave(e *Ejector) {
	old := t.groups.Load()
	if old == nil {
		return
	}
	gs := make([]*Ejector, 0, len(*old))
	for _, g := range *old {
		if g != e {
			gs = append(gs, g)
		}
	}
	t.groups.Store(&gs)
}

// mayEject reports whether one more of the pool's backends may be ejected
// at now. The caller holds ejectMu.
func (e *Ejector) mayEject(now int64) bool {
	ts := *e.targets.Load()
	ejected := 0
	for _, t := range ts {
		if State(t.state.Load()) == StateEjected && now < t.ejectedUntil.Load() {
			ejected++
		}
	}
	return ejected < max(1, len(ts)*e.cfg.maxEjectionPercent()/100)
}

// refusalLogInterval rate-limits the log of refused ejections: an outlier
// kept in rotation would otherwise be reported on every sweep.
const refusalLogInterval = 10 * time.Second

// refused records an ejection that the budget did not allow.
func (e *Ejector) refused(t *Target, reason string) {
	e.m.refusals.Inc()
	now := time.Now().UnixNano()
	if last := e.lastRefusalLog.Load(); now-last < int64(refusalLogInterval) || !e.lastRefusalLog.CompareAndSwap(last, now) {
		return
	}
	e.log.Info("backend kept in rotation: max_ejection_percent of the pool already ejected",
		"addr", t.addr, "max_ejection_percent", e.cfg.maxEjectionPercent(), "would_eject_for", reason)
}

func (e *Ejector) run() {
	defer close(e.done)
	t := time.NewTicker(e.cfg.interval())
	defer t.Stop()
	for {
		select {
		case <-e.stop:
			return
		case now := <-t.C:
			e.sweepSafe(now)
		}
	}
}

// sweepSafe runs one sweep; a panic in it is counted and logged, and the
// next sweep still runs.
func (e *Ejector) sweepSafe(now time.Time) {
	panics.Health.Run(func() { e.sweep(now) }, e.panicLog, "panic in outlier detection", "service", e.service)
}

// sweep moves every target's window one interval on, ejects the outliers
// and updates panic mode.
func (e *Ejector) sweep(now time.Time) {
	ns := now.UnixNano()
	ts := *e.targets.Load()
	for _, o := range findOutliers(&e.cfg, e.advanceWindows(ts, ns)) {
		reason := fmt.Sprintf("%s over the last %s", o.reason, e.cfg.window())
		if o.t.eject(ns, reason, true) {
			e.m.ejections[o.rule].Inc()
			e.resetWindow(o.t)
		}
	}
	e.updatePanic(ts, ns)
}

// advanceWindows moves the windows of ts one interval on, drops those of
// targets gone, and returns the traffic of the targets available at now.
// Unlocking is deferred so that a panic, which sweepSafe survives, does not
// leave e.mu locked.
func (e *Ejector) advanceWindows(ts []*Target, now int64) []backendStats {
	stats := make([]backendStats, 0, len(ts))
	e.mu.Lock()
	defer e.mu.Unlock()
	seen := make(map[*Target]bool, len(ts))
	for _, t := range ts {
		seen[t] = true
		w := e.windows[t]
		if w == nil {
			w = newWindow(e.cfg, t)
			e.windows[t] = w
		}
		w.advance(t)
		if t.Available(now) {
			stats = append(stats, backendStats{t: t, sample: w.sum})
		}
	}
	for t := range e.windows {
		if !seen[t] {
			delete(e.windows, t)
		}
	}
	return stats
}

// resetWindow forgets the traffic of an ejected target.
func (e *Ejector) resetWindow(t *Target) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if w := e.windows[t]; w != nil {
		w.reset()
	}
}

// updatePanic enters or leaves panic mode, logging and counting the change.
func (e *Ejector) updatePanic(ts []*Target, now int64) {
	avail := countAvailable(ts, now)
	var bts []*Target
	if b := e.backup.Load(); b != nil {
		bts = *b.targets.Load()
	}
	bavail := countAvailable(bts, now)
	on := InPanicWithBackups(avail, len(ts), bavail, len(bts), e.panicThreshold)
	if on == e.panic.Load() {
		return
	}
	attrs := []any{"available", avail, "backends", len(ts)}
	if len(bts) > 0 {
		attrs = append(attrs, "backups_available", bavail, "backups", len(bts))
	}
	if on {
		e.panicSince.Store(now)
		e.m.panicEntered.Inc()
		e.log.Warn("panic mode: too few backends available, routing to all of them since the checks may be wrong",
			append(attrs, "panic_threshold_percent", e.panicThreshold)...)
	} else {
		e.log.Info("panic mode over", append(attrs,
			"lasted", time.Duration(now-e.panicSince.Load()).Round(time.Millisecond).String())...)
	}
	e.panic.Store(on)
}

func countAvailable(ts []*Target, now int64) int {
	n := 0
	for _, t := range ts {
		if t.Available(now) {
			n++
		}
	}
	return n
}

// InPanic reports whether a pool with available of its n backends
// available is in panic mode under threshold (percent; 0 is off).
func InPanic(available, n, threshold int) bool {
	return threshold > 0 && n > 0 && available*100 < threshold*n
}

// InPanicWithBackups is InPanic for a pool that also has backups, of which
// backupsAvailable are available. Backups are the pool's answer to its
// primaries failing: while any backend of either set is available, there
// is no panic. With no backups it is InPanic.
func InPanicWithBackups(available, n, backupsAvailable, backups, threshold int) bool {
	if backups == 0 {
		return InPanic(available, n, threshold)
	}
	return threshold > 0 && available == 0 && backupsAvailable == 0
}

// sample is what a target's counters moved by over some time.
type sample struct {
	requests, failures, answered, latencyNs uint64
}

func (s *sample) add(o sample) {
	s.requests += o.requests
	s.failures += o.failures
	s.answered += o.answered
	s.latencyNs += o.latencyNs
}

func (s *sample) sub(o sample) {
	s.requests -= o.requests
	s.failures -= o.failures
	s.answered -= o.answered
	s.latencyNs -= o.latencyNs
}

// window is a target's traffic over the last Window, one bucket per
// Interval.
type window struct {
	last    sample // the target's totals at the previous sweep
	buckets []sample
	i       int
	sum     sample
}

func newWindow(cfg PassiveConfig, t *Target) *window {
	n := int((cfg.window() + cfg.interval() - 1) / cfg.interval())
	n = min(max(n, 1), maxWindowBuckets)
	return &window{last: totals(t), buckets: make([]sample, n)}
}

func totals(t *Target) sample {
	answered, gw := t.answered.Load(), t.gatewayFails.Load()
	return sample{requests: answered + gw, failures: t.serverErrors.Load() + gw, answered: answered, latencyNs: t.latencyNs.Load()}
}

// advance adds the traffic since the previous sweep as the newest bucket,
// dropping the oldest.
func (w *window) advance(t *Target) {
	now := totals(t)
	d := now
	d.sub(w.last)
	w.last = now
	w.i = (w.i + 1) % len(w.buckets)
	w.sum.sub(w.buckets[w.i])
	w.buckets[w.i] = d
	w.sum.add(d)
}

// reset forgets the traffic seen so far: a readmitted backend is judged on
// what it does after its ejection.
func (w *window) reset() {
	clear(w.buckets)
	w.sum = sample{}
}

// backendStats is one available backend's traffic over the window.
type backendStats struct {
	t *Target
	sample
}

func (b *backendStats) successRate() float64 {
	return 1 - float64(b.failures)/float64(b.requests)
}

func (b *backendStats) failurePercent() float64 {
	return 100 * float64(b.failures) / float64(b.requests)
}

func (b *backendStats) meanLatency() time.Duration {
	return time.Duration(b.latencyNs / b.answered)
}

// rule names what made a backend an outlier.
type rule uint8

const (
	ruleSuccessRate rule = iota
	ruleFailurePercentage
	ruleLatency
	numRules
)

func (r rule) String() string {
	switch r {
	case ruleSuccessRate:
		return "success_rate"
	case ruleFailurePercentage:
		return "failure_percentage"
	case ruleLatency:
		return "latency"
	}
	return "unknown"
}

type outlier struct {
	t      *Target
	rule   rule
	reason string
	// severity orders outliers so that the worst is ejected first when
	// the budget allows only some of them.
	severity float64
}

// minSuccessRateGap is how far below the pool's mean a success rate must
// be for the stdev rule: tiny differences between healthy backends, which
// a small stdev would magnify, eject nobody.
const minSuccessRateGap = 0.05

// findOutliers compares the backends in st with each other and returns the
// outliers, worst first. A backend is judged only with MinRequests in the
// window, and only when MinHosts backends have that many.
func findOutliers(cfg *PassiveConfig, st []backendStats) []outlier {
	minReq := cfg.minRequests()
	var judged []*backendStats
	for i := range st {
		if st[i].requests >= minReq {
			judged = append(judged, &st[i])
		}
	}
	if len(judged) < cfg.minHosts() {
		return nil
	}
	var out []outlier
	found := make(map[*Target]bool)
	add := func(o outlier) {
		if !found[o.t] {
			found[o.t] = true
			out = append(out, o)
		}
	}

	// Success rate: below the mean by more than factor standard deviations.
	if f := cfg.stdevFactor(); f > 0 {
		var sum, sq float64
		for _, b := range judged {
			sr := b.successRate()
			sum += sr
			sq += sr * sr
		}
		n := float64(len(judged))
		mean := sum / n
		stdev := math.Sqrt(max(0, sq/n-mean*mean))
		limit := min(mean-f*stdev, mean-minSuccessRateGap)
		for _, b := range judged {
			if sr := b.successRate(); sr < limit {
				add(outlier{t: b.t, rule: ruleSuccessRate, severity: 1 + mean - sr,
					reason: fmt.Sprintf("success rate %.1f%% of %d requests, below the pool's mean %.1f%% minus %g stdev (%.1f%%)",
						100*sr, b.requests, 100*mean, f, 100*stdev)})
			}
		}
	}

	// Failure percentage: failing often while most others rarely do. The
	// median of the others, not their total, so that a few bad backends
	// do not shield each other.
	if fp := cfg.failurePercentage(); fp > 0 {
		pcts := make([]float64, 0, len(judged)-1)
		for _, b := range judged {
			pct := b.failurePercent()
			if pct < fp {
				continue
			}
			pcts = pcts[:0]
			for _, p := range judged {
				if p != b {
					pcts = append(pcts, p.failurePercent())
				}
			}
			if others := median(pcts); others < fp/2 {
				add(outlier{t: b.t, rule: ruleFailurePercentage, severity: 1 + pct/100,
					reason: fmt.Sprintf("%.1f%% of %d requests failed (failure_percentage %g), the other backends' median %.1f%%",
						pct, b.requests, fp, others)})
			}
		}
	}

	// Latency: much slower than the median of the others.
	if lf := cfg.latencyFactor(); lf > 0 {
		var lat []*backendStats
		for _, b := range judged {
			if b.answered >= minReq {
				lat = append(lat, b)
			}
		}
		if len(lat) >= cfg.minHosts() {
			means := make([]float64, 0, len(lat)-1)
			for _, b := range lat {
				mean := b.meanLatency()
				if mean < cfg.latencyMin() {
					continue
				}
				means = means[:0]
				for _, p := range lat {
					if p != b {
						means = append(means, float64(p.meanLatency()))
					}
				}
				median := time.Duration(median(means))
				if float64(mean) > lf*float64(median) {
					ratio := float64(mean) / float64(max(median, 1))
					add(outlier{t: b.t, rule: ruleLatency, severity: ratio / (ratio + 1),
						reason: fmt.Sprintf("mean latency %s over %d requests, %.1fx the median of the other backends (%s; latency_factor %g)",
							mean.Round(time.Microsecond), b.answered, ratio, median.Round(time.Microsecond), lf)})
				}
			}
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].severity > out[j].severity })
	return out
}

// median returns the median of vs, reordering them; 0 if there are none.
func median(vs []float64) float64 {
	if len(vs) == 0 {
		return 0
	}
	sort.Float64s(vs)
	m := vs[len(vs)/2]
	if len(vs)%2 == 0 {
		m = (vs[len(vs)/2-1] + m) / 2
	}
	return m
}
