// Package scenario runs edgelb, demo origins, Consul, nginx and HAProxy as
// real processes and drives load through them: the failure scenarios of
// the bench suite and the runner behind edgelb-bench.
package scenario

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// DefaultWaitTimeout bounds how long a started process may take to answer.
const DefaultWaitTimeout = 20 * time.Second

// Build builds edgelb and demo-origin into dir.
func Build(dir string) error {
	cmd := exec.Command("go", "build", "-o", dir+"/", "github.com/edgelb/edgelb/cmd/edgelb", "github.com/edgelb/edgelb/cmd/demo-origin")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}
	return nil
}

// Procs starts child processes and stops them all on Close. Every process
// gets SIGKILL if the parent dies. It is safe for concurrent use.
type Procs struct {
	// Bin is the directory holding the edgelb and demo-origin binaries.
	Bin string
	// Dir holds configs, state directories and one log file per process.
	Dir string
	// ProxyCPUs and OtherCPUs, if set, are taskset CPU lists: proxies
	// (edgelb, nginx, HAProxy) run on ProxyCPUs and everything else
	// (origins, Consul) on OtherCPUs.
	ProxyCPUs, OtherCPUs string

	mu    sync.Mutex
	procs []*Proc
	seq   int
}

// Proc is a child process.
type Proc struct {
	Name string
	// Addr is the address it serves on, when it serves.
	Addr string
	Log  string
	cmd  *exec.Cmd
	done chan struct{}
}

// Start runs bin with args on the given CPUs (none: unpinned), its output
// going to a log file in Dir.
func (g *Procs) Start(name, cpus string, env []string, bin string, args ...string) (*Proc, error) {
	g.mu.Lock()
	g.seq++
	logPath := filepath.Join(g.Dir, "logs", fmt.Sprintf("%02d-%s.log", g.seq, name))
	g.mu.Unlock()
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return nil, err
	}
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child holds its own descriptor
	if cpus != "" {
		args = append([]string{"-c", cpus, bin}, args...)
		bin = "taskset"
	}
	p := &Proc{Name: name, Log: logPath, cmd: exec.Command(bin, args...), done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.SysProcAttr = childAttr()
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("cannot start %s: %w", name, err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	g.mu.Lock()
	g.procs = append(g.procs, p)
	g.mu.Unlock()
	return p, nil
}

// Close stops every process started, the last started first.
func (g *Procs) Close() {
	g.mu.Lock()
	procs := g.procs
	g.procs = nil
	g.mu.Unlock()
	for i := len(procs) - 1; i >= 0; i-- {
		procs[i].Stop()
	}
}

// Pid returns the process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Signal sends sig to the process.
func (p *Proc) Signal(sig syscall.Signal) { p.cmd.Process.Signal(sig) }

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Kill9 kills the process with SIGKILL and waits for it.
func (p *Proc) Kill9() {
	p.cmd.Process.Kill()
	<-p.done
}

// Stop asks the process to exit (resuming it first if it was stopped) and
// kills it after 5 s. It is idempotent.
func (p *Proc) Stop() {
	if p.Exited() {
		return
	}
	p.Signal(syscall.SIGCONT)
	p.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.Kill9()
	}
}

// Output returns the last 4 KiB the process printed, for error messages.
func (p *Proc) Output() string {
	b, _ := os.ReadFile(p.Log)
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return strings.TrimSpace(string(b))
}

// FreeAddr returns a free loopback address, never one it returned
// before: the port is free once its listener closes, and the kernel may
// give it again at once, to the next caller, whose process would then
// listen where another means to.
func FreeAddr() (string, error) {
	freeMu.Lock()
	defer freeMu.Unlock()
	for {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", err
		}
		addr := ln.Addr().String()
		ln.Close()
		if !freeGiven[addr] {
			freeGiven[addr] = true
			return addr, nil
		}
	}
}

var (
	freeMu    sync.Mutex
	freeGiven = map[string]bool{}
)

// StartOrigin starts a demo origin on a free port.
func (g *Procs) StartOrigin(name string, args ...string) (*Proc, error) {
	addr, err := FreeAddr()
	if err != nil {
		return nil, err
	}
	return g.StartOriginAt(name, addr, args...)
}

// StartOriginAt starts a demo origin on addr and waits until it answers.
func (g *Procs) StartOriginAt(name, addr string, args ...string) (*Proc, error) {
	p, err := g.Start(name, g.OtherCPUs, nil, filepath.Join(g.Bin, "demo-origin"), append([]string{"-listen", addr, "-name", name}, args...)...)
	if err != nil {
		return nil, err
	}
	p.Addr = addr
	if err := WaitHTTP("http://"+addr+"/health", DefaultWaitTimeout); err != nil {
		return nil, fmt.Errorf("%w\n%s", err, p.Output())
	}
	return p, nil
}

// Edge is a running edgelb process.
type Edge struct {
	*Proc
	Admin string
	// Config is its config file.
	Config string
}

