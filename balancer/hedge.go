package balancer

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"
	"gopkg.in/yaml.v3"

	"github.com/edgelb/edgelb/health"
)

// Hedged requests: when an idempotent request's try has not answered in
// time, a second try goes to another backend and the first answer wins; the
// other try is abandoned: its answer is thrown away and its backend is not
// blamed, but it keeps its place in the backend's in-flight count until it
// ends, which steers selection away from a backend that stopped answering.
// Both engines hedge; this file holds what they share: the configuration,
// when to hedge, and the budget that bounds the extra load.

// HedgeConfig is services.NAME.hedge.
type HedgeConfig struct {
	// After is how long a try may go unanswered before a hedge goes: a
	// duration ("50ms") or a percentile of the service's recent answered
	// tries ("p95").
	After HedgeAfter `yaml:"after"`
	// Max is how many hedges one request may send, each after another
	// After; DefaultHedgeMax if not set.
	Max int `yaml:"max"`
	// Budget is the most extra load hedging may add, in percent of the
	// service's requests; DefaultHedgeBudget if not set.
	Budget int `yaml:"budget"`
	// MinAfter is the least a percentile After may come to;
	// DefaultHedgeMinAfter if not set.
	MinAfter time.Duration `yaml:"min_after"`
}

// Hedging defaults.
const (
	DefaultHedgeMax      = 1
	DefaultHedgeBudget   = 10
	DefaultHedgeMinAfter = time.Millisecond
	// maxHedges bounds HedgeConfig.Max.
	maxHedges = 3
)

// HedgeAfter is a fixed delay or a percentile of recent try latencies.
type HedgeAfter struct {
	Fixed      time.Duration
	Percentile float64 // in (0, 100); 0 when Fixed
	// bad is why the value written cannot be read, for validate to
	// report under its key.
	bad string
}

// UnmarshalYAML reads "50ms" or "p95" (also "p99.9").
func (a *HedgeAfter) UnmarshalYAML(n *yaml.Node) error {
	*a = HedgeAfter{}
	v := strings.TrimSpace(n.Value)
	if n.Kind != yaml.ScalarNode {
		a.bad = "want a duration (50ms) or a percentile (p95)"
		return nil
	}
	if p, ok := strings.CutPrefix(v, "p"); ok {
		f, err := strconv.ParseFloat(p, 64)
		if err != nil || !(f > 0 && f < 100) {
			a.bad = strconv.Quote(v) + ": a percentile is p followed by a number between 0 and 100, e.g. p95"
			return nil
		}
		a.Percentile = f
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		a.bad = strconv.Quote(v) + ": want a duration (50ms) or a percentile (p95)"
		return nil
	}
	a.Fixed = d
	return nil
}

// String returns a as it is written in the config.
func (a HedgeAfter) String() string {
	if a.Percentile > 0 {
		return "p" + strconv.FormatFloat(a.Percentile, 'f', -1, 64)
	}
	return a.Fixed.String()
}

func (h *HedgeConfig) applyDefaults() {
	if h == nil {
		return
	}
	setDefault(&h.Max, DefaultHedgeMax)
	setDefault(&h.Budget, DefaultHedgeBudget)
	setDefault(&h.MinAfter, DefaultHedgeMinAfter)
}

// validate checks h after applyDefaults; retries is the service's.
func (h *HedgeConfig) validate(path string, retries int) []error {
	if h == nil {
		return nil
	}
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	switch {
	case h.After.bad != "":
		bad(".after", "%s", h.After.bad)
	case h.After.Fixed == 0 && h.After.Percentile == 0:
		bad(".after", "missing: a duration (50ms) or a percentile (p95)")
	case h.After.Fixed < 0:
		bad(".after", "must be positive, got %s", h.After.Fixed)
	}
	if h.Max < 1 || h.Max > maxHedges {
		bad(".max", "must be 1 to %d, got %d", maxHedges, h.Max)
	} else if tries := max(retries, 0) + 1 + h.Max; tries > maxTries {
		bad(".max", "with retries %d a request could try %d backends; at most %d: lower retries or hedge.max", retries, tries, maxTries)
	}
	if h.Budget < 1 || h.Budget > 100 {
		bad(".budget", "must be 1 to 100 (percent of requests), got %d", h.Budget)
	}
	if h.MinAfter < 0 {
		bad(".min_after", "must not be negative")
	}
	return errs
}

