package balancer

import (
	"strings"
	"testing"
	"time"

	"github.com/edgelb/edgelb/discovery"
	"github.com/edgelb/edgelb/health"
)

// testBackupPool builds a pool of the given primaries and backups from a
// service config body, which should set backup, without a server.
func testBackupPool(t testing.TB, svc string, primaries, backups []string) *Pool {
	t.Helper()
	p := testPool(t, svc, primaries...)
	ins := make([]discovery.Instance, len(backups))
	for i, a := range backups {
		ins[i] = discovery.Instance{Addr: a}
	}
	p.updateBackup(discovery.NewSet(backupName("web"), "static", ins, time.Now()))
	return p
}

// fail5xx ejects b with a 5xx answer (the service must eject after one),
// which keeps it usable in panic mode; it returns when the ejection ends.
func fail5xx(t testing.TB, b *Backend, now int64) int64 {
	t.Helper()
	b.target.Begin()
	b.target.Done(now, health.OutcomeServerError, time.Millisecond)
	if b.target.Available(now) {
		t.Fatalf("%s still available after a 5xx", b.addr)
	}
	for until := now; ; until += int64(time.Millisecond) {
		if b.target.Available(until) {
			return until
		}
	}
}

// picks picks n times at now with tried (a copy each time) and counts the
// backends picked by address; nil counts as "".
func picks(p *Pool, now int64, tr tried, n int) map[string]int {
	got := make(map[string]int)
	for i := 0; i < n; i++ {
		t := tr
		if b := p.pick(now, &t); b != nil {
			got[b.addr]++
		} else {
			got[""]++
		}
	}
	return got
}

// onlyFrom fails unless every pick in got went to one of addrs.
func onlyFrom(t *testing.T, what string, got map[string]int, addrs ...string) {
	t.Helper()
	n := 0
	for _, a := range addrs {
		n += got[a]
	}
	total := 0
	for _, c := range got {
		total += c
	}
	if n != total || n == 0 {
		t.Fatalf("%s: picks went to %v, want only %v", what, got, addrs)
	}
}

const (
	p1, p2 = "127.0.0.1:1", "127.0.0.1:2"
	b1, b2 = "127.0.0.2:1", "127.0.0.2:2"
)

var bothSets = []string{p1, p2, b1, b2}

func TestBackupTakesOverWhenNoPrimaryIsAvailable(t *testing.T) {
	for _, balance := range []string{"p2c", "round_robin", "random"} {
		t.Run(balance, func(t *testing.T) {
			p := testBackupPool(t, "{static: [127.0.0.1:1], backup: [127.0.0.2:1], balance: "+balance+
				", health: {passive: {consecutive_5xx: 1, max_ejection_percent: 100, base_ejection_time: 10s}}}",
				[]string{p1, p2}, []string{b1, b2})
			now := time.Now().UnixNano()
			onlyFrom(t, "all healthy", picks(p, now, tried{}, 500), p1, p2)
			if s := p.serving(now); s != servingPrimary {
				t.Fatalf("serving %q, want primary", s)
			}

			back1 := fail5xx(t, p.byAddr[p1], now)
			onlyFrom(t, "one primary ejected", picks(p, now, tried{}, 500), p2)
			back2 := fail5xx(t, p.byAddr[p2], now)
			got := picks(p, now, tried{}, 1000)
			onlyFrom(t, "every primary ejected", got, b1, b2)
			if got[b1] < 300 || got[b2] < 300 {
				t.Errorf("the backups share the load unevenly: %v", got)
			}
			if s := p.serving(now); s != servingBackup {
				t.Fatalf("serving %q, want backup", s)
			}

			// A primary back in rotation gets new requests at once.
			later := min(back1, back2)
			onlyFrom(t, "a primary back", picks(p, later, tried{}, 500), p.set.Load().list[0].addr, p.set.Load().list[1].addr)
			if s := p.serving(later); s != servingPrimary {
				t.Fatalf("serving %q, want primary", s)
			}
		})
	}
}

