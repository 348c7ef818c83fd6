package scenario

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgelb/edgelb/bench/loadgen"
	"github.com/edgelb/edgelb/bench/report"
)

// TestRunnerSteadyAndKill runs the steady and kill scenarios briefly
// through edgelb, as edgelb-bench does, and writes their report.
func TestRunnerSteadyAndKill(t *testing.T) {
	dir := t.TempDir()
	var seconds int
	rep := Run(context.Background(), Options{
		Bin: Binaries(t), Dir: dir, Duration: 3 * time.Second, Concurrency: 4,
		Logf:     t.Logf,
		OnSecond: func(string, string, loadgen.Second) { seconds++ },
	}, []string{Steady, Kill})
	if len(rep.Scenarios) != 2 {
		t.Fatalf("%d scenarios, want 2", len(rep.Scenarios))
	}
	for _, s := range rep.Scenarios {
		if s.Error != "" || len(s.Runs) != 1 || s.Runs[0].Error != "" || s.Runs[0].Result == nil {
			t.Fatalf("%s: %+v", s.Name, s)
		}
		run := s.Runs[0]
		t.Logf("%s: %d requests, %d errors, p99 %.2fms, %.1fus CPU/request, events %v", s.Name, run.Result.Requests, run.Result.Errors, run.Result.Latency.P99, run.CPUPerRequestUS, run.Events)
		if run.Proxy != report.Edgelb || run.Result.Requests == 0 || run.CPUSeconds <= 0 {
			t.Fatalf("%s: proxy %s, %d requests, %.3fs CPU", s.Name, run.Proxy, run.Result.Requests, run.CPUSeconds)
		}
		if len(s.Comparisons) != 0 {
			t.Fatalf("%s: comparisons without peers: %+v", s.Name, s.Comparisons)
		}
	}
	if seconds == 0 {
		t.Fatal("OnSecond never called")
	}
	if steady := rep.Scenarios[0].Runs[0]; steady.Result.Errors != 0 || len(steady.Events) != 0 {
		t.Fatalf("steady state: %d errors, events %v:\n%s", steady.Result.Errors, steady.Events, steady.Result.Format())
	}

	// The kill is marked at about a third of the load, the restart at two
	// thirds, and clients are still served after the kill.
	kill := rep.Scenarios[1].Runs[0]
	at := map[string]float64{}
	for _, e := range kill.Events {
		at[e.Name] = e.T
	}
	killedAt, ok1 := at["kill -9 o2"]
	restartedAt, ok2 := at["o2 restarted"]
	if !ok1 || !ok2 || killedAt < 0.5 || restartedAt <= killedAt {
		t.Fatalf("kill events %v", kill.Events)
	}
	var after int64
	for _, sec := range kill.Result.Seconds {
		if float64(sec.T) > killedAt {
			after += sec.OK
		}
	}
	if after == 0 {
		t.Fatalf("no request succeeded after the kill:\n%s", kill.Result.Format())
	}

	jsonPath, htmlPath, err := rep.WriteFiles(dir, report.HTMLOptions{})
	if err != nil {
		t.Fatal(err)
	}
	html, _ := os.ReadFile(htmlPath)
	if _, err := os.Stat(jsonPath); err != nil || !strings.Contains(string(html), "kill -9 o2") {
		t.Fatalf("report not written: %v", err)
	}
}

func TestUnknownScenario(t *testing.T) {
	rep := Run(context.Background(), Options{Bin: t.TempDir(), Dir: t.TempDir()}, []string{"nope"})
	if len(rep.Scenarios) != 1 || !strings.Contains(rep.Scenarios[0].Error, `unknown scenario "nope"`) {
		t.Fatalf("%+v", rep.Scenarios)
	}
}

func TestProxies(t *testing.T) {
	f := func(name string, peers bool, want string) {
		t.Helper()
		if got := strings.Join(Proxies(name, peers), ","); got != want {
			t.Errorf("Proxies(%s, %v) = %s, want %s", name, peers, got, want)
		}
	}
	f(Steady, false, "edgelb")
	f(Steady, true, "edgelb,nginx,haproxy")
	f(Kill, true, "edgelb,nginx,haproxy")
	f(Hang, true, "edgelb")
	f(Churn, true, "edgelb")
	f(Backup, true, "edgelb,nginx,haproxy")
	f(Backup, false, "edgelb")
}

