package balancer

import (
	"math"
	"strconv"
	"sync"
	"time"

	"github.com/edgelb/edgelb/health"
)

// The live view of /status?rates=1, which the status page polls: once a
// second a sampler reads the counters of every service and backend and
// keeps what changed in the last liveSamples seconds, so that the page
// has rates, latency percentiles and per-second history from the moment it
// opens, covering the minutes before it did.

const (
	// liveSamples is how many per-second samples are kept: 5 minutes.
	liveSamples = 300
	// liveRateWindow is how many of the latest samples the rates of
	// /status?rates=1 cover.
	liveRateWindow = 10
	// liveInterval is the time between samples.
	liveInterval = time.Second
)

// Backend states in the per-second history: one byte per sample.
const (
	liveNone      = '-' // no sample: the backend was not listed then
	liveHealthy   = 'h'
	liveUnhealthy = 'u'
	liveEjected   = 'e'
	liveDraining  = 'd'
)

// liveState is the history byte of a health state, and liveRank its
// weight when several states share a second: the worst one shows.
var (
	liveState = [...]byte{health.StateHealthy: liveHealthy, health.StateUnhealthy: liveUnhealthy,
		health.StateEjected: liveEjected, health.StateDraining: liveDraining}
	liveRank = [...]int{health.StateHealthy: 0, health.StateDraining: 1, health.StateEjected: 2, health.StateUnhealthy: 3}
)

// liveRecorder keeps the sample clock; the samples themselves live with the
// series of each service and backend (serviceMetrics.live,
// backendMetrics.live), which survive reloads and outlast a departed
// backend as long as its counters do. mu guards all of them.
type liveRecorder struct {
	mu sync.Mutex
	// tick counts the samplings; sampling n happened at times[n%liveSamples]
	// (unix milliseconds). A sample n covers times[n-1] to times[n].
	tick  uint64
	times [liveSamples]int64
}

// serviceLive is the history of one service. Guarded by liveRecorder.mu.
type serviceLive struct {
	// seen is the tick of the last look; prev what the counters said then.
	seen uint64
	prev serviceCounts
	ring [liveSamples]serviceSample
}

type serviceCounts struct {
	requests, errors, stale, retries uint64
	latency                          [len(latencyBuckets) + 1]uint64
}

// serviceSample is what happened to a service during one sample.
type serviceSample struct {
	tick                             uint64 // 0: none
	requests, errors, stale, retries uint32
	latency                          [len(latencyBuckets) + 1]uint32
	inflight                         int32
	available                        uint32
	panic                            bool
}

// backendLive is the history of one backend of one service. Guarded by
// liveRecorder.mu.
type backendLive struct {
	seen    uint64
	prev    backendCounts
	entered [len(liveState)]uint32
	ring    [liveSamples]backendSample
}

type backendCounts struct {
	requests, failures, status5xx, latencyNanos uint64
}

// backendSample is what happened to a backend during one sample.
type backendSample struct {
	tick                          uint64 // 0: none
	requests, failures, status5xx uint32
	latency                       float32 // seconds, summed over the tries
	inflight                      int32
	state                         byte
}

// liveLoop samples every liveInterval until the server stops.
func (s *Server) liveLoop() {
	s.live.mu.Lock()
	s.live.times[0] = time.Now().UnixMilli() // the start of sample 1
	s.live.mu.Unlock()
	s.every(liveInterval, s.sampleLive)
}

// liveBackendLook is what the sampler read of one backend before taking
// the recorder's lock.
type liveBackendLook struct {
	m        *backendMetrics
	counts   backendCounts
	state    health.State
	entered  [len(liveState)]uint32
	inflight int32
}

type liveServiceLook struct {
	m         *serviceMetrics
	counts    serviceCounts
	inflight  int32
	available uint32
	panic     bool
	backends  []liveBackendLook
}

