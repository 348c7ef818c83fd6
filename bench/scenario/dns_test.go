package scenario

import (
	"context"
	"testing"
	"time"
)

// TestRunnerDNS runs the dns scenario briefly: the DNS server stops,
// edgelb sees its resolutions fail, and no request fails.
func TestRunnerDNS(t *testing.T) {
	rep := Run(context.Background(), Options{
		Bin: Binaries(t), Dir: t.TempDir(), Duration: 4 * time.Second, Concurrency: 4, Logf: t.Logf,
	}, []string{DNS})
	s := rep.Scenarios[0]
	if s.Error != "" || len(s.Runs) != 1 || s.Runs[0].Error != "" || s.Runs[0].Result == nil {
		t.Fatalf("%+v", s)
	}
	run := s.Runs[0]
	t.Logf("%d requests, %d errors, events %v", run.Result.Requests, run.Result.Errors, run.Events)
	at := map[string]float64{}
	for _, e := range run.Events {
		at[e.Name] = e.T
	}
	stopped, ok1 := at["DNS server stopped"]
	failing, ok2 := at["edgelb: resolution failing, last addresses kept"]
	if !ok1 || !ok2 || failing < stopped {
		t.Fatalf("events %v", run.Events)
	}
	var after int64
	for _, sec := range run.Result.Seconds {
		if float64(sec.T) > failing {
			after += sec.OK
		}
	}
	if run.Result.Errors != 0 || after == 0 {
		t.Fatalf("%d errors, %d answers after resolution began to fail:\n%s", run.Result.Errors, after, run.Result.Format())
	}
}
