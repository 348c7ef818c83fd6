package scenario

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/hashicorp/consul/api"
)

// ConsulBinary returns the consul binary to use: $EDGELB_CONSUL, consul in
// dirs (in order), then consul on PATH; "" when there is none.
func ConsulBinary(dirs ...string) string {
	if p := os.Getenv("EDGELB_CONSUL"); p != "" {
		return p
	}
	for _, d := range dirs {
		if p := filepath.Join(d, "consul"); fileExists(p) {
			return p
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

// Consul is a `consul agent -dev` on free loopback ports with its own data
// directory.
type Consul struct {
	// Client talks to the agent's HTTP API.
	Client *api.Client

	g       *Procs
	bin     string
	dc      string // "" for Consul's default, dc1
	dataDir string
	ports   [5]int // http, dns, serf lan, serf wan, server
	proc    *Proc
}

// StartConsul starts a Consul dev agent and waits for it to elect itself
// leader.
func (g *Procs) StartConsul(bin string) (*Consul, error) {
	return g.StartConsulDC(bin, "")
}

// StartConsulDC starts a Consul dev agent that is the server of datacenter
// dc ("" for Consul's default) and waits for it to elect itself leader.
func (g *Procs) StartConsulDC(bin, dc string) (*Consul, error) {
	if bin == "" {
		return nil, fmt.Errorf("no consul binary: run `make consul` (or set EDGELB_CONSUL)")
	}
	dataDir, err := os.MkdirTemp(g.Dir, "consul-"+dc)
	if err != nil {
		return nil, err
	}
	c := &Consul{g: g, bin: bin, dc: dc, dataDir: dataDir}
	// A port found free may be taken before Consul binds it: try others.
	for try := 0; try < 3; try++ {
		if c.ports, err = freePorts(); err != nil {
			return nil, err
		}
		if c.Client, err = api.NewClient(&api.Config{Address: c.Addr()}); err != nil {
			return nil, err
		}
		if err = c.Start(); err == nil {
			return c, nil
		}
	}
	return nil, err
}

// Addr returns the agent's HTTP API address.
func (c *Consul) Addr() string { return fmt.Sprintf("127.0.0.1:%d", c.ports[0]) }

// Start starts the agent (again, after Stop) on its ports. A dev agent
// keeps no data: services must be registered again.
func (c *Consul) Start() error {
	args := []string{"agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
		"-data-dir", c.dataDir, "-node", "edgelb-bench",
		"-http-port", fmt.Sprint(c.ports[0]), "-dns-port", fmt.Sprint(c.ports[1]),
		"-serf-lan-port", fmt.Sprint(c.ports[2]), "-serf-wan-port", fmt.Sprint(c.ports[3]),
		"-server-port", fmt.Sprint(c.ports[4]), "-grpc-port", "-1"}
	name := "consul"
	if c.dc != "" {
		args = append(args, "-datacenter", c.dc)
		name += "-" + c.dc
	}
	p, err := c.g.Start(name, c.g.OtherCPUs, nil, c.bin, args...)
	if err != nil {
		return err
	}
	c.proc = p
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if leader, err := c.Client.Status().Leader(); err == nil && leader != "" {
			return nil
		}
		if p.Exited() {
			return fmt.Errorf("consul exited:\n%s", p.Output())
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.Kill9()
	return fmt.Errorf("consul did not elect a leader in 60s:\n%s", p.Output())
}

// Datacenter returns the agent's datacenter.
func (c *Consul) Datacenter() string {
	if c.dc == "" {
		return "dc1"
	}
	return c.dc
}

// JoinWAN joins the agent to other's datacenter over the WAN and waits
// until each answers queries for the other's datacenter.
func (c *Consul) JoinWAN(other *Consul) error {
	if err := c.Client.Agent().Join(fmt.Sprintf("127.0.0.1:%d", other.ports[3]), true); err != nil {
		return fmt.Errorf("cannot join %s to %s over the WAN: %w", c.Datacenter(), other.Datacenter(), err)
	}
	knows := func(a *Consul, dc string) bool {
		_, _, err := a.Client.Catalog().Services(&api.QueryOptions{Datacenter: dc})
		return err == nil
	}
	for deadline := time.Now().Add(30 * time.Second); !knows(c, other.Datacenter()) || !knows(other, c.Datacenter()); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s and %s do not know each other 30s after the WAN join", c.Datacenter(), other.Datacenter())
		}
	}
	return nil
}

// Stop stops the agent.
func (c *Consul) Stop() { c.proc.Stop() }

// Register registers an instance of service at 127.0.0.1:port with a TTL
// check that starts passing.
func (c *Consul) Register(id, service string, port int, tags ...string) error {
	reg := &api.AgentServiceRegistration{
		ID: id, Name: service, Address: "127.0.0.1", Port: port, Tags: tags,
		Check: &api.AgentServiceCheck{CheckID: "check-" + id, TTL: "10m", Status: api.HealthPassing},
	}
	if err := c.Client.Agent().ServiceRegister(reg); err != nil {
		return fmt.Errorf("cannot register %s in Consul: %w", id, err)
	}
	return nil
}

// Deregister removes an instance.
func (c *Consul) Deregister(id string) error {
	if err := c.Client.Agent().ServiceDeregister(id); err != nil {
		return fmt.Errorf("cannot deregister %s from Consul: %w", id, err)
	}
	return nil
}

// freePorts returns distinct free ports, holding each open until all are
// chosen so that none is handed out twice.
func freePorts() (ports [5]int, err error) {
	for i := range ports {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return ports, err
		}
		defer ln.Close()
		ports[i] = ln.Addr().(*net.TCPAddr).Port
	}
	return ports, nil
}