// hedger is a pool's hedging at run time.
type hedger struct {
	max      int
	fixed    int64 // ns; 0 when after is a percentile
	pct      float64
	minAfter int64
	// budget is the tokens, in thousandths of a hedge, that each request
	// adds to the bucket; a hedge takes hedgeToken.
	budget int64
	tokens atomic.Int64
	// after is the current delay in ns; 0 while a percentile has too
	// few answers to go on, when nothing is hedged.
	after atomic.Int64
	// lat counts recent answered tries by latency bucket; computed
	// holds when after was last computed from it (unix nano).
	lat      [hedgeBuckets]atomic.Uint32
	computed atomic.Int64

	// sent counts hedges sent, denied the hedges that came due while the
	// budget was spent (each waits, checking again every retry, and is
	// counted once).
	sent, denied *metrics.Counter
}

const (
	hedgeToken = 1000
	// hedgeBurst is how many hedges the bucket holds at most: a burst
	// of slow answers may hedge that many at once, such as every request
	// in flight to a backend that just stopped answering.
	hedgeBurst = 50 * hedgeToken
	// hedgeBuckets latency buckets, four per doubling from 16µs: the
	// last holds everything over 8s.
	hedgeBuckets   = 80
	hedgeBucketMin = 16 * time.Microsecond
	// hedgeMinAnswers is how many answers a percentile needs.
	hedgeMinAnswers = 32
	// hedgeEvery is how often a percentile is computed again; the counts
	// then halve, so that it follows the last few seconds.
	hedgeEvery = time.Second
	// hedgeRetryMin bounds retry from below.
	hedgeRetryMin = 100 * time.Microsecond
)

func newHedger(service string, h *HedgeConfig) *hedger {
	if h == nil {
		return nil
	}
	hd := &hedger{max: h.Max, fixed: int64(h.After.Fixed), pct: h.After.Percentile, minAfter: int64(h.MinAfter),
		budget: int64(h.Budget) * hedgeToken / 100,
		sent:   metrics.GetOrCreateCounter(`edgelb_hedges_total{service="` + service + `",result="sent"}`),
		denied: metrics.GetOrCreateCounter(`edgelb_hedges_total{service="` + service + `",result="over_budget"}`),
	}
	hd.after.Store(hd.fixed)
	hd.tokens.Store(hedgeBurst)
	return hd
}

// delay returns how long a try may go unanswered before a request hedges
// it (ns), 0 for never; each request that may hedge calls it once, and
// adds to the budget.
func (h *hedger) delay(now int64) int64 {
	if t := h.tokens.Add(h.budget); t > hedgeBurst {
		h.tokens.Add(hedgeBurst - t)
	}
	if h.pct > 0 && now-h.computed.Load() >= int64(hedgeEvery) {
		h.compute(now)
	}
	return h.after.Load()
}

// take spends a hedge from the budget; false when it is spent. waited
// says the hedge was refused before: a hedge that waits for the budget is
// counted once as over_budget, however often it checks.
func (h *hedger) take(waited bool) bool {
	if h.tokens.Add(-hedgeToken) < 0 {
		h.tokens.Add(hedgeToken)
		if !waited {
			h.denied.Inc()
		}
		return false
	}
	h.sent.Inc()
	return true
}

// helps reports whether a hedge to b may help at now (unix nano): not
// while b has requests in flight and has answered none for the hedge delay
// (health.Target.Stalled), as slow as the try the hedge would rescue. Such
// a hedge waits, checking again every retry, without spending budget: when
// everything slows at once (a pause of the machine, a shared dependency),
// the requests that pass the delay together do not spend the budget on
// hedges that cannot help, and it is still there for the requests of a
// backend that hangs alone.
func (h *hedger) helps(b *Backend, now int64) bool {
	return !b.target.Stalled(now, h.after.Load())
}

// retry is how long a hedge refused for want of budget waits before it
// checks again (ns): a quarter of the hedge delay, at least
// hedgeRetryMin; 0, no more checks, while the delay is 0 (a percentile
// without enough answers to go on). Every request adds to the budget, so
// that under load a token comes within a fraction of the delay; a whole
// delay more would add it to the answer of every request that was due a
// hedge when a burst of slow answers had just spent the bucket.
func (h *hedger) retry() int64 {
	a := h.after.Load()
	if a <= 0 {
		return 0
	}
	return max(a/4, int64(hedgeRetryMin))
}

