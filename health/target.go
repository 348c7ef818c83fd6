// Package health keeps the health and load state of every backend address:
// active checks, passive outlier detection from live traffic, ejection and
// overload tracking.
//
// State is keyed by address, so it survives discovery updates and config
// reloads: a backend present before and after an update keeps its Target.
package health

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
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

	// failingUntil is the unix nano time until which live traffic showed
	// that the backend cannot answer at all (consecutive gateway failures).
	// Panic mode leaves such backends out.
	failingUntil atomic.Int64

	// availableSince is the unix nano time the target last became
	// available after an ejection or failed active checks; slow start
	// ramps its traffic up from there. 0 if it never left.
	availableSince atomic.Int64

	consecutiveGatewayFailures atomic.Int32
	consecutive5xx             atomic.Int32

	// lastAnswer is when the backend last answered with HTTP (unix
	// nano); it starts at the target's creation.
	lastAnswer atomic.Int64

	// Totals since the target was created, read by the Ejectors of its
	// pools to compare it with its peers over a recent window. A success
	// costs two atomic adds.
	answered     atomic.Uint64 // requests the backend answered with HTTP
	latencyNs    atomic.Uint64 // sum of the latencies of answered requests
	serverErrors atomic.Uint64 // answered 5xx that are not overload
	gatewayFails atomic.Uint64 // requests that got no HTTP answer

	// activeFailing is set while active checks fail.
	activeFailing atomic.Bool
	// probes counts the active probes of the target; a failed verdict
	// that no probe is left to revise is dropped (Ejector.SetTargets).
	probes atomic.Int32

	// ejections is how many ejections in a row the backend has had,
	// decayed while it stays healthy; guarded by ejectMu.
	ejections int

	// groups are the Ejectors of the pools that use the target; written
	// under ejectMu.
	groups atomic.Pointer[[]*Ejector]

	// change holds the last state change; written on the slow path only.
	change atomic.Pointer[change]
	// entered counts the changes into each state, so that a sampler sees
	// a state the target entered and left between two of its looks.
	entered [StateDraining + 1]atomic.Uint32

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
	now := time.Now()
	t.change.Store(&change{reason: "discovered", since: now})
	t.lastAnswer.Store(now.UnixNano())
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

// PanicUsable reports whether the backend may get requests in panic mode:
// when too few backends of a pool are available the checks may be wrong,
// so every backend is tried except draining ones and those whose own
// recent requests could not connect, timed out or got no valid HTTP.
func (t *Target) PanicUsable(now int64) bool {
	return State(t.state.Load()) != StateDraining && now >= t.failingUntil.Load()
}

// AvailableSince returns the unix nano time the target last came back
// into rotation after an ejection or failed active checks, or 0 if it
// never left. Slow start ramps traffic up from there.
func (t *Target) AvailableSince() int64 { return t.availableSince.Load() }

// Entered returns how many times the target has entered state s, modulo
// 2^32: a count that moved between two looks means s was entered in
// between, however briefly. The expiry of an ejection is no change.
func (t *Target) Entered(s State) uint32 { return t.entered[s].Load() }

// Inflight returns the number of requests in progress to the backend.
func (t *Target) Inflight() int32 { return t.inflight.Load() }

// Begin marks the start of a request to the backend. Every Begin must be
// followed by exactly one Done.
func (t *Target) Begin() { t.inflight.Add(1) }

// Stalled reports whether the backend has requests in flight and has
// answered none of them, or any other, for d up to now (unix nano): it is
// as slow as a request that waited d on another backend.
func (t *Target) Stalled(now, d int64) bool {
	return t.inflight.Load() > 0 && now-t.lastAnswer.Load() >= d
}

// Done records how a request that Begin started ended.
//
// Fast path: a few atomic adds; ejecting is the slow path.
func (t *Target) Done(now int64, o Outcome, latency time.Duration) {
	t.inflight.Add(-1)
	if o >= OutcomeLocalOverload {
		// Neither edgelb's own limits nor abandoned requests say anything
		// about the backend.
		return
	}
	if !o.IsGatewayFailure() {
		t.answered.Add(1)
		t.lastAnswer.Store(now)
		if latency > 0 {
			t.latencyNs.Add(uint64(latency))
		}
	}
	switch {
	case o == OutcomeSuccess:
		// Only write the counters when they are not already zero, so
		// that healthy backends keep their cache line shared.
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
		t.gatewayFails.Add(1)
		n := t.consecutiveGatewayFailures.Add(1)
		// A backend back from an ejection that has not answered since is
		// on probation: one gateway failure ejects it again, so that a
		// dead backend costs one try per ejection, not a run of them.
		if int(n) >= t.passive.consecutiveGatewayFailures() || State(t.state.Load()) == StateEjected {
			t.gatewayFailing(now, int(n), o)
		}
		// A gateway failure is a 5xx to the client too.
		t.serverError(now, o)
	case o == OutcomeServerError:
		t.serverErrors.Add(1)
		t.serverError(now, o)
	}
}

