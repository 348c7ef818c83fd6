// Package health keeps the health and load state of every backend address:
// active checks, passive outlier detection from live traffic, ejection and
// overload tracking.
//
// State is keyed by address, so it survives discovery updates and config
// reloads: a backend present before and after an update keeps its Target.
package health

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

// stateChanges counts transitions by the state entered.
var stateChanges = [...]*metrics.Counter{
	StateHealthy:   metrics.NewCounter(`edgelb_backend_state_changes_total{to="healthy"}`),
	StateUnhealthy: metrics.NewCounter(`edgelb_backend_state_changes_total{to="unhealthy"}`),
	StateEjected:   metrics.NewCounter(`edgelb_backend_state_changes_total{to="ejected"}`),
	StateDraining:  metrics.NewCounter(`edgelb_backend_state_changes_total{to="draining"}`),
}

// State is the routing state of a backend.
type State int32

// Backend states, as shown in /status.
const (
	// StateHealthy backends receive traffic.
	StateHealthy State = iota
	// StateUnhealthy backends failed their active checks.
	StateUnhealthy
	// StateEjected backends were taken out by passive outlier detection
	// for a while.
	StateEjected
	// StateDraining backends left discovery and finish their in-flight
	// requests; they get no new ones.
	StateDraining
)

// String returns the name used in /status, logs and metrics.
func (s State) String() string {
	switch s {
	case StateHealthy:
		return "healthy"
	case StateUnhealthy:
		return "unhealthy"
	case StateEjected:
		return "ejected"
	case StateDraining:
		return "draining"
	}
	return "unknown"
}

// Outcome classifies how one forwarded request to a backend ended.
type Outcome uint8

// Request outcomes reported by the balancer through Target.Done.
const (
	// OutcomeSuccess is any response that is not a failure, 4xx included.
	OutcomeSuccess Outcome = iota
	// OutcomeServerError is a 5xx response that is not an overload signal.
	OutcomeServerError
	// OutcomeOverloaded is 429, or 503 with Retry-After: the backend is
	// alive but asks for less load. It never counts as a failure.
	OutcomeOverloaded
	// OutcomeConnectFailed is a refused or reset connection.
	OutcomeConnectFailed
	// OutcomeTimeout is a backend that did not answer in time.
	OutcomeTimeout
	// OutcomeInvalidResponse is a response that is not valid HTTP.
	OutcomeInvalidResponse
	// OutcomeLocalOverload is edgelb's own connection limit (fasthttp's
	// ErrNoFreeConns). It is not the backend's fault and never counts
	// against it.
	OutcomeLocalOverload
	// OutcomeCanceled is a request abandoned for reasons unrelated to the
	// backend (for example shutdown). It never counts against it.
	OutcomeCanceled

	numOutcomes
)

// String returns the name used in logs and metrics.
func (o Outcome) String() string {
	switch o {
	case OutcomeSuccess:
		return "success"
	case OutcomeServerError:
		return "server_error"
	case OutcomeOverloaded:
		return "overloaded"
	case OutcomeConnectFailed:
		return "connect_failed"
	case OutcomeTimeout:
		return "timeout"
	case OutcomeInvalidResponse:
		return "invalid_response"
	case OutcomeLocalOverload:
		return "local_overload"
	case OutcomeCanceled:
		return "canceled"
	}
	return "unknown"
}

// IsGatewayFailure reports whether o means the backend could not give a
// usable HTTP answer at all.
func (o Outcome) IsGatewayFailure() bool {
	return o == OutcomeConnectFailed || o == OutcomeTimeout || o == OutcomeInvalidResponse
}

// DefaultConsecutiveGatewayFailures is used if
// PassiveConfig.ConsecutiveGatewayFailures is not set.
const DefaultConsecutiveGatewayFailures = 3

// DefaultConsecutive5xx is used if PassiveConfig.Consecutive5xx is not
// set.
const DefaultConsecutive5xx = 5

// DefaultBaseEjectionTime is used if PassiveConfig.BaseEjectionTime is not set.
const DefaultBaseEjectionTime = 5 * time.Second

