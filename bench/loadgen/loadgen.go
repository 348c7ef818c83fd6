// Package loadgen drives HTTP load at a server and measures what clients
// see: throughput, latency percentiles (HDR histograms) and errors by
// status, by Edgelb-Error code and by transport failure, per second and
// overall.
package loadgen

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
	"github.com/valyala/fasthttp"
)

// Options describe a load run. Zero values select the defaults.
type Options struct {
	// URL is the target, e.g. http://127.0.0.1:8080/.
	URL string
	// Method is the HTTP method. GET is used if not set.
	Method string
	// Host overrides the Host header.
	Host string
	// Headers are extra request headers, "Name: value".
	Headers []string
	// Body is the request body.
	Body []byte
	// Concurrency is the number of connections and workers. 32 is used if
	// not set.
	Concurrency int
	// Rate is the target requests per second across all workers; 0 sends
	// as fast as responses come back (closed loop). With a rate, latency
	// counts from when each request was due, so a stalled server cannot
	// hide its stall (no coordinated omission).
	Rate float64
	// Duration bounds the run. 10s is used if neither it nor Requests is
	// set.
	Duration time.Duration
	// Requests bounds the number of requests, if set.
	Requests int64
	// Timeout bounds one request. 2s is used if not set.
	Timeout time.Duration
	// OnSecond, if set, is called with every completed second.
	OnSecond func(Second)
	// Addrs, if set, spreads the load over several servers, as an L4
	// load balancer in front of them would: it is asked before every
	// request for the addresses (host:port) that take new requests, and
	// each request goes to the next of them in turn, in place of the
	// URL's host and port (the URL still gives the Host header, scheme
	// and path). A request whose connection is refused goes to the next
	// address, up to one try on each; an address that leaves the list has
	// its idle connections closed. The URL's address is used while the
	// list is empty.
	Addrs func() []string
	// OnResponse, if set, is called after every request that the end of
	// the run did not cut, from the worker that sent it and concurrently
	// with the others: when it was sent and ended, and the response, or
	// the error (resp is then nil). It must not keep resp.
	OnResponse func(sent, end time.Time, resp *fasthttp.Response, err error)
}

// Percentiles are latencies in milliseconds.
type Percentiles struct {
	P50  float64 `json:"p50_ms"`
	P90  float64 `json:"p90_ms"`
	P99  float64 `json:"p99_ms"`
	P999 float64 `json:"p999_ms"`
	Max  float64 `json:"max_ms"`
}

// Counts are the outcomes of a set of requests.
type Counts struct {
	Requests int64 `json:"requests"`
	// OK counts 2xx and 3xx responses.
	OK int64 `json:"ok"`
	// Errors counts everything else: 4xx, 5xx and transport failures.
	Errors int64 `json:"errors"`
	// Stale counts responses carrying Cache-Status (served from edgelb's
	// stale store).
	Stale int64 `json:"stale"`
	// ByStatus counts responses by status code.
	ByStatus map[int]int64 `json:"by_status,omitempty"`
	// ByEdgelbError counts responses by their Edgelb-Error header.
	ByEdgelbError map[string]int64 `json:"by_edgelb_error,omitempty"`
	// ByTransport counts requests that got no response, by kind: timeout,
	// refused, reset, closed, other.
	ByTransport map[string]int64 `json:"by_transport,omitempty"`
	// Refused counts connections refused that a request survived by
	// going to another address (Options.Addrs); not errors.
	Refused int64 `json:"refused_tried_elsewhere,omitempty"`
}

// Second is one second of a run.
type Second struct {
	// T is seconds since the start of the run.
	T int `json:"t"`
	Counts
	RPS     float64     `json:"rps"`
	Latency Percentiles `json:"latency"`
}