// serverError counts a 5xx in a row and ejects the target after too many.
func (t *Target) serverError(now int64, o Outcome) {
	n := t.consecutive5xx.Add(1)
	if int(n) < t.passive.consecutive5xx() {
		return
	}
	// Slow path. Start the count again whatever happens, so that a
	// backend the ejection budget keeps in rotation is not re-examined on
	// every further 5xx.
	t.consecutive5xx.Store(0)
	t.eject(now, fmt.Sprintf("%d consecutive 5xx, last: %s", n, o), true)
}

// gatewayFailing handles a run of gateway failures (slow path): a backend
// in rotation is ejected whatever the ejection budget says, since one that
// cannot answer at all serves nobody; one already out of rotation is kept
// out of panic mode too.
func (t *Target) gatewayFailing(now int64, n int, o Outcome) {
	if t.eject(now, fmt.Sprintf("%d consecutive gateway failures, last: %s", n, o), false) {
		return
	}
	t.consecutiveGatewayFailures.Store(0)
	if State(t.state.Load()) != StateDraining {
		t.failingUntil.Store(now + int64(t.passive.baseEjectionTime()))
	}
}

// ejectMu serializes ejection decisions, so that the ejection budget of a
// pool is checked and spent atomically. Ejections are rare: one mutex for
// all of them costs nothing.
var ejectMu sync.Mutex

// eject takes the target out of rotation. The ejection lasts longer with
// each ejection in a row, up to MaxEjectionTime, is up to 10% shorter at
// random so that backends ejected together do not return together, and
// the count of ejections in a row drops by one for each MaxEjectionTime
// the backend stays healthy. A budgeted ejection respects the
// max_ejection_percent of every pool the target is in. eject reports
// whether the target was ejected.
func (t *Target) eject(now int64, reason string, budgeted bool) bool {
	ejectMu.Lock()
	defer ejectMu.Unlock()
	old := State(t.state.Load())
	if old != StateHealthy && !(old == StateEjected && now >= t.ejectedUntil.Load()) {
		return false
	}
	if budgeted {
		if e := t.fullGroup(now); e != nil {
			e.refused(t, reason)
			return false
		}
	}
	base, maxD := t.passive.baseEjectionTime(), t.passive.maxEjectionTime()
	if last := t.ejectedUntil.Load(); t.ejections > 0 && now > last {
		t.ejections = max(0, t.ejections-int((now-last)/int64(maxD)))
	}
	// The count stops where the cap is reached, so that decay shortens
	// the very next ejection.
	t.ejections = min(t.ejections+1, int((maxD+base-1)/base))
	d := min(base*time.Duration(t.ejections), maxD)
	d -= time.Duration(rand.Int64N(int64(d)/10 + 1))
	until := now + int64(d)
	t.ejectedUntil.Store(until)
	t.availableSince.Store(until)
	if !budgeted {
		t.failingUntil.Store(until)
	}
	if !t.setState(StateEjected, old, reason+"; ejected for "+d.Round(time.Millisecond).String()) {
		return false
	}
	t.consecutiveGatewayFailures.Store(0)
	t.consecutive5xx.Store(0)
	return true
}

// fullGroup returns a pool of the target that already has as many
// backends ejected as it allows, or nil. The caller holds ejectMu.
func (t *Target) fullGroup(now int64) *Ejector {
	gs := t.groups.Load()
	if gs == nil {
		return nil
	}
	for _, e := range *gs {
		if !e.mayEject(now) {
			return e
		}
	}
	return nil
}

