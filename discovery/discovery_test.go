package discovery

import (
	"fmt"
	"log/slog"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestMain fails the package if a test leaves a goroutine behind.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var testTime = time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)

func TestNewSet(t *testing.T) {
	f := func(ins []Instance, want string) {
		t.Helper()
		s := NewSet("web", "static", ins, testTime)
		if got := fmt.Sprint(s.Instances); got != want {
			t.Errorf("got %s, want %s", got, want)
		}
	}
	f(nil, "[]")
	f([]Instance{{Addr: "b:1", Weight: 3}, {Addr: "a:1"}, {Addr: "b:1", Weight: 5}, {Addr: ""}}, "[{a:1 1} {b:1 3}]")
}

// recorder is a Publisher that keeps what it was given.
type recorder struct {
	mu        sync.Mutex
	sets      map[string]*Set
	removed   map[string]bool
	publishes int
}

func newRecorder() *recorder {
	return &recorder{sets: make(map[string]*Set), removed: make(map[string]bool)}
}

func (r *recorder) Publish(s *Set) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sets[s.Service] = s
	r.publishes++
	delete(r.removed, s.Service)
}

func (r *recorder) Remove(service string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.sets, service)
	r.removed[service] = true
}

// addrs returns the published instances of service as addr*weight, "-" if
// none was published.
func (r *recorder) addrs(service string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.sets[service]
	if s == nil {
		return "-"
	}
	var out []string
	for _, in := range s.Instances {
		out = append(out, fmt.Sprintf("%s*%d", in.Addr, in.Weight))
	}
	sort.Strings(out)
	return strings.Join(out, ",")
}

func (r *recorder) set(service string) *Set {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sets[service]
}

func (r *recorder) wasRemoved(service string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.removed[service]
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.publishes
}

// eventually polls cond for up to 30 s and returns how long it took.
func eventually(t *testing.T, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for time.Since(start) < 30*time.Second {
		if cond() {
			return time.Since(start)
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
	return 0
}

func testLogger() *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	return slog.New(slog.DiscardHandler)
}
