package scenario

import (
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/edgelb/edgelb/bench/report"
)

// fillURLs is how many URLs the fleet-fill scenario stores and asks the
// new instance for.
const fillURLs = 300

// fillTarget is the share of those URLs the new instance must serve from
// its peers.
const fillTarget = 0.99

// fillRun is what the fleet-fill scenario measured.
type fillRun struct {
	// fromPeer counts the URLs the new instance served with a copy a
	// peer gave, stale the other stored copies it served, failed the
	// others (their answers, by status and Edgelb-Error, in why).
	fromPeer, stale, failed int
	why                     map[string]int
	// took holds how long each of those first answers took.
	took []time.Duration
	// edge is the new instance.
	edge *Edge
	// started is when the new instance was started after the kill.
	started time.Duration
}

func fillPath(i int) string { return fmt.Sprintf("/fill/%d", i) }

func fleetFillScript(s *session) error {
	f := s.fleet
	if err := s.at(0.1); err != nil {
		return err
	}
	// Each URL stored on one instance only: the new one has to find the
	// peer that has it.
	for i := range fillURLs {
		e := f.edge(i % fleetSize)
		if code, _, stale, err := fleetGet(e.Addr, fillPath(i)); err != nil || code != 200 || stale {
			return fmt.Errorf("storing %s in %s: %d stale=%v %v", fillPath(i), e.Name, code, stale, err)
		}
	}
	s.mark("%d URLs stored, each on one instance", fillURLs)
	if err := s.at(0.2); err != nil {
		return err
	}
	t0 := time.Now()
	for _, o := range s.origins {
		o.Kill9()
	}
	s.extra["archive"].Kill9()
	s.markAt(t0, "kill -9 every origin")
	if _, ok := s.untilAll(t0, func(e *Edge) bool { _, _, stale, _ := fleetGet(e.Addr, fillPath(0)); return stale }); !ok {
		return fmt.Errorf("not every instance served stale once the origins were killed")
	}

	t1 := time.Now()
	d, err := s.g.StartEdgeAs("edgelb-4", f.config, filepath.Join(s.g.Dir, "state-4"))
	if err != nil {
		return err
	}
	if err := WaitHTTP("http://"+d.Admin+"/readyz", DefaultWaitTimeout); err != nil {
		return fmt.Errorf("%s: %w\n%s", d.Name, err, d.Output())
	}
	f.mu.Lock()
	f.edges = append(f.edges, d)
	f.mu.Unlock()
	s.markAt(t1, "edgelb-4 started, empty state_dir")
	if err := waitFillPeers(d, fleetSize); err != nil {
		return err
	}
	run := &fillRun{why: map[string]int{}, started: t1.Sub(t0)}
	for i := range fillURLs {
		start := time.Now()
		code, errCode, cs, err := fillGet(d.Addr, fillPath(i))
		run.took = append(run.took, time.Since(start))
		switch {
		case err != nil:
			run.failed++
			run.why[err.Error()]++
		case code == 200 && strings.Contains(cs, "detail=peer/"):
			run.fromPeer++
		case code == 200 && cs != "":
			run.stale++
		default:
			run.failed++
			run.why[fmt.Sprintf("%d %s", code, errCode)]++
		}
	}
	s.mark("edgelb-4 asked for the %d URLs", fillURLs)
	run.edge = d
	f.mu.Lock()
	f.fill = run
	f.mu.Unlock()
	return nil
}

