package health

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/internal/panics"
)

// ActiveConfig configures a periodic probe of each backend. Zero values
// select the defaults.
type ActiveConfig struct {
	// Type is "http" (the default) or "tcp" (connect only).
	Type string `yaml:"type"`

	// Path is the HTTP path probed. "/health" is used if not set.
	Path string `yaml:"path"`

	// Host is the Host header of HTTP probes; the backend address if not
	// set.
	Host string `yaml:"host"`

	// ExpectStatus lists the statuses that pass. Any 2xx or 3xx passes if
	// not set.
	ExpectStatus []int `yaml:"expect_status"`

	// BodyContains, if set, must appear in the response body.
	BodyContains string `yaml:"body_contains"`

	// Interval is the time between probes of a healthy backend.
	// DefaultInterval is used if not set.
	Interval time.Duration `yaml:"interval"`

	// UnhealthyInterval is the time between probes of an unhealthy backend,
	// so that a recovered backend returns fast. Interval/2 is used if not
	// set.
	UnhealthyInterval time.Duration `yaml:"unhealthy_interval"`

	// Timeout bounds one probe. The smaller of 1s and Interval is used if
	// not set.
	Timeout time.Duration `yaml:"timeout"`

	// Rise is how many probes in a row must pass to mark an unhealthy
	// backend healthy. DefaultRise is used if not set.
	Rise int `yaml:"rise"`

	// Fall is how many probes in a row must fail to mark a backend
	// unhealthy. DefaultFall is used if not set.
	Fall int `yaml:"fall"`
}

// Defaults of ActiveConfig.
const (
	DefaultInterval = time.Second
	DefaultRise     = 2
	DefaultFall     = 2
)

// WithDefaults returns c with every unset field set to its default.
func (c ActiveConfig) WithDefaults() ActiveConfig {
	if c.Type == "" {
		c.Type = "http"
	}
	if c.Path == "" {
		c.Path = "/health"
	}
	if c.Interval <= 0 {
		c.Interval = DefaultInterval
	}
	if c.UnhealthyInterval <= 0 {
		c.UnhealthyInterval = c.Interval / 2
	}
	if c.Timeout <= 0 {
		c.Timeout = min(time.Second, c.Interval)
	}
	if c.Rise <= 0 {
		c.Rise = DefaultRise
	}
	if c.Fall <= 0 {
		c.Fall = DefaultFall
	}
	return c
}

// Validate returns every problem of c, each naming its key under prefix.
func (c ActiveConfig) Validate(prefix string) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s.%s: "+format, append([]any{prefix, k}, args...)...))
	}
	if c.Type != "" && c.Type != "http" && c.Type != "tcp" {
		bad("type", "must be http or tcp (got %q)", c.Type)
	}
	if c.Path != "" && !strings.HasPrefix(c.Path, "/") {
		bad("path", "must start with / (got %q)", c.Path)
	}
	for _, s := range c.ExpectStatus {
		if s < 100 || s > 599 {
			bad("expect_status", "%d is not an HTTP status", s)
		}
	}
	if c.Interval < 0 || c.UnhealthyInterval < 0 || c.Timeout < 0 || c.Rise < 0 || c.Fall < 0 {
		bad("", "durations and counts must not be negative")
	}
	d := c.WithDefaults()
	if d.Interval < 10*time.Millisecond {
		bad("interval", "must be at least 10ms (got %s)", d.Interval)
	}
	if d.Timeout > d.Interval {
		bad("timeout", "must not exceed interval (%s)", d.Interval)
	}
	return errs
}

// Checker runs active probes: one per (address, check config), however
// many pools share the backend. It is safe for concurrent use.
type Checker struct {
	log *slog.Logger
	// dial opens the connections of HTTP probes; tests replace it.
	dial func(addr string, timeout time.Duration) (net.Conn, error)

	mu     sync.Mutex
	probes map[probeKey]*probe
	wg     sync.WaitGroup
}

type probeKey struct {
	addr string
	cfg  string
}

type probe struct {
	t    *Target
	cfg  ActiveConfig
	refs int
	stop chan struct{}
}

// NewChecker returns a Checker logging to log (slog.Default() if nil).
func NewChecker(log *slog.Logger) *Checker {
	if log == nil {
		log = slog.Default()
	}
	return &Checker{log: log, dial: fasthttp.DialTimeout, probes: make(map[probeKey]*probe)}
}

// Watch starts probing t with cfg, or joins the probe already running for
// the same address and config. The returned func stops watching; the probe
// ends when its last watcher stops.
func (c *Checker) Watch(t *Target, cfg ActiveConfig) (stop func()) {
	cfg = cfg.WithDefaults()
	key := probeKey{addr: t.addr, cfg: fmt.Sprintf("%+v", cfg)}
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.probes[key]
	if p == nil {
		p = &probe{t: t, cfg: cfg, stop: make(chan struct{})}
		c.probes[key] = p
		t.probes.Add(1)
		c.wg.Add(1)
		go c.run(p)
	}
	p.refs++
	var once sync.Once
	return func() {
		once.Do(func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			p.refs--
			if p.refs == 0 {
				close(p.stop)
				delete(c.probes, key)
				p.t.probes.Add(-1)
			}
		})
	}
}