// sampleLive takes one sample of every service and backend (slow path).
func (s *Server) sampleLive(now time.Time) {
	nowNano := now.UnixNano()
	pools := s.poolsSorted()
	looks := make([]liveServiceLook, 0, len(pools))
	for _, p := range pools {
		sl := liveServiceLook{m: p.m, panic: p.ej.Panic()}
		sl.counts = p.m.counts()
		for _, b := range p.set.Load().list {
			st := b.target.State(nowNano)
			if st == health.StateHealthy {
				sl.available++
			}
			sl.backends = append(sl.backends, lookBackend(b, st))
		}
		p.mu.Lock()
		for _, d := range p.draining {
			sl.backends = append(sl.backends, lookBackend(d.b, health.StateDraining))
		}
		p.mu.Unlock()
		for _, bl := range sl.backends {
			sl.inflight += bl.inflight
		}
		looks = append(looks, sl)
	}

	r := &s.live
	r.mu.Lock()
	defer r.mu.Unlock()
	r.tick++
	tick := r.tick
	r.times[tick%liveSamples] = now.UnixMilli()
	for i := range looks {
		looks[i].record(tick)
		for j := range looks[i].backends {
			looks[i].backends[j].record(tick)
		}
	}
}

func lookBackend(b *Backend, st health.State) liveBackendLook {
	bl := liveBackendLook{m: b.m, state: st, inflight: b.target.Inflight(), counts: b.m.counts()}
	for s := range bl.entered {
		bl.entered[s] = b.target.Entered(health.State(s))
	}
	return bl
}

// counts reads the counters of a service.
func (m *serviceMetrics) counts() serviceCounts {
	c := serviceCounts{requests: m.requests.Get(), stale: m.staleServed.Get(), retries: m.retries.Get()}
	for _, g := range m.generated {
		if g != nil {
			c.errors += g.Get()
		}
	}
	for i := range c.latency {
		c.latency[i] = m.latency.counts[i].Load()
	}
	return c
}

// counts reads the counters of a backend.
func (m *backendMetrics) counts() backendCounts {
	c := backendCounts{requests: m.requests.Get(), status5xx: m.status[5].Get(), latencyNanos: m.latency.sumNano.Load()}
	for _, e := range m.errors {
		if e != nil {
			c.failures += e.Get()
		}
	}
	return c
}

// record stores the sample of tick for the service. Series are made at
// zero when their service or backend joins, so a new one's first sample
// counts from zero. A service looked at twice in one tick (its old and new
// pool during a reload) counts once; one not looked at in the previous
// tick starts over, as its counters cannot be split over the gap.
func (sl *liveServiceLook) record(tick uint64) {
	if sl.m.live == nil {
		sl.m.live = &serviceLive{seen: tick - 1}
	}
	l := sl.m.live
	if l.seen == tick {
		return
	}
	if l.seen == tick-1 {
		smp := &l.ring[tick%liveSamples]
		*smp = serviceSample{
			tick:      tick,
			requests:  delta32(sl.counts.requests, l.prev.requests),
			errors:    delta32(sl.counts.errors, l.prev.errors),
			stale:     delta32(sl.counts.stale, l.prev.stale),
			retries:   delta32(sl.counts.retries, l.prev.retries),
			inflight:  sl.inflight,
			available: sl.available,
			panic:     sl.panic,
		}
		for i := range smp.latency {
			smp.latency[i] = delta32(sl.counts.latency[i], l.prev.latency[i])
		}
	}
	l.seen, l.prev = tick, sl.counts
}

