// Command edgelb-demo runs the demo that `make demo` starts: a Consul dev
// agent, three demo origins registered in it with edge.route tags, a
// fourth one to register by hand, and edgelb in front of them on
// 127.0.0.1:8080 and, over HTTPS, 127.0.0.1:8443 (admin on
// 127.0.0.1:9901). The HTTPS certificate comes from a local CA made once
// in the demo's directory.
//
// The hints it prints name its processes by PID, so that nothing else on
// the machine is hit. SIGUSR1 starts again whatever of Consul and the
// origins was stopped; Ctrl-C (or SIGTERM) stops everything it started.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/edgelb/edgelb/balancer/certs/localca"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "edgelb-demo: %v\n", err)
		os.Exit(1)
	}
}

// webOrigins are the origins registered as service web; apiOrigin runs
// too, for the user to register.
const (
	webOrigins = 3
	apiOrigin  = "api-1"
	apiAddr    = "127.0.0.1:9004"
	httpsAddr  = "127.0.0.1:8443"
)

// tlsNames are the names of the demo's HTTPS certificate.
var tlsNames = []string{"localhost", "edgelb.localhost", "127.0.0.1"}

type demo struct {
	out    io.Writer // where hints and events are printed
	bin    string
	dir    string
	config string
	consul *api.Client
	// children in order of start; only the main goroutine touches them.
	children []*child
	exited   chan exit
}

// child is a process the demo runs, and can run again.
type child struct {
	name string
	path string
	args []string
	// critical children end the demo when they exit.
	critical bool
	cmd      *exec.Cmd // the current process; nil before the first start
	done     chan struct{}
	running  bool
}

// exit is a process of a child that ended.
type exit struct {
	c   *child
	cmd *exec.Cmd
	err error
}

