// Command edgelb-demo runs the demo that `make demo` starts: a Consul dev
// agent, three demo origins registered in it with edge.route tags, and
// edgelb in front of them on 127.0.0.1:8080 (admin on 127.0.0.1:9901).
// It stops everything on Ctrl-C.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
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
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "edgelb-demo: %v\n", err)
		os.Exit(1)
	}
}

type demo struct {
	bin    string
	dir    string
	procs  []*proc
	exited chan exit
}

// proc is a child process and a channel closed when it exits.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

// exit is a child process that ended.
type exit struct {
	name     string
	cmdline  []string
	err      error
	critical bool // the demo cannot go on without it
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
	d := &demo{bin: filepath.Dir(exe), dir: *dir, exited: make(chan exit, 16)}
	defer d.stopAll()
	if err := os.MkdirAll(filepath.Join(d.dir, "logs"), 0o755); err != nil {
		return err
	}
	for _, addr := range []string{"127.0.0.1:8500", "127.0.0.1:8080", "127.0.0.1:9901", "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"} {
		if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
			c.Close()
			return fmt.Errorf("%s is already in use: stop what listens there (an earlier demo?) and run again", addr)
		}
	}

	fmt.Println("starting Consul dev agent on 127.0.0.1:8500 ...")
	consulData := filepath.Join(d.dir, "consul")
	os.RemoveAll(consulData)
	if err := d.start("consul", "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1", "-data-dir", consulData); err != nil {
		return err
	}
	client, err := api.NewClient(&api.Config{Address: "127.0.0.1:8500"})
	if err != nil {
		return err
	}
	if err := waitFor(30*time.Second, "Consul leader", func() bool {
		leader, err := client.Status().Leader()
		return err == nil && leader != ""
	}); err != nil {
		return err
	}

	for i := 1; i <= 3; i++ {
		name, port := fmt.Sprintf("web-%d", i), 9000+i
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		if err := d.start("demo-origin", "-listen", addr, "-name", name); err != nil {
			return err
		}
		reg := &api.AgentServiceRegistration{
			ID: name, Name: "web", Address: "127.0.0.1", Port: port,
			Tags: []string{"edge.route=*/"},
			Check: &api.AgentServiceCheck{
				HTTP: "http://" + addr + "/health", Interval: "1s", Timeout: "1s",
				DeregisterCriticalServiceAfter: "10m",
			},
		}
		if err := client.Agent().ServiceRegister(reg); err != nil {
			return fmt.Errorf("cannot register %s in Consul: %w", name, err)
		}
		fmt.Printf("origin %s on %s registered in Consul as service web\n", name, addr)
	}

	if err := d.start("edgelb", "-config", *config); err != nil {
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
	fmt.Printf(`
edgelb is running on http://127.0.0.1:8080 (admin http://127.0.0.1:9901).
Logs are in %[1]s/logs. Try:

  curl -i http://127.0.0.1:8080/                 # answered by web-1, web-2 or web-3 (X-Origin)
  curl -s http://127.0.0.1:9901/status           # backends, states, reasons, discovery freshness
  curl -s http://127.0.0.1:9901/metrics | grep edgelb_

  # break an origin and watch edgelb route around it:
  curl -X POST 'http://127.0.0.1:9002/_fault?mode=hang'      # or error500, garbage, overload, slow, reset
  curl -X POST 'http://127.0.0.1:9002/_fault?mode=none'      # heal it
  pkill -9 -f 'name web-2'                                    # kill it outright

  # stop Consul: edgelb keeps routing to the instances it knew
  pkill -f 'consul agent -dev'
  curl -s http://127.0.0.1:9901/readyz

  # kill every origin: what was answered before is served stale (Cache-Status)
  pkill -9 -f 'demo-origin -listen 127.0.0.1:900'
  curl -i http://127.0.0.1:8080/

  # load it:
  %[2]s/edgelb-load -url http://127.0.0.1:8080/ -c 32 -d 10s

  # register a new origin with a route of its own; it is routed within a second:
  %[2]s/demo-origin -listen 127.0.0.1:9004 -name api-1 &
  curl -X PUT http://127.0.0.1:8500/v1/agent/service/register \
    -d '{"ID":"api-1","Name":"api","Address":"127.0.0.1","Port":9004,"Tags":["edge.route=*/api"]}'
  curl -i http://127.0.0.1:8080/api

Press Ctrl-C to stop the demo.
`, d.dir, d.bin)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *exitAfter > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *exitAfter)
		defer cancel()
	}
	for {
		select {
		case <-ctx.Done():
			fmt.Println("\nstopping the demo ...")
			return nil
		case e := <-d.exited:
			if e.critical {
				return fmt.Errorf("%s exited: %v (see %s/logs)", e.name, e.err, d.dir)
			}
			if e.name == "consul" {
				fmt.Printf("Consul exited (%v); edgelb keeps routing to the instances it knew (see /status and /readyz).\n", e.err)
				continue
			}
			// A dead origin is part of the demo: edgelb routes around it,
			// or serves stored responses when every origin is gone.
			fmt.Printf("origin %s exited (%v); edgelb routes around it. Start it again with:\n  %s\n",
				e.name, e.err, strings.Join(e.cmdline, " ")+" &")
		}
	}
}

// start runs bin/NAME with args in the background, logging to dir/logs.
func (d *demo) start(name string, args ...string) error {
	path := filepath.Join(d.bin, name)
	if _, err := os.Stat(path); err != nil {
		return fmt.Errorf("cannot find %s: run `make build consul` first", path)
	}
	logName := name
	for i, a := range args {
		if a == "-name" && i+1 < len(args) {
			logName = args[i+1]
		}
	}
	log, err := os.Create(filepath.Join(d.dir, "logs", logName+".log"))
	if err != nil {
		return err
	}
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("cannot start %s: %w", name, err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	d.procs = append(d.procs, p)
	// Origins and Consul failing are part of the demo; only edgelb is
	// needed to go on.
	critical := name == "edgelb"
	cmdline := append([]string{path}, args...)
	go func() {
		err := cmd.Wait()
		close(p.done)
		d.exited <- exit{name: logName, cmdline: cmdline, err: err, critical: critical}
	}()
	return nil
}

// stopAll stops the processes in reverse order of start.
func (d *demo) stopAll() {
	for i := len(d.procs) - 1; i >= 0; i-- {
		p := d.procs[i]
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			p.cmd.Process.Kill()
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