// StartEdge starts edgelb with the given config body (listen, admin and
// state_dir are added) and waits until it is alive, and ready when the
// config has routes of its own. When ProxyCPUs is set it runs with
// GOMAXPROCS set to the number of those CPUs.
func (g *Procs) StartEdge(config, stateDir string) (*Edge, error) {
	return g.StartEdgeAs("edgelb", config, stateDir)
}

// StartEdgeAs is StartEdge for an edgelb named name in the logs.
func (g *Procs) StartEdgeAs(name, config, stateDir string) (*Edge, error) {
	admin, err := FreeAddr()
	if err != nil {
		return nil, err
	}
	addr, err := FreeAddr()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(g.Dir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(g.Dir, "edgelb-*.yaml")
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(f, "listen: %s\nadmin: %s\nstate_dir: %s\n%s", addr, admin, stateDir, config)
	if err := f.Close(); err != nil {
		return nil, err
	}
	e, err := g.RunEdge(&Edge{Proc: &Proc{Name: name, Addr: addr}, Admin: admin, Config: f.Name()})
	if err != nil {
		return nil, err
	}
	if strings.HasPrefix(config, "routes:") || strings.Contains(config, "\nroutes:") {
		if err := WaitHTTP("http://"+admin+"/readyz", DefaultWaitTimeout); err != nil {
			return nil, fmt.Errorf("%w\n%s", err, e.Output())
		}
	}
	return e, nil
}

// RunEdge starts edgelb as e says (its name, config file and addresses),
// again after it stopped, and waits until it is alive.
func (g *Procs) RunEdge(e *Edge) (*Edge, error) {
	var env []string
	if g.ProxyCPUs != "" {
		env = append(env, fmt.Sprintf("GOMAXPROCS=%d", cpuCount(g.ProxyCPUs)))
	}
	p, err := g.Start(e.Name, g.ProxyCPUs, env, filepath.Join(g.Bin, "edgelb"), "-config", e.Config, "-log-level", "warn")
	if err != nil {
		return nil, err
	}
	p.Addr = e.Addr
	n := &Edge{Proc: p, Admin: e.Admin, Config: e.Config}
	if err := WaitHTTP("http://"+n.Admin+"/healthz", DefaultWaitTimeout); err != nil {
		return nil, fmt.Errorf("%w\n%s", err, p.Output())
	}
	return n, nil
}

// Wait waits up to d for the process to exit and reports whether it did.
func (p *Proc) Wait(d time.Duration) bool {
	select {
	case <-p.done:
		return true
	case <-time.After(d):
		return false
	}
}

// cpuCount counts the CPUs of a taskset list such as "0", "0,1" or "0-3".
func cpuCount(list string) int {
	return max(len(cpuList(list)), 1)
}

// Status returns edgelb's /status document.
func (e *Edge) Status() (map[string]any, error) {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + e.Admin + "/status")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var st map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return nil, fmt.Errorf("cannot decode /status: %w", err)
	}
	return st, nil
}

// Metrics returns edgelb's /metrics as series: value.
func (e *Edge) Metrics() (map[string]float64, error) {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + e.Admin + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	m := make(map[string]float64)
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		if i := strings.LastIndexByte(line, ' '); i > 0 {
			if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
				m[line[:i]] = v
			}
		}
	}
	return m, nil
}

// BackendState is one backend as /status shows it.
type BackendState struct {
	State, Reason string
	Since         time.Time
}

// ErrNoBackend is returned when /status does not list the backend.
var ErrNoBackend = errors.New("scenario: backend not in /status")

// Backend returns the state of one backend of service in /status.
func (e *Edge) Backend(service, addr string) (BackendState, error) {
	st, err := e.Status()
	if err != nil {
		return BackendState{}, err
	}
	services, _ := st["services"].(map[string]any)
	svc, _ := services[service].(map[string]any)
	backends, _ := svc["backends"].([]any)
	for _, b := range backends {
		b, _ := b.(map[string]any)
		if b["addr"] != addr {
			continue
		}
		s := BackendState{}
		s.State, _ = b["state"].(string)
		s.Reason, _ = b["reason"].(string)
		if since, ok := b["since"].(string); ok {
			s.Since, _ = time.Parse(time.RFC3339Nano, since)
		}
		return s, nil
	}
	return BackendState{}, ErrNoBackend
}

// Serving returns which set of backends serves service now, as /status
// says: "primary", "backup", "panic" or "none".
func (e *Edge) Serving(service string) (string, error) {
	st, err := e.Status()
	if err != nil {
		return "", err
	}
	services, _ := st["services"].(map[string]any)
	svc, ok := services[service].(map[string]any)
	if !ok {
		return "", fmt.Errorf("scenario: service %q not in /status", service)
	}
	serving, _ := svc["serving"].(string)
	return serving, nil
}

// WaitHTTP waits up to timeout for url to answer 200.
func WaitHTTP(url string, timeout time.Duration) error {
	c := http.Client{Timeout: time.Second}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		resp, err := c.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("%s did not answer 200 in %s", url, timeout)
}
