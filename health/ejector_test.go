package health

import (
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/edgelb/edgelb/internal/panics"
)

// traffic is a backend's window in findOutliers tests: requests, failed
// requests and mean latency (every request answered).
type traffic struct {
	reqs, fails int
	lat         time.Duration
}

func TestFindOutliers(t *testing.T) {
	f := func(cfg PassiveConfig, pool []traffic, want string) {
		t.Helper()
		st := make([]backendStats, len(pool))
		for i, p := range pool {
			st[i] = backendStats{t: &Target{addr: fmt.Sprint(i)}, sample: sample{
				requests: uint64(p.reqs), failures: uint64(p.fails), answered: uint64(p.reqs), latencyNs: uint64(p.reqs) * uint64(p.lat)}}
		}
		var got []string
		for _, o := range findOutliers(&cfg, st) {
			got = append(got, o.t.addr+":"+o.rule.String())
		}
		if g := strings.Join(got, " "); g != want {
			t.Errorf("got %q, want %q", g, want)
		}
	}
	ms := time.Millisecond
	ok := traffic{reqs: 1000, fails: 1, lat: 10 * ms}
	def := PassiveConfig{}

	// Healthy pools, small differences and low volume eject nobody.
	f(def, []traffic{ok, ok, ok}, "")
	f(def, []traffic{ok, ok, ok, ok, ok, ok, ok, ok, ok, {reqs: 1000, fails: 10, lat: 10 * ms}}, "")
	f(def, []traffic{ok, ok, {reqs: 40, fails: 40, lat: 10 * ms}}, "")
	// Fewer than min_hosts backends with enough traffic: no comparison.
	f(def, []traffic{ok, {reqs: 1000, fails: 500, lat: 10 * ms}}, "")
	f(PassiveConfig{MinHosts: 2}, []traffic{ok, {reqs: 1000, fails: 500, lat: 10 * ms}}, "1:failure_percentage")

	// 30% failures among healthy peers: three backends are too few for
	// the stdev rule, the failure percentage finds it.
	f(def, []traffic{ok, {reqs: 1000, fails: 300, lat: 10 * ms}, ok}, "1:failure_percentage")
	f(PassiveConfig{FailurePercentage: -1}, []traffic{ok, {reqs: 1000, fails: 300, lat: 10 * ms}, ok}, "")
	// With more peers the stdev rule finds it first, even below the
	// failure percentage.
	f(def, []traffic{ok, ok, ok, ok, ok, ok, ok, {reqs: 1000, fails: 150, lat: 10 * ms}}, "7:success_rate")
	f(PassiveConfig{SuccessRateStdevFactor: -1}, []traffic{ok, ok, ok, ok, ok, ok, ok, {reqs: 1000, fails: 150, lat: 10 * ms}}, "")
	// A failure shared by the whole service is nobody's fault.
	bad := traffic{reqs: 1000, fails: 300, lat: 10 * ms}
	f(def, []traffic{bad, bad, bad, bad}, "")

	// Latency: 10 times slower than the others is an outlier, 3 times
	// is not, and fast backends never are.
	f(def, []traffic{ok, {reqs: 100, fails: 0, lat: 100 * ms}, ok}, "1:latency")
	f(def, []traffic{ok, {reqs: 100, fails: 0, lat: 30 * ms}, ok}, "")
	f(def, []traffic{{reqs: 1000, lat: ms / 10}, {reqs: 100, lat: 5 * ms}, {reqs: 1000, lat: ms / 10}}, "")
	f(PassiveConfig{LatencyMin: ms}, []traffic{{reqs: 1000, lat: ms / 10}, {reqs: 100, lat: 5 * ms}, {reqs: 1000, lat: ms / 10}}, "1:latency")
	f(PassiveConfig{LatencyFactor: -1}, []traffic{ok, {reqs: 100, fails: 0, lat: 100 * ms}, ok}, "")

	// Several outliers come worst first.
	f(def, []traffic{ok, ok, {reqs: 1000, lat: 200 * ms}, {reqs: 1000, fails: 250, lat: 10 * ms}, {reqs: 1000, fails: 400, lat: 10 * ms}, ok},
		"4:failure_percentage 3:failure_percentage 2:latency")
}

