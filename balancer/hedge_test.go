package balancer

import (
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestHedgeConfigErrors(t *testing.T) {
	f := func(hedge string, wants ...string) {
		t.Helper()
		configRefused(t, "services:\n  web: {static: [127.0.0.1:1], hedge: "+hedge+"}\n", wants...)
	}
	f("{}", "services.web.hedge.after: missing")
	f("{after: soon}", `services.web.hedge.after: "soon": want a duration (50ms) or a percentile (p95)`)
	f("{after: p100}", `services.web.hedge.after: "p100": a percentile is p followed by a number between 0 and 100`)
	f("{after: p0}", `services.web.hedge.after: "p0": a percentile`)
	f("{after: [1]}", "services.web.hedge.after: want a duration")
	f("{after: -5ms}", "services.web.hedge.after: must be positive")
	f("{after: 5ms, max: 4}", "services.web.hedge.max: must be 1 to 3, got 4")
	f("{after: 5ms, budget: 101}", "services.web.hedge.budget: must be 1 to 100 (percent of requests), got 101")
	f("{after: 5ms, max: 3}, retries: 5", "services.web.hedge.max: with retries 5 a request could try 9 backends; at most 8")
	f("{after: 5ms, min_after: -1ms}", "services.web.hedge.min_after: must not be negative")

	cfg, err := ParseConfig([]byte("services:\n  web: {static: [127.0.0.1:1], hedge: {after: p99.5}}\n"))
	if err != nil {
		t.Fatal(err)
	}
	h := cfg.Services["web"].Hedge
	if h.After.Percentile != 99.5 || h.Max != DefaultHedgeMax || h.Budget != DefaultHedgeBudget || h.MinAfter != DefaultHedgeMinAfter {
		t.Fatalf("defaults: %+v", *h)
	}
}

// The latency buckets grow by a quarter of a doubling, and a percentile
// comes out at the top of the bucket that holds it.
func TestHedgePercentile(t *testing.T) {
	prev := -1
	for lat := time.Duration(0); lat < 20*time.Second; lat = lat*9/8 + time.Microsecond {
		b := hedgeBucket(lat)
		if b < prev || b >= hedgeBuckets {
			t.Fatalf("%v: bucket %d after %d", lat, b, prev)
		}
		if b < hedgeBuckets-1 && lat > hedgeBucketMin && time.Duration(hedgeBucketTop(b)) < lat {
			t.Fatalf("%v in bucket %d, whose top is %v", lat, b, time.Duration(hedgeBucketTop(b)))
		}
		prev = b
	}
	h := newHedger("hedge_percentile_test", &HedgeConfig{After: HedgeAfter{Percentile: 95}, Max: 1, Budget: 10, MinAfter: time.Millisecond})
	now := time.Now().UnixNano()
	if d := h.delay(now); d != 0 {
		t.Fatalf("no answers yet: delay %v, want 0 (no hedging)", time.Duration(d))
	}
	// 95 answers at 2ms, 5 at 80ms: p95 is 2ms, in the bucket up to 2.048ms.
	for i := 0; i < 95; i++ {
		h.answered(2 * time.Millisecond)
	}
	for i := 0; i < 5; i++ {
		h.answered(80 * time.Millisecond)
	}
	d := time.Duration(h.delay(now + int64(2*hedgeEvery)))
	if d < 2*time.Millisecond || d > 2500*time.Microsecond {
		t.Fatalf("p95 of 95x2ms and 5x80ms: %v", d)
	}
}

// slowOrigin answers after delay, or when the edge gives up on it.
func slowOrigin(t *testing.T, name string, delay time.Duration) *recOrigin {
	return startRecOrigin(t, func(c net.Conn, head string) {
		time.Sleep(delay)
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nX-Origin: %s\r\nContent-Length: %d\r\n\r\n%s", name, len(name), name)
	})
}

// With one backend hanging for 2s and hedge after 30ms, every GET is
// answered well within a second, by the other backend when the first try
// went to the slow one; the slow backend is not blamed for the cancelled
// tries, and the hedges are counted.
func TestHedgedRequests(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		slow := slowOrigin(t, "slow", 2*time.Second)
		_, s := besideFast(t, engine, slow, "try_timeout: 5s, hedge: {after: 30ms}, health: {passive: {consecutive_gateway_failures: 1}}")
		sent0 := metricValue(t, s, `edgelb_hedges_total{service="web",result="sent"}`)
		fastWithin(t, s, "/h", 6, time.Second)
		// Every try the slow one got was a first try, hedged; a first
		// try to the fast one answers before any hedge.
		n := len(slow.got())
		if sent := metricValue(t, s, `edgelb_hedges_total{service="web",result="sent"}`) - sent0; n == 0 || sent != n {
			t.Errorf("%d hedges sent, for %d first tries to the slow backend", sent, n)
		}
		assertAllHealthy(t, s)
		if e := backendErrors(t, s, slow.addr); len(e) != 0 {
			t.Errorf("the slow backend has errors for tries that were cancelled: %v", e)
		}
	})
}

