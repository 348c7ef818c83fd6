package scenario

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Peer proxies compared with edgelb.
const (
	Nginx   = "nginx"
	HAProxy = "haproxy"
)

// Upstream settings shared by edgelb's, nginx's and HAProxy's configs so
// that they treat the same failures alike: connect and per-try timeouts,
// two retries on another backend, passive failure accounting and 1s
// active checks.
const (
	connectTimeout = time.Second
	tryTimeout     = time.Second
	retries        = 2
)

// EdgeConfig is edgelb's config for the service web on static origins,
// with backups as its backup set if any.
func EdgeConfig(origins []string, backups ...string) string {
	return EdgeConfigWith(origins, "", backups...)
}

// EdgeConfigWith is EdgeConfig with more keys for the service, one line.
func EdgeConfigWith(origins []string, extra string, backups ...string) string {
	backup := ""
	if len(backups) > 0 {
		backup = fmt.Sprintf("    backup: [%s]\n", strings.Join(backups, ", "))
	}
	if extra != "" {
		extra = "    " + extra + "\n"
	}
	return fmt.Sprintf(`services:
  web:
    static: [%s]
%s    connect_timeout: %s
    try_timeout: %s
    retries: %d
%s    health:
      active: {path: /health, interval: 1s}
routes: [{service: web}]
`, strings.Join(origins, ", "), backup, connectTimeout, tryTimeout, retries, extra)
}

// NginxConfig is the nginx equivalent of EdgeConfig: one worker, upstream
// keep-alive, least_conn, max_fails for passive ejection,
// proxy_next_upstream for retries on another backend, and backups as
// backup servers.
func NginxConfig(listen, dir string, origins []string, backups ...string) string {
	var servers strings.Builder
	for _, o := range origins {
		fmt.Fprintf(&servers, "    server %s max_fails=3 fail_timeout=5s;\n", o)
	}
	for _, b := range backups {
		fmt.Fprintf(&servers, "    server %s max_fails=3 fail_timeout=5s backup;\n", b)
	}
	s := func(d time.Duration) string { return fmt.Sprintf("%dms", d.Milliseconds()) }
	return fmt.Sprintf(`worker_processes 1;
daemon off;
pid %[1]s/nginx.pid;
error_log stderr error;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path %[1]s/client_body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  upstream web {
    least_conn;
%[2]s    keepalive 128;
  }
  server {
    listen %[3]s;
    location / {
      proxy_pass http://web;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_connect_timeout %[4]s;
      proxy_read_timeout %[5]s;
      proxy_send_timeout %[5]s;
      proxy_next_upstream error timeout invalid_header http_502 http_503 http_504;
      proxy_next_upstream_tries %[6]d;
    }
  }
}
`, dir, servers.String(), listen, s(connectTimeout), s(tryTimeout), retries+1)
}

// HAProxyConfig is the HAProxy equivalent of EdgeConfig: one thread,
// server-side keep-alive, leastconn, 1s HTTP health checks, layer-4
// observation marking a server down after failed connections, retries
// with redispatch to another server, and backups as backup servers.
func HAProxyConfig(listen string, origins []string, backups ...string) string {
	var servers strings.Builder
	for i, o := range origins {
		fmt.Fprintf(&servers, "  server o%d %s check inter 1s fall 2 rise 2 observe layer4 error-limit 3 on-error mark-down\n", i+1, o)
	}
	for i, b := range backups {
		fmt.Fprintf(&servers, "  server b%d %s check inter 1s fall 2 rise 2 observe layer4 error-limit 3 on-error mark-down backup\n", i+1, b)
	}
	return fmt.Sprintf(`global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect %[1]dms
  timeout server %[2]dms
  timeout client 30s
  timeout http-keep-alive 30s
  option http-keep-alive
  option forwardfor
  option redispatch 1
  retries %[3]d
  retry-on all-retryable-errors
frontend fe
  bind %[4]s
  default_backend web
backend web
  balance leastconn
  http-reuse always
  option httpchk GET /health
%[5]s`, connectTimeout.Milliseconds(), tryTimeout.Milliseconds(), retries, listen, servers.String())
}

