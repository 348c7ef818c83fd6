package scenario

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/edgelb/edgelb/bench/loadgen"
	"github.com/edgelb/edgelb/bench/report"
	"github.com/edgelb/edgelb/discovery/dnstest"
)

// Scenario names, in the order "all" runs them.
const (
	Steady     = "steady"
	Kill       = "kill"
	Hang       = "hang"
	Slow       = "slow"
	Outage     = "outage"
	ConsulStop = "consul-stop"
	Churn      = "churn"
	Hedge      = "hedge"
	Backup     = "backup"
	DNS        = "dns"
	DCFailover = "dc-failover"
	Fleet      = "fleet"
	FleetFill  = "fleet-fill"
)

// Names lists every scenario in the order "all" runs them.
var Names = []string{Steady, Kill, Hang, Slow, Outage, ConsulStop, Churn, Hedge, Backup, DNS, DCFailover, Fleet, FleetFill}

// Compared are the scenarios that comparison mode also runs through nginx
// and HAProxy.
var Compared = []string{Steady, Kill, Backup}

// backupOrigin names the backup origin of the backup scenario.
const backupOrigin = "backup"

var about = map[string][2]string{
	Steady: {"Steady state", "Three healthy origins behind the proxy; nothing happens. Requests/s, latency and CPU per request of the proxy itself."},
	Kill: {"kill -9 a backend", "At one third of the load, origin o2 is killed with SIGKILL (connections refused and reset); " +
		"at two thirds it is started again on the same port. Errors show what clients saw while the proxy noticed."},
	Hang: {"Hung backend", "At one third, o2 is stopped with SIGSTOP: it accepts connections and never answers. " +
		"At two thirds it gets SIGCONT. edgelb's try_timeout is 1s: requests that met o2 are retried elsewhere."},
	Slow: {"One slow backend", "At one third, o2 starts answering after 200ms (demo-origin's slow fault); at two thirds it is fast again. " +
		"Least-in-flight selection should send it less and keep p99 low."},
	Outage: {"Full origin outage (stale)", "At one third every origin is killed with SIGKILL; at two thirds they are started again. " +
		"The responses are cacheable (max-age=5), so edgelb answers from its stale store (Cache-Status) instead of 502/503."},
	ConsulStop: {"Consul stop", "Origins are discovered from a Consul dev agent through edge.route tags. At one third the agent is stopped; " +
		"at two thirds it is started again (empty, as a dev agent is) and the origins registered again. edgelb keeps routing on the last instances it knew."},
	Churn: {"Consul register/deregister churn", "While load runs on / (service web, three origins from Consul), an instance web-4 and a service api " +
		"(edge.route=*/api) are registered and deregistered again and again. The table gives the time from each Consul API call " +
		"until GET /api shows the change; the load shows whether churn costs clients anything."},
	Hedge: {"Hung backend, hedged", "As hang (SIGSTOP of o2 from one third to two thirds), with hedge: {after: p95} on edgelb: a try that has not " +
		"answered after the service's recent p95 goes to a second backend as well, and the first answer wins. The notes compare the " +
		"worst latency while o2 hangs with the p99 before it (target: at most 3x) and with the worst latency before it, give the hedges sent " +
		"with the requests (budget 10%), the worst latency of the requests that met the hung o2 (from edgelb's access log, which in this " +
		"scenario logs the requests that tried more than one backend), and the longest time the machine itself paused a busy thread on each CPU, " +
		"measured before the load."},
	Backup: {"Backup server", "Origins o1, o2 and o3 serve; origin backup is the service's backup server (edgelb backup:, nginx and HAProxy " +
		"backup). At one third every primary is killed with SIGKILL; at two thirds they are started again. The failover table gives, " +
		"from the origin that answered each request (X-Origin), the time from the kill to the backup's first answer and until every " +
		"answer comes from it, and the time from the restart until the primaries answer again."},
	DNS: {"DNS outage", "edgelb finds the origins (o1, o2, o3 on 127.0.0.1, .2 and .3, one port) by the name " + dnsName +
		", from a DNS server the bench runs (TTL 1s, dns.interval 2s). At 5s (or a third of a shorter load) the DNS server stops for good; " +
		"edgelb keeps the last addresses it resolved and tries again and again. Errors should stay at 0 for the whole load: -duration sets how long the outage lasts."},
	DCFailover: {"Consul datacenter failover", "Two Consul dev agents, dc1 and dc2, joined over the WAN; service web has origins dc1-1 and dc1-2 in dc1 and " +
		"dc2-1 and dc2-2 in dc2, and edgelb discovers it in dc1 with consul: {failover: [dc2], failover_hold: 3s}. At a quarter of the load " +
		"the dc1 instances are deregistered; at half they are registered again. The notes give the time until answers come from dc2 " +
		"(target: within 1s, with no error) and back from dc1 (after the 3s hold)."},
	Fleet: {"A fleet on Consul", "Three edgelb instances register in one Consul agent and take their services and routes from the key " + fleetKey +
		" (service web on o1, o2, o3; service archive on a fourth origin). The load goes round-robin to the instances Consul lists as passing, " +
		"followed with blocking queries, as an L4 balancer synchronised from Consul would, and a refused connection is tried on the next instance. " +
		"At 10% of the load a copy of " + fleetPurgePath + " is served stale by all three (its origin killed) and purged on one: the time until no " +
		"instance serves it stale; at 25% a route /new is added to the key: the time until all three route it; at 35% a broken value is written " +
		"(an unknown key): all three must refuse it, report it in /status and keep routing; from 45% on, a rolling restart of all three " +
		"(SIGTERM, exit, start, passing in Consul, next). Errors should stay at 0 for the whole load; targets: 1s for the purge and the route."},
	FleetFill: {"A new instance during an outage (peer fill)", "The fleet of " + Fleet + " with consul.peer_fill as it is by default (its secret kept in Consul, " +
		"a 50ms timeout, 3 peers asked at once). At 10% of the load, " + strconv.Itoa(fillURLs) + " URLs are stored, each on one of the three instances only; at 20% every origin " +
		"is killed with SIGKILL; then a fourth edgelb starts with an empty state_dir, joins the load once Consul lists it passing, and is asked " +
		"for each of those URLs once. Target: it serves at least 99% of them, from its peers (Cache-Status detail=peer/...); the notes give the share, " +
		"the time of those first answers, its fills by result, and the errors of the load."},
}