// fastWithin sends n GETs (path, then path0, path1...: one URL each) and
// fails unless each is answered 200 "fast" within limit.
func fastWithin(t *testing.T, s *Server, path string, n int, limit time.Duration) {
	t.Helper()
	for i := 0; i < n; i++ {
		start := time.Now()
		resp, err := rawRequest(t, s, "GET "+path+strconv.Itoa(i)+" HTTP/1.1\r\nHost: x\r\n\r\n")
		took := time.Since(start)
		if err != nil || resp.StatusCode() != 200 || string(resp.Body()) != "fast" {
			t.Fatalf("request %d: %v %d %q", i, err, statusOf(resp), bodyOf(resp))
		}
		if took > limit {
			t.Fatalf("request %d answered after %v, over %v", i, took, limit)
		}
	}
}

// waitEjected waits up to 3s for the web backend at addr to be ejected,
// for a reason that mentions why.
func waitEjected(t *testing.T, s *Server, addr, why string) {
	t.Helper()
	var b BackendStatus
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if b = webBackend(t, s, addr); b.State == "ejected" {
			break
		}
	}
	if b.State != "ejected" || !strings.Contains(b.Reason, why) {
		t.Fatalf("backend %s: %+v, want ejected (%s)", addr, b, why)
	}
}

// The budget bounds hedges: with budget 1%, a burst of slow tries hedges
// as many as the bucket holds; the others wait for budget, each counted
// once. The slow backend's weight gives it the first tries; the hedges go
// to the other, which answers at once.
func TestHedgeBudget(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		a := slowOrigin(t, "a", 60*time.Millisecond)
		b := slowOrigin(t, "b", 0)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: [{addr: "+a.addr+", weight: 1000}, "+b.addr+"], balance: round_robin,"+
			" hedge: {after: 20ms, budget: 1}}\nroutes: [{service: web}]\n")
		sent0 := metricValue(t, s, `edgelb_hedges_total{service="web",result="sent"}`)
		denied0 := metricValue(t, s, `edgelb_hedges_total{service="web",result="over_budget"}`)
		var wg sync.WaitGroup
		n := hedgeBurst/hedgeToken + 20
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := rawRequest(t, s, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
				if err != nil || resp.StatusCode() != 200 {
					t.Errorf("%v %d", err, statusOf(resp))
				}
			}()
		}
		wg.Wait()
		sent := metricValue(t, s, `edgelb_hedges_total{service="web",result="sent"}`) - sent0
		denied := metricValue(t, s, `edgelb_hedges_total{service="web",result="over_budget"}`) - denied0
		// Each request adds a hundredth of a hedge: the n requests add
		// less than one.
		// Each hedge that waited for budget counts once, however often
		// it checked again.
		if sent != hedgeBurst/hedgeToken || denied != n-sent {
			t.Errorf("%d hedges sent and %d refused for %d slow requests, want %d sent and each of the rest refused once", sent, denied, n, hedgeBurst/hedgeToken)
		}
		if got := len(a.got()) + len(b.got()); got != n+sent {
			t.Errorf("origins asked %d times for %d requests and %d hedges", got, n, sent)
		}
		assertAllHealthy(t, s)
	})
}

