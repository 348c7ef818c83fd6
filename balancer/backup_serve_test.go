package balancer

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/discovery/consultest"
)

// Backup sets served end to end, by both engines: what clients get while
// primaries die and come back, and what /status and /metrics say.

// killable is an origin that can die as a killed process does (listener
// closed, every connection reset) and start again on its address.
type killable struct {
	name string
	addr string
	hits atomic.Int64
	h    func(ctx *fasthttp.RequestCtx)

	mu    sync.Mutex
	srv   *fasthttp.Server
	ln    net.Listener
	conns map[net.Conn]bool
}

// startKillable starts an origin answering "hello from NAME", or with h.
func startKillable(t *testing.T, name string, h func(ctx *fasthttp.RequestCtx)) *killable {
	t.Helper()
	if h == nil {
		h = func(ctx *fasthttp.RequestCtx) { fmt.Fprintf(ctx, "hello from %s", name) }
	}
	k := &killable{name: name, addr: "127.0.0.1:0", h: h}
	k.start(t)
	t.Cleanup(k.kill)
	return k
}

// start listens on the origin's address, the first time a free one.
func (k *killable) start(t *testing.T) {
	t.Helper()
	var ln net.Listener
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; {
		if ln, err = net.Listen("tcp", k.addr); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.addr, k.ln, k.conns = ln.Addr().String(), ln, make(map[net.Conn]bool)
	k.srv = &fasthttp.Server{
		Handler: func(ctx *fasthttp.RequestCtx) { k.hits.Add(1); k.h(ctx) },
		ConnState: func(c net.Conn, st fasthttp.ConnState) {
			k.mu.Lock()
			defer k.mu.Unlock()
			switch st {
			case fasthttp.StateNew:
				k.conns[c] = true
			case fasthttp.StateClosed:
				delete(k.conns, c)
			}
		},
	}
	go k.srv.Serve(ln)
}

// kill closes the listener and resets every connection.
func (k *killable) kill() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.ln.Close()
	for c := range k.conns {
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		c.Close()
	}
	clear(k.conns)
}

// servedBy sends n GETs and returns the answers by body; an error, a
// status other than 200 or an Edgelb-Error fails the test.
func servedBy(t *testing.T, s *Server, n int) map[string]int {
	t.Helper()
	got := make(map[string]int)
	for i := 0; i < n; i++ {
		resp := do(t, s, "GET", "x", "/")
		if resp.StatusCode() != 200 || len(resp.Header.Peek(HeaderError)) > 0 {
			t.Fatalf("GET #%d: %d %q %q", i, resp.StatusCode(), resp.Header.Peek(HeaderError), resp.Body())
		}
		got[string(resp.Body())]++
	}
	return got
}

// webBackend returns the /status entry of addr in service web.
func webBackend(t *testing.T, s *Server, addr string) BackendStatus {
	t.Helper()
	b, ok := backendsByAddr(s, "web")[addr]
	if !ok {
		t.Fatalf("%s not in /status", addr)
	}
	return b
}