// setState moves the target from old to s, recording, logging and counting
// why. It does nothing if the state is no longer old.
func (t *Target) setState(s, old State, reason string) bool {
	if !t.state.CompareAndSwap(int32(old), int32(s)) {
		return false
	}
	t.change.Store(&change{reason: reason, since: time.Now()})
	t.entered[s].Add(1)
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
			t.availableSince.Store(time.Now().UnixNano())
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
// Zero values select the defaults; -1 turns off the rules that say so.
type PassiveConfig struct {
	// ConsecutiveGatewayFailures ejects a backend after this many connect
	// failures, timeouts or invalid responses in a row.
	// DefaultConsecutiveGatewayFailures is used if not set.
	ConsecutiveGatewayFailures int `yaml:"consecutive_gateway_failures"`

	// Consecutive5xx ejects a backend after this many 5xx answers or
	// gateway failures in a row. DefaultConsecutive5xx is used if not set.
	Consecutive5xx int `yaml:"consecutive_5xx"`

	// BaseEjectionTime is the first ejection's length; the n-th ejection
	// in a row lasts n times as long, up to MaxEjectionTime, less up to
	// 10% at random. DefaultBaseEjectionTime is used if not set.
	BaseEjectionTime time.Duration `yaml:"base_ejection_time"`

	// MaxEjectionTime caps the ejection length; for each MaxEjectionTime
	// a backend stays healthy, its next ejection is one step shorter.
	// 10 times BaseEjectionTime is used if not set.
	MaxEjectionTime time.Duration `yaml:"max_ejection_time"`

	// MaxEjectionPercent caps the share of a pool's backends that
	// passive ejection may hold out at once; one backend may always be
	// ejected. Backends that cannot answer at all (consecutive gateway
	// failures) are ejected even beyond it, since keeping them loses no
	// capacity. DefaultMaxEjectionPercent is used if not set.
	MaxEjectionPercent int `yaml:"max_ejection_percent"`

	// Interval is how often the backends of a pool are compared.
	// DefaultOutlierInterval is used if not set.
	Interval time.Duration `yaml:"interval"`

	// Window is how much recent traffic the comparison looks at.
	// DefaultOutlierWindow is used if not set.
	Window time.Duration `yaml:"window"`

	// MinRequests is how many requests a backend needs within Window to
	// be judged or to count as a peer. DefaultOutlierMinRequests is used
	// if not set.
	MinRequests int `yaml:"min_requests"`

	// MinHosts is how many backends of the pool need MinRequests for any
	// comparison to happen. DefaultOutlierMinHosts is used if not set.
	MinHosts int `yaml:"min_hosts"`

	// SuccessRateStdevFactor ejects a backend whose success rate is below
	// the pool's mean minus this many standard deviations (and at least
	// 5 points below the mean). DefaultSuccessRateStdevFactor is used if
	// not set; -1 turns the rule off.
	SuccessRateStdevFactor float64 `yaml:"success_rate_stdev_factor"`

	// FailurePercentage ejects a backend whose share of failed requests
	// reaches this percentage while the rest of the pool fails less than
	// half as often: a failure shared by every backend is not one
	// backend's fault. DefaultFailurePercentage is used if not set; -1
	// turns the rule off.
	FailurePercentage float64 `yaml:"failure_percentage"`

	// LatencyFactor ejects a backend whose mean latency is more than this
	// many times the median of the other backends' means.
	// DefaultLatencyFactor is used if not set; -1 turns the rule off.
	LatencyFactor float64 `yaml:"latency_factor"`

	// LatencyMin is the mean latency below which no backend is a latency
	// outlier, so that jitter between fast backends ejects nobody.
	// DefaultLatencyMin is used if not set.
	LatencyMin time.Duration `yaml:"latency_min"`
}

// Defaults of PassiveConfig's outlier detection.
const (
	DefaultMaxEjectionPercent     = 50
	DefaultOutlierInterval        = time.Second
	DefaultOutlierWindow          = 10 * time.Second
	DefaultOutlierMinRequests     = 50
	DefaultOutlierMinHosts        = 3
	DefaultSuccessRateStdevFactor = 1.9
	DefaultFailurePercentage      = 20
	DefaultLatencyFactor          = 5
	DefaultLatencyMin             = 50 * time.Millisecond
)

func (c *PassiveConfig) consecutiveGatewayFailures() int {
	return orDefault(c.ConsecutiveGatewayFailures, DefaultConsecutiveGatewayFailures)
}

func (c *PassiveConfig) consecutive5xx() int {
	return orDefault(c.Consecutive5xx, DefaultConsecutive5xx)
}

func (c *PassiveConfig) baseEjectionTime() time.Duration {
	return orDefault(c.BaseEjectionTime, DefaultBaseEjectionTime)
}

func (c *PassiveConfig) maxEjectionTime() time.Duration {
	return orDefault(c.MaxEjectionTime, 10*c.baseEjectionTime())
}

func (c *PassiveConfig) maxEjectionPercent() int {
	return orDefault(c.MaxEjectionPercent, DefaultMaxEjectionPercent)
}

func (c *PassiveConfig) interval() time.Duration {
	return orDefault(c.Interval, DefaultOutlierInterval)
}

func (c *PassiveConfig) window() time.Duration { return orDefault(c.Window, DefaultOutlierWindow) }

func (c *PassiveConfig) minRequests() uint64 {
	return uint64(orDefault(c.MinRequests, DefaultOutlierMinRequests))
}

func (c *PassiveConfig) minHosts() int { return orDefault(c.MinHosts, DefaultOutlierMinHosts) }

// The rules below are off when set negative.

func (c *PassiveConfig) stdevFactor() float64 {
	return orDefault(c.SuccessRateStdevFactor, DefaultSuccessRateStdevFactor)
}

func (c *PassiveConfig) failurePercentage() float64 {
	return orDefault(c.FailurePercentage, DefaultFailurePercentage)
}

func (c *PassiveConfig) latencyFactor() float64 {
	return orDefault(c.LatencyFactor, DefaultLatencyFactor)
}

func (c *PassiveConfig) latencyMin() time.Duration { return orDefault(c.LatencyMin, DefaultLatencyMin) }

func orDefault[T int | float64 | time.Duration](v, def T) T {
	if v == 0 {
		return def
	}
	return v
}

// Validate returns every problem of c, each naming its key under prefix.
func (c PassiveConfig) Validate(prefix string) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s.%s: "+format, append([]any{prefix, k}, args...)...))
	}
	ints := []struct {
		k string
		v int
	}{{"consecutive_gateway_failures", c.ConsecutiveGatewayFailures}, {"consecutive_5xx", c.Consecutive5xx},
		{"min_requests", c.MinRequests}, {"min_hosts", c.MinHosts}}
	for _, x := range ints {
		if x.v < 0 {
			bad(x.k, "must not be negative (got %d)", x.v)
		}
	}
	durs := []struct {
		k string
		v time.Duration
	}{{"base_ejection_time", c.BaseEjectionTime}, {"max_ejection_time", c.MaxEjectionTime},
		{"interval", c.Interval}, {"window", c.Window}, {"latency_min", c.LatencyMin}}
	for _, x := range durs {
		if x.v < 0 {
			bad(x.k, "must not be negative (got %s)", x.v)
		}
	}
	if p := c.MaxEjectionPercent; p < 0 || p > 100 {
		bad("max_ejection_percent", "must be a percentage from 1 to 100 (got %d)", p)
	}
	if f := c.SuccessRateStdevFactor; f < 0 && f != -1 {
		bad("success_rate_stdev_factor", "must be positive, or -1 to turn the rule off (got %g)", f)
	}
	if f := c.FailurePercentage; (f < 0 && f != -1) || f > 100 {
		bad("failure_percentage", "must be a percentage up to 100, or -1 to turn the rule off (got %g)", f)
	}
	if f := c.LatencyFactor; (f < 0 && f != -1) || (f > 0 && f <= 1) {
		bad("latency_factor", "must be more than 1, or -1 to turn the rule off (got %g)", f)
	}
	if c.MaxEjectionTime > 0 && c.MaxEjectionTime < c.baseEjectionTime() {
		bad("max_ejection_time", "must not be below base_ejection_time (%s)", c.baseEjectionTime())
	}
	if iv := c.interval(); iv > 0 && iv < 100*time.Millisecond {
		bad("interval", "must be at least 100ms (got %s)", iv)
	}
	if c.Window > 0 && c.Window < c.interval() {
		bad("window", "must not be shorter than interval (%s)", c.interval())
	}
	if c.window() > maxWindowBuckets*c.interval() && c.Window > 0 {
		bad("window", "must not exceed %d intervals (%s)", maxWindowBuckets, maxWindowBuckets*c.interval())
	}
	return errs
}
