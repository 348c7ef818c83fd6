package balancer

import (
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/discovery/consultest"
)

// answerLog records which origin answered when, from a paced load.
type answerLog struct {
	mu      sync.Mutex
	answers []originAnswer
	failed  []string
}

type originAnswer struct {
	at   time.Time
	body string
}

// first waits up to 5s for an answer containing want that came after t0,
// and returns when it came, and whether one did.
func (l *answerLog) first(want string, t0 time.Time) (time.Time, bool) {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		l.mu.Lock()
		for _, a := range l.answers {
			if a.at.After(t0) && strings.Contains(a.body, want) {
				l.mu.Unlock()
				return a.at, true
			}
		}
		l.mu.Unlock()
	}
	return time.Time{}, false
}

// last returns when the last answer containing want came.
func (l *answerLog) last(want string) time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	var at time.Time
	for _, a := range l.answers {
		if strings.Contains(a.body, want) {
			at = a.at
		}
	}
	return at
}

// paceLoad sends GET / from n clients, each one request every pace, until
// stop closes, and logs every answer.
func paceLoad(s *Server, n int, pace time.Duration, stop chan struct{}) (*answerLog, func()) {
	l := &answerLog{}
	var wg sync.WaitGroup
	c := &fasthttp.HostClient{Addr: s.Addr(), MaxIdemponentCallAttempts: 1}
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
			defer fasthttp.ReleaseRequest(req)
			defer fasthttp.ReleaseResponse(resp)
			tick := time.NewTicker(pace)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				req.SetRequestURI("http://x/")
				err := c.DoTimeout(req, resp, 10*time.Second)
				now := time.Now()
				l.mu.Lock()
				if err != nil || resp.StatusCode() != 200 {
					l.failed = append(l.failed, fmt.Sprintf("%s: err=%v status=%d %s", now.Format(time.RFC3339Nano), err, resp.StatusCode(), resp.Header.Peek(HeaderError)))
				} else {
					l.answers = append(l.answers, originAnswer{at: now, body: string(resp.Body())})
				}
				l.mu.Unlock()
			}
		}()
	}
	return l, wg.Wait
}

// seriesValue returns the value of one series in /metrics, 0 when it is
// not there yet.
func seriesValue(t *testing.T, s *Server, series string) float64 {
	t.Helper()
	_, body := adminGet(t, s, "/metrics")
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return f
		}
	}
	return 0
}

