// Package consultest runs a real Consul dev agent for tests.
//
// The binary is found in this order: $EDGELB_CONSUL, <repo>/bin/consul
// (`make consul` builds it), then PATH. Without one, tests skip, except
// when $CI is set: then they fail, so that CI never silently skips Consul.
package consultest

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
)

// Agent is a running `consul agent -dev` on free loopback ports.
type Agent struct {
	t       testing.TB
	bin     string
	dataDir string
	ports   [5]int // http, dns, serf lan, serf wan, server
	token   string // ACL management token; "" for an agent without ACLs
	dc      string // datacenter; "" for Consul's default, dc1
	Client  *api.Client

	mu  sync.Mutex
	cmd *exec.Cmd
	out *syncBuffer
}

// syncBuffer is a bytes.Buffer safe for the agent's writes and our reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// Start starts an agent and stops it when the test ends.
func Start(t testing.TB) *Agent {
	t.Helper()
	return start(t, "", "")
}

// StartWithACL starts an agent whose ACLs deny everything to any token but
// managementToken, which its Client uses. It stops when the test ends.
func StartWithACL(t testing.TB, managementToken string) *Agent {
	t.Helper()
	return start(t, managementToken, "")
}

// StartDatacenter starts an agent that is the only server of datacenter
// dc. Join agents of different datacenters with JoinWAN. It stops when the
// test ends.
func StartDatacenter(t testing.TB, dc string) *Agent {
	t.Helper()
	return start(t, "", dc)
}