// fakePool is a pool of n targets with an Ejector that tests sweep by
// hand.
func fakePool(t *testing.T, n int, cfg PassiveConfig, panicThreshold int) (*Ejector, []*Target) {
	t.Helper()
	reg := NewRegistry(nil)
	ts := make([]*Target, n)
	for i := range ts {
		ts[i] = reg.Acquire(fmt.Sprintf("127.0.0.1:%d", i+1), cfg)
	}
	e := reg.NewEjector(t.Name(), cfg, panicThreshold)
	e.SetTargets(ts)
	t.Cleanup(e.Close)
	return e, ts
}

// serveN records n requests on tg, the first fails of them failed.
func serveN(tg *Target, now int64, n, fails int, lat time.Duration) {
	for i := 0; i < n; i++ {
		o := OutcomeSuccess
		if i < fails {
			o = OutcomeServerError
		}
		tg.Begin()
		tg.Done(now, o, lat)
	}
}

func TestEjectorEjectsOutliers(t *testing.T) {
	// Consecutive 5xx are out of the way: the comparison must find them.
	cfg := PassiveConfig{Consecutive5xx: 1000, BaseEjectionTime: time.Minute}
	e, ts := fakePool(t, 4, cfg, 0)
	now := time.Now()
	for i, tg := range ts {
		fails := 0
		if i == 1 {
			fails = 40 // 40%
		}
		lat := 10 * time.Millisecond
		if i == 2 {
			lat = 200 * time.Millisecond
		}
		serveN(tg, now.UnixNano(), 100, fails, lat)
	}
	e.sweep(now)
	// Half of four backends may be out: both outliers go.
	for i, want := range []State{StateHealthy, StateEjected, StateEjected, StateHealthy} {
		if got := ts[i].State(now.UnixNano()); got != want {
			t.Errorf("backend %d: %s, want %s (%s)", i, got, want, ts[i].Status(now).Reason)
		}
	}
	if r := ts[1].Status(now).Reason; !strings.Contains(r, "40.0% of 100 requests failed") || !strings.Contains(r, "over the last 10s") {
		t.Errorf("reason: %q", r)
	}
	if r := ts[2].Status(now).Reason; !strings.Contains(r, "mean latency 200ms") {
		t.Errorf("reason: %q", r)
	}
	// The next sweep sees no new traffic and changes nothing.
	e.sweep(now.Add(time.Second))
	if ts[1].State(now.UnixNano()) != StateEjected {
		t.Fatal("ejection lost")
	}
}

func TestMaxEjectionPercent(t *testing.T) {
	f := func(n, percent, outliers, wantEjected int) {
		t.Helper()
		cfg := PassiveConfig{Consecutive5xx: 1000, MaxEjectionPercent: percent, MinHosts: 2}
		e, ts := fakePool(t, n, cfg, 0)
		now := time.Now()
		for i, tg := range ts {
			fails := 0
			if i < outliers {
				fails = 50 + i // the first is the least bad
			}
			serveN(tg, now.UnixNano(), 100, fails, time.Millisecond)
		}
		e.sweep(now)
		ejected := 0
		for _, tg := range ts {
			if tg.State(now.UnixNano()) == StateEjected {
				ejected++
			}
		}
		if ejected != wantEjected {
			t.Fatalf("%d backends, max %d%%, %d outliers: %d ejected, want %d", n, percent, outliers, ejected, wantEjected)
		}
		if outliers > wantEjected && ts[0].State(now.UnixNano()) == StateEjected {
			t.Fatal("the least bad outlier was ejected before worse ones")
		}
	}
	f(10, 0, 3, 3)  // default 50%
	f(10, 20, 5, 2) // 20% of 10
	f(7, 40, 3, 2)  // 40% of 7 rounds down
	f(3, 0, 2, 0)   // most of the pool fails: nobody's fault
	f(2, 10, 1, 1)  // one may always go
	f(4, 100, 1, 1)
}

