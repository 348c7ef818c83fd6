package discovery

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

// DefaultFailoverHold is how long a datacenter earlier in a service's
// order must keep passing instances before the service goes back to it:
// long enough that an instance flapping between passing and critical, or
// a deployment registering instances one by one, moves the traffic once,
// and short enough that the remote datacenter's latency is not paid for
// long.
const DefaultFailoverHold = 10 * time.Second

// queryPollInterval spaces the executions of a prepared query, which
// Consul cannot answer as a blocking query.
const queryPollInterval = time.Second

// dcNameRe is what Consul accepts as a datacenter name.
var dcNameRe = regexp.MustCompile(`^[a-z0-9_-]+$`)

// Validate checks s; datacenter is the source's default datacenter
// (consul.datacenter). It returns every problem, each naming its key
// under path.
func (s *ConsulService) Validate(path, datacenter string) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	switch {
	case s.Name == "" && s.Query == "":
		bad(".name", "missing; set name (a Consul service) or query (a Consul prepared query)")
	case s.Name != "" && s.Query != "":
		bad("", "set either name or query, not both")
	}
	if s.Query != "" {
		if len(s.Tags) > 0 {
			bad(".tags", "does not go with query: the prepared query chooses the instances")
		}
		if len(s.Failover) > 0 {
			bad(".failover", "does not go with query: the prepared query's own Failover chooses the datacenters")
		}
	}
	if dc := s.Datacenter; dc != "" && !dcNameRe.MatchString(dc) {
		bad(".datacenter", "%q is not a Consul datacenter name (lowercase letters, digits, - and _)", dc)
	}
	own, ownKey := s.Datacenter, path+".datacenter"
	if own == "" {
		own, ownKey = datacenter, "consul.datacenter"
	}
	seen := make(map[string]int, len(s.Failover))
	for i, dc := range s.Failover {
		k := fmt.Sprintf(".failover[%d]", i)
		j, dup := seen[dc]
		switch {
		case strings.TrimSpace(dc) == "":
			bad(k, "empty datacenter name")
		case !dcNameRe.MatchString(dc):
			bad(k, "%q is not a Consul datacenter name (lowercase letters, digits, - and _)", dc)
		case dc == own:
			bad(k, "%q is the service's own datacenter (%s); list only the other datacenters to fail over to", dc, ownKey)
		case dup:
			bad(k, "%q is listed twice (also failover[%d])", dc, j)
		default:
			seen[dc] = i
		}
	}
	switch {
	case s.FailoverHold < 0:
		bad(".failover_hold", "must not be negative (got %v)", s.FailoverHold)
	case s.FailoverHold > 0 && len(s.Failover) == 0 && s.Query == "":
		bad(".failover_hold", "has no effect without failover or query")
	}
	return errs
}

// hasFailover reports whether the service may be served from another
// datacenter than its own.
func (s *ConsulService) hasFailover() bool { return len(s.Failover) > 0 || s.Query != "" }

// failoverHold returns FailoverHold or its default.
func (s *ConsulService) failoverHold() time.Duration {
	if s.FailoverHold > 0 {
		return s.FailoverHold
	}
	return DefaultFailoverHold
}

// Failover says which datacenter serves a service that has failover
// datacenters or a prepared query, since when, and why.
type Failover struct {
	// Datacenter serves the service now; "" before the first decision.
	Datacenter string `json:"datacenter"`

	// Since is when Datacenter began serving.
	Since time.Time `json:"since,omitzero"`

	// Reason says in words why Datacenter serves, and what would change it.
	Reason string `json:"reason"`

	// Hold is failover_hold, in Go's duration notation.
	Hold string `json:"failover_hold"`

	// Datacenters are in order of preference, the service's own first.
	// With a prepared query, they are those its answers came from, in the
	// order the query tries them.
	Datacenters []DatacenterStatus `json:"datacenters"`
}

