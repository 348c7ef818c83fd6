package scenario

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/edgelb/edgelb/bench/loadgen"
)

func TestMachineStalls(t *testing.T) {
	stalls, err := MachineStalls("", 50*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if len(stalls) != runtime.NumCPU() {
		t.Fatalf("stalls of %d CPUs, want %d: %v", len(stalls), runtime.NumCPU(), stalls)
	}
	for cpu, s := range stalls {
		if s <= 0 || s > 50*time.Millisecond+time.Second {
			t.Errorf("CPU %d: stall %v", cpu, s)
		}
	}
	if n := stallNote(stalls, time.Second); !strings.Contains(n, "CPU 0 ") {
		t.Errorf("note without CPU 0: %s", n)
	}
}

func TestCPUList(t *testing.T) {
	f := func(list string, want string) {
		t.Helper()
		var got []string
		for _, c := range cpuList(list) {
			got = append(got, string(rune('0'+c)))
		}
		if g := strings.Join(got, ","); g != want {
			t.Errorf("cpuList(%q) = %s, want %s", list, g, want)
		}
	}
	f("0", "0")
	f("1-3", "1,2,3")
	f("0,2-3", "0,2,3")
	f("0,1", "0,1")
}

func TestHedgeLatencyNotes(t *testing.T) {
	sec := func(t int, p99, mx float64) loadgen.Second {
		var s loadgen.Second
		s.T, s.Latency.P99, s.Latency.Max = t, p99, mx
		return s
	}
	// SIGSTOP at 2.5s and SIGCONT at 6.0s: seconds 0-1 are healthy,
	// seconds 2-6 are judged, second 7 is after.
	seconds := []loadgen.Second{sec(0, 2, 5), sec(1, 2.5, 7), sec(2, 9, 50), sec(3, 3, 7), sec(4, 3, 8), sec(6, 3, 7.4), sec(7, 9, 90)}
	notes := hedgeLatencyNotes(seconds, 2.5, 6.0)
	want := []string{
		"healthy p99 2.50ms (worst second before SIGSTOP); worst latency while o2 hung 50.00ms: 20.0x, target at most 3x: NOT met",
		"worst latency before SIGSTOP, with every origin answering: 7.00ms (2.8x the healthy p99); while o2 hung: 50.00ms (7.14x that)",
	}
	if strings.Join(notes, "\n") != strings.Join(want, "\n") {
		t.Fatalf("notes:\n%s\nwant:\n%s", strings.Join(notes, "\n"), strings.Join(want, "\n"))
	}
	seconds[2] = sec(2, 2, 7.5)
	if n := hedgeLatencyNotes(seconds, 2.5, 6.0); !strings.HasSuffix(n[0], "8.00ms: 3.2x, target at most 3x: NOT met") {
		t.Errorf("without the slow second: %s", n[0])
	}
	seconds[4] = sec(4, 2, 7.4)
	if n := hedgeLatencyNotes(seconds, 2.5, 6.0); !strings.HasSuffix(n[0], "7.50ms: 3.0x, target at most 3x: met") {
		t.Errorf("within 3x: %s", n[0])
	}
	if n := hedgeLatencyNotes(seconds[5:], 2.5, 6.0); len(n) != 1 || !strings.HasPrefix(n[0], "no second") {
		t.Errorf("no healthy second: %v", n)
	}
}

func TestHungTryNote(t *testing.T) {
	stop := time.Date(2026, 12, 2, 9, 0, 5, 0, time.UTC)
	cont := stop.Add(5 * time.Second)
	line := func(at time.Time, dur float64, tries string) string {
		return fmt.Sprintf(`{"time":"%s","status":200,"duration_ms":%.3f,"hedges":1,"tries":[%s]}`, at.Format("2006-01-02T15:04:05.000Z"), dur, tries) + "\n"
	}
	try := func(b string, start, dur float64) string {
		return fmt.Sprintf(`{"backend":"%s","outcome":"ok","start_ms":%.3f,"duration_ms":%.3f}`, b, start, dur)
	}
	o2, o1 := "127.0.0.1:2", "127.0.0.1:1"
	log := line(stop.Add(-time.Second), 9, try(o2, 0, 9)+","+try(o1, 1, 8)) + // over before the stop
		line(stop.Add(-3*time.Millisecond), 4.5, try(o2, 0, 4.5)+","+try(o1, 2, 2.5)) + // in flight at the stop
		line(stop.Add(2*time.Second), 3, try(o1, 0, 3)+","+try(o2, 1, 2)) + // a hedge to o2
		line(stop.Add(2*time.Second), 50, try(o1, 0, 50)+","+try("127.0.0.1:3", 1, 49)) + // o2 not tried
		line(cont.Add(time.Second), 20, try(o2, 0, 20)+","+try(o1, 1, 19)) + // after
		"not json\n"
	path := filepath.Join(t.TempDir(), "hedged.log")
	if err := os.WriteFile(path, []byte(log), 0o644); err != nil {
		t.Fatal(err)
	}
	got := hungTryNote(path, o2, stop, cont, 1.5)
	want := "requests that met the hung o2 (from edgelb's access log): 2, worst 4.50ms (3.0x the healthy p99, target at most 3x: met); 1 lines unreadable"
	if got != want {
		t.Errorf("note:\n%s\nwant:\n%s", got, want)
	}
	if got := hungTryNote(filepath.Join(t.TempDir(), "none"), o2, stop, cont, 1.5); !strings.Contains(got, "no access log") {
		t.Errorf("missing log: %s", got)
	}
}
