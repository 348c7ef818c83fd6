package health

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestRegistryKeepsStateWhileUsed(t *testing.T) {
	reg := NewRegistry(nil)
	a := reg.Acquire("x:1", PassiveConfig{})
	b := reg.Acquire("x:1", PassiveConfig{})
	reg.Release(a)
	if c := reg.Acquire("x:1", PassiveConfig{}); c != b {
		t.Fatal("a target still in use was replaced")
	}
}

// TestRegistryResumesReleasedState flaps a dead backend out of discovery
// and back: it comes back ejected, on probation, with its ejection count,
// so that each ejection lasts longer than the one before.
func TestRegistryResumesReleasedState(t *testing.T) {
	reg := NewRegistry(nil)
	cfg := PassiveConfig{ConsecutiveGatewayFailures: 3, BaseEjectionTime: time.Second, MaxEjectionTime: 10 * time.Second}
	tg := reg.Acquire("127.0.0.1:1", cfg)
	now := time.Now().UnixNano()
	fail := func(tg *Target) {
		tg.Begin()
		tg.Done(now, OutcomeConnectFailed, time.Millisecond)
	}
	for i := 0; i < 3; i++ {
		fail(tg)
	}
	f := func(want time.Duration) {
		t.Helper()
		got := time.Duration(tg.ejectedUntil.Load() - now)
		if got > want || got < want*9/10 {
			t.Fatalf("ejection lasts %s, want %s less up to 10%%", got, want)
		}
	}
	f(time.Second)
	for flap := 2; flap <= 4; flap++ {
		reg.Release(tg)
		if reg.retained() != 1 {
			t.Fatalf("flap %d: the ejected target was not kept", flap)
		}
		back := reg.Acquire("127.0.0.1:1", cfg)
		if back != tg {
			t.Fatalf("flap %d: a new target replaced the released one", flap)
		}
		if st := tg.Status(time.Unix(0, now)); st.State != "ejected" || strings.Contains(st.Reason, "discovered") {
			t.Fatalf("flap %d: back as %s (%s)", flap, st.State, st.Reason)
		}
		// The ejection ends; on probation one failure ejects it again,
		// for longer.
		now = tg.ejectedUntil.Load()
		if st := tg.Status(time.Unix(0, now)); !strings.Contains(st.Reason, "on probation") {
			t.Fatalf("flap %d: after the ejection: %s (%s)", flap, st.State, st.Reason)
		}
		fail(tg)
		f(time.Duration(flap) * time.Second)
	}
}

func TestRegistryForgetsWhatSaysNothing(t *testing.T) {
	reg := NewRegistry(nil)
	tg := reg.Acquire("127.0.0.1:1", PassiveConfig{})
	tg.Begin()
	tg.Done(time.Now().UnixNano(), OutcomeSuccess, time.Millisecond)
	reg.Release(tg)
	if reg.retained() != 0 {
		t.Fatal("a healthy target with no ejections was kept")
	}
	if reg.Acquire("127.0.0.1:1", PassiveConfig{}) == tg {
		t.Fatal("a forgotten target came back")
	}
}

func TestRegistryRetentionEnds(t *testing.T) {
	reg := NewRegistry(nil)
	reg.retention = 20 * time.Millisecond
	cfg := PassiveConfig{ConsecutiveGatewayFailures: 1}
	tg := reg.Acquire("127.0.0.1:1", cfg)
	tg.Begin()
	tg.Done(time.Now().UnixNano(), OutcomeConnectFailed, time.Millisecond)
	reg.Release(tg)
	time.Sleep(50 * time.Millisecond)
	back := reg.Acquire("127.0.0.1:1", cfg)
	if back == tg || back.Status(time.Now()).State != "healthy" || reg.retained() != 0 {
		t.Fatalf("state kept past the retention time: %+v", back.Status(time.Now()))
	}
}

func TestRegistryRetainedBound(t *testing.T) {
	reg := NewRegistry(nil)
	cfg := PassiveConfig{ConsecutiveGatewayFailures: 1}
	now := time.Now().UnixNano()
	for i := 0; i < maxRetained+10; i++ {
		tg := reg.Acquire(fmt.Sprintf("10.0.%d.%d:80", i/256, i%256), cfg)
		tg.Begin()
		tg.Done(now, OutcomeConnectFailed, time.Millisecond)
		reg.Release(tg)
		// Churn of one address leaves no build-up either.
		again := reg.Acquire("10.1.0.1:80", cfg)
		again.Begin()
		again.Done(now, OutcomeConnectFailed, time.Millisecond)
		reg.Release(again)
	}
	if n := reg.retained(); n != maxRetained {
		t.Fatalf("%d released targets kept, want the bound %d", n, maxRetained)
	}
	if len(reg.order) > 2*maxRetained+64 {
		t.Fatalf("%d entries in the release order for %d targets", len(reg.order), reg.retained())
	}
	// The oldest went first.
	if _, ok := reg.released["10.0.0.0:80"]; ok {
		t.Fatal("the oldest released target was kept over the bound")
	}
}

func TestRegistryResumeWithNewPassiveConfig(t *testing.T) {
	reg := NewRegistry(nil)
	tg := reg.Acquire("127.0.0.1:1", PassiveConfig{ConsecutiveGatewayFailures: 1, BaseEjectionTime: time.Second})
	now := time.Now().UnixNano()
	tg.Begin()
	tg.Done(now, OutcomeConnectFailed, time.Millisecond)
	reg.Release(tg)
	cfg := PassiveConfig{ConsecutiveGatewayFailures: 1, BaseEjectionTime: 2 * time.Second}
	back := reg.Acquire("127.0.0.1:1", cfg)
	if back == tg || back.passive != cfg {
		t.Fatal("a target resumed under another passive config must take the new config")
	}
	if back.State(now) != StateEjected || back.ejectedUntil.Load() != tg.ejectedUntil.Load() {
		t.Fatalf("state not carried over: %s", back.State(now))
	}
	// The second ejection in a row, under the new base.
	now = back.ejectedUntil.Load()
	back.Begin()
	back.Done(now, OutcomeConnectFailed, time.Millisecond)
	if got := time.Duration(back.ejectedUntil.Load() - now); got < 3600*time.Millisecond || got > 4*time.Second {
		t.Fatalf("second ejection lasts %s, want 4s less up to 10%%", got)
	}
}

// TestRegistryResumesActiveVerdict: a backend that left failing its active
// checks comes back unhealthy while checks run again; with no check left
// to revise the verdict, it is readmitted rather than kept out for good.
func TestRegistryResumesActiveVerdict(t *testing.T) {
	f := func(probed bool, want State) {
		t.Helper()
		reg := NewRegistry(nil)
		tg := reg.Acquire("127.0.0.1:1", PassiveConfig{})
		tg.setActive(false, "active check failed 2 times in a row")
		reg.Release(tg)
		back := reg.Acquire("127.0.0.1:1", PassiveConfig{})
		if back.State(time.Now().UnixNano()) != StateUnhealthy {
			t.Fatalf("came back %s", back.State(time.Now().UnixNano()))
		}
		if probed {
			back.probes.Add(1)
		}
		e := reg.NewEjector("web", PassiveConfig{}, 0)
		defer e.Close()
		e.SetTargets([]*Target{back})
		if st := back.Status(time.Now()); State(back.state.Load()) != want {
			t.Fatalf("probed %v: %s (%s), want %s", probed, st.State, st.Reason, want)
		}
	}
	f(true, StateUnhealthy)
	f(false, StateHealthy)
}
