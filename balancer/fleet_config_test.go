package balancer

import (
	"strings"
	"testing"
	"time"

	"github.com/edgelb/edgelb/balancer/fleet"
)

func TestFleetConfigErrors(t *testing.T) {
	f := func(consul string, wants ...string) {
		t.Helper()
		yaml := "consul: " + consul + "\nservices:\n  web: {static: [127.0.0.1:1]}\n"
		_, err := ParseConfig([]byte(yaml))
		if err == nil {
			t.Fatalf("config accepted:\n%s", yaml)
		}
		for _, w := range wants {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error lacks %q:\n%v", w, err)
			}
		}
	}
	f("{registr: {}}", "consul.registr: unknown key (known keys: address, datacenter, purge, register, scheme, tag_routes, token)")
	f("{register: {nam: x}}", "consul.register.nam: unknown key")
	f("{register: {name: 'edge lb'}}", `consul.register.name: "edge lb" is not a Consul service name`)
	f("{register: {id: 'a/b'}}", `consul.register.id: "a/b" is not a Consul service ID`)
	f("{register: {address: '10.0.0.1:8080'}}", "consul.register.address: \"10.0.0.1:8080\": want a host name or IP address, without a port")
	f("{register: {tags: ['', 'edge.route=*/']}}", "consul.register.tags[0]: empty tag", `consul.register.tags[1]: "edge.route=*/" would make edgelb instances with consul.tag_routes route to edgelb itself`)
	f("{register: {meta: {version: x, 'a b': y, consul-x: z}}}", "consul.register.meta.version: set by edgelb itself",
		`consul.register.meta: key "a b": Consul takes letters, digits`, "consul.register.meta.consul-x: the prefix consul- is Consul's own")
	f("{register: {meta: {big: '"+strings.Repeat("x", 513)+"'}}}", "consul.register.meta.big: value of 513 bytes; Consul takes at most 512")
	f("{register: {check_interval: 500ms}}", "consul.register.check_interval: must be at least 1s")
	f("{register: {check_interval: 2s, check_timeout: 3s}}", "consul.register.check_timeout: must be above 0 and at most check_interval (2s; got 3s)")
	f("{register: {deregister_after: 30s}}", "consul.register.deregister_after: must be at least 1m0s")
	f("{register: {drain_delay: -1s}}", "consul.register.drain_delay: must be between 0 (none) and 10m0s (got -1s)")
	f("{register: {drain_delay: 5}}", "consul.register.drain_delay: duration 5 needs a unit")
	f("{purge: {prefix: edgelb/purge}}", `consul.purge.prefix: "edgelb/purge": must end with /`)
	f("{purge: {prefix: /edgelb/purge/}}", `consul.purge.prefix: "/edgelb/purge/": a Consul key does not start with /`)
	f("{purge: {prefix: 'a b/', retention: 30s}}", "consul.purge.prefix: \"a b/\": white space", "consul.purge.retention: must be at least 1m0s (got 30s)")
	f("{purge: {retain: 1h}}", "consul.purge.retain: unknown key (known keys: disabled, prefix, retention)")
}

func TestFleetConfigDefaults(t *testing.T) {
	cfg := mustConfig(t, "consul: {register: {}}\nservices:\n  web: {static: [127.0.0.1:1]}\n")
	r := cfg.Consul.Register
	if r.Name != "edgelb" || r.CheckInterval != 2*time.Second || r.CheckTimeout != time.Second ||
		r.DeregisterAfter != time.Minute || r.Drain() != fleet.DefaultDrainDelay {
		t.Errorf("consul.register defaults: %+v drain %v", r, r.Drain())
	}
	cfg = mustConfig(t, "consul: {register: {check_interval: 1s, drain_delay: 0s}}\nservices:\n  web: {static: [127.0.0.1:1]}\n")
	if r := cfg.Consul.Register; r.Drain() != 0 || r.CheckTimeout != time.Second {
		t.Errorf("drain_delay 0s: %v, check_timeout %v", r.Drain(), r.CheckTimeout)
	}
	cfg = mustConfig(t, "consul: {}\nservices:\n  web: {static: [127.0.0.1:1]}\n")
	if cfg.Consul.Register != nil {
		t.Error("consul.register set without being asked for")
	}
	if p := cfg.Consul.Purge; p.Disabled || p.Prefix != "edgelb/purge/" || p.Retention != time.Hour {
		t.Errorf("consul.purge defaults: %+v", p)
	}
}
