package balancer

import (
	"encoding/json"
	"math"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/edgelb/edgelb/health"
	"github.com/edgelb/edgelb/internal/version"
)

// liveStatus reads /status?rates=1 over HTTP, as the page does.
func liveStatus(t *testing.T, s *Server, since int64) *Status {
	t.Helper()
	code, body := adminGet(t, s, "/status?rates=1&since="+strconv.FormatInt(since, 10))
	if code != 200 {
		t.Fatalf("/status?rates=1: %d %s", code, body)
	}
	var st Status
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatalf("/status?rates=1: %v\n%s", err, body)
	}
	return &st
}

// backendStatus returns the backend addr of service in st.
func backendStatus(t *testing.T, st *Status, service, addr string) BackendStatus {
	t.Helper()
	for _, b := range st.Services[service].Backends {
		if b.Addr == addr {
			return b
		}
	}
	t.Fatalf("service %s has no backend %s in /status", service, addr)
	return BackendStatus{}
}

// TestLiveStatus: /status?rates=1 counts every request in the service's
// and backends' per-second history and rates, keeps a dead backend's
// ejection in its history, and gives only newer samples with since;
// plain /status stays as it was, with the version added.
func TestLiveStatus(t *testing.T) {
	o1, o2 := startOrigin(t, "o1", nil), startOrigin(t, "o2", nil)
	s := startEdge(t, "services:\n  web:\n    static: "+staticList(o1, o2)+
		"\n    health: {passive: {consecutive_gateway_failures: 1, base_ejection_time: 1m}}\nroutes: [{service: web}]\n")
	const n = 30
	for i := 0; i < n; i++ {
		if resp := do(t, s, "GET", "shop.example", "/"); resp.StatusCode() != 200 {
			t.Fatalf("GET: %d", resp.StatusCode())
		}
	}
	// Every request is in the samples once they are taken.
	counted := func() (svc, backends uint64) {
		s.live.mu.Lock()
		defer s.live.mu.Unlock()
		p := s.poolsSorted()[0]
		if p.m.live == nil {
			return 0, 0
		}
		for _, smp := range p.m.live.ring {
			svc += uint64(smp.requests)
		}
		for _, b := range p.set.Load().list {
			if b.m.live == nil {
				continue
			}
			for _, smp := range b.m.live.ring {
				backends += uint64(smp.requests)
			}
		}
		return svc, backends
	}
	waitUntil(t, 10*time.Second, "all requests sampled", func() bool {
		svc, backends := counted()
		return svc == n && backends == n
	})
	st := liveStatus(t, s, 0)
	web := st.Services["web"]
	if web.Rates == nil || web.History == nil || st.Samples == nil {
		t.Fatalf("no rates or history: %+v", web)
	}
	if len(st.Samples.Times) == 0 {
		t.Fatalf("samples %v", st.Samples.Times)
	}
	if r := float64(web.Rates.Requests); !(r > 0) || web.Rates.WindowSeconds <= 0 {
		t.Fatalf("service rates %+v", web.Rates)
	}
	if p50, p99 := float64(web.Rates.P50), float64(web.Rates.P99); !(p50 > 0 && p99 >= p50) {
		t.Fatalf("percentiles p50 %v p99 %v", p50, p99)
	}
	for _, series := range []Series{web.History.Requests, web.History.Errors, web.History.P99, web.History.Available} {
		if len(series) != len(st.Samples.Times) {
			t.Fatalf("a series of %d values for %d samples", len(series), len(st.Samples.Times))
		}
	}
	if len(web.History.Panic) != len(st.Samples.Times) || strings.Trim(web.History.Panic, ".") != "" {
		t.Fatalf("panic history %q", web.History.Panic)
	}
	b1 := backendStatus(t, st, "web", o1.addr)
	if b1.History == nil || len(b1.History.States) != len(st.Samples.Times) || strings.Trim(b1.History.States, "h") != "" {
		t.Fatalf("backend history %+v", b1.History)
	}
	if math.IsNaN(float64(b1.Rates.Mean)) && float64(b1.Rates.Requests) > 0 {
		t.Fatalf("backend rates %+v", b1.Rates)
	}

	// A dead backend: its ejection shows in its history and its failures
	// in its rates.
	o2.stop()
	waitUntil(t, 20*time.Second, "o2 ejected", func() bool {
		do(t, s, "GET", "shop.example", "/")
		return backendStatus(t, s.Status(), "web", o2.addr).State == "ejected"
	})
	waitUntil(t, 10*time.Second, "the ejection in o2's history", func() bool {
		b := backendStatus(t, liveStatus(t, s, 0), "web", o2.addr)
		return strings.HasSuffix(b.History.States, "e") && float64(b.Rates.Failures) > 0
	})

	// since: only the samples after it.
	st = liveStatus(t, s, 0)
	last := st.Samples.Times[len(st.Samples.Times)-1]
	waitUntil(t, 10*time.Second, "a newer sample", func() bool {
		st = liveStatus(t, s, last)
		return len(st.Samples.Times) > 0
	})
	for _, tm := range st.Samples.Times {
		if tm <= last {
			t.Fatalf("since=%d gave the sample of %d", last, tm)
		}
	}
	if b := backendStatus(t, st, "web", o2.addr); len(b.History.States) != len(st.Samples.Times) || len(b.History.Requests) != len(st.Samples.Times) {
		t.Fatalf("since=%d: %d samples, history %+v", last, len(st.Samples.Times), b.History)
	}

	// Plain /status: the contract's fields, the version, nothing live.
	code, body := adminGet(t, s, "/status")
	if code != 200 || strings.Contains(body, `"samples"`) || strings.Contains(body, `"rates"`) || strings.Contains(body, `"history"`) {
		t.Fatalf("/status: %d\n%s", code, body)
	}
	var plain map[string]any
	if err := json.Unmarshal([]byte(body), &plain); err != nil {
		t.Fatal(err)
	}
	if plain["version"] != version.Version() || plain["started_at"] == nil {
		t.Fatalf("/status version %v, started_at %v", plain["version"], plain["started_at"])
	}
	code, body = adminGet(t, s, "/status?rates=1&since=yesterday")
	if code != 400 || !strings.Contains(body, `since="yesterday"`) || !strings.Contains(body, "unix milliseconds") {
		t.Fatalf("bad since: %d %q", code, body)
	}
}