func start(t testing.TB, token, dc string) *Agent {
	t.Helper()
	bin := Binary()
	if bin == "" {
		msg := "no consul binary: run `make consul` (or set EDGELB_CONSUL)"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	a := &Agent{t: t, bin: bin, dataDir: t.TempDir(), token: token, dc: dc}
	t.Cleanup(a.Stop)
	// A port found free may be taken before Consul binds it: try again on
	// other ports.
	var err error
	for try := 0; try < 3; try++ {
		a.ports = freePorts(t)
		a.Client, err = api.NewClient(&api.Config{Address: a.Addr(), Token: token})
		if err != nil {
			t.Fatal(err)
		}
		if err = a.start(); err == nil {
			return a
		}
		t.Logf("consul did not start, trying other ports: %v", err)
	}
	t.Fatal(err)
	return nil
}

// Binary returns the path of the consul binary to use, or "".
func Binary() string {
	if p := os.Getenv("EDGELB_CONSUL"); p != "" {
		return p
	}
	if dir, err := os.Getwd(); err == nil {
		for ; dir != filepath.Dir(dir); dir = filepath.Dir(dir) {
			if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && bytes.Contains(b, []byte("module github.com/edgelb/edgelb\n")) {
				if p := filepath.Join(dir, "bin", "consul"); fileExists(p) {
					return p
				}
				break
			}
		}
	}
	if p, err := exec.LookPath("consul"); err == nil {
		return p
	}
	return ""
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// Addr returns the agent's HTTP API address.
func (a *Agent) Addr() string { return fmt.Sprintf("127.0.0.1:%d", a.ports[0]) }

func (a *Agent) start() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.out = &syncBuffer{}
	args := []string{"agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
		"-data-dir", a.dataDir, "-node", "edgelb-test",
		"-http-port", fmt.Sprint(a.ports[0]), "-dns-port", fmt.Sprint(a.ports[1]),
		"-serf-lan-port", fmt.Sprint(a.ports[2]), "-serf-wan-port", fmt.Sprint(a.ports[3]),
		"-server-port", fmt.Sprint(a.ports[4]), "-grpc-port", "-1",
	}
	if a.dc != "" {
		args = append(args, "-datacenter", a.dc)
	}
	if a.token != "" {
		hcl := fmt.Sprintf("acl {\n  enabled = true\n  default_policy = \"deny\"\n  tokens {\n    initial_management = %q\n  }\n}\n", a.token)
		path := filepath.Join(a.dataDir, "acl.hcl")
		if err := os.WriteFile(path, []byte(hcl), 0o600); err != nil {
			return fmt.Errorf("cannot write the ACL config: %v", err)
		}
		args = append(args, "-config-file", path)
	}
	a.cmd = exec.Command(a.bin, args...)
	a.cmd.Stdout, a.cmd.Stderr = a.out, a.out
	a.cmd.SysProcAttr = agentAttr()
	if err := a.cmd.Start(); err != nil {
		a.cmd = nil
		return fmt.Errorf("cannot start consul: %v", err)
	}
	exited := make(chan struct{})
	var state *os.ProcessState
	go func(cmd *exec.Cmd) {
		state, _ = cmd.Process.Wait()
		close(exited)
	}(a.cmd)
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if leader, err := a.Client.Status().Leader(); err == nil && leader != "" {
			return nil
		}
		select {
		case <-exited:
			a.cmd = nil
			return fmt.Errorf("consul exited (%v):\n%s", state, a.out.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	a.cmd.Process.Kill()
	a.cmd = nil
	return fmt.Errorf("consul did not elect a leader in 60s:\n%s", a.out.String())
}

// Stop stops the agent (idempotent).
func (a *Agent) Stop() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return
	}
	a.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func(cmd *exec.Cmd) {
		for {
			// Wait reaps the process: the start watcher may have done it.
			if err := syscall.Kill(cmd.Process.Pid, 0); err != nil {
				close(done)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}(a.cmd)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		a.cmd.Process.Kill()
		<-done
	}
	a.cmd = nil
}

// Restart stops the agent and starts a new, empty one on the same ports, as
// a restarted dev agent or a rebuilt cluster: services must be registered
// again, and its index starts low again.
func (a *Agent) Restart() {
	a.t.Helper()
	a.Stop()
	// A dev agent reloads the services registered through it from its
	// data dir: a new one starts from an empty dir.
	a.dataDir = a.t.TempDir()
	if err := a.start(); err != nil {
		a.t.Fatal(err)
	}
}

// Datacenter returns the agent's datacenter.
func (a *Agent) Datacenter() string {
	if a.dc == "" {
		return "dc1"
	}
	return a.dc
}

// JoinWAN joins the agent to other's datacenter over the WAN (each agent
// has its own serf WAN port on loopback) and waits until both know both
// datacenters.
func (a *Agent) JoinWAN(other *Agent) {
	a.t.Helper()
	addr := fmt.Sprintf("127.0.0.1:%d", other.ports[3])
	if err := a.Client.Agent().Join(addr, true); err != nil {
		a.t.Fatalf("join %s to %s over the WAN: %v", a.Datacenter(), other.Datacenter(), err)
	}
	knows := func(c *api.Client, dc string) bool {
		_, _, err := c.Catalog().Services(&api.QueryOptions{Datacenter: dc})
		return err == nil
	}
	deadline := time.Now().Add(30 * time.Second)
	for !knows(a.Client, other.Datacenter()) || !knows(other.Client, a.Datacenter()) {
		if time.Now().After(deadline) {
			a.t.Fatalf("%s and %s do not know each other 30s after the WAN join", a.Datacenter(), other.Datacenter())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Register registers an instance of service with a TTL check that starts
// passing. It returns the check ID.
func (a *Agent) Register(id, service string, port int, tags []string, weight int) string {
	a.t.Helper()
	reg := &api.AgentServiceRegistration{
		ID: id, Name: service, Address: "127.0.0.1", Port: port, Tags: tags,
		Check: &api.AgentServiceCheck{CheckID: "check-" + id, TTL: "10m", Status: api.HealthPassing},
	}
	if weight > 0 {
		reg.Weights = &api.AgentWeights{Passing: weight, Warning: 1}
	}
	if err := a.Client.Agent().ServiceRegister(reg); err != nil {
		a.t.Fatalf("register %s: %v", id, err)
	}
	return "check-" + id
}

// Deregister removes an instance.
func (a *Agent) Deregister(id string) {
	a.t.Helper()
	if err := a.Client.Agent().ServiceDeregister(id); err != nil {
		a.t.Fatalf("deregister %s: %v", id, err)
	}
}

// SetCheck sets a TTL check to api.HealthPassing, HealthWarning or
// HealthCritical.
func (a *Agent) SetCheck(checkID, status string) {
	a.t.Helper()
	if err := a.Client.Agent().UpdateTTL(checkID, "set by test", status); err != nil {
		a.t.Fatalf("update check %s: %v", checkID, err)
	}
}

// NodeMaintenance turns the node's maintenance mode on or off.
func (a *Agent) NodeMaintenance(on bool) {
	a.t.Helper()
	var err error
	if on {
		err = a.Client.Agent().EnableNodeMaintenance("test")
	} else {
		err = a.Client.Agent().DisableNodeMaintenance()
	}
	if err != nil {
		a.t.Fatalf("node maintenance: %v", err)
	}
}

// Output returns what the agent printed, for failure messages.
func (a *Agent) Output() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.out == nil {
		return ""
	}
	return strings.TrimSpace(a.out.String())
}

// freePorts returns distinct free ports, holding each open until all are
// chosen so that none is handed out twice.
func freePorts(t testing.TB) (ports [5]int) {
	for i := range ports {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		ports[i] = ln.Addr().(*net.TCPAddr).Port
	}
	return ports
}
