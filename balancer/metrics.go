package balancer

import (
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/edgelb/edgelb/health"
)

// latencyBuckets are the upper bounds, in seconds, of the request
// duration histograms.
var latencyBuckets = [...]float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// latencyHistogram is a Prometheus histogram updated with atomics only,
// so that recording a request takes no lock.
type latencyHistogram struct {
	name    string // metric name with its labels, without the closing brace
	labels  string
	counts  [len(latencyBuckets) + 1]atomic.Uint64
	sumNano atomic.Uint64
}

func newLatencyHistogram(name, labels string) *latencyHistogram {
	return &latencyHistogram{name: name, labels: labels}
}

// Update records one request that took d. Fast path: a short scan and two
// atomic adds.
func (h *latencyHistogram) Update(d time.Duration) {
	s := d.Seconds()
	i := 0
	for i < len(latencyBuckets) && s > latencyBuckets[i] {
		i++
	}
	h.counts[i].Add(1)
	if d > 0 {
		h.sumNano.Add(uint64(d))
	}
}

// writePrometheus writes the histogram in the Prometheus text format.
func (h *latencyHistogram) writePrometheus(w io.Writer) {
	var cum uint64
	for i, ub := range latencyBuckets {
		cum += h.counts[i].Load()
		fmt.Fprintf(w, "%s_bucket{%s,le=\"%g\"} %d\n", h.name, h.labels, ub, cum)
	}
	cum += h.counts[len(latencyBuckets)].Load()
	fmt.Fprintf(w, "%s_bucket{%s,le=\"+Inf\"} %d\n", h.name, h.labels, cum)
	fmt.Fprintf(w, "%s_sum{%s} %g\n", h.name, h.labels, float64(h.sumNano.Load())/1e9)
	fmt.Fprintf(w, "%s_count{%s} %d\n", h.name, h.labels, cum)
}

// seriesTable holds the per-service and per-backend series of a Server.
// Its pools share them by name: a pool rebuilt by a reload, or a service
// that leaves and comes back, carries on with the same counters, so that
// they only ever grow while the Server runs. Backend series are dropped
// backendSeriesRetention after the last pool lets the backend go. It is
// safe for concurrent use; only the slow path uses it.
type seriesTable struct {
	mu        sync.Mutex
	services  map[string]*serviceMetrics
	backends  map[[2]string]*backendMetrics // service, addr
	lastPrune time.Time
	closed    bool
}

func newSeriesTable() *seriesTable {
	return &seriesTable{services: make(map[string]*serviceMetrics), backends: make(map[[2]string]*backendMetrics)}
}

// backendSeriesRetention is how long the series of a backend no pool uses
// are kept: as long as its health state.
var backendSeriesRetention = health.DefaultRetention

// service returns the series of service, made on first use.
func (st *seriesTable) service(service string) *serviceMetrics {
	st.mu.Lock()
	defer st.mu.Unlock()
	m := st.services[service]
	if m == nil {
		m = newServiceMetrics(service)
		st.services[service] = m
		if !st.closed {
			metrics.RegisterSet(m.set)
		}
	}
	return m
}

// acquireBackend returns the series of the backend addr of service, whose
// in-flight count t holds. Every acquire is matched by a release.
func (st *seriesTable) acquireBackend(service, addr string, t *health.Target) *backendMetrics {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.pruneLocked(time.Now())
	key := [2]string{service, addr}
	m := st.backends[key]
	if m == nil {
		m = newBackendMetrics(st, service, addr)
		st.backends[key] = m
		if !st.closed {
			metrics.RegisterSet(m.set)
		}
	}
	m.refs++
	m.target.Store(t)
	return m
}

// release drops one user of m.
func (m *backendMetrics) release() {
	st := m.table
	st.mu.Lock()
	defer st.mu.Unlock()
	now := time.Now()
	if m.refs--; m.refs == 0 {
		m.releasedAt = now
	}
	st.pruneLocked(now)
}

// pruneLocked drops the series of backends unused for longer than the
// retention, at most once a second. The caller holds st.mu.
func (st *seriesTable) pruneLocked(now time.Time) {
	if now.Sub(st.lastPrune) < time.Second {
		return
	}
	st.lastPrune = now
	for key, m := range st.backends {
		if m.refs == 0 && now.Sub(m.releasedAt) >= backendSeriesRetention {
			metrics.UnregisterSet(m.set, true)
			delete(st.backends, key)
		}
	}
}

