package health

import (
	"bytes"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
	"go.uber.org/goleak"

	"github.com/edgelb/edgelb/internal/panics"
)

// TestMain checks that probes stop. fasthttp keeps package-level helper
// goroutines (connection cleaners, the server date updater, idle workers)
// that end on their own; they are not ours.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.(*workerPool).Start.func2"),
		goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.(*HostClient).connsCleaner"),
		goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.(*TCPDialer).tcpAddrsClean"),
		goleak.IgnoreAnyFunction("github.com/valyala/fasthttp.updateServerDate.func1"),
	)
}

// healthServer answers /health with the status it holds.
type healthServer struct {
	addr   string
	status atomic.Int32
	host   atomic.Value
	hits   atomic.Int32
	srv    *fasthttp.Server
}

func startHealthServer(t *testing.T) *healthServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &healthServer{addr: ln.Addr().String()}
	h.status.Store(200)
	h.host.Store("")
	h.srv = &fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) {
		h.hits.Add(1)
		h.host.Store(string(ctx.Host()))
		ctx.SetStatusCode(int(h.status.Load()))
		ctx.WriteString("status: fine")
	}}
	go h.srv.Serve(ln)
	// Closing the listener too: Shutdown misses a Serve that has not
	// registered it yet.
	t.Cleanup(func() { h.srv.Shutdown(); ln.Close() })
	return h
}

func waitState(t *testing.T, tg *Target, want State) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if tg.State(time.Now().UnixNano()) == want {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("%s: state %s, want %s (reason %q)", tg.Addr(), tg.State(time.Now().UnixNano()), want, tg.Status(time.Now()).Reason)
}

func TestHTTPCheck(t *testing.T) {
	h := startHealthServer(t)
	c := NewChecker(nil)
	defer c.Close()
	reg := NewRegistry(nil)
	tg := reg.Acquire(h.addr, PassiveConfig{})
	stop := c.Watch(tg, ActiveConfig{Interval: 20 * time.Millisecond, Host: "probe.example"})
	defer stop()

	h.status.Store(503)
	waitState(t, tg, StateUnhealthy)
	if r := tg.Status(time.Now()).Reason; !strings.Contains(r, "GET /health returned 503") {
		t.Fatalf("reason: %q", r)
	}
	h.status.Store(200)
	waitState(t, tg, StateHealthy)
	if got := h.host.Load().(string); got != "probe.example" {
		t.Fatalf("Host header of the probe: %q", got)
	}
}

func TestCheckVariants(t *testing.T) {
	h := startHealthServer(t)
	c := NewChecker(nil)
	defer c.Close()
	f := func(cfg ActiveConfig, want State) {
		t.Helper()
		reg := NewRegistry(nil)
		tg := reg.Acquire(h.addr, PassiveConfig{})
		cfg.Interval = 20 * time.Millisecond
		stop := c.Watch(tg, cfg)
		defer stop()
		if want == StateUnhealthy {
			waitState(t, tg, StateUnhealthy)
			return
		}
		time.Sleep(150 * time.Millisecond)
		waitState(t, tg, StateHealthy)
	}
	f(ActiveConfig{BodyContains: "fine"}, StateHealthy)
	f(ActiveConfig{BodyContains: "missing"}, StateUnhealthy)
	f(ActiveConfig{ExpectStatus: []int{204}}, StateUnhealthy)
	f(ActiveConfig{ExpectStatus: []int{200}}, StateHealthy)
	f(ActiveConfig{Type: "tcp"}, StateHealthy)
	f(ActiveConfig{Path: "/other"}, StateHealthy)
}

func TestTCPCheckDeadBackend(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	c := NewChecker(nil)
	defer c.Close()
	tg := NewRegistry(nil).Acquire(addr, PassiveConfig{})
	stop := c.Watch(tg, ActiveConfig{Type: "tcp", Interval: 20 * time.Millisecond})
	defer stop()
	waitState(t, tg, StateUnhealthy)
	if r := tg.Status(time.Now()).Reason; !strings.Contains(r, "connection refused") {
		t.Fatalf("reason: %q", r)
	}
}

func TestOneProbePerAddressAndCheck(t *testing.T) {
	h := startHealthServer(t)
	c := NewChecker(nil)
	defer c.Close()
	reg := NewRegistry(nil)
	t1 := reg.Acquire(h.addr, PassiveConfig{})
	t2 := reg.Acquire(h.addr, PassiveConfig{})
	if t1 != t2 {
		t.Fatal("one address must have one target")
	}
	cfg := ActiveConfig{Interval: 50 * time.Millisecond}
	s1, s2 := c.Watch(t1, cfg), c.Watch(t2, cfg)
	if n := c.Probes(); n != 1 {
		t.Fatalf("%d probes for one address and check", n)
	}
	s3 := c.Watch(t1, ActiveConfig{Interval: 50 * time.Millisecond, Path: "/other"})
	if n := c.Probes(); n != 2 {
		t.Fatalf("%d probes for two checks", n)
	}
	s1()
	s1()
	if n := c.Probes(); n != 2 {
		t.Fatalf("a probe stopped while still watched: %d", n)
	}
	s2()
	s3()
	if n := c.Probes(); n != 0 {
		t.Fatalf("%d probes left", n)
	}
}

