package scenario

import (
	"strings"
	"testing"
	"time"
)

// TestRunnerFleetFill runs the fleet-fill scenario as edgelb-bench does:
// every origin killed, a fourth edgelb started with an empty state_dir
// serves at least 99% of the URLs the others stored, from its peers.
func TestRunnerFleetFill(t *testing.T) {
	s := runWithConsul(t, 12*time.Second, FleetFill)[0]
	run := s.Runs[0]
	for _, n := range run.Notes {
		t.Log(n)
	}
	notes := strings.Join(run.Notes, "\n")
	if strings.Contains(notes, "NOT met") || !strings.Contains(notes, "target at least 99%: met") {
		t.Fatalf("the target was missed:\n%s", notes)
	}
}
