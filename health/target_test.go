package health

import (
	"strings"
	"testing"
	"time"
)

func TestPassiveEjection(t *testing.T) {
	tg := NewRegistry(nil).Acquire("127.0.0.1:1", PassiveConfig{ConsecutiveGatewayFailures: 3, BaseEjectionTime: time.Second, MaxEjectionTime: 2500 * time.Millisecond})
	now := time.Now().UnixNano()
	fail := func(o Outcome) {
		tg.Begin()
		tg.Done(now, o, time.Millisecond)
	}
	fail(OutcomeConnectFailed)
	fail(OutcomeTimeout)
	fail(OutcomeSuccess) // resets the run
	fail(OutcomeConnectFailed)
	fail(OutcomeLocalOverload) // never counts
	fail(OutcomeOverloaded)    // never counts
	fail(OutcomeConnectFailed)
	if !tg.Available(now) {
		t.Fatal("ejected before 3 gateway failures in a row")
	}
	fail(OutcomeInvalidResponse)
	if tg.Available(now) || tg.State(now) != StateEjected {
		t.Fatal("not ejected after 3 gateway failures in a row")
	}
	if r := tg.Status(time.Unix(0, now)).Reason; !strings.Contains(r, "invalid_response") || !strings.Contains(r, "; ejected for ") {
		t.Fatalf("reason: %q", r)
	}
	// The ejection ends by itself; a success confirms it.
	now += int64(time.Second)
	if !tg.Available(now) {
		t.Fatal("still ejected after the ejection time")
	}
	fail(OutcomeSuccess)
	if State(tg.state.Load()) != StateHealthy {
		t.Fatal("not readmitted after a success")
	}
	// The second ejection lasts longer, up to the cap, less up to 10%.
	for i := 0; i < 3; i++ {
		fail(OutcomeConnectFailed)
	}
	if tg.Available(now+int64(1500*time.Millisecond)) || !tg.Available(now+int64(2*time.Second)) {
		t.Fatal("second ejection must last 1.8s to 2s")
	}
	now += int64(2 * time.Second)
	for i := 0; i < 3; i++ {
		fail(OutcomeConnectFailed)
	}
	if !tg.Available(now + int64(2500*time.Millisecond)) {
		t.Fatal("ejection time must be capped at max_ejection_time")
	}
	if tg.Inflight() != 0 {
		t.Fatalf("inflight %d after all Done", tg.Inflight())
	}
}

func TestEjectionTimeGrowsAndDecays(t *testing.T) {
	base, maxD := time.Second, 4*time.Second
	tg := NewRegistry(nil).Acquire("127.0.0.1:1", PassiveConfig{ConsecutiveGatewayFailures: 1, BaseEjectionTime: base, MaxEjectionTime: maxD})
	now := time.Now().UnixNano()
	// f fails one request at now, after the previous ejection ended and
	// the target stayed healthy for healthy, and checks that the ejection
	// lasts between 90% and 100% of want.
	f := func(healthy, want time.Duration) {
		t.Helper()
		if until := tg.ejectedUntil.Load(); until > now {
			now = until
		}
		now += int64(healthy)
		tg.Begin()
		tg.Done(now, OutcomeConnectFailed, time.Millisecond)
		got := time.Duration(tg.ejectedUntil.Load() - now)
		if got > want || got < want*9/10 {
			t.Fatalf("ejection lasts %s, want %s less up to 10%%", got, want)
		}
	}
	f(0, base)
	f(0, 2*base)
	f(0, 3*base)
	f(0, maxD)
	f(0, maxD) // capped
	// Each max_ejection_time spent healthy takes one step off.
	f(maxD, maxD)
	f(2*maxD, 3*base)
	f(10*maxD, base)
}

func TestEjectionJitter(t *testing.T) {
	seen := make(map[time.Duration]bool)
	for i := 0; i < 20; i++ {
		tg := NewRegistry(nil).Acquire("127.0.0.1:1", PassiveConfig{ConsecutiveGatewayFailures: 1, BaseEjectionTime: time.Second})
		now := time.Now().UnixNano()
		tg.Begin()
		tg.Done(now, OutcomeTimeout, time.Millisecond)
		seen[time.Duration(tg.ejectedUntil.Load()-now)] = true
	}
	if len(seen) < 10 {
		t.Fatalf("20 ejections took %d distinct lengths; want jitter", len(seen))
	}
}