// Options describe a bench-suite run. Zero values select the defaults.
type Options struct {
	// Bin holds the edgelb and demo-origin binaries. Required.
	Bin string
	// Consul is the consul binary, needed by consul-stop, churn and
	// dc-failover.
	Consul string
	// Dir holds every process's config, state and log. Required.
	Dir string
	// Duration is the load of each run (a 1s warm-up comes before it).
	// DefaultDuration is used if not set.
	Duration time.Duration
	// Concurrency is the load's connections. 32 is used if not set.
	Concurrency int
	// Rate, if set, sends this many requests/s (open loop).
	Rate float64
	// Timeout bounds one request. 2s is used if not set.
	Timeout time.Duration
	// Peers runs the Compared scenarios through nginx and HAProxy too.
	Peers bool
	// ProxyCPUs and OtherCPUs pin processes (see Procs); unset, nothing is
	// pinned.
	ProxyCPUs, OtherCPUs string
	// Logf, if set, is told what is happening.
	Logf func(format string, args ...any)
	// OnSecond, if set, is called with every second of load.
	OnSecond func(scenario, proxy string, s loadgen.Second)
}

// DefaultDuration is the load of each run when Options.Duration is not set.
const DefaultDuration = 20 * time.Second

// warmup runs before every measured load, to open connections and fill
// edgelb's stale store.
const warmup = time.Second