// TestConsulDatacenterFailoverUnderLoad runs light load through edgelb
// while the instances of its service in dc1 are deregistered and then
// registered again: clients get every answer, from dc2 as soon as dc1 has
// none, and from dc1 again once it has kept its instances for
// failover_hold. /status says which datacenter serves and why, and the
// metrics count the switches.
func TestConsulDatacenterFailoverUnderLoad(t *testing.T) {
	dc1 := consultest.StartDatacenter(t, "dc1")
	dc2 := consultest.StartDatacenter(t, "dc2")
	dc1.JoinWAN(dc2)
	a1, a2, b1 := startOrigin(t, "dc1-a1", nil), startOrigin(t, "dc1-a2", nil), startOrigin(t, "dc2-b1", nil)
	registerDC1 := func() {
		dc1.Register("a1", "web", originPort(t, a1), nil, 0)
		dc1.Register("a2", "web", originPort(t, a2), nil, 0)
	}
	registerDC1()
	dc2.Register("b1", "web", originPort(t, b1), nil, 0)
	const hold = 2 * time.Second

	bothEngines(t, func(t *testing.T, engine string) {
		registerDC1() // as it was, whatever happened before
		s := startEdge(t, fmt.Sprintf(`
state_dir: %s
server: {%s}
consul: {address: %s}
services:
  web:
    consul: {name: web, failover: [dc2], failover_hold: %s}
    health: {active: {path: /, interval: 200ms}}
routes: [{service: web}]
`, t.TempDir(), engine, dc1.Addr(), hold))
		waitBody(t, s, "x", "/", "hello from dc1-")
		before := seriesValue(t, s, `edgelb_discovery_failovers_total{service="web",from="dc1",to="dc2"}`)

		stop := make(chan struct{})
		log, wait := paceLoad(s, 4, 5*time.Millisecond, stop)
		defer func() {
			select {
			case <-stop:
			default:
				close(stop)
				wait()
			}
		}()
		time.Sleep(1100 * time.Millisecond) // load under way, past the spacing of Consul calls

		// dc1 loses its instances: dc2 answers.
		t0 := time.Now()
		dc1.Deregister("a1")
		dc1.Deregister("a2")
		waitBody(t, s, "x", "/", "hello from dc2-b1")
		first, ok := log.first("hello from dc2-b1", t0)
		if !ok {
			t.Fatal("the load never got an answer from dc2")
		}
		t.Logf("%s: first answer from dc2 %s after dc1's first deregistration; last answer from dc1 %s after it",
			engine, first.Sub(t0).Round(time.Millisecond), log.last("hello from dc1-").Sub(t0).Round(time.Millisecond))
		if d := first.Sub(t0); d > 5*time.Second {
			t.Fatalf("dc2 answered only %s after dc1 lost its instances", d)
		}
		st := s.Status().Services["web"]
		if f := st.Failover; f == nil || f.Datacenter != "dc2" || f.Reason != "dc1 has no passing instance; dc2 has 1 passing instance" {
			t.Fatalf("/status failover: %+v", st.Failover)
		}
		// dc1's backends may still be draining their last requests.
		var serving []BackendStatus
		for _, b := range st.Backends {
			if b.State != "draining" {
				serving = append(serving, b)
			}
		}
		if len(serving) != 1 || serving[0].Addr != b1.addr || serving[0].State != "healthy" {
			t.Fatalf("/status backends while dc2 serves: %+v", st.Backends)
		}
		code, body := adminGet(t, s, "/status")
		if code != 200 || !strings.Contains(body, `"datacenter": "dc2"`) || !strings.Contains(body, `"reason": "dc1 has no passing instance; dc2 has 1 passing instance"`) {
			t.Fatalf("GET /status: %d\n%s", code, body)
		}

		// dc1 has instances again: back after the hold.
		t1 := time.Now()
		registerDC1()
		waitBody(t, s, "x", "/", "hello from dc1-")
		back, ok := log.first("hello from dc1-", t1)
		if !ok {
			t.Fatal("the load never got an answer from dc1 again")
		}
		t.Logf("%s: back to dc1 %s after its instances were registered again (failover_hold %s)", engine, back.Sub(t1).Round(time.Millisecond), hold)
		if back.Sub(t1) < hold-200*time.Millisecond {
			t.Fatalf("back to dc1 after %s, before the hold of %s", back.Sub(t1), hold)
		}
		time.Sleep(200 * time.Millisecond)
		close(stop)
		wait()

		log.mu.Lock()
		n, failed := len(log.answers), log.failed
		log.mu.Unlock()
		t.Logf("%s: %d answers, %d failures", engine, n, len(failed))
		if len(failed) != 0 {
			t.Fatalf("clients saw %d failures, want 0: %v", len(failed), failed)
		}
		if d := seriesValue(t, s, `edgelb_discovery_failovers_total{service="web",from="dc1",to="dc2"}`) - before; d != 1 {
			t.Fatalf("failovers from dc1 to dc2 went up by %v, want 1", d)
		}
		_, m := adminGet(t, s, "/metrics")
		for _, want := range []string{
			`edgelb_discovery_datacenter_serving{service="web",datacenter="dc1"} 1`,
			`edgelb_discovery_datacenter_serving{service="web",datacenter="dc2"} 0`,
			`edgelb_discovery_failovers_total{service="web",from="dc2",to="dc1"}`,
		} {
			if !strings.Contains(m, want) {
				t.Errorf("/metrics lacks %q", want)
			}
		}
		checkExposition(t, m)
	})

	// dc2 stops while dc1 serves: nothing changes for clients.
	registerDC1()
	s := startEdge(t, fmt.Sprintf("state_dir: %s\nconsul: {address: %s}\nservices:\n  web: {consul: {name: web, failover: [dc2]}}\nroutes: [{service: web}]\n",
		t.TempDir(), dc1.Addr()))
	waitBody(t, s, "x", "/", "hello from dc1-")
	stop := make(chan struct{})
	log, wait := paceLoad(s, 2, 5*time.Millisecond, stop)
	dc2.Stop()
	deadline := time.Now().Add(20 * time.Second)
	for f := s.Status().Services["web"].Failover; f == nil || f.Datacenters[1].LastError == ""; f = s.Status().Services["web"].Failover {
		if time.Now().After(deadline) {
			t.Fatalf("dc2's failure never showed in /status: %+v", f)
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(time.Second)
	close(stop)
	wait()
	f := s.Status().Services["web"].Failover
	if len(log.failed) != 0 || f.Datacenter != "dc1" || len(s.Status().Services["web"].Backends) != 2 || log.last("hello from dc2") != (time.Time{}) {
		t.Fatalf("dc2 stopped: %d failures, failover %+v, backends %+v", len(log.failed), f, s.Status().Services["web"].Backends)
	}
	t.Logf("dc2 stopped while dc1 serves: %d answers, all from dc1; dc2 in /status: %s", len(log.answers), f.Datacenters[1].LastError)
}
