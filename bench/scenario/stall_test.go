package scenario

import (
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