// Target is the health and load state of one backend address. One Target
// exists per address however many services and routes use it.
//
// All methods are safe for concurrent use. The request path methods
// (Available, Begin, Done, Inflight) take no lock and allocate nothing.
type Target struct {
	addr string

	state    atomic.Int32
	inflight atomic.Int32

	// ejectedUntil is the unix nano time an ejection ends; 0 if none.
	ejectedUntil atomic.Int64

	consecutiveGatewayFailures atomic.Int32
	consecutive5xx             atomic.Int32
	ejections                  atomic.Int32

	// activeFailing is set while active checks fail.
	activeFailing atomic.Bool

	// change holds the last state change; written on the slow path only.
	change atomic.Pointer[change]

	passive PassiveConfig
	log     *slog.Logger

	// refs counts the pools that use the target; guarded by Registry.mu.
	refs int
}

type change struct {
	reason string
	since  time.Time
}

func newTarget(addr string, passive PassiveConfig, log *slog.Logger) *Target {
	t := &Target{addr: addr, passive: passive, log: log}
	t.change.Store(&change{reason: "discovered", since: time.Now()})
	return t
}

// Addr returns the backend's host:port.
func (t *Target) Addr() string { return t.addr }

// State returns the current state. An ejection whose time is over reads as
// healthy.
func (t *Target) State(now int64) State {
	s := State(t.state.Load())
	if s == StateEjected && now >= t.ejectedUntil.Load() {
		return StateHealthy
	}
	return s
}

// Available reports whether the backend may receive new requests at now
// (unix nanoseconds).
//
// Fast path: one or two atomic loads.
func (t *Target) Available(now int64) bool {
	s := State(t.state.Load())
	if s == StateHealthy {
		return true
	}
	return s == StateEjected && now >= t.ejectedUntil.Load()
}

// Inflight returns the number of requests in progress to the backend.
func (t *Target) Inflight() int32 { return t.inflight.Load() }

// Begin marks the start of a request to the backend. Every Begin must be
// followed by exactly one Done.
func (t *Target) Begin() { t.inflight.Add(1) }

// Done records how a request that Begin started ended.
func (t *Target) Done(now int64, o Outcome, latency time.Duration) {
	t.inflight.Add(-1)
	switch {
	case o == OutcomeSuccess:
		// Fast path: only write the counter when it is not already zero,
		// so healthy backends keep their cache line shared.
		if t.consecutiveGatewayFailures.Load() != 0 {
			t.consecutiveGatewayFailures.Store(0)
		}
		if t.consecutive5xx.Load() != 0 {
			t.consecutive5xx.Store(0)
		}
		if State(t.state.Load()) == StateEjected && now >= t.ejectedUntil.Load() {
			t.setState(StateHealthy, StateEjected, "ejection time over and a request succeeded")
		}
	case o.IsGatewayFailure():
		n := t.consecutiveGatewayFailures.Add(1)
		if int(n) >= t.passive.consecutiveGatewayFailures() {
			t.eject(now, "consecutive gateway failures, last: "+o.String())
		}
		// A gateway failure is a 5xx to the client too.
		fallthrough
	case o == OutcomeServerError:
		n := t.consecutive5xx.Add(1)
		if int(n) >= t.passive.consecutive5xx() {
			t.eject(now, "consecutive 5xx, last: "+o.String())
		}
	}
}

// eject takes the target out of rotation for a time that grows with each
// ejection.
func (t *Target) eject(now int64, reason string) {
	old := State(t.state.Load())
	if old != StateHealthy && !(old == StateEjected && now >= t.ejectedUntil.Load()) {
		return
	}
	n := t.ejections.Add(1)
	d := t.passive.baseEjectionTime() * time.Duration(n)
	if max := t.passive.maxEjectionTime(); d > max {
		d = max
	}
	t.ejectedUntil.Store(now + int64(d))
	if t.setState(StateEjected, old, reason+"; ejected for "+d.String()) {
		t.consecutiveGatewayFailures.Store(0)
		t.consecutive5xx.Store(0)
	}
}

// setState moves the target from old to s, recording, logging and counting
// why. It does nothing if the state is no longer old.
func (t *Target) setState(s, old State, reason string) bool {
	if !t.state.CompareAndSwap(int32(old), int32(s)) {
		return false
	}
	t.change.Store(&change{reason: reason, since: time.Now()})
	stateChanges[s].Inc()
	if t.log != nil {
		level := slog.LevelInfo
		if s == StateUnhealthy || s == StateEjected {
			level = slog.LevelWarn
		}
		t.log.Log(context.Background(), level, "backend state changed", "addr", t.addr, "from", old.String(), "to", s.String(), "reason", reason)
	}
	return true
}