// record stores the sample of tick for the backend; see
// liveServiceLook.record. Its state is the worst of the one it is in and
// those it entered since the last look.
func (bl *liveBackendLook) record(tick uint64) {
	if bl.m.live == nil {
		// Its health state may be older than its series: states entered
		// before count from the next look.
		bl.m.live = &backendLive{seen: tick - 1, entered: bl.entered}
	}
	l := bl.m.live
	if l.seen == tick {
		return
	}
	if l.seen == tick-1 {
		st := bl.state
		for s := range bl.entered {
			if bl.entered[s] != l.entered[s] && liveRank[s] > liveRank[st] {
				st = health.State(s)
			}
		}
		l.ring[tick%liveSamples] = backendSample{
			tick:      tick,
			requests:  delta32(bl.counts.requests, l.prev.requests),
			failures:  delta32(bl.counts.failures, l.prev.failures),
			status5xx: delta32(bl.counts.status5xx, l.prev.status5xx),
			latency:   float32(float64(bl.counts.latencyNanos-l.prev.latencyNanos) / 1e9),
			inflight:  bl.inflight,
			state:     liveState[st],
		}
	}
	l.seen, l.prev, l.entered = tick, bl.counts, bl.entered
}

func delta32(cur, prev uint64) uint32 {
	return uint32(min(cur-prev, math.MaxUint32))
}

// Series is a per-second history in /status?rates=1, one value for each
// of Samples.Times; null where there was no sample.
type Series []float64

// MarshalJSON writes NaN, a missing sample, as null, and other values
// with at most 3 decimals.
func (s Series) MarshalJSON() ([]byte, error) {
	b := make([]byte, 0, 2+len(s)*6)
	b = append(b, '[')
	for i, v := range s {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendLiveNumber(b, v)
	}
	return append(b, ']'), nil
}

func appendLiveNumber(b []byte, v float64) []byte {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return append(b, "null"...)
	}
	return strconv.AppendFloat(b, math.Round(v*1000)/1000, 'f', -1, 64)
}

// Number is a value in /status?rates=1 that may be unknown (NaN), such as
// a latency while there were no requests; it is written as null then.
type Number float64

// MarshalJSON writes NaN as null, other values with at most 3 decimals.
func (n Number) MarshalJSON() ([]byte, error) { return appendLiveNumber(nil, float64(n)), nil }

// Samples are the times of the per-second samples of /status?rates=1.
type Samples struct {
	// Times are the ends of the samples, in unix milliseconds, oldest
	// first; each History series has a value for each.
	Times []int64 `json:"times"`
}

// ServiceRates are a service's rates over the last WindowSeconds.
type ServiceRates struct {
	WindowSeconds float64 `json:"window_s"`
	Requests      Number  `json:"requests_per_s"`
	// Errors are the responses edgelb generated (Edgelb-Error) because
	// no backend answered; Stale the stored copies it served instead.
	Errors  Number `json:"errors_per_s"`
	Stale   Number `json:"stale_per_s"`
	Retries Number `json:"retries_per_s"`
	// Latency percentiles of client requests, retries included,
	// interpolated within the histogram's buckets as Prometheus'
	// histogram_quantile does; null without requests.
	P50 Number `json:"p50_ms"`
	P90 Number `json:"p90_ms"`
	P99 Number `json:"p99_ms"`
}

// ServiceHistory is a service's per-second history.
type ServiceHistory struct {
	Requests  Series `json:"requests_per_s"`
	Errors    Series `json:"errors_per_s"`
	Stale     Series `json:"stale_per_s"`
	Retries   Series `json:"retries_per_s"`
	P50       Series `json:"p50_ms"`
	P99       Series `json:"p99_ms"`
	Inflight  Series `json:"inflight"`
	Available Series `json:"available"`
	// Panic has a byte per sample: 'p' in panic mode, '.' not, '-' no
	// sample.
	Panic string `json:"panic"`
}

// BackendRates are a backend's rates over the last WindowSeconds.
type BackendRates struct {
	WindowSeconds float64 `json:"window_s"`
	// Requests are tries, retries and hedges included; Failures those that
	// failed (edgelb_backend_errors_total); Status5xx its 5xx answers.
	Requests  Number `json:"requests_per_s"`
	Failures  Number `json:"failures_per_s"`
	Status5xx Number `json:"5xx_per_s"`
	// Mean is the mean duration of its tries; null without tries.
	Mean Number `json:"mean_ms"`
}

