package fleet

import (
	"context"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/hashicorp/consul/api"

	"github.com/edgelb/edgelb/discovery"
)

// RegisterConfig is consul.register: how an edgelb instance registers
// itself in Consul. The zero value of every field selects its default.
type RegisterConfig struct {
	// Name is the Consul service name of the fleet. DefaultServiceName
	// is used if not set.
	Name string `yaml:"name"`

	// ID is the instance's Consul service ID. NAME-INSTANCE is used if not
	// set, INSTANCE being the stable ID kept in state_dir/instance_id.
	ID string `yaml:"id"`

	// Address is the host advertised for listen and tls.listen. The host
	// of listen is used if not set, or the Consul node's address when
	// listen has no host or an unspecified one (0.0.0.0, [::]).
	Address string `yaml:"address"`

	// Tags are the instance's Consul tags.
	Tags []string `yaml:"tags"`

	// Meta is the instance's Consul metadata, beside the keys edgelb sets
	// itself (MetaVersion, MetaInstance, MetaHTTPSPort).
	Meta map[string]string `yaml:"meta"`

	// CheckInterval is how often the Consul agent asks the instance's
	// admin /readyz. DefaultCheckInterval is used if not set.
	CheckInterval time.Duration `yaml:"check_interval"`

	// CheckTimeout bounds one such check. DefaultCheckTimeout is used if
	// not set, or CheckInterval when shorter.
	CheckTimeout time.Duration `yaml:"check_timeout"`

	// DeregisterAfter is how long the check may stay critical before
	// Consul removes the instance (one that died without deregistering).
	// DefaultDeregisterAfter is used if not set.
	DeregisterAfter time.Duration `yaml:"deregister_after"`

	// DrainDelay is how long an instance told to stop keeps serving after
	// it deregistered, so that whatever routes by Consul stops sending to
	// it before it stops accepting. DefaultDrainDelay is used if not set;
	// 0 turns it off.
	DrainDelay *time.Duration `yaml:"drain_delay"`
}

// Defaults of RegisterConfig.
const (
	DefaultServiceName     = "edgelb"
	DefaultCheckInterval   = 2 * time.Second
	DefaultCheckTimeout    = time.Second
	DefaultDeregisterAfter = time.Minute
	DefaultDrainDelay      = 5 * time.Second

	// minCheckInterval is the shortest interval a Consul agent runs a
	// check at; it raises shorter ones.
	minCheckInterval = time.Second
	// minDeregisterAfter is the shortest deregister_critical_service_after
	// that Consul honours: its reaper raises shorter ones.
	minDeregisterAfter = time.Minute
	// maxDrainDelay bounds drain_delay: a stop waits that long.
	maxDrainDelay = 10 * time.Minute
)

// Meta keys that edgelb sets on its registration.
const (
	// MetaVersion is edgelb's version (Version).
	MetaVersion = "version"
	// MetaInstance is the stable instance ID.
	MetaInstance = "instance"
	// MetaHTTPSPort is the port of tls.listen, when there is one.
	MetaHTTPSPort = "https_port"
	// MetaPeerFill is where the instance answers its peers' requests for
	// stored copies (consul.peer_fill): host:port of its admin listener,
	// or :port for the host the instance is registered at.
	MetaPeerFill = "peer_fill"
	// TaggedHTTPS is the tagged address of tls.listen.
	TaggedHTTPS = "https"
)

// routeTagPrefix marks the instances that edgelb routes by tag: one on
// edgelb's own registration would route to itself.
const routeTagPrefix = "edge.route="

// ApplyDefaults fills in every unset field that has a default.
func (c *RegisterConfig) ApplyDefaults() {
	if c.Name == "" {
		c.Name = DefaultServiceName
	}
	if c.CheckInterval == 0 {
		c.CheckInterval = DefaultCheckInterval
	}
	if c.CheckTimeout == 0 {
		c.CheckTimeout = min(DefaultCheckTimeout, c.CheckInterval)
	}
	if c.DeregisterAfter == 0 {
		c.DeregisterAfter = DefaultDeregisterAfter
	}
	if c.DrainDelay == nil {
		d := DefaultDrainDelay
		c.DrainDelay = &d
	}
}