// Result is a whole run.
type Result struct {
	Target      string        `json:"target"`
	Concurrency int           `json:"concurrency"`
	Rate        float64       `json:"rate,omitempty"`
	Start       time.Time     `json:"start"`
	Elapsed     time.Duration `json:"elapsed_ns"`
	Counts
	RPS     float64     `json:"rps"`
	Latency Percentiles `json:"latency"`
	Seconds []Second    `json:"seconds"`
}

// tally accumulates outcomes; each worker owns one per second.
type tally struct {
	Counts
	hist *hdrhistogram.Histogram
}

func newTally() *tally {
	return &tally{
		Counts: Counts{ByStatus: map[int]int64{}, ByEdgelbError: map[string]int64{}, ByTransport: map[string]int64{}},
		hist:   hdrhistogram.New(1, int64(time.Minute/time.Microsecond), 3),
	}
}

func (t *tally) merge(o *tally) {
	t.Requests += o.Requests
	t.OK += o.OK
	t.Errors += o.Errors
	t.Stale += o.Stale
	t.Refused += o.Refused
	for k, v := range o.ByStatus {
		t.ByStatus[k] += v
	}
	for k, v := range o.ByEdgelbError {
		t.ByEdgelbError[k] += v
	}
	for k, v := range o.ByTransport {
		t.ByTransport[k] += v
	}
	t.hist.Merge(o.hist)
}

// reset empties t for reuse: a worker's tally is reused every second, not
// allocated again, so that the load tool itself makes no garbage at each
// second to collect while it measures.
func (t *tally) reset() {
	t.Counts = Counts{ByStatus: t.ByStatus, ByEdgelbError: t.ByEdgelbError, ByTransport: t.ByTransport}
	clear(t.ByStatus)
	clear(t.ByEdgelbError)
	clear(t.ByTransport)
	t.hist.Reset()
}

func (t *tally) percentiles() Percentiles {
	ms := func(us int64) float64 { return float64(us) / 1000 }
	return Percentiles{
		P50: ms(t.hist.ValueAtQuantile(50)), P90: ms(t.hist.ValueAtQuantile(90)),
		P99: ms(t.hist.ValueAtQuantile(99)), P999: ms(t.hist.ValueAtQuantile(99.9)), Max: ms(t.hist.Max()),
	}
}