// close drops every series of the table, when its Server stops.
func (st *seriesTable) close() {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.closed = true
	for _, m := range st.services {
		metrics.UnregisterSet(m.set, true)
	}
	for _, m := range st.backends {
		metrics.UnregisterSet(m.set, true)
	}
}

// backendMetrics are the per-backend series; see seriesTable.
type backendMetrics struct {
	set      *metrics.Set
	requests *metrics.Counter
	errors   [numErrCodes]*metrics.Counter
	status   [6]*metrics.Counter // by status class, index 1..5
	latency  *latencyHistogram
	// target is the backend's health state, whose in-flight count the
	// gauge shows.
	target atomic.Pointer[health.Target]
	// tunnels counts the backend's open tunnels, for /status.
	tunnels atomic.Int64
	// backup is set while the backend is in the service's backup set.
	backup atomic.Bool
	// live is its per-second history; see liveRecorder.
	live *backendLive

	// Guarded by table.mu.
	table      *seriesTable
	refs       int
	releasedAt time.Time
}

func newBackendMetrics(table *seriesTable, service, addr string) *backendMetrics {
	s := metrics.NewSet()
	l := fmt.Sprintf(`service=%q,backend=%q`, service, addr)
	m := &backendMetrics{
		set:      s,
		requests: s.NewCounter(`edgelb_backend_requests_total{` + l + `}`),
		latency:  newLatencyHistogram("edgelb_backend_request_duration_seconds", l),
		table:    table,
	}
	for c := errCode(1); c < numErrCodes; c++ {
		if c.backendCause() {
			m.errors[c] = s.NewCounter(fmt.Sprintf(`edgelb_backend_errors_total{%s,cause=%q}`, l, c))
		}
	}
	for i := 1; i <= 5; i++ {
		m.status[i] = s.NewCounter(fmt.Sprintf(`edgelb_backend_responses_total{%s,class="%dxx"}`, l, i))
	}
	s.NewGauge(`edgelb_backend_inflight{`+l+`}`, func() float64 {
		if t := m.target.Load(); t != nil {
			return float64(t.Inflight())
		}
		return 0
	})
	s.NewGauge(`edgelb_backend_backup{`+l+`}`, func() float64 {
		if m.backup.Load() {
			return 1
		}
		return 0
	})
	s.RegisterMetricsWriter(m.latency.writePrometheus)
	return m
}

// statusClass returns 1..5 for a status code, clamping oddities.
func statusClass(code int) int {
	c := code / 100
	if c < 1 || c > 5 {
		return 5
	}
	return c
}

// serviceMetrics are the per-service series; see seriesTable.
type serviceMetrics struct {
	set         *metrics.Set
	requests    *metrics.Counter
	retries     *metrics.Counter
	staleServed *metrics.Counter
	generated   [numErrCodes]*metrics.Counter
	latency     *latencyHistogram

	// Tunnels (see tunnel.go): open ones; slots taken against
	// websocket.max_tunnels, by open tunnels and upgrades under way;
	// upgrade requests by result; closes by reason; bytes relayed each
	// way.
	tunnelsOpen   atomic.Int64
	tunnelSlots   atomic.Int64
	tunnelResults [numUpgradeResults]*metrics.Counter
	tunnelCloses  [numTunnelEnds]*metrics.Counter
	tunnelBytes   [2]*metrics.Counter // toBackend, toClient
	// backupAnswers counts the answers of the backup set's backends.
	backupAnswers *metrics.Counter
	// pool is the service's pool now, whose serving set the gauge shows;
	// nil when it has none.
	pool atomic.Pointer[Pool]

	// live is its per-second history; see liveRecorder.
	live *serviceLive
}