// setActive records the verdict of the active checks.
func (t *Target) setActive(ok bool, reason string) {
	if ok {
		if t.activeFailing.CompareAndSwap(true, false) {
			t.setState(StateHealthy, StateUnhealthy, reason)
		}
		return
	}
	t.activeFailing.Store(true)
	for {
		old := State(t.state.Load())
		if old == StateUnhealthy || old == StateDraining || t.setState(StateUnhealthy, old, reason) {
			return
		}
	}
}

// SetDraining marks the target as draining (true) or back in service.
func (t *Target) SetDraining(draining bool) {
	if draining {
		for {
			old := t.state.Load()
			if old == int32(StateDraining) || t.setState(StateDraining, State(old), "removed from discovery") {
				return
			}
		}
	}
	t.setState(StateHealthy, StateDraining, "back in discovery")
}

// TargetStatus is a point-in-time view of a Target for /status.
type TargetStatus struct {
	Addr     string    `json:"addr"`
	State    string    `json:"state"`
	Reason   string    `json:"reason"`
	Since    time.Time `json:"since"`
	Inflight int32     `json:"inflight"`
}

// Status returns the target's state for /status.
func (t *Target) Status(now time.Time) TargetStatus {
	c := t.change.Load()
	st := t.State(now.UnixNano())
	reason := c.reason
	if st == StateHealthy && State(t.state.Load()) == StateEjected {
		reason = "ejection time over, on probation: " + reason
	}
	return TargetStatus{
		Addr:     t.addr,
		State:    st.String(),
		Reason:   reason,
		Since:    c.since,
		Inflight: t.inflight.Load(),
	}
}

// PassiveConfig configures outlier detection from live traffic.
// Zero values select the defaults.
type PassiveConfig struct {
	// ConsecutiveGatewayFailures ejects a backend after this many connect
	// failures, timeouts or invalid responses in a row.
	// DefaultConsecutiveGatewayFailures is used if not set.
	ConsecutiveGatewayFailures int `yaml:"consecutive_gateway_failures"`

	// Consecutive5xx ejects a backend after this many 5xx answers or
	// gateway failures in a row. DefaultConsecutive5xx is used if not set.
	Consecutive5xx int `yaml:"consecutive_5xx"`

	// BaseEjectionTime is the first ejection's length; the n-th ejection
	// lasts n times as long, up to MaxEjectionTime.
	// DefaultBaseEjectionTime is used if not set.
	BaseEjectionTime time.Duration `yaml:"base_ejection_time"`

	// MaxEjectionTime caps the ejection length. 10 times
	// BaseEjectionTime is used if not set.
	MaxEjectionTime time.Duration `yaml:"max_ejection_time"`
}

func (c *PassiveConfig) consecutiveGatewayFailures() int {
	if c.ConsecutiveGatewayFailures <= 0 {
		return DefaultConsecutiveGatewayFailures
	}
	return c.ConsecutiveGatewayFailures
}

func (c *PassiveConfig) consecutive5xx() int {
	if c.Consecutive5xx <= 0 {
		return DefaultConsecutive5xx
	}
	return c.Consecutive5xx
}

func (c *PassiveConfig) baseEjectionTime() time.Duration {
	if c.BaseEjectionTime <= 0 {
		return DefaultBaseEjectionTime
	}
	return c.BaseEjectionTime
}

func (c *PassiveConfig) maxEjectionTime() time.Duration {
	if c.MaxEjectionTime <= 0 {
		return 10 * c.baseEjectionTime()
	}
	return c.MaxEjectionTime
}

// Registry holds one Target per backend address. It is safe for concurrent
// use; it is only used on the slow path (discovery updates and reloads).
type Registry struct {
	log     *slog.Logger
	mu      sync.Mutex
	targets map[string]*Target
}

// NewRegistry returns an empty registry whose targets log their state
// changes to log (nothing if nil).
func NewRegistry(log *slog.Logger) *Registry {
	return &Registry{log: log, targets: make(map[string]*Target)}
}

// Acquire returns the Target of addr, creating it if needed, and counts one
// more user of it. Every Acquire must be matched by a Release.
func (r *Registry) Acquire(addr string, passive PassiveConfig) *Target {
	r.mu.Lock()
	defer r.mu.Unlock()
	t := r.targets[addr]
	if t == nil {
		t = newTarget(addr, passive, r.log)
		r.targets[addr] = t
	}
	t.refs++
	return t
}

// Release drops one user of t. The target is forgotten when nobody uses it.
func (r *Registry) Release(t *Target) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t.refs--
	if t.refs <= 0 && r.targets[t.addr] == t {
		delete(r.targets, t.addr)
	}
}