// Run drives load until the duration or request count is reached or ctx
// ends, and returns what was measured.
func Run(ctx context.Context, o Options) (*Result, error) {
	u, err := url.Parse(o.URL)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("invalid -url %q: want http://host:port/path", o.URL)
	}
	if o.Method == "" {
		o.Method = "GET"
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 32
	}
	if o.Timeout <= 0 {
		o.Timeout = 2 * time.Second
	}
	if o.Duration <= 0 && o.Requests <= 0 {
		o.Duration = 10 * time.Second
	}
	for _, h := range o.Headers {
		if !strings.Contains(h, ":") {
			return nil, fmt.Errorf("invalid header %q: want \"Name: value\"", h)
		}
	}
	addr := u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), map[string]string{"http": "80", "https": "443"}[u.Scheme])
	}
	clients := newClients(func(addr string) *fasthttp.HostClient {
		return &fasthttp.HostClient{
			Addr: addr, IsTLS: u.Scheme == "https", MaxConns: o.Concurrency,
			MaxIdemponentCallAttempts: 1, NoDefaultUserAgentHeader: true,
			ReadTimeout: o.Timeout, WriteTimeout: o.Timeout, MaxConnWaitTimeout: o.Timeout,
		}
	})
	// With one server, one client, reached without a lock.
	single := clients.get(addr)
	only := []string{addr}
	targets := func() []string {
		if as := o.Addrs(); len(as) > 0 {
			clients.keep(as)
			return as
		}
		return only
	}
	var turn atomic.Uint64
	if o.Duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.Duration)
		defer cancel()
	}

	start := time.Now()
	res := &Result{Target: o.URL, Concurrency: o.Concurrency, Rate: o.Rate, Start: start}
	var (
		mu      sync.Mutex
		seconds = map[int]*tally{}
		sent    int64
	)
	// record is called per request; workers batch into local tallies
	// flushed once per second, so the lock is rarely contended.
	next := func() (due time.Time, ok bool) {
		mu.Lock()
		defer mu.Unlock()
		if o.Requests > 0 && sent >= o.Requests {
			return time.Time{}, false
		}
		n := sent
		sent++
		if o.Rate > 0 {
			return start.Add(time.Duration(float64(n) / o.Rate * float64(time.Second))), true
		}
		return time.Time{}, true
	}
	flush := func(sec int, t *tally) {
		mu.Lock()
		defer mu.Unlock()
		if seconds[sec] == nil {
			seconds[sec] = newTally()
		}
		seconds[sec].merge(t)
	}

	var wg sync.WaitGroup
	for i := 0; i < o.Concurrency; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
			defer fasthttp.ReleaseRequest(req)
			defer fasthttp.ReleaseResponse(resp)
			cur, curSec := newTally(), -1
			defer func() {
				if curSec >= 0 {
					flush(curSec, cur)
				}
			}()
			for ctx.Err() == nil {
				due, ok := next()
				if !ok {
					return
				}
				if !due.IsZero() {
					if d := time.Until(due); d > 0 {
						select {
						case <-ctx.Done():
							return
						case <-time.After(d):
						}
					}
				}
				req.Reset()
				req.Header.SetMethod(o.Method)
				req.SetRequestURI(o.URL)
				if o.Host != "" {
					req.Header.SetHost(o.Host)
					req.UseHostHeader = true
				}
				for _, h := range o.Headers {
					k, v, _ := strings.Cut(h, ":")
					req.Header.Set(strings.TrimSpace(k), strings.TrimSpace(v))
				}
				if len(o.Body) > 0 {
					req.SetBodyRaw(o.Body)
				}
				sendAt := time.Now()
				if due.IsZero() {
					due = sendAt
				}
				var err error
				if o.Addrs == nil {
					err = single.DoTimeout(req, resp, o.Timeout)
				} else {
					as := targets()
					first := int(turn.Add(1) % uint64(len(as)))
					for i := range as {
						err = clients.get(as[(first+i)%len(as)]).DoTimeout(req, resp, o.Timeout)
						if err == nil || !errors.Is(err, syscall.ECONNREFUSED) || i == len(as)-1 {
							break
						}
						// Nothing reached that server: as an L4 balancer
						// does, try the next one.
						cur.Refused++
					}
				}
				end := time.Now()
				if ctx.Err() != nil && err != nil {
					return // cut by the end of the run, not a server failure
				}
				if o.OnResponse != nil {
					if err != nil {
						o.OnResponse(sendAt, end, nil, err)
					} else {
						o.OnResponse(sendAt, end, resp, nil)
					}
				}
				sec := int(end.Sub(start) / time.Second)
				if sec != curSec {
					if curSec >= 0 {
						flush(curSec, cur)
						cur.reset()
					}
					curSec = sec
				}
				cur.Requests++
				cur.hist.RecordValue(max(int64(end.Sub(due)/time.Microsecond), 1))
				if err != nil {
					cur.Errors++
					cur.ByTransport[transportKind(err)]++
					continue
				}
				sc := resp.StatusCode()
				cur.ByStatus[sc]++
				if sc < 400 {
					cur.OK++
				} else {
					cur.Errors++
				}
				if e := resp.Header.Peek("Edgelb-Error"); len(e) > 0 {
					cur.ByEdgelbError[string(e)]++
				}
				if len(resp.Header.Peek("Cache-Status")) > 0 {
					cur.Stale++
				}
			}
		}()
	}

	// Report seconds as they complete.
	done := make(chan struct{})
	reported := 0
	report := func(upTo int) {
		for ; reported < upTo; reported++ {
			mu.Lock()
			t := seconds[reported]
			mu.Unlock()
			if t == nil {
				t = newTally()
			}
			s := Second{T: reported, Counts: t.Counts, RPS: float64(t.Requests), Latency: t.percentiles()}
			res.Seconds = append(res.Seconds, s)
			if o.OnSecond != nil {
				o.OnSecond(s)
			}
		}
	}
	go func() { wg.Wait(); close(done) }()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