func TestBackupAnswersWhenEveryPrimaryRefuses(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		dead := []string{deadAddr(t), deadAddr(t), deadAddr(t)}
		backup := startOrigin(t, "backup", nil)
		// Ejections long enough that none ends during the test, however
		// slow the machine: the /status and metric checks below read the
		// serving set twice.
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web:\n    static: ["+strings.Join(dead, ", ")+"]\n    backup: "+staticList(backup)+
			"\n    health: {passive: {base_ejection_time: 1m, max_ejection_time: 1m}}\nroutes: [{service: web}]\n")

		// Three primaries refuse and a request has three tries: the
		// last one goes to the backup, from the first request on.
		var wg sync.WaitGroup
		var failed atomic.Int64
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 25; i++ {
					a := getNew(s, "/")
					if a.err != nil || a.status != 200 || a.body != "hello from backup" {
						if failed.Add(1) < 5 {
							t.Errorf("GET: %v", a)
						}
					}
				}
			}()
		}
		wg.Wait()
		if got := servedBy(t, s, 20); got["hello from backup"] != 20 {
			t.Fatalf("answers: %v", got)
		}
		if failed.Load() != 0 {
			t.Fatalf("%d requests failed with every primary refusing and a backup up", failed.Load())
		}

		st := serviceStatus(s)
		if st.Serving != "backup" || st.Available != 0 || st.BackupAvailable != 1 || st.BackupSource != "static" || st.Panic {
			t.Fatalf("/status: %+v", st)
		}
		for _, a := range dead {
			if b := webBackend(t, s, a); b.Backup || b.State != "ejected" || !strings.Contains(b.Reason, "connect_failed") {
				t.Errorf("primary %s: %+v", a, b)
			}
		}
		if b := webBackend(t, s, backup.addr); !b.Backup || b.State != "healthy" {
			t.Errorf("backup: %+v", b)
		}
		if n := metricValue(t, s, `edgelb_backup_requests_total{service="web"}`); n != 120 {
			t.Errorf("edgelb_backup_requests_total %d, want 120", n)
		}
		for set, want := range map[string]int{"primary": 0, "backup": 1, "panic": 0, "none": 0} {
			if n := metricValue(t, s, `edgelb_serving{service="web",set="`+set+`"}`); n != want {
				t.Errorf("edgelb_serving set %s: %d, want %d", set, n, want)
			}
		}
		if n := metricValue(t, s, `edgelb_backend_backup{service="web",backend="`+backup.addr+`"}`); n != 1 {
			t.Errorf("edgelb_backend_backup of the backup: %d", n)
		}
		if n := metricValue(t, s, `edgelb_backend_backup{service="web",backend="`+dead[0]+`"}`); n != 0 {
			t.Errorf("edgelb_backend_backup of a primary: %d", n)
		}
		for _, code := range []string{"upstream_connect_failed", "no_healthy_backend"} {
			if n := metricValue(t, s, `edgelb_generated_errors_total{service="web",code="`+code+`"}`); n != 0 {
				t.Errorf("%d %s answers generated", n, code)
			}
		}
		_, m := adminGet(t, s, "/metrics")
		checkExposition(t, m)
	})
}

func TestBackupWhenPrimariesDieUnderLoadAndReturn(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		k1, k2 := startKillable(t, "p1", nil), startKillable(t, "p2", nil)
		// served counts the backup's answers to clients, not to checks.
		var served atomic.Int64
		backup := startOrigin(t, "backup", func(ctx *fasthttp.RequestCtx) {
			if string(ctx.Path()) != "/health" {
				served.Add(1)
			}
			ctx.WriteString("hello from backup")
		})
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web:\n    static: ["+k1.addr+", "+k2.addr+"]\n    backup: ["+backup.addr+"]\n"+
			"    health: {active: {path: /health, interval: 50ms}}\nroutes: [{service: web}]\n")
		waitFor(t, "primaries checked", func() bool { return serviceStatus(s).Available == 2 })

		stop := make(chan struct{})
		ok, failed, wait := load(t, s, 8, stop)
		waitFor(t, "load", func() bool { return ok.Load() > 200 })
		k1.kill()
		n := ok.Load()
		waitFor(t, "load with one primary killed", func() bool { return ok.Load() > n+200 })
		if served.Load() != 0 {
			t.Errorf("the backup got %d requests while a primary was up", served.Load())
		}
		k2.kill()
		waitFor(t, "the backup serving", func() bool { return served.Load() > 200 })
		if st := serviceStatus(s); st.Serving != "backup" {
			t.Errorf("serving %q with every primary killed", st.Serving)
		}

		// The primaries come back: new requests go to them as soon as
		// their checks pass.
		k1.start(t)
		k2.start(t)
		waitFor(t, "the primaries back", func() bool { return serviceStatus(s).Serving == "primary" })
		close(stop)
		wait()
		if failed.Load() != 0 {
			t.Fatalf("%d of %d requests failed while primaries died and came back", failed.Load(), ok.Load()+failed.Load())
		}
		before := served.Load()
		got := servedBy(t, s, 40)
		if got["hello from p1"]+got["hello from p2"] != 40 || served.Load() != before {
			t.Fatalf("after the primaries came back: %v, backup hits %d -> %d", got, before, served.Load())
		}
	})
}