func TestPanicUsable(t *testing.T) {
	reg := NewRegistry(nil)
	tg := reg.Acquire("127.0.0.1:1", PassiveConfig{ConsecutiveGatewayFailures: 2, Consecutive5xx: 2, BaseEjectionTime: time.Second})
	now := time.Now().UnixNano()
	done := func(o Outcome) {
		tg.Begin()
		tg.Done(now, o, time.Millisecond)
	}
	// Ejected for 5xx: the backend answers, so panic mode may use it.
	done(OutcomeServerError)
	done(OutcomeServerError)
	if tg.Available(now) || !tg.PanicUsable(now) {
		t.Fatalf("after 5xx: available %v, panic-usable %v", tg.Available(now), tg.PanicUsable(now))
	}
	// Unhealthy by its checks: panic mode may use it, until live traffic
	// shows it cannot answer at all.
	tg.setActive(false, "check failed")
	if !tg.PanicUsable(now) {
		t.Fatal("an unhealthy backend must be usable in panic mode")
	}
	done(OutcomeConnectFailed)
	done(OutcomeConnectFailed)
	if tg.PanicUsable(now) || !tg.PanicUsable(now+int64(time.Second)) {
		t.Fatal("connect failures must keep a backend out of panic mode for base_ejection_time")
	}
	if tg.State(now) != StateUnhealthy {
		t.Fatalf("state %s", tg.State(now))
	}
	// Readmission by the checks starts slow start from now.
	before := time.Now().UnixNano()
	tg.setActive(true, "check passed")
	if s := tg.AvailableSince(); s < before {
		t.Fatalf("AvailableSince %d, want at least %d", s, before)
	}
	tg.SetDraining(true)
	if tg.PanicUsable(now + int64(time.Hour)) {
		t.Fatal("a draining backend is never usable")
	}
}

func TestPassiveConfigValidate(t *testing.T) {
	f := func(c PassiveConfig, want string) {
		t.Helper()
		var msgs []string
		for _, e := range c.Validate("services.web.health.passive") {
			msgs = append(msgs, e.Error())
		}
		got := strings.Join(msgs, "; ")
		if !strings.Contains(got, want) || (want == "" && got != "") {
			t.Errorf("got %q, want %q", got, want)
		}
	}
	f(PassiveConfig{}, "")
	f(PassiveConfig{SuccessRateStdevFactor: -1, FailurePercentage: -1, LatencyFactor: -1}, "")
	f(PassiveConfig{MaxEjectionPercent: 101}, "services.web.health.passive.max_ejection_percent: must be a percentage from 1 to 100")
	f(PassiveConfig{MinRequests: -5}, "services.web.health.passive.min_requests: must not be negative")
	f(PassiveConfig{Window: -time.Second}, "services.web.health.passive.window: must not be negative")
	f(PassiveConfig{SuccessRateStdevFactor: -2}, "services.web.health.passive.success_rate_stdev_factor: must be positive, or -1")
	f(PassiveConfig{FailurePercentage: 150}, "services.web.health.passive.failure_percentage: must be a percentage up to 100")
	f(PassiveConfig{LatencyFactor: 0.5}, "services.web.health.passive.latency_factor: must be more than 1")
	f(PassiveConfig{BaseEjectionTime: 10 * time.Second, MaxEjectionTime: time.Second}, "services.web.health.passive.max_ejection_time: must not be below base_ejection_time (10s)")
	f(PassiveConfig{Interval: 10 * time.Millisecond}, "services.web.health.passive.interval: must be at least 100ms")
	f(PassiveConfig{Interval: time.Second, Window: 500 * time.Millisecond}, "services.web.health.passive.window: must not be shorter than interval (1s)")
	f(PassiveConfig{Interval: 100 * time.Millisecond, Window: time.Minute}, "services.web.health.passive.window: must not exceed 120 intervals (12s)")
}

// TestEnteredCountsBriefStates: an ejection and its end, and a drain and
// its end, between two looks still show in the counts of the states entered.
func TestEnteredCountsBriefStates(t *testing.T) {
	tg := NewRegistry(nil).Acquire("127.0.0.1:1", PassiveConfig{ConsecutiveGatewayFailures: 1, BaseEjectionTime: time.Millisecond})
	now := time.Now().UnixNano()
	f := func(s State, want uint32) {
		t.Helper()
		if got := tg.Entered(s); got != want {
			t.Fatalf("entered %s %d times, want %d", s, got, want)
		}
	}
	f(StateEjected, 0)
	tg.Begin()
	tg.Done(now, OutcomeConnectFailed, time.Millisecond)
	now += int64(time.Second)
	tg.Begin()
	tg.Done(now, OutcomeSuccess, time.Millisecond)
	if tg.State(now) != StateHealthy {
		t.Fatalf("state %s after the ejection and a success", tg.State(now))
	}
	f(StateEjected, 1)
	f(StateHealthy, 1)
	tg.SetDraining(true)
	tg.SetDraining(false)
	f(StateDraining, 1)
	f(StateHealthy, 2)
	f(StateUnhealthy, 0)
}