// Drain returns drain_delay, or its default.
func (c *RegisterConfig) Drain() time.Duration {
	if c.DrainDelay == nil {
		return DefaultDrainDelay
	}
	return *c.DrainDelay
}

var (
	// serviceNameRE is what Consul accepts as a DNS-compatible service
	// name; other names work over HTTP only.
	serviceNameRE = regexp.MustCompile(`^[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?$`)
	// metaKeyRE is Consul's rule for metadata keys.
	metaKeyRE = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,128}$`)
)

// Validate checks c after ApplyDefaults; it returns every problem, each
// naming its key under path.
func (c *RegisterConfig) Validate(path string) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	if len(c.Name) > 63 || !serviceNameRE.MatchString(c.Name) {
		bad(".name", "%q is not a Consul service name (letters, digits and '-', at most 63, not starting or ending with '-')", c.Name)
	}
	if c.ID != "" && !validID(c.ID) {
		bad(".id", "%q is not a Consul service ID (letters, digits, '-', '_' and '.', at most 128)", c.ID)
	}
	if strings.ContainsAny(c.Address, "/ []") || strings.Count(c.Address, ":") == 1 {
		bad(".address", "%q: want a host name or IP address, without a port (the ports are those of listen and tls.listen)", c.Address)
	}
	for i, t := range c.Tags {
		switch {
		case strings.TrimSpace(t) == "":
			bad(fmt.Sprintf(".tags[%d]", i), "empty tag")
		case strings.HasPrefix(t, routeTagPrefix):
			bad(fmt.Sprintf(".tags[%d]", i), "%q would make edgelb instances with consul.tag_routes route to edgelb itself", t)
		}
	}
	if len(c.Meta) > 64-4 {
		bad(".meta", "%d keys; Consul takes at most 64, 4 of them edgelb's own", len(c.Meta))
	}
	for _, k := range sortedKeys(c.Meta) {
		switch v := c.Meta[k]; {
		case !metaKeyRE.MatchString(k):
			bad(".meta", "key %q: Consul takes letters, digits, '-' and '_', at most 128", k)
		case strings.HasPrefix(k, "consul-"):
			bad(".meta."+k, "the prefix consul- is Consul's own")
		case k == MetaVersion || k == MetaInstance || k == MetaHTTPSPort || k == MetaPeerFill:
			bad(".meta."+k, "set by edgelb itself (%s, %s, %s, %s)", MetaVersion, MetaInstance, MetaHTTPSPort, MetaPeerFill)
		case len(v) > 512:
			bad(".meta."+k, "value of %d bytes; Consul takes at most 512", len(v))
		}
	}
	if c.CheckInterval < minCheckInterval {
		bad(".check_interval", "must be at least %v (Consul runs checks no more often; got %v)", minCheckInterval, c.CheckInterval)
	}
	if c.CheckTimeout <= 0 || c.CheckTimeout > c.CheckInterval {
		bad(".check_timeout", "must be above 0 and at most check_interval (%v; got %v)", c.CheckInterval, c.CheckTimeout)
	}
	if c.DeregisterAfter < minDeregisterAfter {
		bad(".deregister_after", "must be at least %v (Consul does not remove instances sooner; got %v)", minDeregisterAfter, c.DeregisterAfter)
	}
	if d := c.Drain(); d < 0 || d > maxDrainDelay {
		bad(".drain_delay", "must be between 0 (none) and %v (got %v)", maxDrainDelay, d)
	}
	return errs
}

// Registration is what a Registrar registers: an instance's service, with
// an HTTP check on its admin /readyz.
type Registration struct {
	// ID and Name are the service ID and name.
	ID, Name string
	// Address and Port are the client-facing listener; Address may be
	// empty for the node's address.
	Address string
	Port    int
	// Tagged are tagged addresses (TaggedHTTPS for the TLS listener).
	Tagged map[string]api.ServiceAddress
	Tags   []string
	Meta   map[string]string
	// CheckURL is the URL of /readyz, CheckHeader the headers it needs
	// (the admin token).
	CheckURL    string
	CheckHeader map[string][]string
	// CheckInterval, CheckTimeout and DeregisterAfter time the check.
	CheckInterval, CheckTimeout, DeregisterAfter time.Duration
}

// service returns the Consul registration of r.
func (r *Registration) service() *api.AgentServiceRegistration {
	return &api.AgentServiceRegistration{
		ID: r.ID, Name: r.Name, Address: r.Address, Port: r.Port,
		TaggedAddresses: r.Tagged, Tags: r.Tags, Meta: r.Meta,
		Check: &api.AgentServiceCheck{
			Name:                           "edgelb ready",
			Notes:                          "GET " + r.CheckURL + ": 200 once routes are loaded, 503 while starting, shutting down or short of file descriptors",
			HTTP:                           r.CheckURL,
			Method:                         "GET",
			Header:                         r.CheckHeader,
			Interval:                       r.CheckInterval.String(),
			Timeout:                        r.CheckTimeout.String(),
			DeregisterCriticalServiceAfter: r.DeregisterAfter.String(),
		},
	}
}

// RegisterStatus is the registration in /status.
type RegisterStatus struct {
	// ServiceID and Service are the instance's Consul service ID and name.
	ServiceID string `json:"service_id"`
	Service   string `json:"service"`
	// Registered is set while the agent is known to hold the
	// registration: from a registration to the first failed call.
	Registered bool `json:"registered"`
	// RegisteredAt is the last registration; Registrations counts them
	// (more than one after an agent forgot the instance).
	RegisteredAt  time.Time `json:"registered_at,omitzero"`
	Registrations int       `json:"registrations"`
	LastError     string    `json:"last_error,omitempty"`
	LastErrorAt   time.Time `json:"last_error_at,omitzero"`
	// Left is set once the instance deregistered to stop.
	Left bool `json:"left,omitempty"`
}

// Registration metrics.
var (
	registrationsTotal  = metrics.NewCounter(`edgelb_consul_registrations_total`)
	registrationErrors  = metrics.NewCounter(`edgelb_consul_registration_errors_total`)
	registeredInstances atomic.Int64
	_                   = metrics.NewGauge(`edgelb_consul_registered`, func() float64 { return float64(registeredInstances.Load()) })
)

// Registrar keeps an instance registered in Consul: it registers it, and
// again whenever the agent forgets it (a restarted dev agent, a rebuilt
// node), until Leave deregisters it.
//
// Methods are safe for concurrent use.
type Registrar struct {
	client *api.Client
	addr   string // Consul's address, for messages
	log    *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	// again wakes the loop to register reg anew (Update).
	again chan struct{}

	mu         sync.Mutex
	reg        Registration
	st         RegisterStatus
	registered bool // counted in registeredInstances
}

// NewRegistrar returns a Registrar of reg through client, which talks to
// the Consul agent at addr. Start starts it.
func NewRegistrar(client *api.Client, addr string, reg Registration, log *slog.Logger) *Registrar {
	if log == nil {
		log = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Registrar{
		client: client, addr: addr, log: log.With("component", "fleet", "service_id", reg.ID),
		ctx: ctx, cancel: cancel, done: make(chan struct{}), again: make(chan struct{}, 1),
		reg: reg, st: RegisterStatus{ServiceID: reg.ID, Service: reg.Name},
	}
}

// Start registers the instance in the background and keeps it
// registered.
func (r *Registrar) Start() {
	go func() {
		defer close(r.done)
		runAgain(r.ctx, r.log, "panic in Consul registration; starting it again", "register", r.run)
	}()
}

// ID returns the instance's Consul service ID.
func (r *Registrar) ID() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.reg.ID
}

// Update registers reg, which must have the same ID, in place of the
// current registration (new tags, meta or check timing on reload).
func (r *Registrar) Update(reg Registration) {
	r.mu.Lock()
	r.reg = reg
	r.st.Service = reg.Name
	r.mu.Unlock()
	select {
	case r.again <- struct{}{}:
	default:
	}
}

// run registers the instance and then follows its registration on the
// agent with blocking queries: a registration the agent no longer holds
// (404), or an agent that did not answer, is registered again.
func (r *Registrar) run() {
	registered := false
	hash := ""
	failures := 0
	var last time.Time
	for r.ctx.Err() == nil {
		if d := minCallSpacing - time.Since(last); d > 0 && !discovery.SleepCtx(r.ctx, d) {
			return
		}
		last = time.Now()
		if !registered {
			if err := r.register(); err != nil {
				failures++
				r.failed(err, failures)
				if !r.sleep(backoff(failures)) {
					return
				}
				continue
			}
			registered, hash, failures = true, "", 0
		}
		// The blocking call ends early when Update wants a new
		// registration.
		qctx, cancel := context.WithCancel(r.ctx)
		woke := make(chan bool, 1)
		go func() {
			select {
			case <-r.again:
				cancel()
				woke <- true
			case <-qctx.Done():
				woke <- false
			}
		}()
		_, meta, err := r.client.Agent().Service(r.ID(), (&api.QueryOptions{WaitHash: hash, WaitTime: waitTime}).WithContext(qctx))
		cancel()
		update := <-woke
		switch {
		case r.ctx.Err() != nil:
			return
		case update:
			registered = false
		case notFound(err):
			r.log.Warn("the Consul agent no longer holds this instance's registration (restarted or rebuilt?); registering again", "consul", r.addr)
			registered = false
		case err != nil:
			// The agent may come back without the registration: register
			// again as soon as it answers.
			failures++
			registered = false
			r.failed(err, failures)
			if !r.sleep(backoff(failures)) {
				return
			}
		default:
			hash = meta.LastContentHash
		}
	}
}

// sleep waits d, or less when Update comes, and reports whether the
// Registrar is still running.
func (r *Registrar) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-r.ctx.Done():
		return false
	case <-t.C:
	case <-r.again:
	}
	return true
}

// register registers the instance once.
func (r *Registrar) register() error {
	r.mu.Lock()
	reg := r.reg
	r.mu.Unlock()
	ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
	defer cancel()
	err := r.client.Agent().ServiceRegisterOpts(reg.service(), api.ServiceRegisterOpts{ReplaceExistingChecks: true}.WithContext(ctx))
	if err != nil {
		return err
	}
	registrationsTotal.Inc()
	r.mu.Lock()
	first := r.st.Registrations == 0
	r.st.Registered, r.st.RegisteredAt = true, time.Now()
	r.st.Registrations++
	if !r.registered {
		r.registered = true
		registeredInstances.Add(1)
	}
	r.mu.Unlock()
	if first {
		r.log.Info("registered in Consul", "service", reg.Name, "address", reg.Address, "port", reg.Port, "check", reg.CheckURL)
	} else {
		r.log.Info("registered in Consul again", "service", reg.Name)
	}
	return nil
}

// failed records the failures-th failed call in a row.
func (r *Registrar) failed(err error, failures int) {
	registrationErrors.Inc()
	msg := describe(r.addr, err)
	r.mu.Lock()
	r.st.Registered = false
	r.st.LastError, r.st.LastErrorAt = msg, time.Now()
	if r.registered {
		r.registered = false
		registeredInstances.Add(-1)
	}
	r.mu.Unlock()
	if failures == 1 || failures%30 == 0 {
		r.log.Error("Consul registration failing; retrying", "err", msg, "failures", failures)
	}
}

// Leave stops keeping the instance registered and deregisters it, within
// ctx. It is idempotent.
func (r *Registrar) Leave(ctx context.Context) error {
	r.cancel()
	<-r.done
	r.mu.Lock()
	if r.st.Left {
		r.mu.Unlock()
		return nil
	}
	r.st.Left, r.st.Registered = true, false
	if r.registered {
		r.registered = false
		registeredInstances.Add(-1)
	}
	id := r.reg.ID
	r.mu.Unlock()
	err := r.client.Agent().ServiceDeregisterOpts(id, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil && !notFound(err) {
		msg := describe(r.addr, err)
		r.mu.Lock()
		r.st.LastError, r.st.LastErrorAt = msg, time.Now()
		r.mu.Unlock()
		return fmt.Errorf("cannot deregister %s from Consul: %s", id, msg)
	}
	r.log.Info("deregistered from Consul")
	return nil
}

// Status returns the registration's state.
func (r *Registrar) Status() RegisterStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.st
}
