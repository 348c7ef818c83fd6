package balancer

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/edgelb/edgelb/balancer/fleet"
)

func TestFleetConfigErrors(t *testing.T) {
	f := func(consul string, wants ...string) {
		t.Helper()
		configRefused(t, "consul: "+consul+"\nservices:\n  web: {static: [127.0.0.1:1]}\n", wants...)
	}
	f("{registr: {}}", "consul.registr: unknown key (known keys: address, config_key, datacenter, peer_fill, purge, register, scheme, tag_routes, token)")
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
	f("{config_key: edgelb/config/}", `consul.config_key: "edgelb/config/": a key, not a folder`)
	f("{config_key: edgelb/purge/config}", `consul.config_key: "edgelb/purge/config" is under consul.purge.prefix (edgelb/purge/)`)

	// With config_key the file may leave services and routes to the key;
	// what it has is checked all the same.
	if _, err := ParseConfig([]byte("consul: {config_key: edgelb/config}\n")); err != nil {
		t.Errorf("config_key without services: %v", err)
	}
	if _, err := ParseConfig([]byte("consul: {config_key: edgelb/config}\nroutes: [{service: web}]\n")); err == nil ||
		!strings.Contains(err.Error(), `routes[0].service: unknown service "web"`) {
		t.Errorf("config_key with a route to nothing: %v", err)
	}
	if _, err := ParseConfig([]byte("consul: {}\n")); err == nil || !strings.Contains(err.Error(), "services: no service defined") {
		t.Errorf("consul without config_key nor services: %v", err)
	}
}

// TestFleetConfigKeyValue holds a key's value to the rules of the file.
func TestFleetConfigKeyValue(t *testing.T) {
	file := mustConfig(t, "consul: {config_key: edgelb/config}\n")
	f := func(value string, wants ...string) {
		t.Helper()
		_, err := withRouting(file, []byte(value))
		if err == nil {
			t.Fatalf("value accepted:\n%s", value)
		}
		for _, w := range wants {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error lacks %q:\n%v", w, err)
			}
		}
	}
	f("", "empty: want services and routes")
	f("- a\n", "cannot unmarshal")
	f("tls: {listen: 127.0.0.1:8443}\nbogus: 1\nservices:\n  web: {static: [127.0.0.1:1]}\n",
		"tls: belongs in the config file", "bogus: unknown key (known keys: routes, services)")
	f("services:\n  web: {static: [127.0.0.1:1], retries: 1.5}\nroutes: [{service: web, https_redirect: true}]\n",
		"services.web.retries: must be a whole number", "routes[0].https_redirect: ")
	f("services:\n  web: {static: [127.0.0.1:1], try_timeout: soon}\n", "services.web.try_timeout: cannot unmarshal !!str `soon` into time.Duration (line 2)")

	cfg, err := withRouting(file, []byte("services:\n  web: {static: [127.0.0.1:1], retries: -1}\nroutes: [{host: Shop.Example, service: web}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if sc := cfg.Services["web"]; sc.Retries != 0 || sc.Balance != "p2c" || cfg.Routes[0].Host != "shop.example" || cfg.Routes[0].Path != "/" {
		t.Errorf("defaults and canonical forms: %+v %+v", sc, cfg.Routes[0])
	}
	if file.Services != nil || file.Routes != nil || cfg.Listen != file.Listen {
		t.Errorf("the file's config changed: %+v", file)
	}
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

// TestFleetConfigExamples checks configs/fleet.yaml and the key value of
// configs/fleet-routing.yaml joined to it.
func TestFleetConfigExamples(t *testing.T) {
	file, err := LoadConfig("../configs/fleet.yaml")
	if err != nil {
		t.Fatal(err)
	}
	value, err := os.ReadFile("../configs/fleet-routing.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := withRouting(file, value)
	if err != nil {
		t.Fatal(err)
	}
	if file.Consul.Register == nil || file.Consul.ConfigKey != "edgelb/config" || cfg.Services["web"] == nil || len(cfg.Routes) != 1 {
		t.Fatalf("file %+v, joined %+v", file.Consul, cfg)
	}
}
