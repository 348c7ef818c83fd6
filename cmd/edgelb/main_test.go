package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// edgelbBin is the edgelb binary built for these tests.
var edgelbBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "edgelb-cmd-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	edgelbBin = filepath.Join(dir, "edgelb")
	out, err := exec.Command("go", "build", "-o", edgelbBin, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "cannot build edgelb: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func writeConfig(t *testing.T, path, yaml string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestCheck(t *testing.T) {
	dir := t.TempDir()
	f := func(yaml string, wantCode int, want ...string) {
		t.Helper()
		path := filepath.Join(dir, "edgelb.yaml")
		writeConfig(t, path, yaml)
		cmd := exec.Command(edgelbBin, "-config", path, "-check")
		out, err := cmd.CombinedOutput()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != wantCode {
			t.Errorf("exit %d, want %d; output:\n%s", code, wantCode, out)
		}
		for _, w := range want {
			if !strings.Contains(string(out), w) {
				t.Errorf("output lacks %q:\n%s", w, out)
			}
		}
	}
	f("services:\n  web: {static: [127.0.0.1:9001]}\nroutes: [{service: web}]\n", 0, "is valid")
	// Every problem is listed, each with its key.
	f("lisen: 127.0.0.1:8080\nservices:\n  web: {static: [127.0.0.1:99999], retries: -5}\nroutes: [{service: nope}]\n", 1,
		"lisen", "services.web.static[0]", "services.web.retries", "routes[0].service")
	f("services: [not, a, map]\n", 1, "services")
	f("services:\n  web: {static: [127.0.0.1:9001]}\nroutes: [{service: web}]\naccess_log: {path: /nonexistent/access.log, format: xml, sample: 2}\n", 1,
		"access_log.path", "access_log.format", "access_log.sample")
}

// TestAccessLogRotation rotates the access log as logrotate does, renaming
// the file and sending SIGUSR1, three times while clients send requests;
// then SIGTERM. Every request has its line, in one of the four files.
func TestAccessLogRotation(t *testing.T) {
	origin := startOrigin(t)
	dir := t.TempDir()
	listen, admin := freeAddr(t), freeAddr(t)
	path := filepath.Join(dir, "edgelb.yaml")
	logPath := filepath.Join(dir, "access.log")
	writeConfig(t, path, fmt.Sprintf("listen: %s\nadmin: %s\nstate_dir: %s\nservices:\n  web: {static: [%s]}\nroutes: [{service: web}]\n"+
		"access_log: {path: %s}\n", listen, admin, filepath.Join(dir, "state"), origin, logPath))
	cmd := exec.Command(edgelbBin, "-config", path)
	startLogged(t, dir, cmd)
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	waitFor(t, "edgelb ready", func() bool { code, _ := get("http://" + admin + "/readyz"); return code == 200 })

	// The clients go on until the rotations are over.
	const clients = 4
	var sent atomic.Int64
	stop := make(chan struct{})
	done := make(chan error, clients)
	for range clients {
		go func() {
			c := &http.Client{Timeout: 10 * time.Second}
			for {
				select {
				case <-stop:
					done <- nil
					return
				default:
				}
				resp, err := c.Get("http://" + listen + "/r")
				if err != nil {
					done <- err
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					done <- fmt.Errorf("status %d", resp.StatusCode)
					return
				}
				sent.Add(1)
			}
		}()
	}
	for r := 1; r <= 3; r++ {
		time.Sleep(100 * time.Millisecond)
		if err := os.Rename(logPath, fmt.Sprintf("%s.%d", logPath, r)); err != nil {
			t.Fatal(err)
		}
		cmd.Process.Signal(syscall.SIGUSR1)
		waitFor(t, "the new file", func() bool { _, err := os.Stat(logPath); return err == nil })
	}
	time.Sleep(100 * time.Millisecond)
	close(stop)
	for range clients {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("edgelb did not exit after SIGTERM")
	}
	lines, files := 0, 0
	for _, f := range []string{logPath + ".1", logPath + ".2", logPath + ".3", logPath} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(string(b), "\n"); n > 0 {
			lines += n
			files++
		}
	}
	if n := sent.Load(); int64(lines) != n {
		t.Errorf("%d lines in the rotated files for %d requests", lines, n)
	}
	if files < 2 {
		t.Errorf("the lines are in %d file(s): SIGUSR1 did not reopen the log", files)
	}
}

// freeAddr returns a loopback address that was free a moment ago, and
// that it never returned before: the kernel may give a port just freed
// to the next caller, which would then listen where another means to.
func freeAddr(t *testing.T) string {
	t.Helper()
	freeMu.Lock()
	defer freeMu.Unlock()
	for {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		if !freeGiven[addr] {
			freeGiven[addr] = true
			return addr
		}
	}
}

var (
	freeMu    sync.Mutex
	freeGiven = map[string]bool{}
)