// Run runs the named scenarios one after the other and returns what they
// measured. A scenario that fails is reported with its error; the others
// still run. It stops early when ctx ends.
func Run(ctx context.Context, o Options, names []string) *report.Report {
	if o.Duration <= 0 {
		o.Duration = DefaultDuration
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 32
	}
	if o.Timeout <= 0 {
		o.Timeout = 2 * time.Second
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	rep := &report.Report{
		Start:    time.Now(),
		Settings: report.Settings{DurationS: o.Duration.Seconds(), Concurrency: o.Concurrency, Rate: o.Rate},
	}
	for _, name := range names {
		if ctx.Err() != nil {
			break
		}
		rep.Scenarios = append(rep.Scenarios, runScenario(ctx, o, name))
	}
	return rep
}

// Proxies returns the proxies a scenario runs through.
func Proxies(name string, peers bool) []string {
	proxies := []string{report.Edgelb}
	if peers {
		for _, c := range Compared {
			if c == name {
				proxies = append(proxies, Nginx, HAProxy)
			}
		}
	}
	return proxies
}

func runScenario(ctx context.Context, o Options, name string) report.Scenario {
	s := report.Scenario{Name: name, Title: about[name][0], Description: about[name][1]}
	if s.Title == "" {
		s.Error = fmt.Sprintf("unknown scenario %q", name)
		return s
	}
	for _, proxy := range Proxies(name, o.Peers) {
		if ctx.Err() != nil {
			break
		}
		o.Logf("%s: through %s", name, proxy)
		run, prop, err := runOne(ctx, o, name, proxy)
		if err != nil {
			run.Error = err.Error()
			o.Logf("%s/%s: %v", name, proxy, err)
		}
		s.Runs = append(s.Runs, run)
		if prop != nil {
			s.Propagation = prop
		}
	}
	s.Compare()
	return s
}

// session is one run of one scenario through one proxy.
type session struct {
	o       Options
	g       *Procs
	ctx     context.Context
	name    string
	proxy   string
	url     string
	pid     int
	edge    *Edge // nil for a peer
	origins []*Proc
	consul  *Consul
	dns     *dnstest.Server
	extra   map[string]*Proc

	start  time.Time
	mu     sync.Mutex
	events []event
	prop   *report.Propagation

	// fleet is the fleet scenario's state.
	fleet *fleetRun

	// answers records who answered each request, for the backup
	// scenario; killAt and killedAt are when the kill of its primaries
	// began and ended, restartAt when they answered again after their
	// restart (guarded by mu).
	answers *answerLog
	// stalls is the machine's own pauses, measured before a hedge
	// run's processes start (see MachineStalls).
	stalls map[int]time.Duration
	// hedgeLog is edgelb's access log in a hedge run: the requests that
	// tried more than one backend.
	hedgeLog  string
	killAt    time.Time
	killedAt  time.Time
	restartAt time.Time
	// consul2 is dc2's agent in dc-failover.
	consul2 *Consul
	// took holds what the script timed, for its judge.
	took map[string]time.Duration
}

type event struct {
	at   time.Time
	name string
}

// mark records an event now.
func (s *session) mark(format string, args ...any) { s.markAt(time.Now(), format, args...) }

func (s *session) markAt(at time.Time, format string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.events = append(s.events, event{at: at, name: fmt.Sprintf(format, args...)})
}

// at waits until the given fraction of the load has passed.
func (s *session) at(frac float64) error {
	d := time.Until(s.start.Add(time.Duration(frac * float64(s.o.Duration))))
	select {
	case <-s.ctx.Done():
		return s.ctx.Err()
	case <-time.After(d):
		return nil
	}
}

func runOne(ctx context.Context, o Options, name, proxy string) (run report.Run, prop *report.Propagation, err error) {
	run.Proxy = proxy
	g := &Procs{Bin: o.Bin, Dir: filepath.Join(o.Dir, name, proxy), ProxyCPUs: o.ProxyCPUs, OtherCPUs: o.OtherCPUs}
	defer g.Close()
	if err := os.MkdirAll(g.Dir, 0o755); err != nil {
		return run, nil, err
	}
	s := &session{o: o, g: g, ctx: ctx, name: name, proxy: proxy, extra: map[string]*Proc{}}
	defer func() {
		if s.dns != nil {
			s.dns.Stop()
		}
	}()
	if name == Hedge {
		// Measured before any process of the run starts, so that only
		// the machine (and whatever else runs on it) is measured.
		s.stalls, _ = MachineStalls(joinCPUs(o.ProxyCPUs, o.OtherCPUs), stallProbe)
	}
	switch name {
	case ConsulStop, Churn:
		err = s.setupConsul(name == Churn)
	case Backup:
		s.answers = newAnswerLog()
		err = s.setupStatic(backupOrigin)
	case DNS:
		err = s.setupDNS()
	case DCFailover:
		err = s.setupFailover()
	case Fleet, FleetFill:
		err = s.setupFleet()
		defer func() {
			if s.fleet != nil && s.fleet.stop != nil {
				s.fleet.stop()
			}
		}()
	default:
		err = s.setupStatic()
	}
	if err != nil {
		return run, nil, fmt.Errorf("setup: %w", err)
	}
	run, err = s.drive(scripts[name])
	if f := judges[name]; f != nil && err == nil && run.Result != nil {
		run.Notes = f(s, &run)
	}
	if s.answers != nil && run.Result != nil {
		s.mu.Lock()
		killAt, killedAt, restartAt := s.killAt, s.killedAt, s.restartAt
		s.mu.Unlock()
		if !killedAt.IsZero() {
			run.Failover = s.answers.failover(run.Result.Start, run.Result.Start.Add(run.Result.Elapsed), killAt, killedAt, restartAt, backupOrigin)
		}
	}
	return run, s.prop, err
}

// setupStatic starts three origins, the backup origins named, and the
// proxy in front of them.
func (s *session) setupStatic(backups ...string) error {
	var addrs, backupAddrs []string
	for i := 1; i <= 3; i++ {
		p, err := s.g.StartOrigin("o" + strconv.Itoa(i))
		if err != nil {
			return err
		}
		s.origins = append(s.origins, p)
		addrs = append(addrs, p.Addr)
	}
	for _, name := range backups {
		p, err := s.g.StartOrigin(name)
		if err != nil {
			return err
		}
		s.extra[name] = p
		backupAddrs = append(backupAddrs, p.Addr)
	}
	if s.proxy == report.Edgelb {
		cfg := EdgeConfig(addrs, backupAddrs...)
		if s.name == Hedge {
			// sample 0 logs only the requests that tried more than one
			// backend (and errors): every one that met the hung o2.
			s.hedgeLog = filepath.Join(s.g.Dir, "hedged.log")
			cfg = EdgeConfigWith(addrs, "hedge: {after: p95}") +
				fmt.Sprintf("access_log: {path: %s, sample: 0, flush_interval: 20ms}\n", s.hedgeLog)
		}
		e, err := s.g.StartEdge(cfg, filepath.Join(s.g.Dir, "state"))
		if err != nil {
			return err
		}
		s.edge, s.url, s.pid = e, "http://"+e.Addr+"/", e.Pid()
		return nil
	}
	p, err := s.g.StartPeer(s.proxy, addrs, backupAddrs...)
	if err != nil {
		return err
	}
	s.url, s.pid = "http://"+p.Addr+"/", p.Pid()
	return nil
}

// setupConsul starts a Consul agent, three origins registered as service
// web with the route tag edge.route=*/, and edgelb discovering them; with
// churn, also the origins web-4 and api-1, started but not registered.
func (s *session) setupConsul(churn bool) error {
	c, err := s.g.StartConsul(s.o.Consul)
	if err != nil {
		return err
	}
	s.consul = c
	for i := 1; i <= 3; i++ {
		p, err := s.g.StartOrigin("web-" + strconv.Itoa(i))
		if err != nil {
			return err
		}
		s.origins = append(s.origins, p)
	}
	if err := s.registerOrigins(); err != nil {
		return err
	}
	if churn {
		for _, name := range []string{"web-4", "api-1"} {
			p, err := s.g.StartOrigin(name)
			if err != nil {
				return err
			}
			s.extra[name] = p
		}
	}
	e, err := s.g.StartEdge(fmt.Sprintf("consul: {address: %s, tag_routes: true}\n", c.Addr()), filepath.Join(s.g.Dir, "state"))
	if err != nil {
		return err
	}
	s.edge, s.url, s.pid = e, "http://"+e.Addr+"/", e.Pid()
	if err := WaitHTTP(s.url, DefaultWaitTimeout); err != nil {
		return fmt.Errorf("edgelb never routed the Consul service: %w\n%s", err, e.Output())
	}
	return nil
}

// registerOrigins registers the origins in Consul as service web.
func (s *session) registerOrigins() error {
	for _, p := range s.origins {
		if err := s.consul.Register(p.Name, "web", port(p.Addr), "edge.route=*/"); err != nil {
			return err
		}
	}
	return nil
}

func port(addr string) int {
	_, p, _ := net.SplitHostPort(addr)
	n, _ := strconv.Atoi(p)
	return n
}

// drive runs the load through the proxy while script injects the
// scenario's events, and measures the proxy's CPU time meanwhile.
func (s *session) drive(script func(*session) error) (report.Run, error) {
	run := report.Run{Proxy: s.proxy}
	lo := loadgen.Options{URL: s.url, Concurrency: s.o.Concurrency, Rate: s.o.Rate, Timeout: s.o.Timeout}
	if s.fleet != nil {
		lo.Addrs = s.fleet.addrs
	}
	w := lo
	w.Duration = warmup
	if _, err := loadgen.Run(s.ctx, w); err != nil {
		return run, err
	}
	lo.Duration = s.o.Duration
	if s.answers != nil {
		lo.OnResponse = s.answers.observe
	}
	if s.fleet != nil {
		lo.Addrs = s.fleet.addrs
		lo.OnResponse = s.fleet.observe
	}
	if s.o.OnSecond != nil {
		lo.OnSecond = func(sec loadgen.Second) { s.o.OnSecond(s.name, s.proxy, sec) }
	}
	// A fleet's processes change as they restart: its CPU time is not
	// measured (pid 0).
	var cpu0 time.Duration
	var err error
	if s.pid != 0 {
		if cpu0, err = CPUTime(s.pid); err != nil {
			return run, err
		}
	}
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	s.ctx = ctx
	s.start = time.Now()
	scriptDone := make(chan error, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				scriptDone <- fmt.Errorf("scenario script panicked: %v", p)
			}
		}()
		scriptDone <- script(s)
	}()
	res, err := loadgen.Run(s.ctx, lo)
	cpu1, cpuErr := time.Duration(0), error(nil)
	if s.pid != 0 {
		cpu1, cpuErr = CPUTime(s.pid)
	}
	cancel()
	scriptErr := <-scriptDone
	if err != nil {
		return run, err
	}
	// The last second holds only the answers that came in after the load
	// ended; drawn, it would look like a collapse.
	if n := len(res.Seconds); n > 0 && float64(res.Seconds[n-1].T) >= s.o.Duration.Seconds() {
		res.Seconds = res.Seconds[:n-1]
	}
	run.Result = res
	run.Events = []report.Event{}
	if s.pid != 0 && cpuErr == nil && res.Requests > 0 {
		run.CPUSeconds = (cpu1 - cpu0).Seconds()
		run.CPUPerRequestUS = run.CPUSeconds * 1e6 / float64(res.Requests)
	}
	s.mu.Lock()
	for _, e := range s.events {
		run.Events = append(run.Events, report.Event{T: e.at.Sub(res.Start).Seconds(), Name: e.name})
	}
	s.mu.Unlock()
	if scriptErr != nil && !errors.Is(scriptErr, context.Canceled) {
		return run, scriptErr
	}
	return run, nil
}

