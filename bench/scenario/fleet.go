package scenario

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"
	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/bench/report"
)

// The fleet scenario: three edgelb instances registered in one Consul,
// their services and routes in one KV key.
const (
	// fleetSize is how many edgelb instances the fleet has.
	fleetSize = 3
	// fleetService is their Consul service name.
	fleetService = "edgelb"
	// fleetKey is the KV key of their services and routes.
	fleetKey = "edgelb/config"
	// fleetHost is the Host of the scenario's own checks.
	fleetHost = "fleet.bench"
	// fleetPurgePath is the URL purged; the archive origin serves it.
	fleetPurgePath = "/archive/purge-me"
	// fleetTarget is what purges and config changes must take at most to
	// reach every instance.
	fleetTarget = time.Second
)

// fleetRun is what the fleet scenario follows and measures.
type fleetRun struct {
	// targets are the instances Consul lists as passing: where the load
	// goes.
	targets atomic.Pointer[[]string]
	stop    context.CancelFunc

	// config is the instances' config, less listen, admin and state_dir.
	config string

	mu    sync.Mutex
	edges []*Edge
	// byAddr counts the answers of each instance, by its address.
	byAddr map[string]int64
	notes  []string
	// failed is set when a check missed its target.
	failed bool
	// fill is what the fleet-fill scenario measured.
	fill *fillRun
}

// addrs returns the instances the load goes to.
func (f *fleetRun) addrs() []string {
	if p := f.targets.Load(); p != nil {
		return *p
	}
	return nil
}

// observe counts who answered each request.
func (f *fleetRun) observe(_, _ time.Time, resp *fasthttp.Response, err error) {
	if err != nil || resp == nil || resp.RemoteAddr() == nil {
		return
	}
	a := resp.RemoteAddr().String()
	f.mu.Lock()
	f.byAddr[a]++
	f.mu.Unlock()
}

func (f *fleetRun) note(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.notes = append(f.notes, fmt.Sprintf(format, args...))
}

// verdict words a time against fleetTarget, and remembers a miss.
func (f *fleetRun) verdict(d time.Duration, ok bool) string {
	if ok && d <= fleetTarget {
		return fmt.Sprintf("%.0fms (target %v: met)", ms(d), fleetTarget)
	}
	f.mu.Lock()
	f.failed = true
	f.mu.Unlock()
	if !ok {
		return fmt.Sprintf("never, within %v (target %v: NOT met)", churnWait, fleetTarget)
	}
	return fmt.Sprintf("%.0fms (target %v: NOT met)", ms(d), fleetTarget)
}

func (f *fleetRun) edge(i int) *Edge {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.edges[i]
}

// fleetRouting is the value of fleetKey: service web on the three
// origins, service archive on the archive origin, and with newRoute the
// route /new to o2. broken adds a key that does not exist.
func fleetRouting(origins []*Proc, archive *Proc, newRoute, broken bool) string {
	addrs := make([]string, len(origins))
	for i, o := range origins {
		addrs[i] = o.Addr
	}
	var b strings.Builder
	fmt.Fprintf(&b, "services:\n  web:\n    static: [%s]\n    connect_timeout: %s\n    try_timeout: %s\n    retries: %d\n    health:\n      active: {path: /health, interval: 1s}\n",
		strings.Join(addrs, ", "), connectTimeout, tryTimeout, retries)
	if broken {
		b.WriteString("      helth: {}\n")
	}
	fmt.Fprintf(&b, "  archive: {static: [%s], health: {passive: {consecutive_gateway_failures: 1}}}\n", archive.Addr)
	if newRoute {
		fmt.Fprintf(&b, "  new: {static: [%s]}\n", origins[1].Addr)
	}
	b.WriteString("routes:\n  - {path: /, service: web}\n  - {path: /archive, service: archive}\n")
	if newRoute {
		b.WriteString("  - {path: /new, service: new}\n")
	}
	return b.String()
}