loop:
	for {
		select {
		case <-done:
			break loop
		case <-tick.C:
			// A second is complete once every worker moved past it; allow
			// one request timeout for stragglers.
			report(int((time.Since(start) - o.Timeout) / time.Second))
		}
	}
	res.Elapsed = time.Since(start)
	last := -1
	for s := range seconds {
		last = max(last, s)
	}
	report(last + 1)

	total := newTally()
	for _, t := range seconds {
		total.merge(t)
	}
	res.Counts = total.Counts
	res.Latency = total.percentiles()
	if secs := res.Elapsed.Seconds(); secs > 0 {
		res.RPS = float64(total.Requests) / secs
	}
	return res, nil
}

// clients holds a HostClient per server address.
type clients struct {
	newClient func(addr string) *fasthttp.HostClient
	mu        sync.Mutex
	by        map[string]*fasthttp.HostClient
	// last is the address list last kept, to notice what left it.
	last []string
}

func newClients(newClient func(addr string) *fasthttp.HostClient) *clients {
	return &clients{newClient: newClient, by: map[string]*fasthttp.HostClient{}}
}

// get returns the client of addr.
func (c *clients) get(addr string) *fasthttp.HostClient {
	c.mu.Lock()
	defer c.mu.Unlock()
	hc := c.by[addr]
	if hc == nil {
		hc = c.newClient(addr)
		c.by[addr] = hc
	}
	return hc
}

// keep drops the clients of addresses that left the list, closing their
// idle connections: a server that left may close them while they wait.
func (c *clients) keep(addrs []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if slices.Equal(addrs, c.last) {
		return
	}
	c.last = slices.Clone(addrs)
	for a, hc := range c.by {
		if !slices.Contains(addrs, a) {
			hc.CloseIdleConnections()
			delete(c.by, a)
		}
	}
}

// transportKind names why a request got no response.
func transportKind(err error) string {
	var ne net.Error
	switch {
	case err == fasthttp.ErrTimeout || (errors.As(err, &ne) && ne.Timeout()):
		return "timeout"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "reset"
	case err == fasthttp.ErrConnectionClosed || errors.Is(err, os.ErrClosed):
		return "closed"
	}
	return "other"
}

// Format writes a human-readable summary of r.
func (r *Result) Format() string {
	var b strings.Builder
	fmt.Fprintf(&b, "target %s, %d connections", r.Target, r.Concurrency)
	if r.Rate > 0 {
		fmt.Fprintf(&b, ", rate %.0f/s", r.Rate)
	}
	fmt.Fprintf(&b, ", %s\n", r.Elapsed.Round(time.Millisecond))
	fmt.Fprintf(&b, "requests %d  ok %d  errors %d  stale %d  rps %.0f\n", r.Requests, r.OK, r.Errors, r.Stale, r.RPS)
	l := r.Latency
	fmt.Fprintf(&b, "latency ms  p50 %.3f  p90 %.3f  p99 %.3f  p99.9 %.3f  max %.3f\n", l.P50, l.P90, l.P99, l.P999, l.Max)
	writeMap(&b, "status", r.ByStatus)
	writeMap(&b, "Edgelb-Error", r.ByEdgelbError)
	writeMap(&b, "transport errors", r.ByTransport)
	return b.String()
}

func writeMap[K int | string](b *strings.Builder, title string, m map[K]int64) {
	if len(m) == 0 {
		return
	}
	keys := make([]K, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	fmt.Fprintf(b, "%s:", title)
	for _, k := range keys {
		fmt.Fprintf(b, "  %v=%d", k, m[k])
	}
	b.WriteString("\n")
}