func TestBackupAfterPrimariesAskForLessLoad(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		busy := func(ctx *fasthttp.RequestCtx) {
			ctx.Response.Header.Set("Retry-After", "1")
			ctx.SetStatusCode(503)
			ctx.WriteString("busy")
		}
		a, b := startOrigin(t, "a", busy), startOrigin(t, "b", busy)
		backup := startOrigin(t, "backup", nil)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: "+staticList(a, b)+", backup: "+staticList(backup)+"}\nroutes: [{service: web}]\n")
		for i := 1; i <= 10; i++ {
			resp := do(t, s, "GET", "x", "/")
			if resp.StatusCode() != 200 || string(resp.Body()) != "hello from backup" {
				t.Fatalf("GET #%d: %d %q", i, resp.StatusCode(), resp.Body())
			}
			// Every primary is asked first, once.
			if a.hits.Load() != int64(i) || b.hits.Load() != int64(i) || backup.hits.Load() != int64(i) {
				t.Fatalf("GET #%d: hits a %d, b %d, backup %d", i, a.hits.Load(), b.hits.Load(), backup.hits.Load())
			}
		}
		// Overload is no failure: the primaries stay in rotation.
		for _, o := range []*origin{a, b} {
			if st := webBackend(t, s, o.addr); st.State != "healthy" {
				t.Fatalf("primary %s asking for less load: %+v", o.addr, st)
			}
		}
		if st := serviceStatus(s); st.Serving != "primary" {
			t.Fatalf("serving %q", st.Serving)
		}
		// One primary that answers keeps the backup out.
		b.reply.Store(ptr(func(ctx *fasthttp.RequestCtx) { ctx.WriteString("hello from b") }))
		for i := 0; i < 10; i++ {
			if resp := do(t, s, "GET", "x", "/"); resp.StatusCode() != 200 || string(resp.Body()) != "hello from b" {
				t.Fatalf("GET with b answering: %d %q", resp.StatusCode(), resp.Body())
			}
		}
		if backup.hits.Load() != 10 {
			t.Fatalf("the backup got %d requests, want 10", backup.hits.Load())
		}
	})
}

func TestBackupsEjectedLikePrimaries(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		deadPrimary, deadBackup := deadAddr(t), deadAddr(t)
		failing := startOrigin(t, "failing", func(ctx *fasthttp.RequestCtx) { ctx.SetStatusCode(502) })
		good := startOrigin(t, "good", nil)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web:\n    static: ["+deadPrimary+"]\n"+
			"    backup: ["+deadBackup+", "+failing.addr+", "+good.addr+"]\n    retries: 3\n"+
			"    health: {passive: {consecutive_gateway_failures: 1, consecutive_5xx: 2, max_ejection_percent: 100, base_ejection_time: 1m}}\n"+
			"routes: [{service: web}]\n")
		if got := servedBy(t, s, 50); got["hello from good"] != 50 {
			t.Fatalf("answers: %v", got)
		}
		for addr, why := range map[string]string{deadBackup: "connect_failed", failing.addr: "consecutive 5xx"} {
			if b := webBackend(t, s, addr); !b.Backup || b.State != "ejected" || !strings.Contains(b.Reason, why) {
				t.Errorf("backup %s: %+v, want ejected for %s", addr, b, why)
			}
		}
		if b := webBackend(t, s, good.addr); !b.Backup || b.State != "healthy" {
			t.Errorf("good backup: %+v", b)
		}
		// Ejected backups get no more tries.
		hits := failing.hits.Load()
		servedBy(t, s, 20)
		if failing.hits.Load() != hits {
			t.Fatalf("an ejected backup got %d more requests", failing.hits.Load()-hits)
		}
		if errs := backendErrors(t, s, deadBackup); errs["upstream_connect_failed"] != 1 {
			t.Fatalf("errors of the dead backup: %v", errs)
		}
	})
}

