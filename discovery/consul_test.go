package discovery

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/edgelb/edgelb/discovery/consultest"
	"github.com/edgelb/edgelb/internal/panics"
)

func startSourceToken(t *testing.T, a *consultest.Agent, token string, services map[string]ConsulService) (*Consul, *recorder) {
	t.Helper()
	rec := newRecorder()
	c, err := NewConsul(ConsulConfig{Address: a.Addr(), Token: token}, services, "", rec, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	t.Cleanup(c.Stop)
	return c, rec
}

func startSource(t *testing.T, a *consultest.Agent, tagRoutes bool, services map[string]ConsulService, stateDir string) (*Consul, *recorder) {
	t.Helper()
	rec := newRecorder()
	c, err := NewConsul(ConsulConfig{Address: a.Addr(), TagRoutes: tagRoutes}, services, stateDir, rec, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	t.Cleanup(c.Stop)
	return c, rec
}

func TestConsulWatchesService(t *testing.T) {
	a := consultest.Start(t)
	_, rec := startSource(t, a, false, map[string]ConsulService{"web": {Name: "web-svc"}}, "")
	a.Register("w1", "web-svc", 9001, nil, 0)
	d := eventually(t, "first instance", func() bool { return rec.addrs("web") == "127.0.0.1:9001*1" })
	t.Logf("first registration published after %s", d)

	time.Sleep(1100 * time.Millisecond) // past the minimum call interval: the next change is immediate
	a.Register("w2", "web-svc", 9002, nil, 5)
	d = eventually(t, "second instance with weight", func() bool { return rec.addrs("web") == "127.0.0.1:9001*1,127.0.0.1:9002*5" })
	t.Logf("registration published after %s", d)

	check := a.Register("w3", "web-svc", 9003, nil, 0)
	eventually(t, "third instance", func() bool { return strings.Contains(rec.addrs("web"), "9003") })
	a.SetCheck(check, api.HealthCritical)
	eventually(t, "critical instance removed", func() bool { return !strings.Contains(rec.addrs("web"), "9003") })
	a.SetCheck(check, api.HealthWarning)
	time.Sleep(1500 * time.Millisecond)
	if strings.Contains(rec.addrs("web"), "9003") {
		t.Fatalf("an instance with a warning check must not be routed")
	}

	time.Sleep(1100 * time.Millisecond)
	a.Deregister("w2")
	d = eventually(t, "deregistration", func() bool { return rec.addrs("web") == "127.0.0.1:9001*1" })
	t.Logf("deregistration published after %s", d)

	a.NodeMaintenance(true)
	eventually(t, "node in maintenance excluded", func() bool { return rec.addrs("web") == "" })
	a.NodeMaintenance(false)
	eventually(t, "node back from maintenance", func() bool { return rec.addrs("web") == "127.0.0.1:9001*1" })
}

func TestConsulTagRoutes(t *testing.T) {
	a := consultest.Start(t)
	c, rec := startSource(t, a, true, nil, "")
	a.Register("api-1", "api", 9101, []string{"edge.route=*/api", "edge.route=API.example.com/v2/", "other"}, 0)
	a.Register("api-2", "api", 9102, []string{"edge.route=", "edge.route=/nohost", "edge.route=bad host/x"}, 0)
	eventually(t, "tag-routed service", func() bool { return rec.addrs("api") == "127.0.0.1:9101*1,127.0.0.1:9102*1" })
	got := fmt.Sprint(rec.set("api").Routes)
	if got != "[{* /api} {api.example.com /v2}]" {
		t.Fatalf("routes: %s", got)
	}
	a.Register("plain", "plain", 9200, []string{"v1"}, 0)
	time.Sleep(1500 * time.Millisecond)
	if rec.set("plain") != nil {
		t.Fatalf("a service without edge.route tags must not be routed")
	}
	a.Deregister("api-1")
	a.Deregister("api-2")
	eventually(t, "tag-routed service removed", func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return rec.removed["api"]
	})
	var names []string
	for _, st := range c.Status() {
		names = append(names, st.Service)
	}
	if strings.Join(names, ",") != "(catalog)" {
		t.Fatalf("status after removal: %v", names)
	}
}

func TestConsulOutageKeepsInstances(t *testing.T) {
	a := consultest.Start(t)
	state := t.TempDir()
	c, rec := startSource(t, a, true, map[string]ConsulService{"web": {Name: "web"}}, state)
	a.Register("w1", "web", 9001, []string{"edge.route=*/"}, 0)
	a.Register("t1", "tagged", 9301, []string{"edge.route=tagged.example/"}, 0)
	eventually(t, "instances", func() bool {
		return rec.addrs("web") == "127.0.0.1:9001*1" && rec.addrs("tagged") == "127.0.0.1:9301*1"
	})

	a.Stop()
	eventually(t, "errors in status", func() bool {
		for _, st := range c.Status() {
			if st.Service == "web" && st.Stale && strings.Contains(st.LastError, a.Addr()) {
				return true
			}
		}
		return false
	})
	if rec.addrs("web") != "127.0.0.1:9001*1" || rec.addrs("tagged") != "127.0.0.1:9301*1" {
		t.Fatalf("instances lost during the outage: web=%s tagged=%s", rec.addrs("web"), rec.addrs("tagged"))
	}

	// A restarted dev agent has lost every registration; until they come
	// back the last instances stay.
	a.Restart()
	time.Sleep(2500 * time.Millisecond)
	if rec.addrs("web") != "127.0.0.1:9001*1" || rec.addrs("tagged") != "127.0.0.1:9301*1" {
		t.Fatalf("instances dropped after Consul restarted empty: web=%s tagged=%s", rec.addrs("web"), rec.addrs("tagged"))
	}
	a.Register("w2", "web", 9002, []string{"edge.route=*/"}, 0)
	eventually(t, "recovery after restart", func() bool { return rec.addrs("web") == "127.0.0.1:9002*1" })
	for _, st := range c.Status() {
		if st.Service == "web" && (st.Stale || st.LastError != "") {
			t.Fatalf("status after recovery: %+v", st)
		}
	}
}

// TestConsulRestartSeenAtOnce restarts Consul empty on the same ports: the
// watches see the new agent at once instead of blocking on the old, higher
// index, the status says what Consul answers, a new registration is routed
// within seconds, and what nobody registers again is dropped when the
// hold, counted from Consul's first empty answer, ends.
func TestConsulRestartSeenAtOnce(t *testing.T) {
	a := consultest.Start(t)
	rec := newRecorder()
	c, err := NewConsul(ConsulConfig{Address: a.Addr(), TagRoutes: true}, map[string]ConsulService{"web": {Name: "web"}}, "", rec, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	c.hold = 4 * time.Second
	c.Start()
	t.Cleanup(c.Stop)
	a.Register("w1", "web", 9001, []string{"edge.route=*/"}, 0)
	a.Register("t1", "tagged", 9301, []string{"edge.route=tagged.example/"}, 0)
	// Many changes raise the index well above what the new agent starts at.
	for i := 0; i < 20; i++ {
		a.Register(fmt.Sprint("x", i), "other", 9400+i, nil, 0)
	}
	eventually(t, "instances", func() bool {
		return rec.addrs("web") == "127.0.0.1:9001*1" && rec.addrs("tagged") == "127.0.0.1:9301*1"
	})
	status := func(service string) Status {
		for _, st := range c.Status() {
			if st.Service == service {
				return st
			}
		}
		return Status{}
	}

	a.Restart()
	up := time.Now()
	d := eventually(t, "the status to show Consul's answer", func() bool {
		return strings.Contains(status("web").LastError, "returned no instances right after an outage")
	})
	t.Logf("restarted Consul answered %s after it was up", d)
	if d > 15*time.Second {
		t.Fatalf("the restarted Consul was seen only after %s", d)
	}
	if rec.addrs("web") != "127.0.0.1:9001*1" {
		t.Fatalf("instances dropped at once after Consul restarted empty: %s", rec.addrs("web"))
	}

	a.Register("w2", "web", 9002, []string{"edge.route=*/"}, 0)
	d = eventually(t, "the new registration", func() bool { return rec.addrs("web") == "127.0.0.1:9002*1" })
	t.Logf("registration in the restarted Consul published after %s", d)
	if d > 5*time.Second {
		t.Fatalf("a registration in the restarted Consul took %s to be published", d)
	}
	if st := status("web"); st.Stale || st.LastError != "" {
		t.Fatalf("status after the registration: %+v", st)
	}

	// The tag-routed service nobody registers again goes when the hold
	// ends, counted from the first empty answer.
	eventually(t, "the unregistered tag-routed service removed", func() bool { return rec.wasRemoved("tagged") })
	gone := time.Since(up)
	t.Logf("tag-routed service removed %s after Consul was up (hold %s)", gone, c.hold)
	if gone < c.hold || gone > c.hold+15*time.Second {
		t.Fatalf("tag-routed service removed %s after Consul was up, want the hold of %s from its first answer", gone, c.hold)
	}
	if st := status("(catalog)"); st.Stale || st.LastError != "" {
		t.Fatalf("catalog status after the hold: %+v", st)
	}
}

func TestConsulBootFromState(t *testing.T) {
	a := consultest.Start(t)
	state := t.TempDir()
	c, rec := startSource(t, a, true, map[string]ConsulService{"web": {Name: "web"}}, state)
	a.Register("w1", "web", 9001, nil, 0)
	a.Register("t1", "tagged", 9301, []string{"edge.route=*/t"}, 0)
	eventually(t, "instances", func() bool {
		return rec.addrs("web") == "127.0.0.1:9001*1" && rec.addrs("tagged") == "127.0.0.1:9301*1"
	})
	c.Stop()
	a.Stop()

	c2, rec2 := startSource(t, a, true, map[string]ConsulService{"web": {Name: "web"}}, state)
	eventually(t, "instances from state_dir", func() bool {
		return rec2.addrs("web") == "127.0.0.1:9001*1" && rec2.addrs("tagged") == "127.0.0.1:9301*1"
	})
	if got := fmt.Sprint(rec2.set("tagged").Routes); got != "[{* /t}]" {
		t.Fatalf("routes from disk: %s", got)
	}
	fromDisk := false
	for _, st := range c2.Status() {
		fromDisk = fromDisk || (st.Service == "web" && st.FromDisk && st.Stale)
	}
	if !fromDisk {
		t.Fatalf("status must say the data came from disk: %+v", c2.Status())
	}
}

func TestConsulUnreachable(t *testing.T) {
	rec := newRecorder()
	c, err := NewConsul(ConsulConfig{Address: "127.0.0.1:1"}, map[string]ConsulService{"web": {Name: "web"}}, "", rec, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	defer c.Stop()
	eventually(t, "error in status", func() bool {
		st := c.Status()
		return len(st) == 1 && strings.Contains(st[0].LastError, "127.0.0.1:1 is unreachable")
	})
	if rec.set("web") != nil {
		t.Fatalf("nothing must be published without data")
	}
}

func TestConsulWrongToken(t *testing.T) {
	a := consultest.StartWithACL(t, "edgelb-test-management")
	a.Register("web-1", "web", 9001, nil, 0)
	rec := newRecorder()
	c, err := NewConsul(ConsulConfig{Address: a.Addr(), Token: "not-the-token"}, map[string]ConsulService{"web": {Name: "web"}}, "", rec, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	t.Cleanup(c.Stop)
	eventually(t, "a status naming the refused token", func() bool {
		for _, st := range c.Status() {
			if st.Service == "web" && strings.Contains(st.LastError, "refused the token") {
				return true
			}
		}
		return false
	})
	if rec.set("web") != nil {
		t.Fatal("nothing may be published when Consul refuses the token")
	}

	// The right token sees the instance.
	_, rec2 := startSourceToken(t, a, "edgelb-test-management", map[string]ConsulService{"web": {Name: "web"}})
	eventually(t, "web with the right token", func() bool { return rec2.addrs("web") == "127.0.0.1:9001*1" })
}

func TestConsulMalformedData(t *testing.T) {
	a := consultest.Start(t)
	c, rec := startSource(t, a, true, nil, "")
	a.Register("api-1", "api", 9001, []string{"edge.route=*/api", "edge.route=/nohost", "edge.route=h$st/"}, 0)
	eventually(t, "the valid route", func() bool {
		s := rec.set("api")
		return s != nil && fmt.Sprint(s.Routes) == "[{* /api}]"
	})
	eventually(t, "the malformed tags in status", func() bool {
		for _, st := range c.Status() {
			if st.Service == "api" && len(st.Problems) == 2 &&
				strings.Contains(st.Problems[0], `instance "api-1": tag "edge.route=/nohost": missing host`) &&
				strings.Contains(st.Problems[1], `invalid host "h$st"`) {
				return true
			}
		}
		return false
	})
}

func TestCallLimiter(t *testing.T) {
	// Calls that want to go back to back: the first callBurst start at
	// once, then one per minCallInterval.
	var l callLimiter
	ctx := context.Background()
	now := testTime
	var starts []time.Duration
	for i := 0; i < 6; i++ {
		l.waitAt(ctx, now)
		if l.last.After(now) {
			now = l.last
		}
		starts = append(starts, now.Sub(testTime))
	}
	if got := fmt.Sprint(starts); got != "[0s 0s 0s 1s 2s 3s]" {
		t.Fatalf("back-to-back calls start at %s", got)
	}
	// After a quiet spell the burst is available again, never more.
	now = now.Add(time.Hour)
	for i := 0; i < 4; i++ {
		before := now
		l.waitAt(ctx, now)
		if l.last.After(now) {
			now = l.last
		}
		if waited := now.Sub(before); (i < 3) != (waited == 0) {
			t.Fatalf("call %d after a quiet hour waited %s", i, waited)
		}
	}
}

func TestCallLimiterRefund(t *testing.T) {
	// Calls that each bring a change start at once, however many.
	var l callLimiter
	for i := 0; i < 10; i++ {
		l.waitAt(context.Background(), testTime)
		if l.last.After(testTime) {
			t.Fatalf("call %d bringing a change waited until %s", i, l.last)
		}
		l.refund()
	}
}

// panickyPublisher panics at the first Publish of one service, as a bug in
// what the sets are published to would.
type panickyPublisher struct {
	*recorder
	service string
	armed   atomic.Bool
}

func (p *panickyPublisher) Publish(s *Set) {
	if s.Service == p.service && p.armed.CompareAndSwap(true, false) {
		panic("test panic in Publish")
	}
	p.recorder.Publish(s)
}

// A panic in a watch is counted and logged; that watch starts again and
// follows its service as before, and the other watches never stop.
func TestConsulWatchPanicIsCountedAndWatchGoesOn(t *testing.T) {
	a := consultest.Start(t)
	pub := &panickyPublisher{recorder: newRecorder(), service: "web"}
	pub.armed.Store(true)
	var logs lockedBuffer
	before := panics.Discovery.Total()
	c, err := NewConsul(ConsulConfig{Address: a.Addr()}, map[string]ConsulService{"web": {Name: "web-svc"}, "api": {Name: "api-svc"}}, "",
		pub, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	t.Cleanup(c.Stop)

	eventually(t, "the panic", func() bool { return !pub.armed.Load() })
	a.Register("a1", "api-svc", 9101, nil, 0)
	eventually(t, "api published", func() bool { return pub.addrs("api") == "127.0.0.1:9101*1" })
	a.Register("w1", "web-svc", 9001, nil, 0)
	eventually(t, "web published after its watch panicked", func() bool { return pub.addrs("web") == "127.0.0.1:9001*1" })
	time.Sleep(1100 * time.Millisecond) // past the minimum call interval
	a.Register("w2", "web-svc", 9002, nil, 0)
	eventually(t, "web still followed", func() bool { return pub.addrs("web") == "127.0.0.1:9001*1,127.0.0.1:9002*1" })

	if n := panics.Discovery.Total() - before; n != 1 {
		t.Fatalf(`edgelb_panics_total{component="discovery"} went up by %d, want 1`, n)
	}
	out := logs.String()
	want := `level=ERROR msg="panic in Consul watch; restarting it" source=consul component=discovery task="watch web" panic="test panic in Publish" stack=`
	if strings.Count(out, "msg=\"panic in Consul watch") != 1 || !strings.Contains(out, want) || !strings.Contains(out, "consul_test.go") {
		t.Fatalf("log, want one line with %q and the panicking frame:\n%s", want, out)
	}
}

// lockedBuffer is a log destination safe for concurrent writes.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// blockingPublisher holds the first Publish of one service until released.
type blockingPublisher struct {
	*recorder
	service string
	armed   atomic.Bool
	entered chan struct{}
	release chan struct{}
}

func (p *blockingPublisher) Publish(s *Set) {
	if s.Service == p.service && p.armed.CompareAndSwap(true, false) {
		close(p.entered)
		<-p.release
	}
	p.recorder.Publish(s)
}

// A tag-routed service that leaves Consul while its watch is publishing it
// stays removed: the removal waits for that publication, so that it cannot
// come after the removal and bring the service's routes back.
func TestTagRoutedServiceRemovedDuringItsPublication(t *testing.T) {
	a := consultest.Start(t)
	pub := &blockingPublisher{recorder: newRecorder(), service: "api", entered: make(chan struct{}), release: make(chan struct{})}
	pub.armed.Store(true)
	c, err := NewConsul(ConsulConfig{Address: a.Addr(), TagRoutes: true}, nil, "", pub, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	t.Cleanup(c.Stop)
	a.Register("a1", "api", 9101, []string{"edge.route=*/api"}, 0)
	select {
	case <-pub.entered:
	case <-time.After(30 * time.Second):
		t.Fatal("the api watch never published")
	}
	a.Deregister("a1")
	// The catalog sees api leave within a blocking query's answer; its
	// removal must wait for the publication held here.
	time.Sleep(2 * time.Second)
	close(pub.release)
	eventually(t, "api removed", func() bool { return pub.wasRemoved("api") })
	time.Sleep(500 * time.Millisecond)
	if s := pub.set("api"); s != nil || !pub.wasRemoved("api") {
		t.Fatalf("api published after it left Consul: %+v", s)
	}
}
