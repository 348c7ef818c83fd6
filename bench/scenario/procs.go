// Package scenario runs edgelb, demo origins and Consul as real processes
// and drives load through them, for failure tests and benchmarks.
package scenario

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Binaries builds edgelb and demo-origin into a temporary directory once
// per test binary and returns that directory.
func Binaries(t testing.TB) string {
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "edgelb-bin-")
		if err != nil {
			buildErr = err
			return
		}
		cmd := exec.Command("go", "build", "-o", dir+"/", "github.com/edgelb/edgelb/cmd/edgelb", "github.com/edgelb/edgelb/cmd/demo-origin")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
			return
		}
		binDir = dir
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// Proc is a child process.
type Proc struct {
	Name string
	Addr string
	cmd  *exec.Cmd
	out  *bytes.Buffer
	done chan struct{}
}

// Start runs bin with args, stopping it when the test ends.
func Start(t testing.TB, name, bin string, args ...string) *Proc {
	t.Helper()
	p := &Proc{Name: name, cmd: exec.Command(bin, args...), out: &bytes.Buffer{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.Signal(syscall.SIGCONT)
		p.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("%s output:\n%s", name, p.out.String())
		}
	})
	return p
}

// Signal sends sig to the process.
func (p *Proc) Signal(sig syscall.Signal) { p.cmd.Process.Signal(sig) }

// Kill9 kills the process with SIGKILL and waits for it.
func (p *Proc) Kill9() {
	p.cmd.Process.Kill()
	<-p.done
}

// FreeAddr returns a free loopback address.
func FreeAddr(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// StartOrigin starts a demo origin.
func StartOrigin(t testing.TB, name string, args ...string) *Proc {
	addr := FreeAddr(t)
	p := Start(t, name, filepath.Join(Binaries(t), "demo-origin"), append([]string{"-listen", addr, "-name", name}, args...)...)
	p.Addr = addr
	WaitHTTP(t, "http://"+addr+"/health")
	return p
}

// Edge is a running edgelb process.
type Edge struct {
	*Proc
	Admin string
}

// StartEdge starts edgelb with the given config body (listen, admin and
// state_dir are added) and waits until it is alive, and ready when the
// config has routes of its own.
func StartEdge(t testing.TB, config, stateDir string) *Edge {
	t.Helper()
	e := &Edge{Admin: FreeAddr(t)}
	addr := FreeAddr(t)
	path := filepath.Join(t.TempDir(), "edgelb.yaml")
	full := fmt.Sprintf("listen: %s\nadmin: %s\nstate_dir: %s\n%s", addr, e.Admin, stateDir, config)
	if err := os.WriteFile(path, []byte(full), 0o644); err != nil {
		t.Fatal(err)
	}
	e.Proc = Start(t, "edgelb", filepath.Join(Binaries(t), "edgelb"), "-config", path)
	e.Addr = addr
	WaitHTTP(t, "http://"+e.Admin+"/healthz")
	if strings.HasPrefix(config, "routes:") || strings.Contains(config, "\nroutes:") {
		WaitHTTP(t, "http://"+e.Admin+"/readyz")
	}
	return e
}

// Status returns edgelb's /status document.
func (e *Edge) Status(t testing.TB) map[string]any {
	resp, err := http.Get("http://" + e.Admin + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	return st
}

// BackendState returns the state and reason of one backend in /status.
func (e *Edge) BackendState(t testing.TB, service, addr string) (state, reason string, since time.Time) {
	st := e.Status(t)
	svc, _ := st["services"].(map[string]any)[service].(map[string]any)
	if svc == nil {
		return "", "", time.Time{}
	}
	for _, b := range svc["backends"].([]any) {
		b := b.(map[string]any)
		if b["addr"] == addr {
			since, _ := time.Parse(time.RFC3339Nano, b["since"].(string))
			return b["state"].(string), b["reason"].(string), since
		}
	}
	return "", "", time.Time{}
}

// WaitHTTP waits up to 20 s for url to answer 200.
func WaitHTTP(t testing.TB, url string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s did not answer 200 in 20s", url)
}