// setupFleet starts a Consul agent, three origins and the archive origin,
// writes the services and routes to fleetKey, and starts three edgelb
// instances that register themselves and take their routing from the key;
// the load follows Consul's list of passing instances.
func (s *session) setupFleet() error {
	c, err := s.g.StartConsul(s.o.Consul)
	if err != nil {
		return err
	}
	s.consul = c
	for i := 1; i <= 3; i++ {
		p, err := s.g.StartOrigin(fmt.Sprintf("o%d", i))
		if err != nil {
			return err
		}
		s.origins = append(s.origins, p)
	}
	archive, err := s.g.StartOrigin("archive")
	if err != nil {
		return err
	}
	s.extra["archive"] = archive
	if err := s.putRouting(false, false); err != nil {
		return err
	}
	f := &fleetRun{byAddr: map[string]int64{}}
	s.fleet = f
	config := fmt.Sprintf("consul:\n  address: %s\n  config_key: %s\n  register: {name: %s, check_interval: 1s, drain_delay: 1s}\nserver: {drain_timeout: 5s}\n",
		c.Addr(), fleetKey, fleetService)
	f.config = config
	for i := 1; i <= fleetSize; i++ {
		e, err := s.g.StartEdgeAs(fmt.Sprintf("edgelb-%d", i), config, filepath.Join(s.g.Dir, fmt.Sprintf("state-%d", i)))
		if err != nil {
			return err
		}
		if err := WaitHTTP("http://"+e.Admin+"/readyz", DefaultWaitTimeout); err != nil {
			return fmt.Errorf("%s: %w\n%s", e.Name, err, e.Output())
		}
		f.edges = append(f.edges, e)
	}
	ctx, cancel := context.WithCancel(s.ctx)
	f.stop = cancel
	go f.follow(ctx, c.Client)
	deadline := time.Now().Add(DefaultWaitTimeout)
	for len(f.addrs()) < fleetSize {
		if time.Now().After(deadline) {
			return fmt.Errorf("Consul lists %d passing edgelb instances, want %d", len(f.addrs()), fleetSize)
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.url = "http://" + f.edges[0].Addr + "/"
	return nil
}

// putRouting writes the fleet's services and routes to fleetKey.
func (s *session) putRouting(newRoute, broken bool) error {
	v := fleetRouting(s.origins, s.extra["archive"], newRoute, broken)
	if _, err := s.consul.Client.KV().Put(&api.KVPair{Key: fleetKey, Value: []byte(v)}, nil); err != nil {
		return fmt.Errorf("cannot write %s: %w", fleetKey, err)
	}
	return nil
}

// follow keeps targets at the instances that Consul lists as passing,
// with blocking queries, as an L4 balancer synchronised from Consul does.
func (f *fleetRun) follow(ctx context.Context, c *api.Client) {
	var index uint64
	for ctx.Err() == nil {
		entries, meta, err := c.Health().Service(fleetService, "", true, (&api.QueryOptions{WaitIndex: index, WaitTime: 10 * time.Second}).WithContext(ctx))
		if err != nil {
			index = 0
			time.Sleep(100 * time.Millisecond)
			continue
		}
		addrs := make([]string, 0, len(entries))
		for _, e := range entries {
			addrs = append(addrs, fmt.Sprintf("%s:%d", e.Service.Address, e.Service.Port))
		}
		sort.Strings(addrs)
		f.targets.Store(&addrs)
		if meta.LastIndex < index {
			index = 0
		} else {
			index = meta.LastIndex
		}
	}
}

// fleetGet sends GET path to an instance with Host fleetHost.
func fleetGet(addr, path string) (code int, origin string, stale bool, err error) {
	req, _ := http.NewRequest("GET", "http://"+addr+path, nil)
	req.Host = fleetHost
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", false, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, resp.Header.Get("X-Origin"), resp.Header.Get("Cache-Status") != "", nil
}

// untilAll polls cond for every instance until it holds for all, and
// returns how long after t0 it held for the last; ok is false when one
// did not within churnWait.
func (s *session) untilAll(t0 time.Time, cond func(e *Edge) bool) (time.Duration, bool) {
	var last time.Duration
	for i := range fleetSize {
		e := s.fleet.edge(i)
		for !cond(e) {
			if time.Since(t0) > churnWait || s.ctx.Err() != nil {
				return time.Since(t0), false
			}
			time.Sleep(2 * time.Millisecond)
		}
		last = max(last, time.Since(t0))
	}
	return last, true
}

func fleetScript(s *session) error {
	if err := s.at(0.1); err != nil {
		return err
	}
	if err := s.fleetPurge(); err != nil {
		return err
	}
	if err := s.at(0.25); err != nil {
		return err
	}
	if err := s.fleetNewRoute(); err != nil {
		return err
	}
	if err := s.at(0.35); err != nil {
		return err
	}
	if err := s.fleetBrokenValue(); err != nil {
		return err
	}
	if err := s.at(0.45); err != nil {
		return err
	}
	for i := range fleetSize {
		if err := s.fleetRestart(i); err != nil {
			return err
		}
	}
	return nil
}

// fleetPurge stores a copy of fleetPurgePath in every instance, kills its
// origin so that they serve it stale, purges it on the first instance and
// measures until none serves it stale.
func (s *session) fleetPurge() error {
	f := s.fleet
	for i := range fleetSize {
		if code, _, _, err := fleetGet(f.edge(i).Addr, fleetPurgePath); err != nil || code != 200 {
			return fmt.Errorf("storing %s in %s: %d %v", fleetPurgePath, f.edge(i).Name, code, err)
		}
	}
	s.extra["archive"].Kill9()
	s.mark("kill -9 archive")
	if _, ok := s.untilAll(time.Now(), func(e *Edge) bool { _, _, stale, _ := fleetGet(e.Addr, fleetPurgePath); return stale }); !ok {
		return fmt.Errorf("not every instance served %s stale once its origin was killed", fleetPurgePath)
	}
	t0 := time.Now()
	resp, err := http.Post("http://"+f.edge(0).Admin+"/cache/purge?url=http://"+fleetHost+fleetPurgePath, "", nil)
	if err != nil {
		return err
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("purge on %s: %d %s", f.edge(0).Name, resp.StatusCode, body)
	}
	s.markAt(t0, "purge on edgelb-1")
	d, ok := s.untilAll(t0, func(e *Edge) bool {
		code, _, stale, err := fleetGet(e.Addr, fleetPurgePath)
		return err == nil && !stale && code >= 500
	})
	s.markAt(t0.Add(d), "purged on all")
	f.note("purge of %s on edgelb-1: no instance serves it stale after %s; edgelb-1 answered %q", fleetPurgePath, f.verdict(d, ok), strings.TrimSpace(string(body)))
	return nil
}

// fleetNewRoute adds the route /new in the key and measures until every
// instance routes it.
func (s *session) fleetNewRoute() error {
	t0 := time.Now()
	if err := s.putRouting(true, false); err != nil {
		return err
	}
	s.markAt(t0, "route /new added to the key")
	d, ok := s.untilAll(t0, func(e *Edge) bool {
		code, origin, stale, err := fleetGet(e.Addr, "/new")
		return err == nil && code == 200 && !stale && origin == "o2"
	})
	s.markAt(t0.Add(d), "/new routed by all")
	s.fleet.note("new route /new written to %s: routed by all three instances after %s", fleetKey, s.fleet.verdict(d, ok))
	return nil
}

// fleetBrokenValue writes a value with an unknown key: every instance must
// refuse it, say so in /status and keep routing; the good value is then
// written back.
func (s *session) fleetBrokenValue() error {
	f := s.fleet
	t0 := time.Now()
	if err := s.putRouting(true, true); err != nil {
		return err
	}
	s.markAt(t0, "broken value written to the key")
	var reported string
	d, ok := s.untilAll(t0, func(e *Edge) bool {
		msg := configKeyError(e)
		if msg != "" && reported == "" {
			reported = msg
		}
		return msg != ""
	})
	routing := true
	for i := range fleetSize {
		for _, path := range []string{"/", "/new"} {
			if code, _, stale, err := fleetGet(f.edge(i).Addr, path); err != nil || code != 200 || stale {
				routing = false
			}
		}
	}
	changed := "routing unchanged on all three (/ and /new served)"
	if !routing {
		changed = "routing CHANGED"
		f.mu.Lock()
		f.failed = true
		f.mu.Unlock()
	}
	f.note("broken value in %s: refused and reported in /status by all three after %s; %s; error: %q",
		fleetKey, f.verdict(d, ok), changed, firstLine(reported))
	t1 := time.Now()
	if err := s.putRouting(true, false); err != nil {
		return err
	}
	if _, ok := s.untilAll(t1, func(e *Edge) bool { return configKeyError(e) == "" }); !ok {
		return fmt.Errorf("the good value written back did not clear the error everywhere")
	}
	s.mark("good value back")
	return nil
}

// configKeyError returns the error /status reports for the config key.
func configKeyError(e *Edge) string {
	st, err := e.Status()
	if err != nil {
		return ""
	}
	b, _ := json.Marshal(st["fleet"])
	var fl struct {
		Config struct {
			Error string `json:"error"`
		} `json:"config"`
	}
	json.Unmarshal(b, &fl)
	return fl.Config.Error
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

// fleetRestart restarts instance i as a rolling restart does: SIGTERM,
// wait for it to exit, start it again, wait until Consul lists it passing.
func (s *session) fleetRestart(i int) error {
	f := s.fleet
	e := f.edge(i)
	t0 := time.Now()
	e.Signal(syscall.SIGTERM)
	s.markAt(t0, "SIGTERM %s", e.Name)
	gone := s.waitTarget(e.Addr, false, t0)
	if !e.Wait(20 * time.Second) {
		return fmt.Errorf("%s did not exit within 20s of SIGTERM", e.Name)
	}
	exited := time.Since(t0)
	t1 := time.Now()
	n, err := s.g.RunEdge(e)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.edges[i] = n
	f.mu.Unlock()
	back := s.waitTarget(e.Addr, true, t1)
	s.mark("%s passing again", e.Name)
	f.note("%s: out of the load %s after SIGTERM, exited after %.1fs (drain_delay 1s), passing in Consul again %s after its start",
		e.Name, fmtWait(gone), exited.Seconds(), fmtWait(back))
	return nil
}

// waitTarget waits until the load's targets hold addr (or no longer), and
// returns how long after t0; -1 if not within DefaultWaitTimeout, -2 if
// the load ended first.
func (s *session) waitTarget(addr string, in bool, t0 time.Time) time.Duration {
	for time.Since(t0) < DefaultWaitTimeout {
		if slices.Contains(s.fleet.addrs(), addr) == in {
			return time.Since(t0)
		}
		if s.ctx.Err() != nil {
			return -2
		}
		time.Sleep(2 * time.Millisecond)
	}
	return -1
}

func fmtWait(d time.Duration) string {
	switch {
	case d == -2:
		return "(not seen: the load ended first; the scenario wants -duration 14s or more)"
	case d < 0:
		return "never"
	}
	return fmt.Sprintf("%.0fms", ms(d))
}

// fleetJudge adds to the notes the errors of the whole load, how it was
// spread, and the connections tried elsewhere.
func fleetJudge(s *session, run *report.Run) []string {
	f := s.fleet
	f.mu.Lock()
	defer f.mu.Unlock()
	notes := []string{"load: round-robin over the instances Consul lists as passing (blocking queries), as an L4 balancer synchronised from Consul; " +
		"a refused connection is tried on the next instance, and an instance that leaves the list has its idle connections closed"}
	var spread []string
	for i, e := range f.edges {
		spread = append(spread, fmt.Sprintf("edgelb-%d %d", i+1, f.byAddr[e.Addr]))
	}
	notes = append(notes, fmt.Sprintf("answers by instance: %s; connections refused and tried elsewhere: %d", strings.Join(spread, ", "), run.Result.Refused))
	notes = append(notes, f.notes...)
	verdict := "met"
	if run.Result.Errors != 0 {
		verdict = "NOT met"
	}
	notes = append(notes, fmt.Sprintf("errors over the whole load, the rolling restart of all three included: %d of %d requests (target 0: %s)",
		run.Result.Errors, run.Result.Requests, verdict))
	return notes
}
