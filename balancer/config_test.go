package balancer

import (
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// configRefused parses yaml, which must be refused with an error holding
// each of wants, and returns that error.
func configRefused(t testing.TB, yaml string, wants ...string) error {
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
	return err
}

func TestParseConfigErrors(t *testing.T) {
	f := func(yaml string, wants ...string) {
		t.Helper()
		configRefused(t, yaml, wants...)
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
	f("services:\n  web: {static: [127.0.0.1:1], first_byte_timeout: -1s}\n", "services.web.first_byte_timeout: must not be negative")
	f("services:\n  web: {static: [127.0.0.1:1], first_byte_timeout: 2s, try_timeout: 2s}\n",
		"services.web.first_byte_timeout: must be below try_timeout (2s), which would end the try first: it would never fire")
	// Against try_timeout's default, 5s.
	f("services:\n  web: {static: [127.0.0.1:1], first_byte_timeout: 10s}\n", "services.web.first_byte_timeout: must be below try_timeout (5s)")
	f("services:\n  web: {static: [127.0.0.1:1], first_byte_timeout: 100}\n", "services.web.first_byte_timeout: duration 100 needs a unit")
	f("services:\n  web: {static: [127.0.0.1:1], first_bytes_timeout: 1s}\n", "services.web.first_bytes_timeout: unknown key")
	f("services:\n  web: {static: [127.0.0.1:1]}\nroutes: [{path: api, service: web}, {service: nope}]\n",
		"routes[0].path: must start with /", `routes[1].service: unknown service "nope"`)
	f("services:\n  web: {static: [127.0.0.1:1]}\nroutes: [{service: web}, {host: '*', path: /, service: web}]\n", "routes[1]: host \"*\" path \"/\" already routed by routes[0]")
	f("listen: 127.0.0.1:99999\nservices:\n  web: {static: [127.0.0.1:1]}\n", "listen: invalid address")
	f("services: {}\n", "services: no service defined")
	f("services:\n  web: {static: [127.0.0.1:1], health: {panic_threshold: 150}}\n", "services.web.health.panic_threshold: must be a percentage from 1 to 100, or -1")
	f("services:\n  web: {static: [127.0.0.1:1], health: {slow_start: -1s}}\n", "services.web.health.slow_start: must not be negative")
	f("services:\n  web: {static: [127.0.0.1:1], health: {slowstart: 1s}}\n", "services.web.health.slowstart: unknown key")
	f("services:\n  web: {static: [127.0.0.1:1], health: {passive: {max_ejection_percent: half}}}\n", "services.web.health.passive.max_ejection_percent: cannot unmarshal")
	f("services:\n  web: {static: [127.0.0.1:1], retries: 1.5, health: {passive: {max_ejection_percent: 0.5}}}\n",
		"services.web.retries: must be a whole number, got 1.5", "services.web.health.passive.max_ejection_percent: must be a whole number, got 0.5")
	f("services:\n  web: {static: [127.0.0.1:1], try_timeout: 5, health: {active: {path: /h, interval: 1.5}}}\n",
		"services.web.try_timeout: duration 5 needs a unit (ms, s, m, h), e.g. 5s", "services.web.health.active.interval: duration 1.5 needs a unit")
	f("services:\n  web: {static: [127.0.0.1:1], health: {passive: {max_ejection_percent: 200, latency_factor: 1}}}\n",
		"services.web.health.passive.max_ejection_percent: must be a percentage from 1 to 100 (got 200)",
		"services.web.health.passive.latency_factor: must be more than 1")
	f("services:\n  web: {static: [127.0.0.1:1], health: {passive: {interval: 1s, window: 100ms}}}\n", "services.web.health.passive.window: must not be shorter than interval (1s)")
	f("server: {batch_wait: 5ms}\nservices:\n  web: {static: [127.0.0.1:1]}\n", "server.batch_wait: must be between 0 (off) and 1ms (got 5ms)")
	f("server: {batch_wait: -1us}\nservices:\n  web: {static: [127.0.0.1:1]}\n", "server.batch_wait: must be between 0 (off) and 1ms (got -1µs)")
	f("server: {batch_wait: 20}\nservices:\n  web: {static: [127.0.0.1:1]}\n", "server.batch_wait: duration 20 needs a unit")
	f("server: {header_timeout: 50ms}\nservices:\n  web: {static: [127.0.0.1:1]}\n", "server.header_timeout: must be at least 100ms (got 50ms)")
	f("server: {header_timeout: -1s}\nservices:\n  web: {static: [127.0.0.1:1]}\n", "server.header_timeout: must be at least 100ms (got -1s)")
	f("server: {header_timeout: 10}\nservices:\n  web: {static: [127.0.0.1:1]}\n", "server.header_timeout: duration 10 needs a unit")
	f("server: {max_conns_per_ip: -1}\nservices:\n  web: {static: [127.0.0.1:1]}\n", "server.max_conns_per_ip: must not be negative (got -1); 0 or unset turns the cap off")
	f("server: {max_conns_per_ip: 2.5}\nservices:\n  web: {static: [127.0.0.1:1]}\n", "server.max_conns_per_ip: must be a whole number, got 2.5")
	f("server: {max_conn_per_ip: 3}\nservices:\n  web: {static: [127.0.0.1:1]}\n", "server.max_conn_per_ip: unknown key")
	f("stale_store: {statuses: [999], refresh_interval: -1s}\nservices:\n  web: {static: [127.0.0.1:1]}\n",
		"stale_store.statuses[0]: 999 is not an HTTP status (100 to 599)", "stale_store.refresh_interval: must not be negative (got -1s)")
	f("stale_store: {max_bytes: -1, max_entry_bytes: -2, statuses: [200, 99]}\nservices:\n  web: {static: [127.0.0.1:1]}\n",
		"stale_store.max_bytes: must not be negative (got -1)", "stale_store.max_entry_bytes: must not be negative (got -2)",
		"stale_store.statuses[1]: 99 is not an HTTP status")
	// Every problem is reported at once.
	f("bogus: 1\nservices:\n  web: {static: [x]}\nroutes: [{service: y}]\n", "bogus: unknown key", "services.web.static[0]", "routes[0].service")
}

func TestParseConfigFailoverErrors(t *testing.T) {
	f := func(consul, service string, wants ...string) {
		t.Helper()
		err := configRefused(t, "consul: {"+consul+"}\nservices:\n  web:\n    consul: {"+service+"}\n", wants...)
		if n := strings.Count("\n"+err.Error(), "\nservices.web.consul"); n != len(wants) {
			t.Errorf("%d errors about services.web.consul, want %d:\n%v", n, len(wants), err)
		}
	}
	f("", "name: web, failover: [dc2], failover_hld: 5s", "services.web.consul.failover_hld: unknown key (known keys: datacenter, failover, failover_hold, name, query, tags)")
	f("", "name: web, failover: [{dc: dc2}]", "services.web.consul.failover: cannot unmarshal !!map into string")
	f("", "name: web, failover: dc2", "services.web.consul.failover: cannot unmarshal")
	f("", "name: web, failover: ['', dc2, dc2]", "services.web.consul.failover[0]: empty datacenter name", `services.web.consul.failover[2]: "dc2" is listed twice (also failover[1])`)
	f("datacenter: dc1", "name: web, failover: [dc2, dc1]", `services.web.consul.failover[1]: "dc1" is the service's own datacenter (consul.datacenter); list only the other datacenters to fail over to`)
	f("", "name: web, datacenter: dc3, failover: [dc3]", `services.web.consul.failover[0]: "dc3" is the service's own datacenter (services.web.consul.datacenter)`)
	f("", "name: '', failover: [dc2]", "services.web.consul.name: missing; set name (a Consul service) or query (a Consul prepared query)")
	f("", "query: web-q, failover: [dc2], failover_hold: -1s",
		"services.web.consul.failover: does not go with query", "services.web.consul.failover_hold: must not be negative")
	f("", "name: web, failover_hold: 1m", "services.web.consul.failover_hold: has no effect without failover or query")
	f("", "name: web, failover: [dc2], failover_hold: 10", "services.web.consul.failover_hold: duration 10 needs a unit", "services.web.consul.failover_hold: cannot unmarshal")

	cfg, err := ParseConfig([]byte("consul: {}\nservices:\n  web: {consul: {name: web, failover: [dc2, dc3]}}\n  q: {consul: {query: web-q}}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c := cfg.Services["web"].Consul; strings.Join(c.Failover, ",") != "dc2,dc3" || c.FailoverHold != 0 {
		t.Fatalf("failover: %+v", c)
	}
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
	if web.Balance != "p2c" || web.TryTimeout != DefaultTryTimeout || web.FirstByteTimeout != 0 || web.Retries != DefaultRetries || web.Stale.MaxStale != 24*time.Hour {
		t.Errorf("service defaults: %+v", web)
	}
	if web.Static[1].Addr != "127.0.0.1:9002" || web.Static[1].Weight != 3 {
		t.Errorf("static with weight: %+v", web.Static)
	}
	if cfg.Routes[1].Host != "api.example.com" {
		t.Errorf("route host not lower-cased: %q", cfg.Routes[1].Host)
	}
	if w, off := cfg.Server.batchWait(true), cfg.Server.batchWait(false); w != DefaultBatchWait || off != 0 {
		t.Errorf("server.batch_wait defaults: %v with io_uring, %v without; want %v and 0", w, off, DefaultBatchWait)
	}
	if sc := cfg.Server; sc.HeaderTimeout != DefaultHeaderTimeout || sc.MaxConnsPerIP != 0 {
		t.Errorf("server.header_timeout, max_conns_per_ip defaults: %v %d", sc.HeaderTimeout, sc.MaxConnsPerIP)
	}
	cfg, err = ParseConfig([]byte("server: {header_timeout: 3s, max_conns_per_ip: 50}\nservices:\n  web: {static: [127.0.0.1:1]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if sc := cfg.Server; sc.HeaderTimeout != 3*time.Second || sc.MaxConnsPerIP != 50 {
		t.Errorf("server.header_timeout, max_conns_per_ip: %v %d", sc.HeaderTimeout, sc.MaxConnsPerIP)
	}
	cfg, err = ParseConfig([]byte("services:\n  web: {static: [127.0.0.1:1], first_byte_timeout: 100ms, try_timeout: 2s}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if web := cfg.Services["web"]; web.FirstByteTimeout != 100*time.Millisecond || web.TryTimeout != 2*time.Second {
		t.Errorf("first_byte_timeout, try_timeout: %v %v", web.FirstByteTimeout, web.TryTimeout)
	}
	cfg, err = ParseConfig([]byte("stale_store: {statuses: [200, 404], refresh_interval: 2s}\nservices:\n  web: {static: [127.0.0.1:1]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if sc := cfg.StaleStore; len(sc.Statuses) != 2 || sc.RefreshInterval != 2*time.Second {
		t.Errorf("stale_store: %+v", sc)
	}
	for yaml, want := range map[string]time.Duration{"0s": 0, "0": 0, "50us": 50 * time.Microsecond, "1ms": time.Millisecond} {
		cfg, err := ParseConfig([]byte("server: {batch_wait: " + yaml + "}\nservices:\n  web: {static: [127.0.0.1:1]}\n"))
		if err != nil {
			t.Fatalf("batch_wait %s: %v", yaml, err)
		}
		if w := cfg.Server.batchWait(false); w != want {
			t.Errorf("batch_wait %s: got %v", yaml, w)
		}
	}
}

func TestParseBackupConfig(t *testing.T) {
	ok := func(yaml string, check func(b *BackupConfig) bool) {
		t.Helper()
		cfg, err := ParseConfig([]byte(yaml))
		if err != nil {
			t.Fatalf("%s: %v", yaml, err)
		}
		if b := cfg.Services["web"].Backup; b == nil || !check(b) {
			t.Errorf("%s: got %+v", yaml, b)
		}
	}
	ok("services:\n  web: {static: [127.0.0.1:1], backup: [127.0.0.1:2, {addr: 127.0.0.1:3, weight: 2}]}\n", func(b *BackupConfig) bool {
		return b.Consul == nil && len(b.Static) == 2 && b.Static[0].Addr == "127.0.0.1:2" && b.Static[1].Weight == 2
	})
	ok("services:\n  web:\n    static: [127.0.0.1:1]\n    backup: {static: [127.0.0.1:2]}\n", func(b *BackupConfig) bool {
		return len(b.Static) == 1 && b.Static[0].Addr == "127.0.0.1:2"
	})
	ok("consul: {}\nservices:\n  web:\n    consul: {name: web}\n    backup: {consul: {name: web-dr, tags: [edge]}}\n", func(b *BackupConfig) bool {
		return b.Consul != nil && b.Consul.Name == "web-dr" && len(b.Consul.Tags) == 1 && b.Static == nil
	})
	// The same Consul service with other tags is another set.
	ok("consul: {}\nservices:\n  web:\n    consul: {name: web, tags: [primary]}\n    backup: {consul: {name: web, tags: [standby]}}\n", func(b *BackupConfig) bool {
		return b.Consul.Name == "web"
	})
	cfg := mustConfig(t, "services:\n  web: {static: [127.0.0.1:1]}\n")
	if cfg.Services["web"].Backup != nil {
		t.Fatal("a backup set where none is configured")
	}
}

func TestParseBackupConfigErrors(t *testing.T) {
	f := func(yaml string, wants ...string) {
		t.Helper()
		configRefused(t, yaml, wants...)
	}
	svc := func(body string) string { return "services:\n  web:\n    static: [127.0.0.1:1, 127.0.0.1:2]\n" + body }
	f(svc("    backup: [127.0.0.1:3, nope, 127.0.0.1:2]\n"),
		`services.web.backup[1]: invalid address "nope"`,
		"services.web.backup[2]: 127.0.0.1:2 is also a primary backend (services.web.static[1]); a backend is a primary or a backup, not both")
	f(svc("    backup: {static: [127.0.0.1:99999, {addr: 127.0.0.1:1, weight: -1}]}\n"),
		`services.web.backup.static[0]: invalid address "127.0.0.1:99999": port must be a number up to 65535`,
		"services.web.backup.static[1].weight: must not be negative",
		"services.web.backup.static[1]: 127.0.0.1:1 is also a primary backend (services.web.static[0])")
	f(svc("    backup: [127.0.0.1:3, 127.0.0.1:3]\n"), "services.web.backup[1]: 127.0.0.1:3 is listed twice (also services.web.backup[0])")
	f(svc("    backup: {}\n"), "services.web.backup: no backends")
	f(svc("    backup: []\n"), "services.web.backup: no backends")
	f(svc("    backup: {static: [127.0.0.1:3], consul: {name: dr}}\n"), "services.web.backup: set either consul or static, not both")
	f(svc("    backup: {consul: {name: dr}}\n"), "services.web.backup.consul: needs the top-level consul block")
	f("consul: {}\n"+svc("    backup: {consul: {tags: [x]}}\n"), "services.web.backup.consul.name: missing")
	f("consul: {}\nservices:\n  web: {consul: {name: web}, backup: {consul: {name: web}}}\n",
		"services.web.backup.consul: watches the same Consul service as services.web.consul")
	f(svc("    backup: {statik: [127.0.0.1:3]}\n"), "services.web.backup.statik: unknown key (known keys: consul, static)")
	f(svc("    backup: [{addr: 127.0.0.1:3, wieght: 2}]\n"), "services.web.backup[0].wieght: unknown key")
	f(svc("    backup: {consul: {name: dr, tgas: [x]}}\n"), "services.web.backup.consul.tgas: unknown key")
	f(svc("    backup: 127.0.0.1:3\n"), `services.web.backup: want a list of host:port, {static: [...]} or {consul: {name: ...}} (got "127.0.0.1:3") (line 4)`)
	f("consul: {}\nservices:\n  web: {consul: {name: web}, backup: {consul: {name: dr}}}\n  web/backup: {static: [127.0.0.1:1]}\n",
		"services.web/backup: the name is taken: the Consul backup set of services.web reports under it")
}

func TestParseHealthConfig(t *testing.T) {
	f := func(health string, check func(h *HealthConfig) bool) {
		t.Helper()
		cfg, err := ParseConfig([]byte("services:\n  web: {static: [127.0.0.1:1], health: " + health + "}\n"))
		if err != nil {
			t.Fatalf("%s: %v", health, err)
		}
		if h := &cfg.Services["web"].Health; !check(h) {
			t.Errorf("%s: got %+v", health, *h)
		}
	}
	f("{}", func(h *HealthConfig) bool { return h.PanicThreshold == 50 && h.SlowStart == 0 })
	f("{panic_threshold: -1, slow_start: 30s}", func(h *HealthConfig) bool { return h.PanicThreshold == -1 && h.SlowStart == 30*time.Second })
	f("{passive: {max_ejection_percent: 30, interval: 500ms, window: 5s, min_requests: 10, min_hosts: 2, success_rate_stdev_factor: 2.5, failure_percentage: -1, latency_factor: 10, latency_min: 20ms}}",
		func(h *HealthConfig) bool {
			p := h.Passive
			return p.MaxEjectionPercent == 30 && p.Interval == 500*time.Millisecond && p.Window == 5*time.Second && p.MinRequests == 10 &&
				p.MinHosts == 2 && p.SuccessRateStdevFactor == 2.5 && p.FailurePercentage == -1 && p.LatencyFactor == 10 && p.LatencyMin == 20*time.Millisecond
		})
}

func TestParseConfigAdminAccess(t *testing.T) {
	dir := t.TempDir()
	file := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	const svc = "services:\n  web: {static: [127.0.0.1:1]}\n"
	bad := func(yaml string, wants ...string) {
		t.Helper()
		err := configRefused(t, yaml+svc, wants...)
		if strings.Contains(err.Error(), "short-secret") || strings.Contains(err.Error(), "0123456789 abcdef") {
			t.Errorf("the error shows the token:\n%v", err)
		}
	}
	bad("admin_token: short-secret\n", "admin_token: the token has 12 characters; use at least 16")
	bad("admin_token: \"0123456789 abcdef\"\n", "admin_token: character 11 of the token is ' '")
	bad("admin_token: \"0123456789abcdef\\u00e9\"\n", "admin_token: character 17 of the token is not ASCII")
	bad("admin_token: \"================\"\n", "admin_token: the token must hold more than =")
	bad("admin_token: 0123456789abcdef\nadmin_token_file: "+file("t1", "0123456789abcdef")+"\n", "admin_token: set either admin_token or admin_token_file, not both")
	bad("admin_token_file: "+filepath.Join(dir, "missing")+"\n", "admin_token_file: cannot read the token: open ", "no such file")
	bad("admin_token_file: "+file("empty", " \n")+"\n", "admin_token_file: \""+filepath.Join(dir, "empty")+"\" is empty")
	bad("admin_token_file: "+file("short", "short-secret\n")+"\n", "admin_token_file: the token has 12 characters")
	bad("admin_hosts: [edge-1.internal:9901]\n", `admin_hosts[0]: "edge-1.internal:9901": want a host name without a port, such as "edge-1.internal"`)
	bad("admin_hosts: [ok.example, '*.example', 'http://x', '']\n",
		`admin_hosts[1]: "*.example" is not a host name`, `admin_hosts[2]: "http://x" is not a host name`, `admin_hosts[3]: "" is not a host name`)
	bad("admin_hosts: edge-1\n", "admin_hosts: cannot unmarshal")
	bad("admin_tokn: x\n", "admin_tokn: unknown key")

	f := func(yaml string, check func(c *Config) bool) {
		t.Helper()
		cfg, err := ParseConfig([]byte(yaml + svc))
		if err != nil {
			t.Fatalf("%s: %v", yaml, err)
		}
		if !check(cfg) {
			t.Errorf("%s: got token %q, hosts %q", yaml, cfg.AdminToken, cfg.AdminHosts)
		}
	}
	f("", func(c *Config) bool { return c.AdminToken == "" && len(c.AdminHosts) == 0 })
	f("admin_token: abcdefghijklmnop+/_-.~==\n", func(c *Config) bool { return c.AdminToken == "abcdefghijklmnop+/_-.~==" })
	f("admin_token_file: "+file("ok", "\n  0123456789abcdef0123\r\n")+"\n", func(c *Config) bool { return c.AdminToken == "0123456789abcdef0123" })
	f("admin_hosts: [Edge-1.Internal, 10.0.0.5, '::1', edge_2]\n", func(c *Config) bool {
		return strings.Join(c.AdminHosts, ",") == "edge-1.internal,10.0.0.5,::1,edge_2"
	})
}

// TestParseConfigTLS: the tls block, https_redirect and hsts are checked
// with their full key paths, and certificates are loaded at parse time, so
// that a bad pair refuses the config (at start, in -check, on reload).
func TestParseConfigTLS(t *testing.T) {
	pki := newTestPKI(t)
	cert, key := pki.issue("shop", "shop.example")
	cert2, key2 := pki.issue("api", "api.example")
	noName, noNameKey := pki.issue("bare")
	svc := "services:\n  web: {static: [127.0.0.1:1]}\n"
	tlsBlock := "tls: {certs: [{cert: " + cert + ", key: " + key + "}]}\n"
	bad := func(yaml string, wants ...string) {
		t.Helper()
		configRefused(t, yaml, wants...)
	}
	bad("tls: {listen: 127.0.0.1:8443}\n"+svc, "tls.certs: missing: tls.listen needs at least one certificate ({cert: FILE, key: FILE})")
	bad("tls: {}\n"+svc, "tls.certs: missing")
	bad("tls: {certs: [{cert: "+cert+", key: "+key2+"}]}\n"+svc,
		`tls.certs[0]: key "`+key2+`" does not belong to certificate "`+cert+`"`)
	bad("tls: {certs: [{cert: "+cert+", key: "+key+"}, {cert: /nonexistent/c.pem, key: "+key+"}]}\n"+svc,
		`tls.certs[1]: cannot read certificate "/nonexistent/c.pem"`)
	bad("tls: {certs: [{cert: "+cert+"}]}\n"+svc, "tls.certs[0]: needs both cert and key")
	bad("tls: {certs: [{cert: "+cert+", key: "+key+"}, {cert: "+noName+", key: "+noNameKey+"}]}\n"+svc,
		`tls.certs[1]: certificate "`+noName+`" holds no DNS name`)
	bad("tls: {certs: [{cert: "+cert+", key: "+key+"}], min_version: 1.1}\n"+svc, `tls.min_version: must be "1.2" or "1.3" (got "1.1")`)
	bad("tls: {certs: [{cert: "+cert+", key: "+key+"}], listen: 127.0.0.1:8080}\n"+svc, "tls.listen: must differ from listen (127.0.0.1:8080)")
	bad("tls: {certs: [{cert: "+cert+", key: "+key+"}], listen: nope}\n"+svc, `tls.listen: invalid address "nope"`)
	bad("tls: {certs: [{cert: "+cert+", key: "+key+"}], session_tickets: {rotate: 10s, keys: 0}}\n"+svc,
		"tls.session_tickets.rotate: must be at least 1m0s (got 10s)")
	bad("tls: {certs: [{cert: "+cert+", key: "+key+"}], session_tickets: {keys: 100}}\n"+svc, "tls.session_tickets.keys: must be from 1 to 64 (got 100)")
	bad("tls: {certs: [{cert: "+cert+", key: "+key+"}], acme: {email: x}}\n"+svc, `tls.acme.email: "x" is not an email address`, "tls.acme.domains: missing")
	bad(svc+"routes: [{service: web, https_redirect: true, hsts: {}}]\n",
		"routes[0].https_redirect: needs the tls block", "routes[0].hsts: needs the tls block")
	bad(tlsBlock+svc+"routes: [{service: web, hsts: {max_age: 100}}]\n", "routes[0].hsts.max_age: duration 100 needs a unit (s, m, h, d, y), e.g. 100d")
	bad(tlsBlock+svc+"routes: [{service: web, hsts: {max_age: soon}}]\n", `routes[0].hsts.max_age: invalid duration "soon"`)
	bad(tlsBlock+svc+"routes: [{service: web, hsts: {preload: true, max_age: 30d}}]\n",
		"routes[0].hsts.preload: needs include_subdomains: true", "routes[0].hsts.max_age: must be at least 1y with preload (got 30d)")

	good := func(yaml string) *Config {
		t.Helper()
		cfg, err := ParseConfig([]byte(yaml))
		if err != nil {
			t.Fatalf("%v\n%s", err, yaml)
		}
		return cfg
	}
	cfg := good(tlsBlock + svc + "routes: [{service: web, https_redirect: true, hsts: {}}, {path: /a, service: web, hsts: {max_age: 0}}, " +
		"{path: /b, service: web, hsts: {max_age: 2y, include_subdomains: true, preload: true}}, {path: /c, service: web, hsts: {max_age: 12h}}]\n")
	if tc := cfg.TLS; tc.Listen != DefaultTLSListen || tc.MinVersion != "1.2" || tc.SessionTickets.Rotate != time.Hour || tc.SessionTickets.Keys != 4 {
		t.Errorf("tls defaults: %+v", tc)
	}
	for i, want := range []string{"max-age=31536000", "max-age=0", "max-age=63072000; includeSubDomains; preload", "max-age=43200"} {
		if got := string(cfg.Routes[i].HSTS.value); got != want {
			t.Errorf("routes[%d].hsts: %q, want %q", i, got, want)
		}
	}
	cfg = good("tls: {certs: [{cert: " + cert + ", key: " + key + "}, {cert: " + cert2 + ", key: " + key2 + "}], min_version: 1.3}\n" + svc)
	if cfg.TLS.minVersion != tls.VersionTLS13 || len(cfg.TLS.certs.Certificates()) != 2 {
		t.Errorf("min_version 1.3 with two certificates: %+v", cfg.TLS)
	}
}

// The websocket keys: per service a mapping, or a bool short for
// {enabled: BOOL}; per route a bool. Every mistake names its key.
func TestWebSocketConfig(t *testing.T) {
	bad := func(yaml string, wants ...string) {
		t.Helper()
		configRefused(t, yaml, wants...)
	}
	bad("services:\n  web: {static: [127.0.0.1:1], websocket: {idle_timeout: -1s, max_tunnels: -5}}\n",
		"services.web.websocket.idle_timeout: must not be negative", "services.web.websocket.max_tunnels: must not be negative (got -5)")
	bad("services:\n  web: {static: [127.0.0.1:1], websocket: {idle_timeout: 30}}\n", "services.web.websocket.idle_timeout: duration 30 needs a unit")
	bad("services:\n  web: {static: [127.0.0.1:1], websocket: {idle: 1m}}\n", "services.web.websocket.idle: unknown key (known keys: enabled, half_closed_timeout, idle_timeout, max_tunnels)")
	bad("services:\n  web: {static: [127.0.0.1:1], websocket: maybe}\n", "services.web.websocket: cannot unmarshal")
	bad("services:\n  web: {static: [127.0.0.1:1]}\nroutes: [{service: web, websocket: sometimes}]\n", "routes[0].websocket: cannot unmarshal")
	bad("services:\n  web: {static: [127.0.0.1:1]}\nroutes: [{service: web, websockets: true}]\n", "routes[0].websockets: unknown key")

	f := func(yaml string, enabled bool, idle time.Duration, maxTunnels int, route bool) {
		t.Helper()
		cfg, err := ParseConfig([]byte(yaml))
		if err != nil {
			t.Fatalf("%s: %v", yaml, err)
		}
		ws := cfg.Services["web"].WebSocket
		if ws.enabled() != enabled || ws.IdleTimeout != idle || ws.MaxTunnels != maxTunnels {
			t.Errorf("%s: enabled %v idle %v max %d", yaml, ws.enabled(), ws.IdleTimeout, ws.MaxTunnels)
		}
		if got := upgrades(cfg.Routes[0].WebSocket, cfg.Services["web"]); got != route {
			t.Errorf("%s: the route tunnels: %v", yaml, got)
		}
	}
	const svc = "services:\n  web: {static: [127.0.0.1:1]"
	f(svc+"}\nroutes: [{service: web}]\n", true, DefaultTunnelIdleTimeout, DefaultMaxTunnels, true)
	f(svc+", websocket: false}\nroutes: [{service: web}]\n", false, DefaultTunnelIdleTimeout, DefaultMaxTunnels, false)
	f(svc+", websocket: {idle_timeout: 10m, max_tunnels: 50}}\nroutes: [{service: web}]\n", true, 10*time.Minute, 50, true)
	f(svc+"}\nroutes: [{service: web, websocket: false}]\n", true, DefaultTunnelIdleTimeout, DefaultMaxTunnels, false)
	f(svc+", websocket: {enabled: false}}\nroutes: [{service: web, websocket: true}]\n", false, DefaultTunnelIdleTimeout, DefaultMaxTunnels, true)
}