func TestBudgetAppliesTo5xxNotToGatewayFailures(t *testing.T) {
	cfg := PassiveConfig{Consecutive5xx: 2, ConsecutiveGatewayFailures: 2}
	_, ts := fakePool(t, 2, cfg, 0)
	now := time.Now().UnixNano()
	serveN(ts[0], now, 2, 2, time.Millisecond)
	serveN(ts[1], now, 2, 2, time.Millisecond)
	if ts[0].State(now) != StateEjected || ts[1].State(now) != StateHealthy {
		t.Fatalf("consecutive 5xx: %s, %s; want one ejected", ts[0].State(now), ts[1].State(now))
	}
	for i := 0; i < 2; i++ {
		ts[1].Begin()
		ts[1].Done(now, OutcomeConnectFailed, time.Millisecond)
	}
	if ts[1].State(now) != StateEjected {
		t.Fatalf("a backend refusing connections stays %s", ts[1].State(now))
	}
}

func TestPanicMode(t *testing.T) {
	e, ts := fakePool(t, 4, PassiveConfig{}, 50)
	now := time.Now()
	step := func(unhealthy int, want bool) {
		t.Helper()
		for i, tg := range ts {
			tg.setActive(i >= unhealthy, "test")
		}
		e.sweep(now)
		if e.Panic() != want {
			t.Fatalf("%d of 4 unhealthy: panic %v, want %v", unhealthy, e.Panic(), want)
		}
	}
	step(0, false)
	step(2, false) // 50% available is not below 50%
	step(3, true)
	since := e.PanicSince()
	step(4, true)
	if e.PanicSince() != since || since.IsZero() {
		t.Fatal("panic start changed while in panic")
	}
	step(1, false)
	if !e.PanicSince().IsZero() {
		t.Fatal("PanicSince set outside panic mode")
	}

	f := func(avail, n, threshold int, want bool) {
		t.Helper()
		if got := InPanic(avail, n, threshold); got != want {
			t.Errorf("InPanic(%d, %d, %d) = %v", avail, n, threshold, got)
		}
	}
	f(0, 0, 50, false)
	f(0, 1, 50, true)
	f(1, 1, 50, false)
	f(1, 3, 50, true)
	f(2, 3, 50, false)
	f(0, 3, 0, false)
}

func TestPanicModeWithBackups(t *testing.T) {
	e, ts := fakePool(t, 4, PassiveConfig{}, 50)
	b := e.NewBackup()
	t.Cleanup(b.Close)
	reg := NewRegistry(nil)
	bts := []*Target{reg.Acquire("127.0.0.2:1", PassiveConfig{}), reg.Acquire("127.0.0.2:2", PassiveConfig{})}
	b.SetTargets(bts)
	now := time.Now()
	step := func(primariesDown, backupsDown int, want bool) {
		t.Helper()
		for i, tg := range ts {
			tg.setActive(i >= primariesDown, "test")
		}
		for i, tg := range bts {
			tg.setActive(i >= backupsDown, "test")
		}
		e.sweep(now)
		b.sweep(now)
		if e.Panic() != want {
			t.Fatalf("%d of 4 primaries and %d of 2 backups down: panic %v, want %v", primariesDown, backupsDown, e.Panic(), want)
		}
		if b.Panic() {
			t.Fatal("the backup set's Ejector decided panic mode")
		}
	}
	step(3, 0, false) // below the threshold, but backups are there
	step(4, 1, false)
	step(3, 2, false) // one primary is left
	step(4, 2, true)
	step(4, 1, false)

	// The backups have a budget of their own: one of two may go for 5xx,
	// whatever the primaries do.
	for _, tg := range append(ts, bts...) {
		tg.setActive(true, "test")
	}
	for _, tg := range bts {
		serveN(tg, now.UnixNano(), DefaultConsecutive5xx, DefaultConsecutive5xx, time.Millisecond)
	}
	if bts[0].State(now.UnixNano()) != StateEjected || bts[1].State(now.UnixNano()) != StateHealthy {
		t.Fatalf("backups after consecutive 5xx: %s, %s; want one ejected", bts[0].State(now.UnixNano()), bts[1].State(now.UnixNano()))
	}

	f := func(avail, n, bavail, bn, threshold int, want bool) {
		t.Helper()
		if got := InPanicWithBackups(avail, n, bavail, bn, threshold); got != want {
			t.Errorf("InPanicWithBackups(%d, %d, %d, %d, %d) = %v", avail, n, bavail, bn, threshold, got)
		}
	}
	f(1, 3, 0, 0, 50, true) // no backups: InPanic
	f(1, 3, 0, 2, 50, false)
	f(0, 3, 1, 2, 50, false)
	f(0, 3, 0, 2, 50, true)
	f(0, 0, 0, 2, 50, true)
	f(0, 3, 0, 2, 0, false)
}

