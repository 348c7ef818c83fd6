package balancer

import (
	"strings"
	"testing"
	"time"
)

func TestParseConfigErrors(t *testing.T) {
	f := func(yaml string, wants ...string) {
		t.Helper()
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
	f("", "config is empty")
	f("listen: [", "cannot parse YAML")
	f("lisen: x\nservices: {a: {static: [127.0.0.1:1]}}", "lisen: unknown key")
	f("services:\n  web:\n    static: [127.0.0.1:1]\n    helth: {}\n", "services.web.helth: unknown key")
	f("services:\n  web:\n    static: [127.0.0.1:1]\n    health: {passive: {bogus: 1}}\n", "services.web.health.passive.bogus: unknown key")
	f("services:\n  web: {static: [127.0.0.1:1], try_timeout: soon}\n", "services.web.try_timeout: cannot unmarshal")
	f("services:\n  web: {static: [nope]}\n", "services.web.static[0]: invalid address \"nope\"")
	f("services:\n  web: {}\n", "services.web: no backends")
	f("services:\n  web: {static: [127.0.0.1:1], consul: {name: web}}\n", "services.web: set either consul or static, not both")
	f("services:\n  web: {consul: {name: web}}\n", "services.web.consul: needs the top-level consul block")
	f("services:\n  web: {static: [127.0.0.1:1], balance: fastest}\n", `services.web.balance: unknown policy "fastest"`)
	f("services:\n  web: {static: [127.0.0.1:1], try_timeout: 20s, timeout: 10s}\n", "services.web.try_timeout: must not exceed timeout")
	f("services:\n  web: {static: [127.0.0.1:1]}\nroutes: [{path: api, service: web}, {service: nope}]\n",
		"routes[0].path: must start with /", `routes[1].service: unknown service "nope"`)
	f("services:\n  web: {static: [127.0.0.1:1]}\nroutes: [{service: web}, {host: '*', path: /, service: web}]\n", "routes[1]: host \"*\" path \"/\" already routed by routes[0]")
	f("listen: 127.0.0.1:99999\nservices:\n  web: {static: [127.0.0.1:1]}\n", "listen: invalid address")
	f("services: {}\n", "services: no service defined")
	// Every problem is reported at once.
	f("bogus: 1\nservices:\n  web: {static: [x]}\nroutes: [{service: y}]\n", "bogus: unknown key", "services.web.static[0]", "routes[0].service")
}

func TestParseConfigDefaults(t *testing.T) {
	cfg, err := ParseConfig([]byte(`
consul: {tag_routes: true}
services:
  web:
    static: [127.0.0.1:9001, {addr: 127.0.0.1:9002, weight: 3}]
    health: {active: {path: /health, interval: 1s}}
    stale: {max_stale: 24h}
  api:
    consul: {name: api, tags: [v2]}
routes:
  - {host: "*", path: /, service: web}
  - {host: API.example.com, path: /v2, service: api}
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != DefaultListen || cfg.Admin != DefaultAdmin || cfg.StateDir != DefaultStateDir {
		t.Errorf("listener defaults: %q %q %q", cfg.Listen, cfg.Admin, cfg.StateDir)
	}
	if cfg.Consul.Address != "127.0.0.1:8500" {
		t.Errorf("consul address default: %q", cfg.Consul.Address)
	}
	web := cfg.Services["web"]
	if web.Balance != "p2c" || web.TryTimeout != DefaultTryTimeout || web.Retries != DefaultRetries || web.Stale.MaxStale != 24*time.Hour {
		t.Errorf("service defaults: %+v", web)
	}
	if web.Static[1].Addr != "127.0.0.1:9002" || web.Static[1].Weight != 3 {
		t.Errorf("static with weight: %+v", web.Static)
	}
	if cfg.Routes[1].Host != "api.example.com" {
		t.Errorf("route host not lower-cased: %q", cfg.Routes[1].Host)
	}
}