// BackendHistory is a backend's per-second history.
type BackendHistory struct {
	Requests  Series `json:"requests_per_s"`
	Failures  Series `json:"failures_per_s"`
	Status5xx Series `json:"5xx_per_s"`
	Mean      Series `json:"mean_ms"`
	Inflight  Series `json:"inflight"`
	// States has a byte per sample: h healthy, u unhealthy, e ejected, d
	// draining, the worst the backend was in during that second; '-' no
	// sample.
	States string `json:"states"`
}

// liveView is one reading of the recorder for /status?rates=1: the ticks
// of the history asked for and of the rate window.
type liveView struct {
	r           *liveRecorder
	first, last uint64 // history ticks, first > last when none
	rateFrom    uint64 // first tick of the rate window
}

// view returns the reading for the samples after since (unix
// milliseconds). The caller holds r.mu.
func (r *liveRecorder) view(since int64) liveView {
	v := liveView{r: r, last: r.tick}
	// A sample needs the time of the one before it, so the oldest time
	// kept serves only as that.
	oldest := uint64(1)
	if r.tick >= liveSamples {
		oldest = r.tick - liveSamples + 2
	}
	v.first = oldest
	for v.first <= v.last && r.times[v.first%liveSamples] <= since {
		v.first++
	}
	v.rateFrom = max(oldest, r.tick-min(r.tick, liveRateWindow-1))
	return v
}

func (v liveView) samples() *Samples {
	s := &Samples{Times: []int64{}}
	for t := v.first; t <= v.last; t++ {
		s.Times = append(s.Times, v.r.times[t%liveSamples])
	}
	return s
}

// seconds returns the length of sample t.
func (v liveView) seconds(t uint64) float64 {
	return float64(v.r.times[t%liveSamples]-v.r.times[(t-1)%liveSamples]) / 1e3
}

func (v liveView) service(l *serviceLive) (*ServiceRates, *ServiceHistory) {
	h := &ServiceHistory{}
	panicBytes := make([]byte, 0, v.last-v.first+1)
	for t := v.first; t <= v.last; t++ {
		smp := l.sample(t)
		if smp == nil {
			h.Requests = append(h.Requests, math.NaN())
			h.Errors = append(h.Errors, math.NaN())
			h.Stale = append(h.Stale, math.NaN())
			h.Retries = append(h.Retries, math.NaN())
			h.P50 = append(h.P50, math.NaN())
			h.P99 = append(h.P99, math.NaN())
			h.Inflight = append(h.Inflight, math.NaN())
			h.Available = append(h.Available, math.NaN())
			panicBytes = append(panicBytes, liveNone)
			continue
		}
		sec := v.seconds(t)
		h.Requests = append(h.Requests, float64(smp.requests)/sec)
		h.Errors = append(h.Errors, float64(smp.errors)/sec)
		h.Stale = append(h.Stale, float64(smp.stale)/sec)
		h.Retries = append(h.Retries, float64(smp.retries)/sec)
		h.P50 = append(h.P50, latencyQuantile(0.5, smp.latency[:])*1e3)
		h.P99 = append(h.P99, latencyQuantile(0.99, smp.latency[:])*1e3)
		h.Inflight = append(h.Inflight, float64(smp.inflight))
		h.Available = append(h.Available, float64(smp.available))
		if smp.panic {
			panicBytes = append(panicBytes, 'p')
		} else {
			panicBytes = append(panicBytes, '.')
		}
	}
	h.Panic = string(panicBytes)

	var sum serviceSample
	var secs float64
	for t := v.rateFrom; t <= v.last; t++ {
		if smp := l.sample(t); smp != nil {
			secs += v.seconds(t)
			sum.requests += smp.requests
			sum.errors += smp.errors
			sum.stale += smp.stale
			sum.retries += smp.retries
			for i, c := range smp.latency {
				sum.latency[i] += c
			}
		}
	}
	r := &ServiceRates{WindowSeconds: math.Round(secs*1000) / 1000}
	r.Requests, r.Errors, r.Stale, r.Retries = perSecond(sum.requests, secs), perSecond(sum.errors, secs), perSecond(sum.stale, secs), perSecond(sum.retries, secs)
	r.P50 = Number(latencyQuantile(0.5, sum.latency[:]) * 1e3)
	r.P90 = Number(latencyQuantile(0.9, sum.latency[:]) * 1e3)
	r.P99 = Number(latencyQuantile(0.99, sum.latency[:]) * 1e3)
	return r, h
}