// TestRunnerBackup runs the backup scenario briefly through edgelb: no
// client error while every primary is killed, the backup answering in
// the outage, and the primaries again after their restart.
func TestRunnerBackup(t *testing.T) {
	dir := t.TempDir()
	rep := Run(context.Background(), Options{Bin: Binaries(t), Dir: dir, Duration: 6 * time.Second, Concurrency: 4, Logf: t.Logf}, []string{Backup})
	s := rep.Scenarios[0]
	if s.Error != "" || len(s.Runs) != 1 || s.Runs[0].Error != "" || s.Runs[0].Result == nil || s.Runs[0].Failover == nil {
		t.Fatalf("%+v", s)
	}
	run := s.Runs[0]
	f := run.Failover
	t.Logf("events %v; failover %+v", run.Events, *f)
	if run.Result.Errors != 0 || f.OutageErrors != 0 {
		t.Fatalf("%d errors, %d in the outage:\n%s", run.Result.Errors, f.OutageErrors, run.Result.Format())
	}
	if f.FirstBackupMS < 0 || f.Outage[backupOrigin] == 0 || f.Before[backupOrigin] != 0 {
		t.Fatalf("the backup's answers: first %.1fms after the kill; before %v, outage %v", f.FirstBackupMS, f.Before, f.Outage)
	}
	if f.FirstPrimaryMS < 0 || f.After["o1"]+f.After["o2"]+f.After["o3"] == 0 {
		t.Fatalf("no primary answered after the restart: %v", f.After)
	}
	names := map[string]bool{}
	for _, e := range run.Events {
		names[e.Name] = true
	}
	for _, want := range []string{"kill -9 o1, o2, o3 (backup up)", "o1, o2, o3 restarted", "edgelb serving from backup", "edgelb serving from primary"} {
		if !names[want] {
			t.Errorf("no event %q in %v", want, run.Events)
		}
	}
	_, htmlPath, err := rep.WriteFiles(dir, report.HTMLOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if html, _ := os.ReadFile(htmlPath); !strings.Contains(string(html), "kill to first backup answer ms") {
		t.Fatal("no failover table in the report")
	}
}

// TestRunnerConsulScenarios runs consul-stop and churn briefly against a
// real Consul agent.
func TestRunnerConsulScenarios(t *testing.T) {
	scenarios := runWithConsul(t, 4*time.Second, ConsulStop, Churn)
	for _, s := range scenarios {
		run := s.Runs[0]
		t.Logf("%s: %d requests, %d errors, events %v", s.Name, run.Result.Requests, run.Result.Errors, run.Events)
		if run.Result.Requests == 0 || len(run.Events) < 2 {
			t.Fatalf("%s: %d requests, events %v", s.Name, run.Result.Requests, run.Events)
		}
	}
	p := scenarios[1].Propagation
	if p == nil || len(p.RegisterMS) == 0 || len(p.DeregisterMS) == 0 {
		t.Fatalf("churn measured no propagation: %+v", p)
	}
	t.Logf("churn: register %v ms, deregister %v ms, missed %d", p.RegisterMS, p.DeregisterMS, p.Missed)
}

// runWithConsul runs the named scenarios for d each, as edgelb-bench does,
// with the consul binary of `make consul` (failing under CI without one,
// skipping otherwise); every run must have finished with a result.
func runWithConsul(t *testing.T, d time.Duration, names ...string) []report.Scenario {
	t.Helper()
	bin := ConsulBinary(consulDirs()...)
	if bin == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("no consul binary: run `make consul`")
		}
		t.Skip("no consul binary: run `make consul`")
	}
	rep := Run(context.Background(), Options{
		Bin: Binaries(t), Consul: bin, Dir: t.TempDir(), Duration: d, Concurrency: 4, Logf: t.Logf,
	}, names)
	for _, s := range rep.Scenarios {
		if s.Error != "" || len(s.Runs) != 1 || s.Runs[0].Error != "" || s.Runs[0].Result == nil {
			t.Fatalf("%s: %+v", s.Name, s)
		}
	}
	return rep.Scenarios
}

// consulDirs are where `make consul` puts the binary: <repo>/bin.
func consulDirs() []string {
	wd, _ := os.Getwd()
	return []string{filepath.Join(wd, "..", "..", "bin")}
}

// TestRunnerDCFailover runs dc-failover briefly against two real Consul
// agents: clients see no error, and the answers come from dc2 after the
// dc1 instances go, and from dc1 again after failover_hold.
func TestRunnerDCFailover(t *testing.T) {
	// Deregistration at 2s, registration at 4s, back after the 3s hold.
	s := runWithConsul(t, 8*time.Second, DCFailover)[0]
	run := s.Runs[0]
	t.Logf("%d requests, %d errors, events %v", run.Result.Requests, run.Result.Errors, run.Events)
	for _, n := range run.Notes {
		t.Log(n)
	}
	var names []string
	for _, e := range run.Events {
		names = append(names, e.Name)
	}
	if got := strings.Join(names, ", "); got != "dc1 instances deregistered, answers from dc2, dc1 instances registered again, answers from dc1 again" {
		t.Fatalf("events: %s", got)
	}
	if run.Result.Errors != 0 || len(run.Notes) != 4 || !strings.HasSuffix(run.Notes[0], ": met") || !strings.HasSuffix(run.Notes[2], ": met") ||
		!strings.Contains(run.Notes[3], "dc1 to dc2 1, dc2 to dc1 1; serving at the end: dc1 1, dc2 0") {
		t.Fatalf("%d errors; notes:\n%s", run.Result.Errors, strings.Join(run.Notes, "\n"))
	}
}