// scripts inject each scenario's events during the load.
var scripts = map[string]func(*session) error{
	Steady:     func(*session) error { return nil },
	Kill:       killScript,
	Hang:       hangScript,
	Slow:       slowScript,
	Outage:     outageScript,
	ConsulStop: consulStopScript,
	Churn:      churnScript,
	Hedge:      hangScript,
	Backup:     backupScript,
	DNS:        dnsScript,
	DCFailover: failoverScript,
	Fleet:      fleetScript,
	FleetFill:  fleetFillScript,
}

// judges, after a scenario's load, write what it shows against its
// targets.
var judges = map[string]func(*session, *report.Run) []string{
	Hedge:      hedgeJudge,
	DCFailover: failoverJudge,
	Fleet:      fleetJudge,
	FleetFill:  fleetFillJudge,
}

// hedgeJudge compares the worst latency while o2 hung with the p99 before
// it, and with the worst latency before it, and reports the hedges sent
// with the requests and how long the machine itself stalled a busy thread.
func hedgeJudge(s *session, run *report.Run) []string {
	var stop, cont float64 = -1, -1
	for _, e := range run.Events {
		switch {
		case strings.HasPrefix(e.Name, "SIGSTOP"):
			stop = e.T
		case strings.HasPrefix(e.Name, "SIGCONT"):
			cont = e.T
		}
	}
	if stop < 0 || cont < 0 {
		return []string{"o2 was not stopped and continued during the load"}
	}
	notes := hedgeLatencyNotes(run.Result.Seconds, stop, cont)
	if s.hedgeLog != "" && len(s.origins) > 1 {
		// Past edgelb's flush interval, every line of the load is out.
		time.Sleep(100 * time.Millisecond)
		start := run.Result.Start
		at := func(t float64) time.Time { return start.Add(time.Duration(t * float64(time.Second))) }
		notes = append(notes, hungTryNote(s.hedgeLog, s.origins[1].Addr, at(stop), at(cont), healthyP99(run.Result.Seconds, stop)))
	}
	if m, err := s.edge.Metrics(); err == nil {
		sent, denied, reqs := m[`edgelb_hedges_total{service="web",result="sent"}`], m[`edgelb_hedges_total{service="web",result="over_budget"}`],
			m[`edgelb_requests_total{service="web"}`]
		if reqs > 0 {
			notes = append(notes, fmt.Sprintf("hedges sent %.0f (%.1f%% of %.0f requests, budget 10%%), %.0f refused over budget", sent, 100*sent/reqs, reqs, denied))
		}
	}
	if s.stalls != nil {
		notes = append(notes, stallNote(s.stalls, stallProbe))
	}
	return notes
}

