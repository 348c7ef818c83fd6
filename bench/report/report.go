// Package report holds what a bench-suite run measured, per scenario and
// per proxy, and writes it as JSON and as an HTML report with charts over
// time, events marked.
package report

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/edgelb/edgelb/bench/loadgen"
)

// Proxy names; Edgelb's run is the one every other run is compared with.
const Edgelb = "edgelb"

// Report is a whole bench-suite run.
type Report struct {
	Start     time.Time  `json:"start"`
	Host      Host       `json:"host"`
	Settings  Settings   `json:"settings"`
	Scenarios []Scenario `json:"scenarios"`
}

// Host describes where the run happened.
type Host struct {
	CPUs      int    `json:"cpus"`
	GoVersion string `json:"go_version"`
	// Pinned says whether proxies ran pinned to their own CPUs (ProxyCPUs)
	// with the load tool, origins and Consul on the others.
	Pinned    bool   `json:"pinned"`
	ProxyCPUs string `json:"proxy_cpus,omitempty"`
	// Peers maps nginx and haproxy to their version lines.
	Peers map[string]string `json:"peers,omitempty"`
}

// Settings are the load settings every run used.
type Settings struct {
	DurationS   float64 `json:"duration_s"`
	Concurrency int     `json:"concurrency"`
	// Rate is the target requests per second; 0 means closed loop.
	Rate float64 `json:"rate,omitempty"`
}

// Scenario is one scenario: a run through edgelb and, in comparison mode,
// the same load through nginx and HAProxy.
type Scenario struct {
	Name        string       `json:"name"`
	Title       string       `json:"title"`
	Description string       `json:"description"`
	Runs        []Run        `json:"runs"`
	Comparisons []Comparison `json:"comparisons,omitempty"`
	// Propagation is the churn scenario's registration/deregistration to
	// routing delays.
	Propagation *Propagation `json:"propagation,omitempty"`
	Error       string       `json:"error,omitempty"`
}

// Run is the load through one proxy.
type Run struct {
	Proxy  string  `json:"proxy"`
	Events []Event `json:"events"`
	// CPUSeconds is the proxy's user+system CPU time during the load, all
	// of its processes together.
	CPUSeconds float64 `json:"cpu_s"`
	// CPUPerRequestUS is CPUSeconds per request, in microseconds.
	CPUPerRequestUS float64         `json:"cpu_per_request_us"`
	Result          *loadgen.Result `json:"result,omitempty"`
	// Failover is what the backup scenario measured.
	Failover *Failover `json:"failover,omitempty"`
	Error    string    `json:"error,omitempty"`
	// Notes say what the run shows against the scenario's targets.
	Notes []string `json:"notes,omitempty"`
}

// Failover is how answers moved from a service's primary origins to its
// backup origin and back, from the origin that answered each request.
// Times are in milliseconds; -1 means it never happened.
type Failover struct {
	// Backup names the backup origin.
	Backup string `json:"backup"`
	// KillMS is how long killing the primaries took, from the first
	// SIGKILL to the exit of the last one: the times below count from the
	// first.
	KillMS float64 `json:"kill_ms"`
	// FirstBackupMS is the time from the kill of the primaries to the
	// first answer from the backup.
	FirstBackupMS float64 `json:"first_backup_ms"`
	// AllBackupMS is the time from the kill to the end of the last
	// request until the restart that the backup did not answer: from
	// then on, every request got the backup's answer.
	AllBackupMS float64 `json:"all_backup_ms"`
	// OutageErrors counts the requests that failed (no answer, or not
	// 2xx/3xx) between the kill and the restart; OutageMaxMS is the
	// longest request that ended then.
	OutageErrors int64   `json:"outage_errors"`
	OutageMaxMS  float64 `json:"outage_max_ms"`
	// FirstPrimaryMS is the time from the restart of the primaries (all
	// of them answering) to the first answer from one of them;
	// AllPrimaryMS to the end of the last answer from the backup.
	FirstPrimaryMS float64 `json:"first_primary_ms"`
	AllPrimaryMS   float64 `json:"all_primary_ms"`
	// LastSecondPrimaryPercent is the primaries' share of the answers in
	// the last second of the load.
	LastSecondPrimaryPercent float64 `json:"last_second_primary_percent"`
	// Before, Outage and After count the answers by origin ("" for
	// requests with no answer) before the kill, between the kill and the
	// restart, and after it; BySecond does so for each second of the load.
	Before   map[string]int64   `json:"before"`
	Outage   map[string]int64   `json:"outage"`
	After    map[string]int64   `json:"after"`
	BySecond []map[string]int64 `json:"by_second"`
}