// A hedge waits, without spending budget, while the backend it would go
// to is as slow (requests in flight, no answer for the hedge delay): two
// hung backends, a request on each, and neither hedges to the other.
func TestHedgeWaitsWhileTargetStalled(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		x, y := silentOrigin(t), silentOrigin(t)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+x.addr+", "+y.addr+"], balance: round_robin,"+
			" try_timeout: 600ms, retries: 0, hedge: {after: 50ms}}\nroutes: [{service: web}]\n")
		sent0 := metricValue(t, s, `edgelb_hedges_total{service="web",result="sent"}`)
		tokens0 := s.pools["web"].hedge.tokens.Load()
		var wg sync.WaitGroup
		for i := 0; i < 2; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if resp, err := rawRequest(t, s, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil || resp.StatusCode() != 504 {
					t.Errorf("%v %d, want 504 at try_timeout", err, statusOf(resp))
				}
			}()
		}
		waitFor(t, "a try on each backend", func() bool { return len(x.got()) == 1 && len(y.got()) == 1 })
		time.Sleep(300 * time.Millisecond)
		if n := metricValue(t, s, `edgelb_hedges_total{service="web",result="sent"}`) - sent0; n != 0 {
			t.Errorf("%d hedges sent to a backend as hung as the first", n)
		}
		if got := s.pools["web"].hedge.tokens.Load(); got < tokens0 {
			t.Errorf("the hedge budget went from %d to %d: spent on hedges that could not help", tokens0, got)
		}
		wg.Wait()
	})
}

// A hedge refused for want of budget goes out soon after other requests
// add to it, not a whole hedge delay later: with the bucket spent, a
// request on a hung backend is due its hedge at 400ms and refused; at
// 450ms the bucket gets a hedge's worth, as other requests would add, and
// the waiting hedge goes at its next check, a quarter of the delay later,
// where it used to wait until 800ms.
func TestRefusedHedgeGoesOnceBudgetReturns(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		hung := silentOrigin(t)
		fast := slowOrigin(t, "fast", 0)
		// The hung backend's weight makes it the first try's.
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: [{addr: "+hung.addr+", weight: 100}, "+fast.addr+"],"+
			" balance: round_robin, try_timeout: 5s, hedge: {after: 400ms, budget: 1}}\nroutes: [{service: web}]\n")
		h := s.pools["web"].hedge
		h.tokens.Store(0)
		denied0 := metricValue(t, s, `edgelb_hedges_total{service="web",result="over_budget"}`)
		done := make(chan time.Duration, 1)
		go func() {
			start := time.Now()
			resp, err := rawRequest(t, s, "GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
			if err != nil || resp.StatusCode() != 200 || string(resp.Body()) != "fast" {
				t.Errorf("the hedged request: %v %d %q", err, statusOf(resp), bodyOf(resp))
			}
			done <- time.Since(start)
		}()
		waitFor(t, "the first try on the hung backend", func() bool { return len(hung.got()) == 1 })
		time.Sleep(450 * time.Millisecond)
		if n := metricValue(t, s, `edgelb_hedges_total{service="web",result="over_budget"}`) - denied0; n != 1 {
			t.Fatalf("over_budget went up by %d, want 1: the hedge was not refused", n)
		}
		h.tokens.Add(hedgeToken)
		if took := <-done; took > 750*time.Millisecond {
			t.Errorf("the hedged request took %v: its hedge waited a whole delay (400ms) after the budget came back", took)
		}
		if n := metricValue(t, s, `edgelb_hedges_total{service="web",result="over_budget"}`) - denied0; n != 1 {
			t.Errorf("over_budget went up by %d, want 1: a hedge that waits counts once", n)
		}
	})
}

// A hedge that fails (the other backend is dead) does not fail the
// request: the first try's answer, when it comes, is the one.
func TestHedgeToDeadBackend(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		slow := slowOrigin(t, "slow", 150*time.Millisecond)
		dead := deadAddr(t)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+slow.addr+", "+dead+"], balance: round_robin,"+
			" hedge: {after: 20ms}, health: {panic_threshold: -1, passive: {consecutive_gateway_failures: 100}}}\nroutes: [{service: web}]\n")
		for i := 0; i < 4; i++ {
			resp, err := rawRequest(t, s, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			if err != nil || resp.StatusCode() != 200 || string(resp.Body()) != "slow" {
				t.Fatalf("request %d: %v %d %q", i, err, statusOf(resp), bodyOf(resp))
			}
		}
		if n := len(slow.got()); n != 4 {
			t.Errorf("the slow backend was asked %d times for 4 requests", n)
		}
	})
}