func run() error {
	config := flag.String("config", "configs/demo.yaml", "edgelb config to run")
	dir := flag.String("dir", ".demo", "directory for the demo's logs and state")
	exitAfter := flag.Duration("exit-after", 0, "stop the demo after this long (0: run until Ctrl-C)")
	flag.Parse()

	exe, err := os.Executable()
	if err != nil {
		return err
	}
	d := &demo{out: os.Stdout, bin: filepath.Dir(exe), dir: *dir, config: *config, exited: make(chan exit, 16)}
	defer d.stopAll()
	if err := os.MkdirAll(filepath.Join(d.dir, "logs"), 0o755); err != nil {
		return err
	}
	for _, addr := range []string{"127.0.0.1:8500", "127.0.0.1:8080", httpsAddr, "127.0.0.1:9901", "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003", apiAddr} {
		if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
			c.Close()
			return fmt.Errorf("%s is already in use: stop what listens there (an earlier demo?) and run again", addr)
		}
	}
	// Signals are taken from the start, so that Ctrl-C while starting
	// stops what already runs.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGUSR1)
	defer signal.Stop(sigs)

	consulData := filepath.Join(d.dir, "consul")
	os.RemoveAll(consulData)
	consul := d.add("consul", false, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1", "-data-dir", consulData)
	if d.consul, err = api.NewClient(&api.Config{Address: "127.0.0.1:8500"}); err != nil {
		return err
	}
	fmt.Fprintln(d.out, "starting Consul dev agent on 127.0.0.1:8500 ...")
	if err := d.startConsul(consul); err != nil {
		return err
	}
	for i := 1; i <= webOrigins; i++ {
		o := d.add(webName(i), false, "-listen", webAddr(i), "-name", webName(i))
		if err := d.start(o); err != nil {
			return err
		}
		fmt.Fprintf(d.out, "origin %s on %s registered in Consul as service web\n", o.name, webAddr(i))
	}
	files, created, err := localca.Ensure(filepath.Join(d.dir, "tls"), tlsNames)
	if err != nil {
		return fmt.Errorf("cannot make the demo's HTTPS certificate: %w", err)
	}
	if created {
		fmt.Fprintf(d.out, "HTTPS certificate for %s issued by a local CA in %s\n", strings.Join(tlsNames, ", "), filepath.Dir(files.CA))
	}
	api1 := d.add(apiOrigin, false, "-listen", apiAddr, "-name", apiOrigin)
	if err := d.start(api1); err != nil {
		return err
	}
	edgelb := d.add("edgelb", true, "-config", d.config)
	if err := d.start(edgelb); err != nil {
		return err
	}
	if err := waitFor(30*time.Second, "edgelb ready", func() bool {
		resp, err := http.Get("http://127.0.0.1:9901/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	}); err != nil {
		return fmt.Errorf("%w (see %s)", err, filepath.Join(d.dir, "logs", "edgelb.log"))
	}
	d.printHints()

	var timeout <-chan time.Time
	if *exitAfter > 0 {
		timeout = time.After(*exitAfter)
	}
	for {
		select {
		case <-timeout:
			fmt.Fprintln(d.out, "\nstopping the demo ...")
			return nil
		case sig := <-sigs:
			if sig != syscall.SIGUSR1 {
				fmt.Fprintln(d.out, "\nstopping the demo ...")
				return nil
			}
			d.startStopped()
		case e := <-d.exited:
			if e.cmd != e.c.cmd {
				continue
			}
			e.c.running = false
			if e.c.critical {
				return fmt.Errorf("%s exited: %v (see %s/logs)", e.c.name, e.err, d.dir)
			}
			d.reportExit(e)
		}
	}
}

func webName(i int) string { return fmt.Sprintf("web-%d", i) }
func webAddr(i int) string { return fmt.Sprintf("127.0.0.1:%d", 9000+i) }

// add declares a child running bin/name (bin/demo-origin for origins).
func (d *demo) add(name string, critical bool, args ...string) *child {
	bin := name
	if name != "consul" && name != "edgelb" {
		bin = "demo-origin"
	}
	c := &child{name: name, path: filepath.Join(d.bin, bin), args: args, critical: critical}
	d.children = append(d.children, c)
	return c
}

func (d *demo) child(name string) *child {
	for _, c := range d.children {
		if c.name == name {
			return c
		}
	}
	panic("BUG: no demo process " + name)
}

// start runs c in the background, logging to dir/logs/NAME.log (appended
// to when it runs again).
func (d *demo) start(c *child) error {
	if _, err := os.Stat(c.path); err != nil {
		return fmt.Errorf("cannot find %s: run `make build consul` first", c.path)
	}
	log, err := os.OpenFile(filepath.Join(d.dir, "logs", c.name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(c.path, c.args...)
	cmd.Stdout, cmd.Stderr = log, log
	// Its own process group: Ctrl-C in the terminal reaches the demo
	// only, which stops its processes in order. Should the demo be
	// killed outright, they get SIGTERM all the same.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	err = cmd.Start()
	log.Close()
	if err != nil {
		return fmt.Errorf("cannot start %s: %w", c.name, err)
	}
	done := make(chan struct{})
	c.cmd, c.done, c.running = cmd, done, true
	go func() {
		err := cmd.Wait()
		close(done)
		d.exited <- exit{c: c, cmd: cmd, err: err}
	}()
	return nil
}

// startConsul starts the Consul agent, waits for it to elect itself and
// registers the web origins in it.
func (d *demo) startConsul(c *child) error {
	if err := d.start(c); err != nil {
		return err
	}
	if err := waitFor(30*time.Second, "Consul leader", func() bool {
		leader, err := d.consul.Status().Leader()
		return err == nil && leader != ""
	}); err != nil {
		return fmt.Errorf("%w (see %s)", err, filepath.Join(d.dir, "logs", "consul.log"))
	}
	for i := 1; i <= webOrigins; i++ {
		reg := &api.AgentServiceRegistration{
			ID: webName(i), Name: "web", Address: "127.0.0.1", Port: 9000 + i,
			Tags: []string{"edge.route=*/"},
			Check: &api.AgentServiceCheck{
				HTTP: "http://" + webAddr(i) + "/health", Interval: "1s", Timeout: "1s",
				DeregisterCriticalServiceAfter: "10m",
			},
		}
		if err := d.consul.Agent().ServiceRegister(reg); err != nil {
			return fmt.Errorf("cannot register %s in Consul: %w", webName(i), err)
		}
	}
	return nil
}

// startStopped starts again every stopped process but edgelb.
func (d *demo) startStopped() {
	started := false
	for _, c := range d.children {
		if c.running || c.critical {
			continue
		}
		started = true
		var err error
		if c.name == "consul" {
			// The agent reloads from its data dir what was registered
			// through it; the web origins are registered again anyway.
			fmt.Fprintln(d.out, "starting Consul again, with the services registered in it before ...")
			err = d.startConsul(c)
		} else {
			err = d.start(c)
		}
		if err != nil {
			fmt.Fprintf(d.out, "cannot start %s again: %v\n", c.name, err)
			continue
		}
		fmt.Fprintf(d.out, "%s runs again as PID %d\n", c.name, c.cmd.Process.Pid)
	}
	if !started {
		fmt.Fprintln(d.out, "SIGUSR1: every demo process is running")
	}
}

// reportExit says what a process that ended means for the demo.
func (d *demo) reportExit(e exit) {
	again := fmt.Sprintf("kill -USR1 %d", os.Getpid())
	switch {
	case e.c.name == "consul":
		fmt.Fprintf(d.out, "Consul exited (%v); edgelb keeps routing to the instances it knew (see /status and /readyz).\n"+
			"  start it again: %s\n", e.err, again)
	case e.c.name == apiOrigin:
		fmt.Fprintf(d.out, "origin %s exited (%v); start it again: %s\n", e.c.name, e.err, again)
	default:
		alive := 0
		for i := 1; i <= webOrigins; i++ {
			if d.child(webName(i)).running {
				alive++
			}
		}
		if alive > 0 {
			fmt.Fprintf(d.out, "origin %s exited (%v); edgelb routes around it (%d of %d web origins left).\n", e.c.name, e.err, alive, webOrigins)
		} else {
			fmt.Fprintf(d.out, "origin %s exited (%v); no web origin is left: edgelb answers from stored copies (Cache-Status) or 503 no_healthy_backend.\n",
				e.c.name, e.err)
		}
		fmt.Fprintf(d.out, "  start it again: %s\n", again)
	}
}

// printHints prints what to try, naming the demo's processes by PID.
func (d *demo) printHints() {
	pid := func(name string) int { return d.child(name).cmd.Process.Pid }
	// web-2 is killed a step before.
	var others []string
	for _, name := range []string{"web-1", "web-3", apiOrigin} {
		others = append(others, fmt.Sprint(pid(name)))
	}
	var procs strings.Builder
	for _, c := range d.children {
		fmt.Fprintf(&procs, "  %-7s PID %d\n", c.name, c.cmd.Process.Pid)
	}
	fmt.Fprintf(d.out, `
edgelb is running on http://127.0.0.1:8080 and https://127.0.0.1:8443 (admin http://127.0.0.1:9901).
Logs are in %[1]s/logs. The demo is PID %[2]d; its processes:
%[3]s
Try:

  open http://127.0.0.1:9901/ in a browser: the live status page; keep it open while you break things below

  curl -i http://127.0.0.1:8080/                 # answered by web-1, web-2 or web-3 (X-Origin)

  # HTTPS, with a certificate from the demo's own CA, which --cacert trusts:
  curl -i --cacert %[1]s/tls/ca.pem https://127.0.0.1:8443/
  curl -i --tlsv1.2 --cacert %[1]s/tls/ca.pem --resolve edgelb.localhost:8443:127.0.0.1 https://edgelb.localhost:8443/

  # HTTP/2: over TLS (ALPN h2), and h2c with prior knowledge on the plain port:
  curl -i --http2 --cacert %[1]s/tls/ca.pem https://127.0.0.1:8443/
  curl -i --http2-prior-knowledge http://127.0.0.1:8080/

  # WebSocket: the origins echo on /ws ("web-2: hello"), through a tunnel of edgelb's:
  echo hello | %[10]s/edgelb-load -ws ws://127.0.0.1:8080/ws
  echo hello | %[10]s/edgelb-load -ws wss://127.0.0.1:8443/ws -cacert %[1]s/tls/ca.pem

  curl -s http://127.0.0.1:9901/status           # backends, states, reasons, discovery freshness
  curl -s http://127.0.0.1:9901/metrics | grep edgelb_

  # register api-1 (running on %[4]s) with a route of its own; it is routed within a second:
  curl -X PUT http://127.0.0.1:8500/v1/agent/service/register \
    -d '{"ID":"api-1","Name":"api","Address":"127.0.0.1","Port":9004,"Tags":["edge.route=*/api"]}'
  curl -i http://127.0.0.1:8080/api

  # break an origin and watch edgelb route around it:
  curl -X POST 'http://127.0.0.1:9002/_fault?mode=hang'      # or error500, garbage, overload, slow, reset
  curl -X POST 'http://127.0.0.1:9002/_fault?mode=none'      # heal it
  kill -9 %[5]d                                              # kill web-2 outright

  # stop Consul: edgelb keeps routing to the instances it knew
  kill %[6]d
  curl -s http://127.0.0.1:9901/readyz

  # kill the other origins too: what was answered before is served stale (Cache-Status)
  kill -9 %[7]s
  curl -i http://127.0.0.1:8080/

  # start again whatever was stopped (Consul, with its services, and the origins):
  kill -USR1 %[2]d

  # reload edgelb's config (%[8]s) without dropping requests:
  kill -HUP %[9]d

  # load it:
  %[10]s/edgelb-load -url http://127.0.0.1:8080/ -c 32 -d 10s

Press Ctrl-C to stop the demo and every process it started.
`, d.dir, os.Getpid(), procs.String(), apiAddr, pid("web-2"), pid("consul"), strings.Join(others, " "), d.config, pid("edgelb"), d.bin)
}

// stopAll stops the running processes in reverse order of start.
func (d *demo) stopAll() {
	for i := len(d.children) - 1; i >= 0; i-- {
		c := d.children[i]
		if c.cmd == nil {
			continue
		}
		select {
		case <-c.done:
			continue
		default:
		}
		c.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.done:
		case <-time.After(5 * time.Second):
			c.cmd.Process.Kill()
			<-c.done
		}
	}
}

func waitFor(d time.Duration, what string, ok func() bool) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if ok() {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.New("timed out waiting for " + what)
}