func TestWindowForgetsOldTraffic(t *testing.T) {
	cfg := PassiveConfig{Interval: time.Second, Window: 3 * time.Second}
	tg := NewRegistry(nil).Acquire("127.0.0.1:1", cfg)
	w := newWindow(cfg, tg)
	now := time.Now().UnixNano()
	f := func(served int, wantSum uint64) {
		t.Helper()
		serveN(tg, now, served, 0, time.Millisecond)
		w.advance(tg)
		if w.sum.requests != wantSum {
			t.Fatalf("window holds %d requests, want %d", w.sum.requests, wantSum)
		}
	}
	f(10, 10)
	f(20, 30)
	f(0, 30)
	f(5, 25) // the first interval left the window
	f(0, 5)
	w.reset()
	f(1, 1)
}

func TestEjectorClose(t *testing.T) {
	e, ts := fakePool(t, 2, PassiveConfig{Interval: 100 * time.Millisecond}, 50)
	e.Close()
	e.Close()
	if gs := ts[0].groups.Load(); gs != nil && len(*gs) != 0 {
		t.Fatal("a closed Ejector still holds a budget")
	}
}

// A sweep that panics is counted and logged, and the next sweep still
// runs and ejects.
func TestSweepPanicIsCountedAndSweepsGoOn(t *testing.T) {
	var logs lockedBuffer
	reg := NewRegistry(slog.New(slog.NewTextHandler(&logs, nil)))
	// The ticker's own sweeps stay out of the way of the ones made here.
	cfg := PassiveConfig{Consecutive5xx: 1000, BaseEjectionTime: time.Minute, Interval: time.Hour}
	ts := make([]*Target, 4)
	for i := range ts {
		ts[i] = reg.Acquire(fmt.Sprintf("127.0.0.1:%d", i+1), cfg)
	}
	e := reg.NewEjector("web", cfg, 0)
	e.SetTargets(ts)
	before := panics.Health.Total()

	// A nil target makes the sweep panic while it holds the Ejector's lock.
	e.targets.Store(&[]*Target{ts[0], nil})
	e.sweepSafe(time.Now())
	if n := panics.Health.Total() - before; n != 1 {
		t.Fatalf(`edgelb_panics_total{component="health"} went up by %d, want 1`, n)
	}
	out := logs.String()
	if want := `level=ERROR msg="panic in outlier detection" component=health service=web panic=`; !strings.Contains(out, want) || !strings.Contains(out, "ejector.go") {
		t.Fatalf("log lacks %q and the panicking frame:\n%s", want, out)
	}

	e.targets.Store(&ts)
	now := time.Now()
	for i, tg := range ts {
		fails := 0
		if i == 1 {
			fails = 40
		}
		serveN(tg, now.UnixNano(), 100, fails, 10*time.Millisecond)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		e.sweepSafe(now)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the sweep after a panic did not end: the Ejector's lock was left held")
	}
	if got := ts[1].State(now.UnixNano()); got != StateEjected {
		t.Fatalf("outlier after the panic: %s, want ejected", got)
	}
	if n := panics.Health.Total() - before; n != 1 {
		t.Fatalf("the sweep after the panic panicked too (%d panics)", n)
	}
	// Not deferred: with the lock left held, Close would hang the test.
	e.Close()
}