// stallProbe is how long MachineStalls watches each CPU before a hedge run.
const stallProbe = 2 * time.Second

// joinCPUs joins taskset lists, leaving out empty ones.
func joinCPUs(lists ...string) string {
	var out []string
	for _, l := range lists {
		if l != "" {
			out = append(out, l)
		}
	}
	return strings.Join(out, ",")
}

// hedgeLatencyNotes judges the latency of a hedge run from its seconds: the
// worst latency of those from one before SIGSTOP to SIGCONT against the
// worst p99 of the seconds wholly before SIGSTOP (target: at most 3x), and
// against those seconds' own worst latency, which shows what the machine
// gives without any hung backend.
// healthyP99 is the worst p99 of the seconds wholly before stop.
func healthyP99(seconds []loadgen.Second, stop float64) float64 {
	var p99 float64
	for _, sec := range seconds {
		if float64(sec.T)+1 <= stop {
			p99 = max(p99, sec.Latency.P99)
		}
	}
	return p99
}

// hungTryNote reads edgelb's access log of a hedge run (the requests that
// tried more than one backend) and gives the worst latency of the
// requests that met the hung origin at addr: those with a try on it that
// was still out at stop or began before cont. Set against the healthy p99,
// it shows what the hang itself cost, apart from the machine's own pauses
// that the worst latency of every request also holds.
func hungTryNote(path, addr string, stop, cont time.Time, p99 float64) string {
	f, err := os.Open(path)
	if err != nil {
		return "requests that met the hung o2: no access log: " + err.Error()
	}
	defer f.Close()
	type try struct {
		Backend    string  `json:"backend"`
		StartMS    float64 `json:"start_ms"`
		DurationMS float64 `json:"duration_ms"`
	}
	var line struct {
		Time       string  `json:"time"`
		DurationMS float64 `json:"duration_ms"`
		Tries      []try   `json:"tries"`
	}
	n, bad := 0, 0
	var worst float64
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line.Tries = line.Tries[:0]
		if json.Unmarshal(sc.Bytes(), &line) != nil {
			bad++
			continue
		}
		t0, err := time.Parse("2006-01-02T15:04:05.000Z", line.Time)
		if err != nil {
			bad++
			continue
		}
		for _, tr := range line.Tries {
			// The log's times have a millisecond's precision.
			from := t0.Add(time.Duration(tr.StartMS * float64(time.Millisecond)))
			to := from.Add(time.Duration((tr.DurationMS + 1) * float64(time.Millisecond)))
			if tr.Backend == addr && to.After(stop) && from.Before(cont) {
				n++
				worst = max(worst, line.DurationMS)
				break
			}
		}
	}
	if err := sc.Err(); err != nil {
		return "requests that met the hung o2: reading the access log: " + err.Error()
	}
	note := fmt.Sprintf("requests that met the hung o2 (from edgelb's access log): %d, worst %.2fms", n, worst)
	if n > 0 && p99 > 0 {
		verdict := "met"
		if worst/p99 > 3 {
			verdict = "NOT met"
		}
		note += fmt.Sprintf(" (%.1fx the healthy p99, target at most 3x: %s)", worst/p99, verdict)
	}
	if bad > 0 {
		note += fmt.Sprintf("; %d lines unreadable", bad)
	}
	return note
}