func TestUnhealthyIntervalIsFaster(t *testing.T) {
	h := startHealthServer(t)
	c := NewChecker(nil)
	defer c.Close()
	tg := NewRegistry(nil).Acquire(h.addr, PassiveConfig{})
	stop := c.Watch(tg, ActiveConfig{Interval: 200 * time.Millisecond, UnhealthyInterval: 20 * time.Millisecond, Timeout: 100 * time.Millisecond})
	defer stop()
	h.status.Store(500)
	waitState(t, tg, StateUnhealthy)
	n := h.hits.Load()
	time.Sleep(400 * time.Millisecond)
	if probes := h.hits.Load() - n; probes < 5 {
		t.Fatalf("%d probes in 400ms while unhealthy; want the faster interval", probes)
	}
}

func TestActiveConfigValidate(t *testing.T) {
	f := func(c ActiveConfig, want string) {
		t.Helper()
		var msgs []string
		for _, e := range c.Validate("services.web.health.active") {
			msgs = append(msgs, e.Error())
		}
		got := strings.Join(msgs, "; ")
		if !strings.Contains(got, want) || (want == "" && got != "") {
			t.Errorf("got %q, want %q", got, want)
		}
	}
	f(ActiveConfig{}, "")
	f(ActiveConfig{Type: "udp"}, "services.web.health.active.type: must be http or tcp")
	f(ActiveConfig{Path: "health"}, "services.web.health.active.path: must start with /")
	f(ActiveConfig{Interval: time.Second, Timeout: 2 * time.Second}, "services.web.health.active.timeout: must not exceed interval (1s)")
	f(ActiveConfig{ExpectStatus: []int{42}}, "services.web.health.active.expect_status: 42 is not an HTTP status")
	f(ActiveConfig{Interval: time.Millisecond}, "services.web.health.active.interval: must be at least 10ms")
}

// A probe that panics costs that probe only: the panic is counted and
// logged, the backend's state does not move, its next probes go out and
// decide as before, and the other backends' probes never stop.
func TestProbePanicIsCountedAndChecksGoOn(t *testing.T) {
	a, b := startHealthServer(t), startHealthServer(t)
	var logs lockedBuffer
	c := NewChecker(slog.New(slog.NewTextHandler(&logs, nil)))
	defer c.Close()
	var panicked atomic.Bool
	c.dial = func(addr string, timeout time.Duration) (net.Conn, error) {
		if addr == a.addr && panicked.CompareAndSwap(false, true) {
			panic("test panic in a probe")
		}
		return fasthttp.DialTimeout(addr, timeout)
	}
	before := panics.Health.Total()
	reg := NewRegistry(nil)
	ta, tb := reg.Acquire(a.addr, PassiveConfig{}), reg.Acquire(b.addr, PassiveConfig{})
	cfg := ActiveConfig{Interval: 20 * time.Millisecond}
	defer c.Watch(ta, cfg)()
	defer c.Watch(tb, cfg)()

	deadline := time.Now().Add(10 * time.Second)
	for (a.hits.Load() < 3 || b.hits.Load() < 3) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if !panicked.Load() || a.hits.Load() < 3 || b.hits.Load() < 3 {
		t.Fatalf("panicked %v; probes answered: %d by a, %d by b", panicked.Load(), a.hits.Load(), b.hits.Load())
	}
	if n := panics.Health.Total() - before; n != 1 {
		t.Fatalf(`edgelb_panics_total{component="health"} went up by %d, want 1`, n)
	}
	now := time.Now().UnixNano()
	if ta.State(now) != StateHealthy || tb.State(now) != StateHealthy {
		t.Fatalf("states after the panic: a %s, b %s", ta.State(now), tb.State(now))
	}
	// The probe of a still decides a's state.
	a.status.Store(503)
	waitState(t, ta, StateUnhealthy)
	waitState(t, tb, StateHealthy)

	out := logs.String()
	want := `level=ERROR msg="panic in health probe" component=health addr=` + a.addr + ` panic="test panic in a probe" stack=`
	if strings.Count(out, `msg="panic in health probe"`) != 1 || !strings.Contains(out, want) || !strings.Contains(out, "checker_test.go") {
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