// again sets timer for the next check of a hedge that waits (see retry),
// and leaves it stopped when there is none.
func (h *hedger) again(timer *time.Timer) {
	if r := h.retry(); r > 0 {
		timer.Reset(time.Duration(r))
	}
}

// answered records the latency of an answered try.
func (h *hedger) answered(lat time.Duration) {
	if h.pct > 0 {
		h.lat[hedgeBucket(lat)].Add(1)
	}
}

// hedgeBucket maps a latency to its bucket: four per doubling from
// hedgeBucketMin.
func hedgeBucket(lat time.Duration) int {
	x := uint64(max(lat, hedgeBucketMin) / (hedgeBucketMin / 16))
	// x >= 16: the top bits give the doubling, the two below it the
	// quarter within.
	n := bits.Len64(x) - 1
	q := int(x>>(n-2)) & 3
	return min((n-4)*4+q, hedgeBuckets-1)
}

// hedgeBucketTop is the latency at the top of bucket i (ns).
func hedgeBucketTop(i int) int64 {
	d, q := i/4, int64(i%4)
	return int64(hedgeBucketMin) << d * (4 + q + 1) / 4
}

// compute sets after from the latency percentile, once per hedgeEvery
// across all callers, and halves the counts.
func (h *hedger) compute(now int64) {
	last := h.computed.Load()
	if now-last < int64(hedgeEvery) || !h.computed.CompareAndSwap(last, now) {
		return
	}
	var counts [hedgeBuckets]uint32
	total := uint64(0)
	for i := range h.lat {
		c := h.lat[i].Load()
		counts[i] = c
		total += uint64(c)
		if c > 0 {
			h.lat[i].Add(^(c - c/2 - 1))
		}
	}
	if total < hedgeMinAnswers {
		h.after.Store(0)
		return
	}
	want := uint64(math.Ceil(float64(total) * h.pct / 100))
	seen := uint64(0)
	for i, c := range counts {
		seen += uint64(c)
		if seen >= want {
			h.after.Store(max(hedgeBucketTop(i), h.minAfter))
			return
		}
	}
}

// hedgeTry is one try of a hedged request on the fasthttp path.
type hedgeTry struct {
	b     *Backend
	req   *fasthttp.Request
	resp  *fasthttp.Response
	start time.Time
	end   time.Time
	err   error
	// returned is set once the try's result came back to hedgedTry.
	returned bool
}