func TestBackupWhenPrimariesAreTriedOrFull(t *testing.T) {
	p := testBackupPool(t, "{static: [127.0.0.1:1], backup: [127.0.0.2:1], retries: 3, health: {max_inflight: 1}}",
		[]string{p1, p2}, []string{b1, b2})
	now := time.Now().UnixNano()

	// Retries after every primary has been tried go to a backup.
	var tr tried
	tr.add(p.byAddr[p1])
	onlyFrom(t, "one primary tried", picks(p, now, tr, 200), p2)
	tr.add(p.byAddr[p2])
	onlyFrom(t, "both primaries tried", picks(p, now, tr, 200), b1, b2)
	tr.add(p.byAddr[b1])
	onlyFrom(t, "both primaries and a backup tried", picks(p, now, tr, 200), b2)
	tr.add(p.byAddr[b2])
	onlyFrom(t, "everything tried", picks(p, now, tr, 10), "")

	// Primaries at max_inflight send new requests to the backups; the
	// backups' own cap holds too.
	p.byAddr[p1].target.Begin()
	p.byAddr[p2].target.Begin()
	onlyFrom(t, "primaries at max_inflight", picks(p, now, tried{}, 200), b1, b2)
	p.byAddr[b1].target.Begin()
	p.byAddr[b2].target.Begin()
	onlyFrom(t, "every backend at max_inflight", picks(p, now, tried{}, 10), "")
	if code := p.noBackendCode(now); code != errOverloaded {
		t.Fatalf("no backend for want of capacity: %s, want overloaded", code)
	}
	if s := p.serving(now); s != servingPrimary {
		t.Fatalf("serving %q: load does not change which set serves", s)
	}
}

func TestBackupGetsTheLastTry(t *testing.T) {
	primaries := []string{p1, p2, "127.0.0.1:3", "127.0.0.1:4"}
	p := testBackupPool(t, "{static: [127.0.0.1:1], backup: [127.0.0.2:1], retries: 2}", primaries, []string{b1})
	now := time.Now().UnixNano()
	var tr tried
	onlyFrom(t, "first try", picks(p, now, tr, 200), primaries...)
	tr.add(p.byAddr[p1])
	onlyFrom(t, "second try", picks(p, now, tr, 200), primaries[1:]...)
	tr.add(p.byAddr[p2])
	onlyFrom(t, "the last try retries allow", picks(p, now, tr, 200), b1)

	// Without retries the only try is a primary's.
	p = testBackupPool(t, "{static: [127.0.0.1:1], backup: [127.0.0.2:1], retries: -1}", primaries, []string{b1})
	onlyFrom(t, "retries -1", picks(p, now, tried{}, 200), primaries...)
}

func TestBackupPanicMode(t *testing.T) {
	p := testBackupPool(t, "{static: [127.0.0.1:1], backup: [127.0.0.2:1], health: {panic_threshold: 50, passive: {consecutive_5xx: 1, max_ejection_percent: 100, base_ejection_time: 10s}}}",
		[]string{p1, p2, "127.0.0.1:3"}, []string{b1, b2})
	now := time.Now().UnixNano()
	fail5xx(t, p.byAddr[p1], now)
	fail5xx(t, p.byAddr[p2], now)
	// One primary of three is below the threshold, but with backups that
	// is no panic: the primary left takes the requests.
	onlyFrom(t, "one primary of three", picks(p, now, tried{}, 200), "127.0.0.1:3")
	fail5xx(t, p.byAddr["127.0.0.1:3"], now)
	fail5xx(t, p.byAddr[b1], now)
	onlyFrom(t, "one backup left", picks(p, now, tried{}, 200), b2)
	if s := p.serving(now); s != servingBackup {
		t.Fatalf("serving %q, want backup", s)
	}

	fail5xx(t, p.byAddr[b2], now)
	if s := p.serving(now); s != servingPanic {
		t.Fatalf("serving %q, want panic", s)
	}
	// Panic mode: the primaries first, whatever their checks say, then
	// the backups.
	var tr tried
	got := picks(p, now, tr, 300)
	onlyFrom(t, "panic", got, p1, p2, "127.0.0.1:3")
	t1 := tr
	if b := p.pick(now, &t1); !t1.outOfRotation || b == nil || b.backup {
		t.Fatalf("panic pick %v: out of rotation %v", b, t1.outOfRotation)
	}
	for _, a := range []string{p1, p2, "127.0.0.1:3"} {
		tr.add(p.byAddr[a])
	}
	onlyFrom(t, "panic, primaries tried", picks(p, now, tr, 200), b1, b2)

	// panic_threshold -1: none.
	p = testBackupPool(t, "{static: [127.0.0.1:1], backup: [127.0.0.2:1], health: {panic_threshold: -1, passive: {consecutive_5xx: 1, max_ejection_percent: 100, base_ejection_time: 10s}}}",
		[]string{p1}, []string{b1})
	fail5xx(t, p.byAddr[p1], now)
	fail5xx(t, p.byAddr[b1], now)
	onlyFrom(t, "panic off", picks(p, now, tried{}, 10), "")
	if s := p.serving(now); s != servingNone {
		t.Fatalf("serving %q, want none", s)
	}
}