// DatacenterStatus is what edgelb last learnt of a service in one
// datacenter.
type DatacenterStatus struct {
	// Name is the datacenter; "" for the agent's own before the agent has
	// said its name.
	Name string `json:"name"`

	// Passing counts the passing instances of the last answer.
	Passing int `json:"passing"`

	// PassingSince is when the datacenter last got passing instances
	// again after it had none; absent when it has had them since its
	// first answer, or has none.
	PassingSince time.Time `json:"passing_since,omitzero"`

	// LastUpdate is when the datacenter last answered.
	LastUpdate time.Time `json:"last_update,omitzero"`

	// LastError is the last failed query in words, "" once one succeeds.
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`

	// Ignored says why the datacenter is left out, "" when it is not.
	Ignored string `json:"ignored,omitempty"`
}

// dcState is a watch's knowledge of its service in one datacenter.
// The watch's mu guards it.
type dcState struct {
	// name is the datacenter; "" for the agent's own until known.
	name string
	// set is the last answer believed; nil before the first.
	set *Set
	// known is set by the first answer or failed call.
	known bool
	// upSince is when set last turned non-empty after an empty answer;
	// zero when it has been non-empty since the first answer.
	upSince time.Time
	// ignored says why the datacenter is left out ("" when used).
	ignored string
	// cancel stops the datacenter's watch; nil with a prepared query.
	cancel func()

	status Status
	// problems are the malformed data last logged; only the datacenter's
	// follower uses it, so that each problem is logged once.
	problems []string
}

// passing returns the instances of the last answer.
func (d *dcState) passing() int {
	if d.set == nil {
		return 0
	}
	return len(d.set.Instances)
}

// take makes set the datacenter's last answer, noting when it got passing
// instances again. It reports whether the instances or routes changed.
func (d *dcState) take(set *Set, now time.Time) bool {
	switch {
	case len(set.Instances) == 0:
		d.upSince = time.Time{}
	case d.set != nil && len(d.set.Instances) == 0:
		d.upSince = now
	}
	changed := d.set == nil || !sameSet(d.set, set)
	d.set, d.known = set, true
	return changed
}

// dcLabel names a datacenter in words, metrics and logs.
func dcLabel(name string) string {
	if name == "" {
		return "local"
	}
	return name
}

// choice is what choose decided.
type choice struct {
	// next is the index of the datacenter to serve from; -1 while an
	// earlier one has not answered yet.
	next int
	// wake is when a datacenter earlier than next ends its hold, zero if
	// none waits.
	wake time.Time
	// reason says why, in words.
	reason string
}

// choose picks the datacenter to serve from among dcs, in order of
// preference, serving cur (-1 for none yet): the first that has passing
// instances, except that while cur has them an earlier one must have kept
// its own for hold first. When none has any, cur stays, since switching
// would change nothing for clients.
func choose(dcs []*dcState, cur int, hold time.Duration, now time.Time) choice {
	curUp := cur >= 0 && dcs[cur].ignored == "" && dcs[cur].passing() > 0
	var why []string
	var wake time.Time
	for i, d := range dcs {
		name := dcLabel(d.name)
		switch {
		case d.ignored != "":
			continue
		case !d.known:
			if cur < 0 {
				return choice{next: -1, reason: fmt.Sprintf("waiting for the first answer from %s", name)}
			}
			why = append(why, fmt.Sprintf("%s has not answered yet", name))
			continue
		case d.set == nil:
			why = append(why, fmt.Sprintf("%s has not answered (%s)", name, d.status.LastError))
			continue
		case d.passing() == 0:
			why = append(why, fmt.Sprintf("%s has no passing instance", name))
			continue
		case i < cur && curUp && !d.upSince.IsZero() && now.Sub(d.upSince) < hold:
			end := d.upSince.Add(hold)
			if wake.IsZero() || end.Before(wake) {
				wake = end
			}
			why = append(why, fmt.Sprintf("%s has passing instances again since %s; back to it at %s if they stay (failover_hold %v)",
				name, d.upSince.Format(time.RFC3339), end.Format(time.RFC3339), hold))
			continue
		}
		r := fmt.Sprintf("%s has %d passing %s", name, d.passing(), plural(d.passing(), "instance", "instances"))
		if st := d.status; st.LastError != "" && st.LastErrorAt.After(st.LastUpdate) {
			r += fmt.Sprintf(" in its last answer, at %s; later queries fail: %s", st.LastUpdate.Format(time.RFC3339), st.LastError)
		}
		why = append(why, r)
		return choice{next: i, wake: wake, reason: strings.Join(why, "; ")}
	}
	next := cur
	if next < 0 || dcs[next].ignored != "" {
		// Nothing served yet: the first datacenter that answered, so that
		// the service's emptiness is published; none when all failed.
		next = slices.IndexFunc(dcs, func(d *dcState) bool { return d.ignored == "" && d.set != nil })
		if next < 0 {
			return choice{next: -1, reason: "no datacenter has answered yet"}
		}
	}
	names := make([]string, 0, len(dcs))
	for _, d := range dcs {
		if d.ignored == "" {
			names = append(names, dcLabel(d.name))
		}
	}
	return choice{next: next, wake: wake, reason: fmt.Sprintf("no datacenter has a passing instance (%s); staying on %s", strings.Join(names, ", "), dcLabel(dcs[next].name))}
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// servingGauges keeps edgelb_discovery_datacenter_serving: 1 for the
// datacenter serving each service with failover, 0 for its others. A
// stopped watch gives its service up, so that a choice it makes late
// cannot overwrite what its successor set.
var servingGauges = struct {
	mu    sync.Mutex
	owner map[string]*watch
}{owner: make(map[string]*watch)}

// servingGauge returns the serving gauge of service in datacenter.
func servingGauge(service, dc string) *metrics.Gauge {
	return metrics.GetOrCreateGauge(fmt.Sprintf(`edgelb_discovery_datacenter_serving{service=%q,datacenter=%q}`, service, dcLabel(dc)), nil)
}

// setServing records that w serves from dc among names, unless w has
// stopped.
func setServing(w *watch, names []string, dc string) {
	servingGauges.mu.Lock()
	defer servingGauges.mu.Unlock()
	if w.stopped {
		return
	}
	servingGauges.owner[w.name] = w
	for _, n := range names {
		v := 0.0
		if n == dc {
			v = 1
		}
		servingGauge(w.name, n).Set(v)
		if !slices.Contains(w.gauged, n) {
			w.gauged = append(w.gauged, n)
		}
	}
}

// stopServing zeroes the gauges that w set, unless another watch of its
// service has taken over, and keeps w from setting them again.
func stopServing(w *watch) {
	servingGauges.mu.Lock()
	defer servingGauges.mu.Unlock()
	w.stopped = true
	if servingGauges.owner[w.name] != w {
		return
	}
	delete(servingGauges.owner, w.name)
	for _, n := range w.gauged {
		servingGauge(w.name, n).Set(0)
	}
}
