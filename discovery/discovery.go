// Package discovery finds the instances of services and publishes them as
// immutable sets. Sources are static lists from the config, Consul, and
// DNS for static backends given by host name.
//
// A published Set is never modified after it is handed out: consumers may
// keep it and read it from any goroutine without locking.
package discovery

import (
	"sort"
	"time"
)

// Instance is one reachable endpoint of a service.
type Instance struct {
	// Addr is host:port. It is the instance's identity: health state and
	// connections are keyed by it.
	Addr string `json:"addr"`

	// Weight is the relative share of traffic. 1 is used if not set.
	Weight int `json:"weight,omitempty"`
}

// Route is a routing rule that a source found with the instances, for
// example from an `edge.route=HOST/PATH` tag in Consul.
type Route struct {
	// Host is the exact host to match, or "*" for any host.
	Host string `json:"host"`

	// Path is the path prefix to match; it always starts with "/".
	Path string `json:"path"`
}

// Set is the immutable list of instances of one service as a source last
// saw them.
type Set struct {
	// Service is the name the config and routes use for the service.
	Service string `json:"service"`

	// Instances are sorted by Addr; no Addr appears twice.
	Instances []Instance `json:"instances"`

	// Routes are routing rules carried by the instances themselves (tag
	// routes), sorted by Host then Path. Empty for static services and
	// when tag routes are off.
	Routes []Route `json:"routes,omitempty"`

	// Source names where the set came from: "static", "consul" or "dns".
	Source string `json:"source"`

	// Datacenter is the Consul datacenter the instances are in: the one
	// configured for the service or, for a service with failover
	// datacenters or a prepared query, the one chosen. "" for static
	// services and for the agent's own datacenter when its name is not
	// known.
	Datacenter string `json:"datacenter,omitempty"`

	// UpdatedAt is when the source last confirmed the set.
	UpdatedAt time.Time `json:"updated_at"`
}

// NewSet returns a Set with its instances normalised: sorted by Addr,
// duplicates merged and zero weights set to 1.
func NewSet(service, source string, instances []Instance, updatedAt time.Time) *Set {
	ins := make([]Instance, 0, len(instances))
	seen := make(map[string]bool, len(instances))
	for _, in := range instances {
		if in.Addr == "" || seen[in.Addr] {
			continue
		}
		seen[in.Addr] = true
		if in.Weight <= 0 {
			in.Weight = 1
		}
		ins = append(ins, in)
	}
	sort.Slice(ins, func(i, j int) bool { return ins[i].Addr < ins[j].Addr })
	return &Set{Service: service, Instances: ins, Source: source, UpdatedAt: updatedAt}
}

// Status describes how fresh a source's view is. It is shown in /status and
// decides /readyz.
type Status struct {
	// Source is "static", "consul" or "dns".
	Source string `json:"source"`

	// Service is the watched service, or "" for the source as a whole.
	Service string `json:"service,omitempty"`

	// Name is the host name that a "dns" status is about; the service has
	// one status per name.
	Name string `json:"name,omitempty"`

	// Addrs are the addresses that Name resolves to as served: the last
	// good answer. Only for "dns".
	Addrs []string `json:"addrs,omitempty"`

	// AnsweredBy says where Addrs came from: a DNS server, the hosts file
	// or state_dir. Only for "dns".
	AnsweredBy string `json:"answered_by,omitempty"`

	// LastUpdate is when the source last delivered data successfully.
	LastUpdate time.Time `json:"last_update"`

	// NextResolve is when Name is resolved next. Only for "dns".
	NextResolve time.Time `json:"next_resolve,omitzero"`

	// FailingSince is when the failures that go on now began; zero while
	// the last try succeeded. Only for "dns".
	FailingSince time.Time `json:"failing_since,omitzero"`

	// Failures counts the failed tries in a row. Only for "dns".
	Failures int `json:"failures,omitempty"`

	// LastError is the last error in words, "" if the last call succeeded.
	LastError string `json:"last_error,omitempty"`

	// LastErrorAt is when LastError happened.
	LastErrorAt time.Time `json:"last_error_at,omitzero"`

	// Stale is true while the source serves data it could not confirm:
	// the registry is unreachable or the data came from state_dir.
	Stale bool `json:"stale"`

	// FromDisk is true when the data was loaded from state_dir and not yet
	// confirmed by the registry.
	FromDisk bool `json:"from_disk,omitempty"`

	// Problems lists, in words, the registry data of the last answer that
	// was ignored: malformed route tags, instances without a usable
	// address.
	Problems []string `json:"problems,omitempty"`
}

// Publisher receives sets from a source. Publish replaces the set of
// set.Service; Remove drops a service that no longer exists (for example a
// tag-routed service deregistered from Consul).
//
// Implementations must be safe for concurrent use; sources may call them
// from several goroutines.
type Publisher interface {
	Publish(set *Set)
	Remove(service string)
}
