package fleet

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgelb/edgelb/discovery/consultest"
)

// applied records what a Purges applied.
type applied struct {
	mu   sync.Mutex
	urls []string // "*" for everything
}

func (a *applied) apply(r Record) {
	a.mu.Lock()
	defer a.mu.Unlock()
	u := r.URL
	if u == "" {
		u = "*"
	}
	a.urls = append(a.urls, u)
}

func (a *applied) String() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return strings.Join(a.urls, " ")
}

// waitApplied waits until a has applied want (space-separated, in order).
func waitApplied(t *testing.T, a *applied, want string) {
	t.Helper()
	for start := time.Now(); time.Since(start) < 15*time.Second; time.Sleep(5 * time.Millisecond) {
		if a.String() == want {
			return
		}
	}
	t.Fatalf("applied %q, want %q", a.String(), want)
}

// newPurges starts a purge log on agent ag with state in dir.
func newPurges(t *testing.T, ag *consultest.Agent, dir, instance string, retention time.Duration) (*Purges, *applied) {
	t.Helper()
	a := &applied{}
	cfg := PurgeConfig{}
	cfg.ApplyDefaults()
	if retention > 0 {
		cfg.Retention = retention
	}
	p := NewPurges(ag.Client, ag.Addr(), cfg, dir, instance, a.apply, testLogger())
	p.gcEvery = time.Hour // the tests collect by hand
	p.CatchUp(2 * time.Second)
	p.Start()
	t.Cleanup(p.Stop)
	return p, a
}

func publish(t *testing.T, p *Purges, url string) Record {
	t.Helper()
	r, err := p.Publish(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestPurgeLogOrder publishes from two instances: each applies every
// purge once, in the order of their indexes, its own included.
func TestPurgeLogOrder(t *testing.T) {
	ag := consultest.Start(t)
	p1, a1 := newPurges(t, ag, t.TempDir(), "one", 0)
	p2, a2 := newPurges(t, ag, t.TempDir(), "two", 0)
	r1 := publish(t, p1, "http://x/1")
	r2 := publish(t, p2, "http://x/2")
	r3 := publish(t, p1, "")
	if !(r1.Index < r2.Index && r2.Index < r3.Index) {
		t.Fatalf("indexes %d %d %d", r1.Index, r2.Index, r3.Index)
	}
	waitApplied(t, a1, "http://x/1 http://x/2 *")
	waitApplied(t, a2, "http://x/1 http://x/2 *")
	if st := p2.Status(); st.Cursor != r3.Index || st.LastApplied == nil || !st.LastApplied.All || st.LastApplied.By != "one" {
		t.Fatalf("status: %+v %+v", st, st.LastApplied)
	}
}

// TestPurgeLogRestart: an instance applies again, at start, the purges
// published since its stale store was saved, and only those.
func TestPurgeLogRestart(t *testing.T) {
	ag := consultest.Start(t)
	dir := t.TempDir()
	p1, _ := newPurges(t, ag, t.TempDir(), "one", 0)
	p2, a2 := newPurges(t, ag, dir, "two", 0)
	publish(t, p1, "http://x/1")
	waitApplied(t, a2, "http://x/1")
	// The store saved after /1 was applied; /2 applied, not saved.
	p2.StoreSaved(p2.Cursor())
	publish(t, p1, "http://x/2")
	waitApplied(t, a2, "http://x/1 http://x/2")
	p2.Stop()
	publish(t, p1, "http://x/3")

	// Back: the store on disk has seen /1 only.
	_, a2 = newPurges(t, ag, dir, "two", 0)
	waitApplied(t, a2, "http://x/2 http://x/3")
}

// TestPurgeLogCollect removes old records; an instance whose cursor is
// below what was collected purges everything, as it may have missed some.
func TestPurgeLogCollect(t *testing.T) {
	ag := consultest.Start(t)
	p1, _ := newPurges(t, ag, t.TempDir(), "one", time.Minute)
	dir := t.TempDir()
	p2, a2 := newPurges(t, ag, dir, "two", time.Minute)
	publish(t, p1, "http://x/1")
	waitApplied(t, a2, "http://x/1")
	p2.StoreSaved(p2.Cursor())
	p2.Stop()
	publish(t, p1, "http://x/2")
	publish(t, p1, "http://x/3")

	// Two minutes on, everything is past the retention.
	if err := p1.collect(time.Now().Add(2 * time.Minute)); err != nil {
		t.Fatal(err)
	}
	pairs, _, err := ag.Client.KV().List(DefaultPurgePrefix+logDir, nil)
	if err != nil || len(pairs) != 0 {
		t.Fatalf("records after collection: %d (%v)", len(pairs), err)
	}
	// A new purge, after the collection.
	publish(t, p1, "http://x/4")

	_, a2 = newPurges(t, ag, dir, "two", time.Minute)
	waitApplied(t, a2, "* http://x/4")
}

// TestPurgeLogConsulRestart restarts the dev agent, which loses the log:
// purges published after it start a new log whose indexes are lower than
// the old cursor, and they are applied all the same.
func TestPurgeLogConsulRestart(t *testing.T) {
	ag := consultest.Start(t)
	p1, a1 := newPurges(t, ag, t.TempDir(), "one", 0)
	_, a2 := newPurges(t, ag, t.TempDir(), "two", 0)
	for i := 1; i <= 3; i++ {
		publish(t, p1, fmt.Sprintf("http://x/%d", i))
	}
	waitApplied(t, a2, "http://x/1 http://x/2 http://x/3")
	old := p1.Status().Epoch
	ag.Restart()
	// p1 may publish before its watch has seen the new agent.
	var r Record
	for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
		var err error
		if r, err = p1.Publish(context.Background(), "http://x/after"); err == nil {
			break
		}
		if time.Since(start) > 15*time.Second {
			t.Fatal(err)
		}
		p1.mu.Lock()
		p1.st.Pending = nil
		p1.mu.Unlock()
	}
	waitApplied(t, a2, "http://x/1 http://x/2 http://x/3 http://x/after")
	waitApplied(t, a1, "http://x/1 http://x/2 http://x/3 http://x/after")
	if st := p1.Status(); st.Epoch == old || st.Cursor != r.Index {
		t.Fatalf("after the restart: epoch %q (was %q), cursor %d, record index %d", st.Epoch, old, st.Cursor, r.Index)
	}
}

// TestPurgeLogPending keeps a purge that Consul did not take and
// publishes it once Consul answers.
func TestPurgeLogPending(t *testing.T) {
	ag := consultest.Start(t)
	p1, a1 := newPurges(t, ag, t.TempDir(), "one", 0)
	_, a2 := newPurges(t, ag, t.TempDir(), "two", 0)
	ag.Stop()
	if _, err := p1.Publish(context.Background(), "http://x/while-down"); err == nil || !strings.Contains(err.Error(), "unreachable") {
		t.Fatalf("publish with Consul down: %v", err)
	}
	if st := p1.Status(); st.Pending != 1 {
		t.Fatalf("pending %d", st.Pending)
	}
	ag.Restart()
	waitApplied(t, a2, "http://x/while-down")
	waitApplied(t, a1, "http://x/while-down")
	if st := p1.Status(); st.Pending != 0 {
		t.Fatalf("pending %d after Consul came back", st.Pending)
	}
	pairs, _, _ := ag.Client.KV().List(DefaultPurgePrefix+logDir, nil)
	if len(pairs) != 1 {
		t.Fatalf("records: %d", len(pairs))
	}
}

// testLogger logs with -v only.
func testLogger() *slog.Logger {
	if testing.Verbose() {
		return slog.Default()
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}
