package panics

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/VictoriaMetrics/metrics"
)

// syncBuffer is a log destination safe for concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func TestRunRecoversCountsAndLogsOnce(t *testing.T) {
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	before := Health.Total()
	r := Health.Run(func() { panic("probe exploded") }, log, "panic in health probe", "addr", "10.0.0.1:80")
	if r != "probe exploded" {
		t.Fatalf("Run returned %v, want the panic value", r)
	}
	if n := Health.Total() - before; n != 1 {
		t.Fatalf("counted %d panics, want 1", n)
	}
	out := logs.String()
	if n := strings.Count(out, "\n"); n != 1 {
		t.Fatalf("%d log lines, want 1:\n%s", n, out)
	}
	for _, want := range []string{
		`level=ERROR msg="panic in health probe" component=health addr=10.0.0.1:80 panic="probe exploded" stack=`,
		"panics_test.go", // the panicking frame
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}

	if r := Health.Run(func() {}, log, "unused"); r != nil || Health.Total()-before != 1 {
		t.Fatalf("a call that returns: got %v, %d panics", r, Health.Total()-before)
	}
	// panic(nil) is a panic too.
	if r := Health.Run(func() { panic(nil) }, log, "nil"); r == nil || Health.Total()-before != 2 {
		t.Fatalf("panic(nil): got %v, %d panics", r, Health.Total()-before)
	}
}

func TestRecoveredBoundsWhatItLogs(t *testing.T) {
	f := func(name string, panicking func(), want []string) {
		t.Helper()
		var logs syncBuffer
		Stale.Run(panicking, slog.New(slog.NewJSONHandler(&logs, nil)), "boom")
		out := logs.String()
		if len(out) > maxValueLen+maxStackLen+1024 {
			t.Errorf("%s: %d bytes logged", name, len(out))
		}
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("%s: log lacks %q:\n%.2000s", name, w, out)
			}
		}
	}
	f("long value", func() { panic(strings.Repeat("é", 4*maxValueLen)) }, []string{`"component":"stale"`, `...(truncated)`})
	var deep func(int)
	deep = func(n int) {
		if n == 0 {
			panic("deep")
		}
		deep(n - 1)
	}
	f("deep stack", func() { deep(2000) }, []string{`"panic":"deep"`, "...(stack truncated)", "panics_test.go"})
}

// Every series exists from the start, so that a rate or an alert sees
// the first panic.
func TestEveryComponentIsExported(t *testing.T) {
	var b bytes.Buffer
	metrics.WritePrometheus(&b, false)
	for _, name := range []string{"balancer", "admin", "discovery", "health", "stale", "fleet"} {
		if want := `edgelb_panics_total{component="` + name + `"} `; !strings.Contains(b.String(), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}