// Event is something the scenario did or saw during the load.
type Event struct {
	// T is seconds since the start of the load.
	T    float64 `json:"t_s"`
	Name string  `json:"name"`
}

// Comparison is edgelb's figures divided by a peer's: below 1 is better
// for CPU per request and p99, above 1 is better for requests/s.
type Comparison struct {
	Peer               string  `json:"peer"`
	RPSRatio           float64 `json:"rps_ratio"`
	CPUPerRequestRatio float64 `json:"cpu_per_request_ratio"`
	P99Ratio           float64 `json:"p99_ratio"`
	Errors             int64   `json:"edgelb_errors"`
	PeerErrors         int64   `json:"peer_errors"`
}

// Propagation is how long Consul changes took to change routing.
type Propagation struct {
	// RegisterMS and DeregisterMS are, for each change in order, the time
	// from the Consul API call to the first client answer showing it.
	RegisterMS   []float64 `json:"register_ms"`
	DeregisterMS []float64 `json:"deregister_ms"`
	P50MS        float64   `json:"p50_ms"`
	MaxMS        float64   `json:"max_ms"`
	// Missed counts changes not seen within the wait limit.
	Missed int `json:"missed"`
}

// Summarize fills P50MS and MaxMS from the delays.
func (p *Propagation) Summarize() {
	all := append(append([]float64(nil), p.RegisterMS...), p.DeregisterMS...)
	if len(all) == 0 {
		return
	}
	sort.Float64s(all)
	p.P50MS, p.MaxMS = all[len(all)/2], all[len(all)-1]
}

// Compare fills Comparisons from the runs: edgelb's against each peer's.
func (s *Scenario) Compare() {
	s.Comparisons = nil
	edge := s.Run(Edgelb)
	if edge == nil || edge.Result == nil {
		return
	}
	for _, r := range s.Runs {
		if r.Proxy == Edgelb || r.Result == nil {
			continue
		}
		s.Comparisons = append(s.Comparisons, Comparison{
			Peer:               r.Proxy,
			RPSRatio:           ratio(edge.Result.RPS, r.Result.RPS),
			CPUPerRequestRatio: ratio(edge.CPUPerRequestUS, r.CPUPerRequestUS),
			P99Ratio:           ratio(edge.Result.Latency.P99, r.Result.Latency.P99),
			Errors:             edge.Result.Errors,
			PeerErrors:         r.Result.Errors,
		})
	}
}

// Run returns the run through proxy, or nil.
func (s *Scenario) Run(proxy string) *Run {
	for i := range s.Runs {
		if s.Runs[i].Proxy == proxy {
			return &s.Runs[i]
		}
	}
	return nil
}

// ratio is a/b, 0 when b is 0.
func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// WriteFiles writes the report as dir/report.json and dir/report.html.
func (r *Report) WriteFiles(dir string, h HTMLOptions) (jsonPath, htmlPath string, err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", "", err
	}
	jsonPath, htmlPath = filepath.Join(dir, "report.json"), filepath.Join(dir, "report.html")
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", "", fmt.Errorf("cannot encode report: %w", err)
	}
	if err := os.WriteFile(jsonPath, data, 0o644); err != nil {
		return "", "", err
	}
	f, err := os.Create(htmlPath)
	if err != nil {
		return "", "", err
	}
	if err := r.WriteHTML(f, h); err != nil {
		f.Close()
		return "", "", err
	}
	return jsonPath, htmlPath, f.Close()
}
