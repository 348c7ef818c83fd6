package main

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/edgelb/edgelb/discovery/consultest"
)

// TestSIGTERMLeavesTheFleetFirst runs the edgelb binary registered in
// Consul: SIGTERM deregisters it at once, it goes on answering clients for
// its drain_delay, then refuses connections and exits 0.
func TestSIGTERMLeavesTheFleetFirst(t *testing.T) {
	a := consultest.Start(t)
	origin := startOrigin(t)
	dir := t.TempDir()
	listen, admin := freeAddr(t), freeAddr(t)
	path := filepath.Join(dir, "edgelb.yaml")
	writeConfig(t, path, fmt.Sprintf(`listen: %s
admin: %s
state_dir: %s
consul: {address: %s, register: {name: edge, check_interval: 1s, drain_delay: 2s}}
services:
  web: {static: [%s]}
routes: [{service: web}]
`, listen, admin, filepath.Join(dir, "state"), a.Addr(), origin))
	cmd := exec.Command(edgelbBin, "-config", path)
	startLogged(t, dir, cmd)
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })

	passing := func() (n int) {
		entries, _, err := a.Client.Health().Service("edge", "", true, nil)
		if err == nil {
			n = len(entries)
		}
		return n
	}
	waitFor(t, "edgelb passing in Consul", func() bool { return passing() == 1 })

	cmd.Process.Signal(syscall.SIGTERM)
	sent := time.Now()
	waitFor(t, "deregistration", func() bool {
		entries, _, err := a.Client.Health().Service("edge", "", false, nil)
		return err == nil && len(entries) == 0
	})
	if d := time.Since(sent); d > time.Second {
		t.Errorf("deregistered %s after SIGTERM", d)
	}
	// Still serving: whatever routed by Consul may not have noticed yet.
	for time.Since(sent) < 1500*time.Millisecond {
		if code, body := get("http://" + listen + "/x"); code != 200 || body != "origin /x" {
			t.Fatalf("%s after SIGTERM, within the drain delay: %d %q", time.Since(sent), code, body)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if code, body := get("http://" + admin + "/readyz"); code != 503 || !strings.Contains(body, "leaving") {
		t.Errorf("/readyz within the drain delay: %d %q", code, body)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v", err)
		}
		if d := time.Since(sent); d < 2*time.Second {
			t.Fatalf("exited %s after SIGTERM, before the 2s drain delay", d)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("edgelb did not exit after SIGTERM")
	}
	if code, _ := get("http://" + listen + "/x"); code != 0 {
		t.Fatalf("after exit: %d", code)
	}
}