func hedgeLatencyNotes(seconds []loadgen.Second, stop, cont float64) []string {
	var healthyP99, healthyMax, hungMax float64
	for _, sec := range seconds {
		t := float64(sec.T)
		switch {
		case t+1 <= stop:
			healthyP99 = max(healthyP99, sec.Latency.P99)
			healthyMax = max(healthyMax, sec.Latency.Max)
		case t >= stop-1 && t <= cont:
			hungMax = max(hungMax, sec.Latency.Max)
		}
	}
	if healthyP99 <= 0 {
		return []string{"no second of load before SIGSTOP to compare with"}
	}
	r := hungMax / healthyP99
	verdict := "met"
	if r > 3 {
		verdict = "NOT met"
	}
	return []string{
		fmt.Sprintf("healthy p99 %.2fms (worst second before SIGSTOP); worst latency while o2 hung %.2fms: %.1fx, target at most 3x: %s",
			healthyP99, hungMax, r, verdict),
		fmt.Sprintf("worst latency before SIGSTOP, with every origin answering: %.2fms (%.1fx the healthy p99); while o2 hung: %.2fms (%.2fx that)",
			healthyMax, healthyMax/healthyP99, hungMax, hungMax/healthyMax),
	}
}

func killScript(s *session) error {
	o := s.origins[1]
	if err := s.at(1.0 / 3); err != nil {
		return err
	}
	o.Kill9()
	s.mark("kill -9 %s", o.Name)
	s.watchOut(o)
	if err := s.at(2.0 / 3); err != nil {
		return err
	}
	p, err := s.g.StartOriginAt(o.Name, o.Addr)
	if err != nil {
		return err
	}
	s.origins[1] = p
	s.mark("%s restarted", o.Name)
	return nil
}