func TestBackupSlowStartRampsPrimariesUpFromBackups(t *testing.T) {
	p := testBackupPool(t, "{static: [127.0.0.1:1], backup: [127.0.0.2:1], health: {slow_start: 10s, passive: {consecutive_5xx: 1, max_ejection_percent: 100, base_ejection_time: 1s}}}",
		[]string{p1}, []string{b1})
	now := time.Now().UnixNano()
	back := fail5xx(t, p.byAddr[p1], now)
	onlyFrom(t, "primary out", picks(p, now, tried{}, 100), b1)
	got := picks(p, back+int64(5*time.Second), tried{}, 4000)
	if share := float64(got[p1]) / 4000; share < 0.4 || share > 0.6 {
		t.Errorf("primary half-way through slow start got %.2f of the picks, want about half: %v", share, got)
	}
	onlyFrom(t, "slow start over", picks(p, back+int64(10*time.Second), tried{}, 200), p1)
}

func TestBackupSetUpdates(t *testing.T) {
	p := testBackupPool(t, "{static: [127.0.0.1:1], backup: [127.0.0.2:1]}", []string{p1}, []string{b1, b2})
	b := p.byAddr[b1]
	if !b.backup || b.backupAnswers == nil || !b.m.backup.Load() || p.byAddr[p1].backup {
		t.Fatal("roles not set")
	}
	// Backups that came with the service do not start slow; one joining
	// them does.
	if b.slowFrom != 0 {
		t.Fatal("a first backup starts slow")
	}
	p.updateBackup(discovery.NewSet(backupName("web"), "static", []discovery.Instance{{Addr: b1}, {Addr: b2}, {Addr: "127.0.0.2:3"}}, time.Now()))
	if p.byAddr["127.0.0.2:3"].slowFrom == 0 || p.byAddr[b2].slowFrom != 0 {
		t.Fatal("slow start of a backup joining the backups")
	}
	// An address in both sets is a primary only.
	p.update(discovery.NewSet("web", "static", []discovery.Instance{{Addr: p1}, {Addr: b1}}, time.Now()))
	if nb := p.byAddr[b1]; nb.backup || nb.backupAnswers != nil || nb.target != b.target || nb.m.backup.Load() {
		t.Fatalf("backup turned primary: %+v", nb)
	}
	if l := p.backup.Load().list; len(l) != 2 || l[0].addr != b2 {
		t.Fatalf("backup set: %v", l)
	}
	// And back.
	p.update(discovery.NewSet("web", "static", []discovery.Instance{{Addr: p1}}, time.Now()))
	if nb := p.byAddr[b1]; !nb.backup || nb.target != b.target {
		t.Fatalf("primary turned backup: %+v", nb)
	}
	// A backup that leaves drains.
	b.target.Begin()
	p.updateBackup(discovery.NewSet(backupName("web"), "static", []discovery.Instance{{Addr: b2}}, time.Now()))
	p.mu.Lock()
	draining := len(p.draining)
	p.mu.Unlock()
	if draining != 1 || p.byAddr[b1] != nil {
		t.Fatalf("a backup with a request in flight left: %d draining", draining)
	}
	b.target.Done(time.Now().UnixNano(), health.OutcomeSuccess, 0)
	p.reap(time.Now())
	p.mu.Lock()
	draining = len(p.draining)
	p.mu.Unlock()
	if draining != 0 {
		t.Fatal("an idle backup that left is still draining")
	}

	// A service without a backup set ignores one.
	p = testPool(t, "{static: [127.0.0.1:1]}", p1)
	p.updateBackup(discovery.NewSet(backupName("web"), "static", []discovery.Instance{{Addr: b1}}, time.Now()))
	if len(p.backup.Load().list) != 0 || p.byAddr[b1] != nil {
		t.Fatal("backups taken by a service without a backup set")
	}
	if !strings.HasSuffix(backupName("web"), "/backup") {
		t.Fatal(backupName("web"))
	}
}