// hedgedTry makes the try of req on b and, while no answer has come after
// the hedge delay, tries other backends beside it, up to the service's
// hedge max for the request (hedges counts those it sent) and within its
// budget. The first answer that is not one to
// retry wins and goes in resp; the other tries are cancelled, and count
// for nothing in their backends' health. It returns the try whose result
// the caller counts and goes on from, as from one try: the winner's
// backend with a nil error, or when no try answered well, the best of what
// came (an answer to retry beats a failure). Every other try is counted
// here, and recorded in rl with the tries that lost. t gets every backend
// tried.
func (p *Pool) hedgedTry(b *Backend, req *fasthttp.Request, resp *fasthttp.Response, t *tried, hedges *int, now, deadline time.Time, rl *reqLog) (*Backend, error, time.Time) {
	h := p.hedge
	delay := h.delay(now.UnixNano())
	if delay == 0 || *hedges >= h.max {
		return b, forwardOnce(b.client, req, resp, p.tryDeadline(now, deadline), p.cfg.FirstByteTimeout, p.cfg.MaxResponseBody), now
	}
	results := make(chan *hedgeTry, 1+h.max)
	var tries [1 + maxHedges]*hedgeTry
	n, running := 0, 0
	start := func(b *Backend, at time.Time) {
		ht := &hedgeTry{b: b, req: fasthttp.AcquireRequest(), resp: fasthttp.AcquireResponse(), start: at}
		req.CopyTo(ht.req)
		tries[n] = ht
		n++
		running++
		d := p.tryDeadline(at, deadline)
		go func() {
			ht.err = forwardOnce(ht.b.client, ht.req, ht.resp, d, p.cfg.FirstByteTimeout, p.cfg.MaxResponseBody)
			ht.end = time.Now()
			results <- ht
		}()
	}
	start(b, now)
	timer := time.NewTimer(time.Duration(delay))
	defer timer.Stop()
	var best *hedgeTry // the best result so far, not counted yet
	var won *hedgeTry
	waited := false // the hedge due has waited for budget
	for running > 0 && won == nil {
		select {
		case ht := <-results:
			running--
			ht.returned = true
			better := best == nil || best.err != nil && ht.err == nil
			if ht.err == nil {
				if _, retryable := classifyResponse(ht.resp); !retryable {
					won = ht
					better = true
				}
			}
			if !better {
				p.countHedgeTry(ht, rl)
				continue
			}
			if best != nil {
				p.countHedgeTry(best, rl)
			}
			best = ht
		case <-timer.C:
			if *hedges >= h.max || best != nil && best.err == nil {
				continue
			}
			at := time.Now()
			if !at.Before(deadline) {
				continue
			}
			hb := p.pick(at.UnixNano(), t)
			if hb == nil {
				continue
			}
			if !h.helps(hb, at.UnixNano()) {
				h.again(timer)
				continue
			}
			if !h.take(waited) {
				// Over budget: check again soon, as requests add
				// to it.
				waited = true
				h.again(timer)
				continue
			}
			waited = false
			t.add(hb)
			*hedges++
			hb.target.Begin()
			start(hb, at)
			if a := h.after.Load(); *hedges < h.max && a > 0 {
				timer.Reset(time.Duration(a))
			}
		}
	}
	if running > 0 {
		lost := time.Now()
		for _, ht := range tries[:n] {
			if !ht.returned {
				rl.addTry(ht.b, lost.UnixNano(), lost.Sub(ht.start), tryHedgeLost, 0)
			}
		}
		// The others lost: abandoned, they go on until their answer,
		// thrown away, or their deadline, and end counted only if they
		// timed out (see endLostTry). Until then they hold their place in
		// their backends' in-flight counts, so that a backend that
		// stopped answering stops being picked.
		go func(running int) {
			for ; running > 0; running-- {
				ht := <-results
				endLostTry(ht.b, ht.end.UnixNano(), ht.end.Sub(ht.start), lostTryCode(ht.err))
				releaseHedgeTry(ht)
			}
		}(running)
	}
	best.resp.CopyTo(resp)
	b, err, at := best.b, best.err, best.start
	releaseHedgeTry(best)
	return b, err, at
}

// lostTryCode is how a lost try that ended with err counts (see
// endLostTry): a timeout, a connect that timed out, else nothing.
func lostTryCode(err error) errCode {
	if err == nil {
		return errNone
	}
	switch o, _ := classifyErr(err); {
	case o == health.OutcomeTimeout:
		return errTimeout
	case isDialErr(err) && (errors.Is(err, fasthttp.ErrDialTimeout) || timeoutErr(err) == fasthttp.ErrTimeout):
		return errConnectFailed
	}
	return errNone
}

// tryDeadline is when a try that starts at is due: try_timeout later, at
// most the request's deadline.
func (p *Pool) tryDeadline(at, deadline time.Time) time.Time {
	if d := at.Add(p.cfg.TryTimeout); d.Before(deadline) {
		return d
	}
	return deadline
}

// countHedgeTry counts a try of a hedged request that is not the one
// hedgedTry returns, and releases it; rl is its request's record.
func (p *Pool) countHedgeTry(ht *hedgeTry, rl *reqLog) {
	lat := ht.end.Sub(ht.start)
	if ht.err == nil {
		o, _ := classifyResponse(ht.resp)
		endTry(rl, ht.b, ht.end.UnixNano(), lat, o, ht.resp.StatusCode(), errNone)
	} else {
		o, c := classifyErr(ht.err)
		endTry(rl, ht.b, ht.end.UnixNano(), lat, o, 0, c)
	}
	releaseHedgeTry(ht)
}

func releaseHedgeTry(ht *hedgeTry) {
	fasthttp.ReleaseRequest(ht.req)
	fasthttp.ReleaseResponse(ht.resp)
}
