package scenario

import (
	"os"
	"strings"
	"testing"
)

func TestPeerConfigsAreEquivalent(t *testing.T) {
	origins := []string{"127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"}
	f := func(name, config string, wants ...string) {
		t.Helper()
		for _, w := range append(wants, origins...) {
			if !strings.Contains(config, w) {
				t.Errorf("%s config lacks %q:\n%s", name, w, config)
			}
		}
	}
	f("edgelb", EdgeConfig(origins), "connect_timeout: 1s", "try_timeout: 1s", "retries: 2", "active: {path: /health, interval: 1s}")
	f("nginx", NginxConfig("127.0.0.1:8000", "/tmp/x", origins),
		"listen 127.0.0.1:8000;", "worker_processes 1;", "keepalive 128;", "least_conn;", "max_fails=3 fail_timeout=5s",
		"proxy_next_upstream error timeout invalid_header http_502 http_503 http_504;", "proxy_next_upstream_tries 3;",
		"proxy_connect_timeout 1000ms;", "proxy_read_timeout 1000ms;", `proxy_set_header Connection "";`, "pid /tmp/x/nginx.pid;")
	f("haproxy", HAProxyConfig("127.0.0.1:8000", origins),
		"bind 127.0.0.1:8000", "nbthread 1", "http-reuse always", "balance leastconn", "option redispatch", "retries 2",
		"retry-on all-retryable-errors", "option httpchk GET /health", "check inter 1s fall 2 rise 2", "on-error mark-down",
		"timeout connect 1000ms", "timeout server 1000ms")
}

func TestPeerConfigsWithBackups(t *testing.T) {
	origins, backups := []string{"127.0.0.1:9001", "127.0.0.1:9002"}, []string{"127.0.0.1:9101"}
	f := func(name, config string, wants ...string) {
		t.Helper()
		for _, w := range wants {
			if !strings.Contains(config, w) {
				t.Errorf("%s config lacks %q:\n%s", name, w, config)
			}
		}
	}
	f("edgelb", EdgeConfig(origins, backups...), "static: [127.0.0.1:9001, 127.0.0.1:9002]\n    backup: [127.0.0.1:9101]\n")
	f("nginx", NginxConfig("127.0.0.1:8000", "/tmp/x", origins, backups...), "server 127.0.0.1:9101 max_fails=3 fail_timeout=5s backup;")
	f("haproxy", HAProxyConfig("127.0.0.1:8000", origins, backups...), "server b1 127.0.0.1:9101 check inter 1s fall 2 rise 2 observe layer4 error-limit 3 on-error mark-down backup")
	if strings.Contains(EdgeConfig(origins), "backup") || strings.Contains(NginxConfig("127.0.0.1:8000", "/tmp/x", origins), "backup") {
		t.Error("a backup without backups")
	}
}

func TestCPUTime(t *testing.T) {
	before, err := CPUTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	x := 0
	for i := 0; i < 50_000_000; i++ {
		x += i % 7
	}
	after, err := CPUTime(os.Getpid())
	if err != nil || after < before || x == 0 {
		t.Fatalf("CPU time went from %s to %s (%v)", before, after, err)
	}
	if _, err := CPUTime(1 << 30); err == nil {
		t.Fatal("no error for a pid that does not exist")
	}
}

func TestCPUCount(t *testing.T) {
	f := func(list string, want int) {
		t.Helper()
		if got := cpuCount(list); got != want {
			t.Errorf("cpuCount(%q) = %d, want %d", list, got, want)
		}
	}
	f("0", 1)
	f("0,1", 2)
	f("1-3", 3)
	f("0,2-3", 3)
}