func (v liveView) backend(l *backendLive) (*BackendRates, *BackendHistory) {
	h := &BackendHistory{}
	states := make([]byte, 0, v.last-v.first+1)
	for t := v.first; t <= v.last; t++ {
		smp := l.sample(t)
		if smp == nil {
			h.Requests = append(h.Requests, math.NaN())
			h.Failures = append(h.Failures, math.NaN())
			h.Status5xx = append(h.Status5xx, math.NaN())
			h.Mean = append(h.Mean, math.NaN())
			h.Inflight = append(h.Inflight, math.NaN())
			states = append(states, liveNone)
			continue
		}
		sec := v.seconds(t)
		h.Requests = append(h.Requests, float64(smp.requests)/sec)
		h.Failures = append(h.Failures, float64(smp.failures)/sec)
		h.Status5xx = append(h.Status5xx, float64(smp.status5xx)/sec)
		h.Mean = append(h.Mean, meanMillis(float64(smp.latency), smp.requests))
		h.Inflight = append(h.Inflight, float64(smp.inflight))
		states = append(states, smp.state)
	}
	h.States = string(states)

	var requests, failures, status5xx uint32
	var latency, secs float64
	for t := v.rateFrom; t <= v.last; t++ {
		if smp := l.sample(t); smp != nil {
			secs += v.seconds(t)
			requests += smp.requests
			failures += smp.failures
			status5xx += smp.status5xx
			latency += float64(smp.latency)
		}
	}
	return &BackendRates{
		WindowSeconds: math.Round(secs*1000) / 1000,
		Requests:      perSecond(requests, secs),
		Failures:      perSecond(failures, secs),
		Status5xx:     perSecond(status5xx, secs),
		Mean:          Number(meanMillis(latency, requests)),
	}, h
}

func (l *serviceLive) sample(t uint64) *serviceSample {
	if l == nil || l.ring[t%liveSamples].tick != t {
		return nil
	}
	return &l.ring[t%liveSamples]
}

func (l *backendLive) sample(t uint64) *backendSample {
	if l == nil || l.ring[t%liveSamples].tick != t {
		return nil
	}
	return &l.ring[t%liveSamples]
}

// perSecond is n over secs, unknown when no time was sampled.
func perSecond(n uint32, secs float64) Number {
	if secs <= 0 {
		return Number(math.NaN())
	}
	return Number(float64(n) / secs)
}

func meanMillis(seconds float64, n uint32) float64 {
	if n == 0 {
		return math.NaN()
	}
	return seconds / float64(n) * 1e3
}

// latencyQuantile returns the q-quantile, in seconds, of counts by
// latencyBuckets (the last one above them all), interpolating linearly
// within a bucket as Prometheus' histogram_quantile does: what falls above
// the last bound reads as that bound. NaN without counts.
func latencyQuantile(q float64, counts []uint32) float64 {
	var total uint64
	for _, c := range counts {
		total += uint64(c)
	}
	if total == 0 {
		return math.NaN()
	}
	rank := q * float64(total)
	var cum uint64
	for i, c := range counts {
		if c == 0 || float64(cum+uint64(c)) < rank {
			cum += uint64(c)
			continue
		}
		if i == len(latencyBuckets) {
			return latencyBuckets[len(latencyBuckets)-1]
		}
		lower := 0.0
		if i > 0 {
			lower = latencyBuckets[i-1]
		}
		return lower + (latencyBuckets[i]-lower)*(rank-float64(cum))/float64(c)
	}
	return latencyBuckets[len(latencyBuckets)-1]
}