// waitUntil polls cond until it holds, failing after timeout.
func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestLiveBriefStatesShow: a backend ejected and back between two samples
// still shows as ejected in that second, and no sample spans a gap in the
// looks.
func TestLiveBriefStatesShow(t *testing.T) {
	reg := health.NewRegistry(nil)
	defer reg.Close()
	const addr = "127.0.0.1:1"
	tg := reg.Acquire(addr, health.PassiveConfig{ConsecutiveGatewayFailures: 1, BaseEjectionTime: time.Millisecond})
	b := &Backend{addr: addr, target: tg, m: newBackendMetrics(newSeriesTable(), "web", addr)}
	var tick uint64
	look := func() byte {
		tick++
		now := time.Now().UnixNano()
		bl := lookBackend(b, tg.State(now))
		bl.record(tick)
		return b.m.live.ring[tick%liveSamples].state
	}
	if st := look(); st != liveHealthy {
		t.Fatalf("healthy backend sampled as %q", st)
	}
	tg.Begin()
	tg.Done(time.Now().UnixNano(), health.OutcomeConnectFailed, time.Millisecond)
	time.Sleep(10 * time.Millisecond) // the ejection is over
	if st := tg.State(time.Now().UnixNano()); st != health.StateHealthy {
		t.Fatalf("state %s after the ejection", st)
	}
	if st := look(); st != liveEjected {
		t.Fatalf("a brief ejection sampled as %q", st)
	}
	if st := look(); st != liveHealthy {
		t.Fatalf("after the ejection: %q", st)
	}
	// A gap in the looks starts over: no sample spans it.
	tick++
	if st := look(); st != 0 {
		t.Fatalf("a sample across a gap: %q", st)
	}
}

func TestLatencyQuantile(t *testing.T) {
	f := func(q float64, counts map[int]uint32, want float64) {
		t.Helper()
		c := make([]uint32, len(latencyBuckets)+1)
		for i, n := range counts {
			c[i] = n
		}
		got := latencyQuantile(q, c)
		if math.IsNaN(want) != math.IsNaN(got) || (!math.IsNaN(want) && math.Abs(got-want) > 1e-9) {
			t.Fatalf("q %v of %v: %v, want %v", q, counts, got, want)
		}
	}
	f(0.5, nil, math.NaN())
	// All in the first bucket (0 to 0.5ms): interpolated from 0.
	f(0.5, map[int]uint32{0: 10}, 0.00025)
	f(1, map[int]uint32{0: 10}, 0.0005)
	// 10 in 1-2.5ms, 10 in 2.5-5ms: the median is the top of the first.
	f(0.5, map[int]uint32{2: 10, 3: 10}, 0.0025)
	f(0.75, map[int]uint32{2: 10, 3: 10}, 0.00375)
	// Above the last bound reads as the last bound.
	f(0.99, map[int]uint32{len(latencyBuckets): 5}, 30)
	f(0.1, map[int]uint32{0: 1, len(latencyBuckets): 99}, 30)
}

func TestSeriesJSON(t *testing.T) {
	b, err := json.Marshal(struct {
		S Series `json:"s"`
		N Number `json:"n"`
		M Number `json:"m"`
	}{Series{1, math.NaN(), 2.0004, 1.0 / 3}, Number(math.NaN()), 12.5})
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"s":[1,null,2,0.333],"n":null,"m":12.5}`; string(b) != want {
		t.Fatalf("%s, want %s", b, want)
	}
}
