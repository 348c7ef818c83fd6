package scenario

import (
	"strings"
	"testing"
	"time"
)

// TestRunnerFleet runs the fleet scenario as edgelb-bench does: three
// edgelb processes on one Consul, a purge, a new route and a broken value
// in the config key, and a rolling restart of all three under load, with
// no error.
func TestRunnerFleet(t *testing.T) {
	s := runWithConsul(t, 14*time.Second, Fleet)[0]
	run := s.Runs[0]
	for _, n := range run.Notes {
		t.Log(n)
	}
	t.Logf("%d requests, events %v", run.Result.Requests, run.Events)
	notes := strings.Join(run.Notes, "\n")
	if strings.Contains(notes, "NOT met") || strings.Contains(notes, "never") || strings.Contains(notes, "CHANGED") {
		t.Fatalf("a target was missed:\n%s\n%s", notes, run.Result.Format())
	}
	for _, want := range []string{"purge of /archive/purge-me", "new route /new", "broken value", "edgelb-1: out of the load", "edgelb-3: out of the load",
		"errors over the whole load, the rolling restart of all three included: 0 of"} {
		if !strings.Contains(notes, want) {
			t.Errorf("notes lack %q", want)
		}
	}
	restarts := 0
	for _, e := range run.Events {
		if strings.HasSuffix(e.Name, "passing again") {
			restarts++
		}
	}
	if restarts != fleetSize {
		t.Fatalf("%d instances passing again after their restart, want %d; events %v", restarts, fleetSize, run.Events)
	}
}