// Close stops every probe and waits for them.
func (c *Checker) Close() {
	c.mu.Lock()
	for k, p := range c.probes {
		close(p.stop)
		delete(c.probes, k)
		p.t.probes.Add(-1)
	}
	c.mu.Unlock()
	c.wg.Wait()
}

// Probes returns how many probes run, for tests and metrics.
func (c *Checker) Probes() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.probes)
}

// run probes p until it stops. A panic costs that one probe: it is
// counted and logged, says nothing about the backend, and the next probe
// goes out on a new HostClient, since the panicking one may keep its only
// connection slot taken and fail every later probe with ErrNoFreeConns.
func (c *Checker) run(p *probe) {
	defer c.wg.Done()
	hc := c.newHostClient(p)
	defer func() { hc.CloseIdleConnections() }()
	var passes, fails int
	// The first probe goes out at a random point of the first interval,
	// so that probes of many backends do not fire together.
	wait := time.Duration(rand.Int64N(int64(p.cfg.Interval)))
	for {
		timer := time.NewTimer(wait)
		select {
		case <-p.stop:
			timer.Stop()
			return
		case <-timer.C:
		}
		if panics.Health.Run(func() { c.check(hc, p, &passes, &fails) }, c.log, "panic in health probe", "addr", p.t.addr) != nil {
			hc.CloseIdleConnections()
			hc = c.newHostClient(p)
		}
		wait = p.cfg.Interval
		if p.t.activeFailing.Load() {
			wait = p.cfg.UnhealthyInterval
		}
		// Up to 10% jitter keeps probes from synchronising.
		wait += time.Duration(rand.Int64N(int64(wait)/10 + 1))
	}
}

func (c *Checker) newHostClient(p *probe) *fasthttp.HostClient {
	return &fasthttp.HostClient{
		Addr:                      p.t.addr,
		MaxConns:                  1,
		MaxIdemponentCallAttempts: 1,
		NoDefaultUserAgentHeader:  true,
		Name:                      "edgelb-health",
		Dial: func(addr string) (net.Conn, error) {
			return c.dial(addr, p.cfg.Timeout)
		},
	}
}

// check runs one probe and moves the backend to healthy after Rise passes
// in a row, or to unhealthy after Fall failures.
func (c *Checker) check(hc *fasthttp.HostClient, p *probe, passes, fails *int) {
	err := c.probeOnce(hc, p)
	switch {
	case err == nil:
		*passes, *fails = *passes+1, 0
		if *passes >= p.cfg.Rise {
			p.t.setActive(true, fmt.Sprintf("active check passed %d times in a row", *passes))
		}
	case isLocalResourceErr(err):
		// edgelb is out of descriptors or memory: the probe says
		// nothing about the backend either way.
	default:
		*passes, *fails = 0, *fails+1
		if *fails >= p.cfg.Fall {
			p.t.setActive(false, fmt.Sprintf("active check failed %d times in a row, last: %v", *fails, err))
		}
	}
}

// probeOnce runs one probe and returns why it failed, or nil.
func (c *Checker) probeOnce(hc *fasthttp.HostClient, p *probe) error {
	cfg := p.cfg
	if cfg.Type == "tcp" {
		conn, err := net.DialTimeout("tcp", p.t.addr, cfg.Timeout)
		if err != nil {
			return err
		}
		return conn.Close()
	}
	req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
	defer fasthttp.ReleaseRequest(req)
	defer fasthttp.ReleaseResponse(resp)
	req.SetRequestURI("http://" + p.t.addr + cfg.Path)
	if cfg.Host != "" {
		req.Header.SetHost(cfg.Host)
		req.UseHostHeader = true
	}
	if err := hc.DoTimeout(req, resp, cfg.Timeout); err != nil {
		if err == fasthttp.ErrTimeout {
			return fmt.Errorf("GET %s: no answer within %s", cfg.Path, cfg.Timeout)
		}
		return fmt.Errorf("GET %s: %w", cfg.Path, err)
	}
	sc := resp.StatusCode()
	ok := sc >= 200 && sc < 400
	if len(cfg.ExpectStatus) > 0 {
		ok = false
		for _, s := range cfg.ExpectStatus {
			ok = ok || s == sc
		}
	}
	if !ok {
		return fmt.Errorf("GET %s returned %d", cfg.Path, sc)
	}
	if cfg.BodyContains != "" && !bytes.Contains(resp.Body(), []byte(cfg.BodyContains)) {
		return fmt.Errorf("GET %s: body lacks %q", cfg.Path, cfg.BodyContains)
	}
	return nil
}

// isLocalResourceErr reports whether err is edgelb itself running out of
// file descriptors or kernel memory.
func isLocalResourceErr(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}