// startOrigin serves "origin PATH" on every path; /slow answers after a
// second.
func startOrigin(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			time.Sleep(time.Second)
		}
		fmt.Fprintf(w, "origin %s", r.URL.Path)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func get(url string) (int, string) {
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for start := time.Now(); time.Since(start) < 15*time.Second; time.Sleep(10 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestSignals runs the edgelb binary: SIGHUP reloads the config (a broken
// one is refused and the running config kept), SIGTERM lets a request in
// flight finish, then exits 0.
func TestSignals(t *testing.T) {
	origin := startOrigin(t)
	dir := t.TempDir()
	listen, admin := freeAddr(t), freeAddr(t)
	path := filepath.Join(dir, "edgelb.yaml")
	base := fmt.Sprintf("listen: %s\nadmin: %s\nstate_dir: %s\nservices:\n  web: {static: [%s]}\n", listen, admin, filepath.Join(dir, "state"), origin)
	writeConfig(t, path, base+"routes: [{path: /a, service: web}, {path: /slow, service: web}]\n")

	// The process writes its log to a file, read as it grows.
	cmd := exec.Command(edgelbBin, "-config", path)
	output := startLogged(t, dir, cmd)
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	waitFor(t, "edgelb ready", func() bool { code, _ := get("http://" + admin + "/readyz"); return code == 200 })

	if code, body := get("http://" + listen + "/a"); code != 200 || body != "origin /a" {
		t.Fatalf("GET /a: %d %q", code, body)
	}
	if code, _ := get("http://" + listen + "/b"); code != 404 {
		t.Fatalf("GET /b before the reload: %d", code)
	}

	writeConfig(t, path, base+"routes: [{path: /a, service: web}, {path: /b, service: web}, {path: /slow, service: web}]\n")
	cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the new route", func() bool { code, _ := get("http://" + listen + "/b"); return code == 200 })

	writeConfig(t, path, base+"routes: [{path: /a, service: nope}]\n")
	cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the refused reload in the log", func() bool { return strings.Contains(output(), "keeping the running config") })
	if code, _ := get("http://" + listen + "/b"); code != 200 {
		t.Fatalf("a broken config changed routing: GET /b %d", code)
	}

	slow := make(chan string, 1)
	go func() {
		code, body := get("http://" + listen + "/slow")
		slow <- fmt.Sprint(code, " ", body)
	}()
	time.Sleep(200 * time.Millisecond)
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case got := <-slow:
		if got != "200 origin /slow" {
			t.Fatalf("request in flight at SIGTERM: %s", got)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("request in flight at SIGTERM never answered")
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("edgelb did not exit after SIGTERM")
	}
}

// TestReloadBooks sends SIGHUP with three broken configs (an unknown key,
// truncated YAML, an empty file), then a good one that changes the
// service: every failure is counted, and the service's request counter
// carries on through the rebuild of its pool.
func TestReloadBooks(t *testing.T) {
	origin := startOrigin(t)
	dir := t.TempDir()
	listen, admin := freeAddr(t), freeAddr(t)
	path := filepath.Join(dir, "edgelb.yaml")
	good := fmt.Sprintf("listen: %s\nadmin: %s\nstate_dir: %s\nservices:\n  web: {static: [%s]}\nroutes: [{service: web}]\n", listen, admin, filepath.Join(dir, "state"), origin)
	writeConfig(t, path, good)
	cmd := exec.Command(edgelbBin, "-config", path)
	output := startLogged(t, dir, cmd)
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	})
	waitFor(t, "edgelb ready", func() bool { code, _ := get("http://" + admin + "/readyz"); return code == 200 })
	metric := func(name string) string {
		_, body := get("http://" + admin + "/metrics")
		for _, line := range strings.Split(body, "\n") {
			if v, ok := strings.CutPrefix(line, name+" "); ok {
				return v
			}
		}
		return "absent"
	}
	for i := 0; i < 50; i++ {
		if code, _ := get("http://" + listen + "/"); code != 200 {
			t.Fatalf("GET /: %d", code)
		}
	}

	broken := []string{
		good + "bogus: 1\n", // unknown key
		good[:len(good)/2],  // truncated YAML
		"",                  // empty file
	}
	for i, yaml := range broken {
		writeConfig(t, path, yaml)
		cmd.Process.Signal(syscall.SIGHUP)
		waitFor(t, "the refused reload in the log", func() bool {
			return strings.Count(output(), "keeping the running config") == i+1
		})
	}
	if got := metric(`edgelb_config_reloads_total{result="error"}`); got != "3" {
		t.Fatalf(`edgelb_config_reloads_total{result="error"} %s after three broken configs, want 3`, got)
	}

	writeConfig(t, path, strings.Replace(good, "web: {static", "web: {retries: 1, static", 1))
	cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the reload", func() bool { return metric(`edgelb_config_reloads_total{result="ok"}`) == "1" })
	for i := 0; i < 10; i++ {
		if code, _ := get("http://" + listen + "/"); code != 200 {
			t.Fatalf("GET / after the reload: %d", code)
		}
	}
	if got := metric(`edgelb_requests_total{service="web"}`); got != "60" {
		t.Fatalf(`edgelb_requests_total{service="web"} %s after 50 requests, a reload that rebuilt the service and 10 more, want 60`, got)
	}
}

// startLogged starts cmd with its output in dir/edgelb.log and returns a
// function that reads the log so far; a failed test logs it at the end.
func startLogged(t *testing.T, dir string, cmd *exec.Cmd) (output func() string) {
	t.Helper()
	logFile, err := os.Create(filepath.Join(dir, "edgelb.log"))
	if err != nil {
		t.Fatal(err)
	}
	output = func() string { b, _ := os.ReadFile(logFile.Name()); return string(b) }
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatal(err)
	}
	// Registered before the caller's stop, so it runs after it.
	t.Cleanup(func() {
		logFile.Close()
		if t.Failed() {
			t.Logf("edgelb output:\n%s", output())
		}
	})
	return output
}
