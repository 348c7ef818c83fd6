package main

import (
	"bufio"
	"encoding/json"
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
	"testing"
	"time"
)

// TestDescriptorLimit runs edgelb with 200 file descriptors and holds 400
// connections to it, on both engines. At the limit it must not spin, must
// keep its listener, must report the shortage in /readyz, must answer the
// requests it cannot forward with 503 overloaded without blaming the
// backend, and must log the shortage once rather than once per failure.
// Once the connections close, new ones are served again.
func TestDescriptorLimit(t *testing.T) {
	for _, loop := range []string{"true", "false"} {
		t.Run("event_loop="+loop, func(t *testing.T) { testDescriptorLimit(t, loop) })
	}
}

func testDescriptorLimit(t *testing.T, eventLoop string) {
	origin := startOrigin(t)
	dir := t.TempDir()
	listen, admin := freeAddr(t), freeAddr(t)
	path := filepath.Join(dir, "edgelb.yaml")
	// Held connections send nothing for a while: header_timeout must not
	// close them first. One failure blamed on the backend would eject it,
	// one failed tcp probe would mark it down.
	writeConfig(t, path, fmt.Sprintf(`listen: %s
admin: %s
state_dir: %s
server: {event_loop: %s, header_timeout: 2m, idle_timeout: 2m}
services:
  web:
    static: [%s]
    health:
      active: {type: tcp, interval: 100ms, fall: 1}
      passive: {consecutive_gateway_failures: 1}
routes: [{service: web}]
`, listen, admin, filepath.Join(dir, "state"), eventLoop, origin))

	// ulimit -n sets the hard limit too, which the Go runtime would
	// otherwise raise the soft one to.
	cmd := exec.Command("sh", "-c", `ulimit -n 200 && exec "$0" "$@"`, edgelbBin, "-config", path)
	cmd.Env = append(os.Environ(), "GOMAXPROCS=2")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	output := startLogged(t, dir, cmd)
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	pid := cmd.Process.Pid

	// The admin API is asked over one kept-alive connection, opened before
	// the limit: at the limit, edgelb cannot accept a new one either.
	adminClient := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1}}
	adminGet := func(p string) (int, string) {
		resp, err := adminClient.Get("http://" + admin + p)
		if err != nil {
			t.Fatalf("GET %s: %v", p, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	waitFor(t, "edgelb ready", func() bool { code, _ := get("http://" + admin + "/readyz"); return code == 200 })
	if limits, _ := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid)); !strings.Contains(string(limits), "Max open files            200") {
		t.Fatalf("edgelb does not run with 200 descriptors:\n%s", limits)
	}
	if code, body := adminGet("/readyz"); code != 200 {
		t.Fatalf("/readyz before: %d %s", code, body)
	}

	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for i := 0; i < 400; i++ {
		c, err := net.DialTimeout("tcp", listen, 10*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		held = append(held, c)
	}
	waitFor(t, "/readyz to report the descriptor limit", func() bool {
		code, body := adminGet("/readyz")
		return code == 503 && strings.Contains(body, "too many open files")
	})

	// Idle at the limit, with connections waiting in the backlog: no spin.
	cpu0 := cpuTime(t, pid)
	time.Sleep(time.Second)
	used := cpuTime(t, pid) - cpu0
	t.Logf("CPU time in 1s at the limit: %v", used)
	if used > 300*time.Millisecond {
		t.Errorf("edgelb used %v of CPU in 1s at the descriptor limit: it spins", used)
	}

	// Requests at the limit: each needs a backend connection of its own
	// (the origin answers /slow after a second), which edgelb cannot open.
	var mu sync.Mutex
	statuses := map[string]int{}
	var wg sync.WaitGroup
	for i, c := range held {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetDeadline(time.Now().Add(4 * time.Second))
			fmt.Fprintf(c, "GET /slow?%d HTTP/1.1\r\nHost: a\r\n\r\n", i)
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				return // still in the backlog
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			mu.Lock()
			statuses[fmt.Sprintf("%d %s %s", resp.StatusCode, resp.Header.Get("Edgelb-Error"), resp.Header.Get("Retry-After"))]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	t.Logf("answers at the limit: %v", statuses)
	for s := range statuses {
		if s != "200  " && s != "503 overloaded 1" {
			t.Errorf("answer at the descriptor limit: %q, want 200 or 503 overloaded with Retry-After", s)
		}
	}
	if statuses["503 overloaded 1"] == 0 {
		t.Errorf("no request met the descriptor limit: %v", statuses)
	}
	if code, body := adminGet("/readyz"); code != 503 || !strings.Contains(body, "too many open files") {
		t.Errorf("/readyz during the shortage: %d %s", code, body)
	}
	assertBackendHealthy := func(when string) {
		t.Helper()
		_, body := adminGet("/status")
		var st struct {
			Services map[string]struct {
				Backends []struct{ State, Reason string }
			}
		}
		if err := json.Unmarshal([]byte(body), &st); err != nil {
			t.Fatalf("/status: %v\n%s", err, body)
		}
		for _, b := range st.Services["web"].Backends {
			if b.State != "healthy" {
				t.Errorf("%s: backend %s (%s): edgelb's own shortage was blamed on it", when, b.State, b.Reason)
			}
		}
	}
	assertBackendHealthy("at the limit")

	for _, c := range held {
		c.Close()
	}
	held = nil
	waitFor(t, "new connections served again", func() bool {
		code, body := get("http://" + listen + "/after")
		return code == 200 && body == "origin /after"
	})
	assertBackendHealthy("after")
	_, metrics := adminGet("/metrics")
	if !strings.Contains(metrics, `edgelb_accept_errors_total{cause="emfile"}`) || strings.Contains(metrics, `edgelb_accept_errors_total{cause="emfile"} 0`) {
		t.Errorf("accept errors not counted:\n%s", grepLines(metrics, "accept_errors"))
	}
	waitFor(t, "/readyz ready again", func() bool { code, _ := adminGet("/readyz"); return code == 200 })

	log := output()
	t.Logf("log lines on the shortage:\n%s", grepLines(log, "too many open files"))
	if n := strings.Count(log, "cannot accept connections"); n < 1 || n > 2 {
		t.Errorf("the accept failure was logged %d times, want once per 10s:\n%s", n, grepLines(log, "accept"))
	}
	for _, bad := range []string{"server stopped", "cannot hand a connection"} {
		if strings.Contains(log, bad) {
			t.Errorf("log has %q:\n%s", bad, grepLines(log, bad))
		}
	}
}

// cpuTime returns the user and system CPU time process pid has used.
func cpuTime(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the command name, which is in parentheses: utime and
	// stime are the 12th and 13th, in clock ticks of 1/100 s.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

func grepLines(s, word string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, word) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