// waitFillPeers waits until the instance has the fleet's secret and lists
// n ready peers that answer peer fills.
func waitFillPeers(e *Edge, n int) error {
	deadline := time.Now().Add(DefaultWaitTimeout)
	for {
		st, err := e.Status()
		if err == nil {
			b, _ := json.Marshal(st["fleet"])
			var fl struct {
				Peers struct {
					Peers []struct {
						Ready    bool   `json:"ready"`
						PeerFill string `json:"peer_fill"`
					} `json:"peers"`
				} `json:"peers"`
				PeerFill struct {
					Secret string `json:"secret"`
				} `json:"peer_fill"`
			}
			json.Unmarshal(b, &fl)
			ready := 0
			if fl.PeerFill.Secret == "" {
				ready = -n // the secret, from Consul, is not known yet
			}
			for _, p := range fl.Peers.Peers {
				if p.Ready && p.PeerFill != "" {
					ready++
				}
			}
			if ready >= n {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s never listed %d ready peers answering peer fills", e.Name, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// fillGet sends GET path to an instance with Host fleetHost and returns
// the status, Edgelb-Error and Cache-Status.
func fillGet(addr, path string) (code int, errCode, cacheStatus string, err error) {
	req, _ := http.NewRequest("GET", "http://"+addr+path, nil)
	req.Host = fleetHost
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", "", err
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("Edgelb-Error"), resp.Header.Get("Cache-Status"), nil
}

// fleetFillJudge words the share of the URLs the new instance served from
// its peers against fillTarget, the time of those answers, and the load's
// errors.
func fleetFillJudge(s *session, run *report.Run) []string {
	f := s.fleet
	f.mu.Lock()
	defer f.mu.Unlock()
	fr := f.fill
	if fr == nil {
		return []string{"the new instance was never asked for the stored URLs: the load ended first (the scenario wants -duration 10s or more)"}
	}
	share := float64(fr.fromPeer) / fillURLs
	verdict := "met"
	if share < fillTarget {
		verdict = "NOT met"
	}
	notes := []string{fmt.Sprintf("edgelb-4, started %.1fs after every origin was killed, with an empty state_dir: served %d of the %d URLs the others had stored "+
		"from its peers (%.1f%%; target at least %.0f%%: %s); %d from its own store, %d not at all",
		fr.started.Seconds(), fr.fromPeer, fillURLs, 100*share, 100*fillTarget, verdict, fr.stale, fr.failed)}
	if len(fr.why) > 0 {
		var why []string
		for k, n := range fr.why {
			why = append(why, fmt.Sprintf("%dx %s", n, k))
		}
		slices.Sort(why)
		notes = append(notes, "not served: "+strings.Join(why, ", "))
	}
	took := slices.Clone(fr.took)
	slices.Sort(took)
	if n := len(took); n > 0 {
		notes = append(notes, fmt.Sprintf("time of those first answers (each a peer fill, asked one after the other): p50 %.2fms, p99 %.2fms, max %.2fms",
			ms(took[n/2]), ms(took[n*99/100]), ms(took[n-1])))
	}
	if fills := peerFills(fr.edge); fills != nil {
		var parts []string
		for _, r := range []string{"hit", "miss", "timeout", "error", "refused"} {
			parts = append(parts, fmt.Sprintf("%s %.0f", r, fills[r]))
		}
		notes = append(notes, "edgelb-4's peer fills by result at the end, the load's requests to it included: "+strings.Join(parts, ", "))
	}
	var spread []string
	for i, e := range f.edges {
		spread = append(spread, fmt.Sprintf("edgelb-%d %d", i+1, f.byAddr[e.Addr]))
	}
	notes = append(notes, fmt.Sprintf("load: round-robin over the instances Consul lists as passing; answers by instance: %s; errors %d of %d requests",
		strings.Join(spread, ", "), run.Result.Errors, run.Result.Requests))
	return notes
}

// peerFills returns the instance's peer fills by result, from /status.
func peerFills(e *Edge) map[string]float64 {
	st, err := e.Status()
	if err != nil {
		return nil
	}
	b, _ := json.Marshal(st["fleet"])
	var fl struct {
		PeerFill struct {
			Fills map[string]float64 `json:"fills"`
		} `json:"peer_fill"`
	}
	json.Unmarshal(b, &fl)
	return fl.PeerFill.Fills
}