func TestBackupSetReload(t *testing.T) {
	dead := deadAddr(t)
	backup := startOrigin(t, "backup", nil)
	health := ", stale: {disabled: true}, health: {panic_threshold: -1, passive: {consecutive_gateway_failures: 1}}"
	yaml := func(svc string) *Config {
		return mustConfig(t, "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  web: {static: ["+dead+"]"+health+svc+"}\nroutes: [{service: web}]\n")
	}
	s := startEdge(t, "services:\n  web: {static: ["+dead+"]"+health+"}\nroutes: [{service: web}]\n")
	reload := func(svc string) {
		t.Helper()
		cfg := yaml(svc)
		cfg.Listen, cfg.Admin = s.cfg.Listen, s.cfg.Admin
		if err := s.Reload(cfg); err != nil {
			t.Fatal(err)
		}
	}
	if resp := do(t, s, "GET", "x", "/"); resp.StatusCode() == 200 {
		t.Fatal("answered with no backend up")
	}
	if st := serviceStatus(s); st.Serving != "none" || st.BackupSource != "" {
		t.Fatalf("/status without backups: %+v", st)
	}
	reload(", backup: [" + backup.addr + "]")
	if got := servedBy(t, s, 10); got["hello from backup"] != 10 {
		t.Fatalf("after adding a backup: %v", got)
	}
	found := false
	for _, d := range s.Status().Discovery {
		found = found || (d.Source == "static" && d.Service == "web/backup")
	}
	if !found {
		t.Fatalf("no discovery entry for the static backup set: %+v", s.Status().Discovery)
	}
	reload("")
	if resp := do(t, s, "GET", "x", "/"); resp.StatusCode() == 200 {
		t.Fatal("a removed backup set still answers")
	}
	if b, ok := backendsByAddr(s, "web")[backup.addr]; ok && b.State != "draining" {
		t.Fatalf("a removed backup: %+v", b)
	}
}

func TestConsulBackupSet(t *testing.T) {
	a := consultest.Start(t)
	primary := startOrigin(t, "primary", nil)
	backup := startOrigin(t, "backup", nil)
	s := startEdge(t, fmt.Sprintf(`
state_dir: %s
consul: {address: %s, tag_routes: true}
services:
  web:
    consul: {name: web}
    backup: {consul: {name: web-dr}}
routes: [{service: web}]
`, t.TempDir(), a.Addr()))
	// A route tag on a backup routes nothing: the backups answer for web.
	a.Register("dr-1", "web-dr", originPort(t, backup), []string{"edge.route=*/dr"}, 0)
	waitBody(t, s, "x", "/", "hello from backup")
	st := serviceStatus(s)
	if st.Serving != "backup" || st.BackupSource != "consul" || st.BackupUpdatedAt.IsZero() || st.BackupAvailable != 1 || len(st.Backends) != 1 || !st.Backends[0].Backup {
		t.Fatalf("/status with the backup set only: %+v", st)
	}
	if resp := do(t, s, "GET", "x", "/dr"); string(resp.Body()) != "hello from backup" {
		t.Fatalf("/dr: %d %q", resp.StatusCode(), resp.Body())
	}
	if _, ok := s.Status().Services["web-dr"]; ok {
		t.Fatal("the backup service got a pool of its own from its route tag")
	}
	found := false
	for _, d := range s.Status().Discovery {
		found = found || (d.Source == "consul" && d.Service == "web/backup" && !d.LastUpdate.IsZero())
	}
	if !found {
		t.Fatalf("no discovery entry for the Consul backup set: %+v", s.Status().Discovery)
	}

	a.Register("web-1", "web", originPort(t, primary), nil, 0)
	waitBody(t, s, "x", "/", "hello from primary")
	if got := servedBy(t, s, 20); got["hello from primary"] != 20 {
		t.Fatalf("with a primary registered: %v", got)
	}
	// An instance in both sets is a primary.
	a.Register("dr-2", "web-dr", originPort(t, primary), nil, 0)
	waitFor(t, "the second backup instance", func() bool { return serviceStatus(s).BackupUpdatedAt.After(st.BackupUpdatedAt) })
	if b := webBackend(t, s, primary.addr); b.Backup {
		t.Fatalf("an instance in both sets: %+v", b)
	}
	a.Deregister("web-1")
	waitBody(t, s, "x", "/", "hello from")
	waitFor(t, "the backups serving", func() bool { return serviceStatus(s).Serving == "backup" })
	if got := servedBy(t, s, 40); got["hello from backup"] == 0 || got["hello from primary"] == 0 {
		t.Fatalf("backups with a former primary among them: %v", got)
	}
	a.Deregister("dr-1")
	a.Deregister("dr-2")
	waitFor(t, "the backup set empty", func() bool { return len(serviceStatus(s).Backends) == 0 })
	if resp := do(t, s, "GET", "x", "/never-asked"); resp.StatusCode() != 503 || string(resp.Header.Peek(HeaderError)) != "no_healthy_backend" {
		t.Fatalf("with no instance in either set: %d %q", resp.StatusCode(), resp.Header.Peek(HeaderError))
	}
}
