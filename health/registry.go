package health

import (
	"log/slog"
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

// DefaultRetention is how long a Registry keeps the state of a target
// that no pool uses any more, if the state has anything to say.
const DefaultRetention = 5 * time.Minute

// maxRetained bounds the released targets a Registry keeps; the oldest go
// first.
const maxRetained = 4096

// Registry holds one Target per backend address. It is safe for concurrent
// use; it is only used on the slow path (discovery updates and reloads).
//
// A target that no pool uses any more is kept for DefaultRetention when
// it is out of rotation, on probation or has ejections to its name, so
// that an address that leaves discovery and comes back resumes where it
// was: a backend flapping in the registry cannot launder its state.
type Registry struct {
	log *slog.Logger
	// retention is DefaultRetention; tests shorten it.
	retention time.Duration

	mu       sync.Mutex
	targets  map[string]*Target
	released map[string]released
	// order holds the released targets by release time, oldest first;
	// entries resumed or replaced since are skipped when they come up.
	order []released
	// series are the outlier detection metrics of each service.
	series map[string]*ejectorMetrics
	closed bool
}

// released is a target no pool uses, and when the last one let it go.
type released struct {
	t  *Target
	at time.Time
}

// NewRegistry returns an empty registry whose targets log their state
// changes to log (nothing if nil).
func NewRegistry(log *slog.Logger) *Registry {
	return &Registry{log: log, retention: DefaultRetention, targets: make(map[string]*Target), released: make(map[string]released),
		series: make(map[string]*ejectorMetrics)}
}

// Close drops the metrics of the registry's Ejectors, when the balancer
// using it stops.
func (r *Registry) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	for _, m := range r.series {
		metrics.UnregisterSet(m.set, true)
	}
}

// Acquire returns the Target of addr, creating it if needed, and counts one
// more user of it. Every Acquire must be matched by a Release.
//
// A target released less than the retention time ago is resumed with its
// state. Targets in use keep the passive config they were made with; a
// resumed one takes passive.
func (r *Registry) Acquire(addr string, passive PassiveConfig) *Target {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	r.pruneLocked(now)
	t := r.targets[addr]
	if t == nil {
		if rel, ok := r.released[addr]; ok {
			delete(r.released, addr)
			t = rel.t
			if t.passive != passive {
				t = newTarget(addr, passive, r.log).resume(rel.t)
			}
			if r.log != nil {
				st := t.Status(now)
				r.log.Info("backend back; resuming its health state", "addr", addr, "state", st.State, "reason", st.Reason,
					"away", now.Sub(rel.at).Round(time.Millisecond))
			}
		} else {
			t = newTarget(addr, passive, r.log)
		}
		r.targets[addr] = t
	}
	t.refs++
	return t
}

// Release drops one user of t. When nobody uses it, it is forgotten, or
// kept for the retention time if its state has anything to say.
func (r *Registry) Release(t *Target) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t.refs--
	if t.refs > 0 || r.targets[t.addr] != t {
		return
	}
	delete(r.targets, t.addr)
	now := time.Now()
	if t.worthKeeping(now.UnixNano()) {
		rel := released{t: t, at: now}
		r.released[t.addr] = rel
		r.order = append(r.order, rel)
	}
	r.pruneLocked(now)
}

// pruneLocked forgets released targets past the retention time or beyond
// maxRetained. The caller holds r.mu.
func (r *Registry) pruneLocked(now time.Time) {
	drop := 0
	for _, rel := range r.order {
		cur, ok := r.released[rel.t.addr]
		current := ok && cur.t == rel.t && cur.at.Equal(rel.at)
		if current && now.Sub(rel.at) < r.retention && len(r.released) <= maxRetained {
			break
		}
		if current {
			delete(r.released, rel.t.addr)
		}
		drop++
	}
	if drop > 0 {
		r.order = append(r.order[:0], r.order[drop:]...)
	}
	// Entries of addresses resumed since build up under churn: compact.
	if len(r.order) > 2*len(r.released)+64 {
		kept := r.order[:0]
		for _, rel := range r.order {
			if cur, ok := r.released[rel.t.addr]; ok && cur.t == rel.t && cur.at.Equal(rel.at) {
				kept = append(kept, rel)
			}
		}
		clear(r.order[len(kept):])
		r.order = kept
	}
}

// retained returns how many released targets the registry keeps.
func (r *Registry) retained() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.released)
}

// worthKeeping reports whether the target's state says more than a new
// target's would: out of rotation, on probation, kept out of panic mode,
// failing its active checks, or with ejections not yet decayed.
func (t *Target) worthKeeping(now int64) bool {
	ejectMu.Lock()
	ejections := t.ejections
	ejectMu.Unlock()
	s := State(t.state.Load())
	return s == StateUnhealthy || s == StateEjected || ejections > 0 || t.activeFailing.Load() || now < t.failingUntil.Load()
}

// resume copies the health state of old, a released target of the same
// address, into t, a new one, and returns t.
func (t *Target) resume(old *Target) *Target {
	ejectMu.Lock()
	t.ejections = old.ejections
	ejectMu.Unlock()
	t.ejectedUntil.Store(old.ejectedUntil.Load())
	t.failingUntil.Store(old.failingUntil.Load())
	t.availableSince.Store(old.availableSince.Load())
	t.activeFailing.Store(old.activeFailing.Load())
	if s := State(old.state.Load()); s != StateDraining {
		t.state.Store(int32(s))
	}
	t.change.Store(old.change.Load())
	return t
}