// A backend that stopped answering (it reads requests and never answers)
// loses every hedge race; its abandoned tries keep their place in its
// in-flight count until their deadline, so least-loaded selection stops
// picking it after its first try.
func TestHedgeSteersAwayFromHungBackend(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		hung := slowOrigin(t, "hung", 10*time.Second)
		a := slowOrigin(t, "a", 0)
		b := slowOrigin(t, "b", 0)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+hung.addr+", "+a.addr+", "+b.addr+"], try_timeout: 5s,"+
			" hedge: {after: 20ms}}\nroutes: [{service: web}]\n")
		for i := 0; i < 30; i++ {
			start := time.Now()
			resp, err := rawRequest(t, s, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
			if err != nil || resp.StatusCode() != 200 || string(resp.Body()) == "hung" {
				t.Fatalf("request %d: %v %d %q", i, err, statusOf(resp), bodyOf(resp))
			}
			if took := time.Since(start); took > time.Second {
				t.Fatalf("request %d took %v", i, took)
			}
		}
		if n := len(hung.got()); n > 2 {
			t.Errorf("the hung backend got %d of 30 requests; its abandoned tries should keep it from being picked", n)
		}
		assertAllHealthy(t, s)
	})
}

// Every try ends: after hedged requests whose clients stay or go away
// mid-request, and whose losing tries are abandoned, no backend is left
// with a request in flight.
func TestHedgedTriesAllEnd(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		slow := slowOrigin(t, "slow", 300*time.Millisecond)
		fast := slowOrigin(t, "fast", 0)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+slow.addr+", "+fast.addr+"], try_timeout: 1s,"+
			" hedge: {after: 10ms, max: 1}}\nroutes: [{service: web}]\n")
		var wg sync.WaitGroup
		for i := 0; i < 24; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c := dialEdge(t, s)
				defer c.Close()
				io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
				if i%3 == 0 {
					// Gone before any answer.
					time.Sleep(5 * time.Millisecond)
					return
				}
				c.Read(make([]byte, 512))
			}()
		}
		wg.Wait()
		deadline := time.Now().Add(5 * time.Second)
		for {
			busy := 0
			for _, b := range s.Status().Services["web"].Backends {
				busy += int(b.Inflight)
			}
			if busy == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d tries still in flight 5s after the last request", busy)
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// A backend that stopped answering, behind hedging: every client still gets
// the other backend's answer within a second, and the hung one's abandoned
// tries, once past try_timeout, count as the timeouts they are, so passive
// checks eject it (no active checks here) instead of hedges masking it.
func TestHedgedHungBackendEjected(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		hung, fast, s := silentAndFast(t, engine, "try_timeout: 300ms, hedge: {after: 20ms}, health: {passive: {consecutive_gateway_failures: 2}}")
		fastWithin(t, s, "/h", 4, time.Second)
		if len(hung.got()) < 2 {
			t.Fatalf("the hung backend got %d tries, want 2 or more", len(hung.got()))
		}
		waitEjected(t, s, hung.addr, "timeout")
		if e := backendErrors(t, s, fast.addr); len(e) != 0 {
			t.Errorf("the answering backend's errors: %v", e)
		}
	})
}

// A hedge that waits checks again every quarter of the delay, at least
// every hedgeRetryMin, and no more while the delay is 0 (never hedge).
func TestHedgeRetry(t *testing.T) {
	h := &hedger{}
	for after, want := range map[time.Duration]time.Duration{0: 0, 400 * time.Millisecond: 100 * time.Millisecond, 200 * time.Microsecond: hedgeRetryMin} {
		h.after.Store(int64(after))
		if got := time.Duration(h.retry()); got != want {
			t.Errorf("after %v: retry %v, want %v", after, got, want)
		}
	}
}

// A client that leaves while its request has a try and a hedge out costs
// neither backend anything: its own error is never a backend's.
func TestHedgedClientLeavesBlamesNobody(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		a := slowOrigin(t, "a", 200*time.Millisecond)
		b := slowOrigin(t, "b", 200*time.Millisecond)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+a.addr+", "+b.addr+"], balance: round_robin,"+
			" hedge: {after: 20ms}, health: {passive: {consecutive_gateway_failures: 1, consecutive_5xx: 1}}}\nroutes: [{service: web}]\n")
		for i := 0; i < 3; i++ {
			c := dialEdge(t, s)
			io.WriteString(c, "GET /gone"+strconv.Itoa(i)+" HTTP/1.1\r\nHost: x\r\n\r\n")
			waitFor(t, "a try and a hedge", func() bool { return len(a.got())+len(b.got()) == 2*(i+1) })
			c.Close()
			// Until both tries are over: an idle backend takes the
			// next request's hedge.
			time.Sleep(300 * time.Millisecond)
		}
		for _, o := range []*recOrigin{a, b} {
			if e := backendErrors(t, s, o.addr); len(e) != 0 {
				t.Errorf("backend %s blamed for clients that left: %v", o.addr, e)
			}
		}
		assertAllHealthy(t, s)
	})
}
