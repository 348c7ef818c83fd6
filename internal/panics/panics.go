// Package panics is where edgelb accounts for the panics it recovers: each
// is logged once, with its component and a bounded stack, and counted in
// edgelb_panics_total{component}.
//
// recover stops a panic only when a deferred function calls it directly,
// so callers recover themselves and hand the value to Recovered, or let
// Run call f under a deferred recover.
package panics

import (
	"fmt"
	"log/slog"
	"runtime"
	"unicode/utf8"

	"github.com/VictoriaMetrics/metrics"
)

// Component is a part of edgelb whose recovered panics are counted apart.
// The set is closed, so that every series is exported, at 0, from the
// start, and an alert on its increase fires at the first panic.
type Component struct {
	name  string
	total *metrics.Counter
}

// The components of edgelb_panics_total.
var (
	// Balancer is request handling in both engines (the event loop and
	// the fasthttp server) and the balancer's background tasks.
	Balancer = newComponent("balancer")
	// Admin is the admin API's handlers.
	Admin = newComponent("admin")
	// Discovery is the Consul watches and what they publish to.
	Discovery = newComponent("discovery")
	// Health is the active probes and outlier detection.
	Health = newComponent("health")
	// Stale is the stale store's saving to and loading from state_dir.
	Stale = newComponent("stale")
	// ACME is the getting and renewing of certificates from an ACME CA.
	ACME = newComponent("acme")
	// Fleet is what makes instances act as one through Consul: the
	// registration, the purge log, the config key and the peer list.
	Fleet = newComponent("fleet")
)

func newComponent(name string) *Component {
	return &Component{name: name, total: metrics.NewCounter(`edgelb_panics_total{component="` + name + `"}`)}
}

// Name returns the component label.
func (c *Component) Name() string { return c.name }

// Total returns how many panics of c have been recovered.
func (c *Component) Total() uint64 { return c.total.Get() }

// Bounds of what a panic puts in the log. The panicking frames come first
// in the stack, so a cut one still shows where it happened.
const (
	maxValueLen = 1 << 10
	maxStackLen = 8 << 10
)

// Recovered counts r, a panic value that the caller's deferred function got
// from recover, and logs msg at error level with the component, attrs, the
// value and the stack, which is still the panicking one while deferred
// functions run. It is safe for concurrent use.
func (c *Component) Recovered(log *slog.Logger, r any, msg string, attrs ...any) {
	c.total.Inc()
	buf := make([]byte, maxStackLen)
	stack := string(buf[:runtime.Stack(buf, false)])
	if len(stack) == maxStackLen {
		stack += "\n...(stack truncated)"
	}
	value := fmt.Sprint(r)
	if len(value) > maxValueLen {
		n := maxValueLen
		for n > 0 && !utf8.RuneStart(value[n]) {
			n--
		}
		value = value[:n] + "...(truncated)"
	}
	args := make([]any, 0, len(attrs)+6)
	args = append(args, "component", c.name)
	args = append(args, attrs...)
	args = append(args, "panic", value, "stack", stack)
	log.Error(msg, args...)
}

// Run calls f, recovering a panic in it as Recovered does. It returns the
// panic's value, or nil if f returned.
func (c *Component) Run(f func(), log *slog.Logger, msg string, attrs ...any) (r any) {
	defer func() {
		if r = recover(); r != nil {
			c.Recovered(log, r, msg, attrs...)
		}
	}()
	f()
	return nil
}
