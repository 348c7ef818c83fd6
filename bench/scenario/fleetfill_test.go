package scenario

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"
)

// TestRunnerFleetFill runs the fleet-fill scenario as edgelb-bench does:
// every origin killed, a fourth edgelb started with an empty state_dir
// serves at least 99% of the URLs the others stored, from its peers.
func TestRunnerFleetFill(t *testing.T) {
	bin := ConsulBinary(consulDirs()...)
	if bin == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("no consul binary: run `make consul`")
		}
		t.Skip("no consul binary: run `make consul`")
	}
	rep := Run(context.Background(), Options{
		Bin: Binaries(t), Consul: bin, Dir: t.TempDir(), Duration: 12 * time.Second, Concurrency: 4, Logf: t.Logf,
	}, []string{FleetFill})
	s := rep.Scenarios[0]
	if s.Error != "" || len(s.Runs) != 1 || s.Runs[0].Error != "" || s.Runs[0].Result == nil {
		t.Fatalf("%+v", s)
	}
	run := s.Runs[0]
	for _, n := range run.Notes {
		t.Log(n)
	}
	notes := strings.Join(run.Notes, "\n")
	if strings.Contains(notes, "NOT met") || !strings.Contains(notes, "target at least 99%: met") {
		t.Fatalf("the target was missed:\n%s", notes)
	}
}