func newServiceMetrics(service string) *serviceMetrics {
	s := metrics.NewSet()
	l := fmt.Sprintf(`service=%q`, service)
	m := &serviceMetrics{
		set:           s,
		requests:      s.NewCounter(`edgelb_requests_total{` + l + `}`),
		retries:       s.NewCounter(`edgelb_retries_total{` + l + `}`),
		staleServed:   s.NewCounter(`edgelb_stale_responses_total{` + l + `}`),
		latency:       newLatencyHistogram("edgelb_request_duration_seconds", l),
		backupAnswers: s.NewCounter(`edgelb_backup_requests_total{` + l + `}`),
	}
	for c := errCode(1); c < numErrCodes; c++ {
		m.generated[c] = s.NewCounter(fmt.Sprintf(`edgelb_generated_errors_total{%s,code=%q}`, l, c))
	}
	for r := range numUpgradeResults {
		m.tunnelResults[r] = s.NewCounter(fmt.Sprintf(`edgelb_tunnels_total{%s,result=%q}`, l, upgradeResultNames[r]))
	}
	for e := range numTunnelEnds {
		m.tunnelCloses[e] = s.NewCounter(fmt.Sprintf(`edgelb_tunnels_closed_total{%s,reason=%q}`, l, tunnelEndNames[e]))
	}
	m.tunnelBytes[toBackend] = s.NewCounter(`edgelb_tunnel_bytes_total{` + l + `,direction="to_backend"}`)
	m.tunnelBytes[toClient] = s.NewCounter(`edgelb_tunnel_bytes_total{` + l + `,direction="to_client"}`)
	s.NewGauge(`edgelb_tunnels_open{`+l+`}`, func() float64 { return float64(m.tunnelsOpen.Load()) })
	for _, set := range servingSets {
		s.NewGauge(fmt.Sprintf(`edgelb_serving{%s,set=%q}`, l, set), func() float64 {
			serving := servingNone
			if p := m.pool.Load(); p != nil {
				serving = p.serving(time.Now().UnixNano())
			}
			if serving == set {
				return 1
			}
			return 0
		})
	}
	s.RegisterMetricsWriter(m.latency.writePrometheus)
	return m
}

// Process-wide series.
var (
	noRouteTotal = metrics.NewCounter(`edgelb_generated_errors_total{service="",code="no_route"}`)
	// Requests matching no route while tag routes are not known yet:
	// answered from the stale store, or with no_healthy_backend.
	unroutedStaleTotal   = metrics.NewCounter(`edgelb_stale_responses_total{service=""}`)
	unroutedUnknownTotal = metrics.NewCounter(`edgelb_generated_errors_total{service="",code="no_healthy_backend"}`)
	reloadsTotal         = metrics.NewCounter(`edgelb_config_reloads_total{result="ok"}`)
	reloadErrors         = metrics.NewCounter(`edgelb_config_reloads_total{result="error"}`)

	// The event loops: connections handed to the full path, tries the loop
	// gave up and left to it, handed connections dropped because the
	// server was not taking them, accept errors, and batched waits.
	loopHandoffs     = metrics.NewCounter(`edgelb_event_loop_handoffs_total`)
	loopFallbacks    = metrics.NewCounter(`edgelb_event_loop_fallbacks_total`)
	loopHandoffDrops = metrics.NewCounter(`edgelb_event_loop_handoff_drops_total`)
	loopAcceptErrors = metrics.NewCounter(`edgelb_event_loop_accept_errors_total`)
	loopBatchWaits   = metrics.NewCounter(`edgelb_event_loop_batch_waits_total`)
	// The loops' sends (answers and requests) and the system calls that
	// made them: fewer calls than sends where io_uring batches them.
	loopSends     = metrics.NewCounter(`edgelb_event_loop_sends_total`)
	loopSendCalls = metrics.NewCounter(`edgelb_event_loop_send_calls_total`)
	// Reads made ahead for a poll's events, and the system calls that
	// made them (loop_readahead_linux.go).
	loopReadsAhead     = metrics.NewCounter(`edgelb_event_loop_reads_ahead_total`)
	loopReadAheadCalls = metrics.NewCounter(`edgelb_event_loop_read_ahead_calls_total`)

	// Clients held to the server limits: requests whose head or body did
	// not come within server.header_timeout or idle_timeout, and
	// connections closed at accept for server.max_conns_per_ip.
	clientHeadTimeouts = metrics.NewCounter(`edgelb_client_timeouts_total{phase="head"}`)
	clientBodyTimeouts = metrics.NewCounter(`edgelb_client_timeouts_total{phase="body"}`)
	connsOverIPLimit   = metrics.NewCounter(`edgelb_client_conns_rejected_total{reason="max_conns_per_ip"}`)
)