func hangScript(s *session) error {
	o := s.origins[1]
	if err := s.at(1.0 / 3); err != nil {
		return err
	}
	o.Signal(syscall.SIGSTOP)
	s.mark("SIGSTOP %s", o.Name)
	s.watchOut(o)
	if err := s.at(2.0 / 3); err != nil {
		o.Signal(syscall.SIGCONT)
		return err
	}
	o.Signal(syscall.SIGCONT)
	s.mark("SIGCONT %s", o.Name)
	return nil
}

func slowScript(s *session) error {
	o := s.origins[1]
	if err := s.at(1.0 / 3); err != nil {
		return err
	}
	if err := setFault(o.Addr, "slow&delay=200ms"); err != nil {
		return err
	}
	s.mark("%s slow (200ms)", o.Name)
	if err := s.at(2.0 / 3); err != nil {
		return err
	}
	if err := setFault(o.Addr, "none"); err != nil {
		return err
	}
	s.mark("%s fast again", o.Name)
	return nil
}

func outageScript(s *session) error {
	if err := s.at(1.0 / 3); err != nil {
		return err
	}
	for _, o := range s.origins {
		o.Kill9()
	}
	s.mark("kill -9 every origin")
	if err := s.at(2.0 / 3); err != nil {
		return err
	}
	for i, o := range s.origins {
		p, err := s.g.StartOriginAt(o.Name, o.Addr)
		if err != nil {
			return err
		}
		s.origins[i] = p
	}
	s.mark("origins restarted")
	return nil
}

func backupScript(s *session) error {
	if err := s.at(1.0 / 3); err != nil {
		return err
	}
	killAt := time.Now()
	for _, o := range s.origins {
		o.Kill9()
	}
	s.mu.Lock()
	s.killAt, s.killedAt = killAt, time.Now()
	s.mu.Unlock()
	s.markAt(killAt, "kill -9 o1, o2, o3 (%s up)", backupOrigin)
	s.watchServing("backup")
	if err := s.at(2.0 / 3); err != nil {
		return err
	}
	for i, o := range s.origins {
		p, err := s.g.StartOriginAt(o.Name, o.Addr)
		if err != nil {
			return err
		}
		s.origins[i] = p
	}
	// StartOriginAt returns once each origin answers.
	s.mu.Lock()
	s.restartAt = time.Now()
	s.mu.Unlock()
	s.markAt(s.restartAt, "o1, o2, o3 restarted")
	s.watchServing("primary")
	return nil
}

func consulStopScript(s *session) error {
	if err := s.at(1.0 / 3); err != nil {
		return err
	}
	s.consul.Stop()
	s.mark("Consul stopped")
	if err := s.at(2.0 / 3); err != nil {
		return err
	}
	if err := s.consul.Start(); err != nil {
		return err
	}
	if err := s.registerOrigins(); err != nil {
		return err
	}
	s.mark("Consul restarted, origins registered again")
	return nil
}

