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
	if r := tg.Status(time.Unix(0, now)).Reason; !strings.Contains(r, "invalid_response") || !strings.Contains(r, "ejected for 1s") {
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
	// The second ejection lasts longer, up to the cap.
	for i := 0; i < 3; i++ {
		fail(OutcomeConnectFailed)
	}
	if tg.Available(now+int64(1500*time.Millisecond)) || !tg.Available(now+int64(2*time.Second)) {
		t.Fatal("second ejection must last 2s")
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

func TestRegistryKeepsStateWhileUsed(t *testing.T) {
	reg := NewRegistry(nil)
	a := reg.Acquire("x:1", PassiveConfig{})
	b := reg.Acquire("x:1", PassiveConfig{})
	reg.Release(a)
	if c := reg.Acquire("x:1", PassiveConfig{}); c != b {
		t.Fatal("a target still in use was replaced")
	}
}