// Peer is a running nginx or HAProxy.
type Peer struct {
	*Proc
}

// StartPeer starts nginx or HAProxy on a free port in front of origins,
// with backups as backup servers, and waits until it proxies.
func (g *Procs) StartPeer(name string, origins []string, backups ...string) (*Peer, error) {
	addr, err := FreeAddr()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(g.Dir, name+"-")
	if err != nil {
		return nil, err
	}
	var p *Proc
	switch name {
	case Nginx:
		conf := filepath.Join(dir, "nginx.conf")
		if err := os.WriteFile(conf, []byte(NginxConfig(addr, dir, origins, backups...)), 0o644); err != nil {
			return nil, err
		}
		p, err = g.Start(name, g.ProxyCPUs, nil, "nginx", "-p", dir, "-c", conf, "-e", "stderr")
	case HAProxy:
		conf := filepath.Join(dir, "haproxy.cfg")
		if err := os.WriteFile(conf, []byte(HAProxyConfig(addr, origins, backups...)), 0o644); err != nil {
			return nil, err
		}
		p, err = g.Start(name, g.ProxyCPUs, nil, "haproxy", "-f", conf, "-db")
	default:
		return nil, fmt.Errorf("unknown peer %q", name)
	}
	if err != nil {
		return nil, err
	}
	p.Addr = addr
	if err := WaitHTTP("http://"+addr+"/", DefaultWaitTimeout); err != nil {
		return nil, fmt.Errorf("%w\n%s", err, p.Output())
	}
	return &Peer{Proc: p}, nil
}

// MissingPeers returns the peers that are not on PATH.
func MissingPeers() []string {
	var missing []string
	for _, p := range []string{Nginx, HAProxy} {
		if _, err := exec.LookPath(p); err != nil {
			missing = append(missing, p)
		}
	}
	return missing
}

// InstallPeers installs nginx and HAProxy from Debian packages when they
// are missing (as `make peers` does).
func InstallPeers() error {
	missing := MissingPeers()
	if len(missing) == 0 {
		return nil
	}
	sudo := []string{}
	if os.Geteuid() != 0 {
		sudo = []string{"sudo", "-n"}
	}
	run := func(args ...string) error {
		args = append(sudo, args...)
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	if err := run("apt-get", "update", "-qq"); err != nil {
		return err
	}
	return run(append([]string{"apt-get", "install", "-y", "-qq"}, missing...)...)
}

// PeerVersion returns the first line of nginx -v or haproxy -v.
func PeerVersion(name string) string {
	out, _ := exec.Command(name, "-v").CombinedOutput()
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return line
}

// CPUTime returns the user and system CPU time used so far by pid and its
// children (nginx's workers), from /proc/PID/stat.
func CPUTime(pid int) (time.Duration, error) {
	pids := append([]int{pid}, childrenOf(pid)...)
	var total time.Duration
	for _, p := range pids {
		f, _, err := procStat(p)
		if err != nil {
			if p == pid {
				return 0, err
			}
			continue // a child that exited meanwhile
		}
		utime, _ := strconv.ParseInt(f[11], 10, 64)
		stime, _ := strconv.ParseInt(f[12], 10, 64)
		total += time.Duration(utime+stime) * time.Second / clockTicks
	}
	return total, nil
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat times; 100 on every
// Linux architecture Go supports.
const clockTicks = 100

// procStat returns the fields of /proc/PID/stat after the command name
// (field 3 onwards), and the parent pid.
func procStat(pid int) ([]string, int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, 0, err
	}
	// The command name is in parentheses and may contain spaces.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return nil, 0, fmt.Errorf("cannot parse /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return nil, 0, fmt.Errorf("cannot parse /proc/%d/stat: %d fields", pid, len(f))
	}
	ppid, _ := strconv.Atoi(f[1])
	return f, ppid, nil
}

// childrenOf returns the direct children of pid.
func childrenOf(pid int) []int {
	entries, _ := os.ReadDir("/proc")
	var kids []int
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if _, ppid, err := procStat(p); err == nil && ppid == pid {
			kids = append(kids, p)
		}
	}
	return kids
}