// churnWait bounds how long one Consul change may take to show.
const churnWait = 10 * time.Second

// churnSpacing separates changes, so that each one is timed on its own.
const churnSpacing = 1100 * time.Millisecond

func churnScript(s *session) error {
	s.prop = &report.Propagation{}
	defer s.prop.Summarize()
	api, web4 := s.extra["api-1"], s.extra["web-4"]
	url := "http://" + s.edge.Addr + "/api"
	end := s.start.Add(s.o.Duration - churnSpacing)
	for time.Until(end) > churnWait/5 {
		if err := s.sleep(churnSpacing); err != nil {
			return err
		}
		t0 := time.Now()
		if err := s.consul.Register("api-1", "api", port(api.Addr), "edge.route=*/api"); err != nil {
			return err
		}
		if err := s.consul.Register("web-4", "web", port(web4.Addr), "edge.route=*/"); err != nil {
			return err
		}
		s.markAt(t0, "register")
		if d, ok := s.waitRouted(url, t0, true); ok {
			s.prop.RegisterMS = append(s.prop.RegisterMS, ms(d))
		} else {
			s.prop.Missed++
		}
		if err := s.sleep(churnSpacing); err != nil {
			return err
		}
		t0 = time.Now()
		if err := s.consul.Deregister("api-1"); err != nil {
			return err
		}
		if err := s.consul.Deregister("web-4"); err != nil {
			return err
		}
		s.markAt(t0, "deregister")
		if d, ok := s.waitRouted(url, t0, false); ok {
			s.prop.DeregisterMS = append(s.prop.DeregisterMS, ms(d))
		} else {
			s.prop.Missed++
		}
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func (s *session) sleep(d time.Duration) error {
	select {
	case <-s.ctx.Done():
		return s.ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// waitRouted polls url until it is answered live by api-1 (routed), or
// otherwise (not routed: by a shorter route's origin, an error status or
// a stale copy), and returns the time since t0.
func (s *session) waitRouted(url string, t0 time.Time, routed bool) (time.Duration, bool) {
	c := &http.Client{Timeout: time.Second}
	for time.Since(t0) < churnWait && s.ctx.Err() == nil {
		resp, err := c.Get(url)
		if err == nil {
			resp.Body.Close()
			// A stale copy (Cache-Status) carries api-1's headers but says
			// that no backend answered.
			live := resp.StatusCode < 400 && resp.Header.Get("Cache-Status") == ""
			if routed == (live && resp.Header.Get("X-Origin") == "api-1") {
				return time.Since(t0), true
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	return 0, false
}

// watchOut marks when edgelb takes the origin out of rotation
// (ejected or unhealthy), polling /status in the background for at most a
// third of the load. Peers have no such API: nothing is marked for them.
func (s *session) watchOut(o *Proc) {
	if s.edge == nil {
		return
	}
	from := time.Now()
	go func() {
		deadline := from.Add(s.o.Duration / 3)
		for time.Now().Before(deadline) && s.ctx.Err() == nil {
			st, err := s.edge.Backend("web", o.Addr)
			if err == nil && (st.State == "ejected" || st.State == "unhealthy") {
				at := st.Since
				if at.Before(from) || at.After(time.Now()) {
					at = time.Now()
				}
				s.markAt(at, "%s %s", o.Name, st.State)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
}

// watchServing marks when edgelb's /status says that service web is
// served by set ("primary", "backup"), polling in the background for at
// most a third of the load. Peers have no such API: nothing is marked for
// them.
func (s *session) watchServing(set string) {
	if s.edge == nil {
		return
	}
	from := time.Now()
	go func() {
		deadline := from.Add(s.o.Duration / 3)
		for time.Now().Before(deadline) && s.ctx.Err() == nil {
			if serving, err := s.edge.Serving("web"); err == nil && serving == set {
				s.mark("edgelb serving from %s", set)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
}

// setFault switches a demo origin's fault mode ("slow&delay=200ms").
func setFault(addr, mode string) error {
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Post("http://"+addr+"/_fault?mode="+mode, "", nil)
	if err != nil {
		return fmt.Errorf("cannot set fault %s on %s: %w", mode, addr, err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("cannot set fault %s on %s: status %d", mode, addr, resp.StatusCode)
	}
	return nil
}
