package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
)

// newTestDemo returns a demo whose processes are sleep commands under the
// demo's names, all started.
func newTestDemo(t *testing.T) (*demo, *bytes.Buffer) {
	t.Helper()
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Skip("no sleep command")
	}
	out := &bytes.Buffer{}
	d := &demo{out: out, bin: "/demo/bin", dir: t.TempDir(), config: "configs/demo.yaml", exited: make(chan exit, 16)}
	os.MkdirAll(d.dir+"/logs", 0o755)
	for _, name := range []string{"consul", "web-1", "web-2", "web-3", apiOrigin, "edgelb"} {
		c := &child{name: name, path: sleep, args: []string{"60"}, critical: name == "edgelb"}
		d.children = append(d.children, c)
		if err := d.start(c); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(d.stopAll)
	return d, out
}

// kill kills the named processes and reports each exit as the demo does.
func (d *demo) killForTest(t *testing.T, names ...string) {
	t.Helper()
	for _, name := range names {
		c := d.child(name)
		c.cmd.Process.Kill()
		for e := range d.exited {
			if e.c == c && e.cmd == c.cmd {
				c.running = false
				d.reportExit(e)
				break
			}
		}
	}
}

// TestDemoHints checks that the hints name the demo's own processes by
// PID, in an order that works when followed, and that nothing in them
// matches processes by name.
func TestDemoHints(t *testing.T) {
	d, out := newTestDemo(t)
	d.printHints()
	hints := out.String()
	pid := func(name string) int { return d.child(name).cmd.Process.Pid }
	for _, bad := range []string{"pkill", "killall", "pidof"} {
		if strings.Contains(hints, bad) {
			t.Errorf("the hints use %s, which hits other people's processes:\n%s", bad, hints)
		}
	}
	var order []int
	for _, want := range []string{
		"curl -i --cacert " + d.dir + "/tls/ca.pem https://127.0.0.1:8443/\n",
		"curl -i --http2 --cacert " + d.dir + "/tls/ca.pem https://127.0.0.1:8443/\n",
		"curl -i --http2-prior-knowledge http://127.0.0.1:8080/\n",
		"echo hello | " + d.bin + "/edgelb-load -ws wss://127.0.0.1:8443/ws -cacert " + d.dir + "/tls/ca.pem\n",
		"/v1/agent/service/register",
		fmt.Sprintf("kill -9 %d ", pid("web-2")),
		fmt.Sprintf("kill %d\n", pid("consul")),
		fmt.Sprintf("kill -9 %d %d %d\n", pid("web-1"), pid("web-3"), pid(apiOrigin)),
		fmt.Sprintf("kill -USR1 %d\n", os.Getpid()),
		fmt.Sprintf("kill -HUP %d\n", pid("edgelb")),
	} {
		i := strings.Index(hints, want)
		if i < 0 {
			t.Fatalf("the hints lack %q:\n%s", want, hints)
		}
		order = append(order, i)
	}
	for i := 1; i < len(order); i++ {
		if order[i] < order[i-1] {
			t.Fatalf("the hints are out of order (api-1 must be registered while Consul runs, and Consul brought back after it is stopped):\n%s", hints)
		}
	}
}

// TestDemoOriginsComeAndGo kills the origins one by one: the demo says that
// edgelb routes around them only while a web origin is left, starts again
// what was stopped on SIGUSR1, and stops the restarted processes too.
func TestDemoOriginsComeAndGo(t *testing.T) {
	d, out := newTestDemo(t)
	d.killForTest(t, "web-2")
	if !strings.Contains(out.String(), "origin web-2 exited (signal: killed); edgelb routes around it (2 of 3 web origins left)") {
		t.Fatalf("after web-2 exited:\n%s", out)
	}
	out.Reset()
	d.killForTest(t, "web-1", "web-3")
	if got := out.String(); !strings.Contains(got, "no web origin is left: edgelb answers from stored copies") ||
		strings.Contains(got, "web-3 exited (signal: killed); edgelb routes around it") {
		t.Fatalf("after every web origin exited:\n%s", got)
	}
	if !strings.Contains(out.String(), fmt.Sprintf("start it again: kill -USR1 %d", os.Getpid())) {
		t.Fatalf("no way back given:\n%s", out)
	}

	out.Reset()
	old := d.child("web-2").cmd.Process.Pid
	d.startStopped()
	var restarted []*exec.Cmd
	for _, name := range []string{"web-1", "web-2", "web-3"} {
		c := d.child(name)
		if !c.running || !strings.Contains(out.String(), fmt.Sprintf("%s runs again as PID %d", name, c.cmd.Process.Pid)) {
			t.Fatalf("%s not started again:\n%s", name, out)
		}
		restarted = append(restarted, c.cmd)
	}
	if d.child("web-2").cmd.Process.Pid == old {
		t.Fatal("web-2 has its old PID")
	}
	// stopAll returns once each process is reaped: its PID is gone.
	d.stopAll()
	for _, cmd := range restarted {
		if err := syscall.Kill(cmd.Process.Pid, 0); err == nil {
			t.Fatalf("a restarted origin (PID %d) still runs after the demo stopped", cmd.Process.Pid)
		}
	}
}
