package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// versionVar is the variable `make build` stamps with -ldflags -X.
const versionVar = "github.com/edgelb/edgelb/internal/version.version"

// TestVersion: -version prints one line and exits 0 without a config; a
// binary stamped as `make build` stamps it reports that version there and
// in the admin API's /status.
func TestVersion(t *testing.T) {
	out, err := exec.Command(edgelbBin, "-version").CombinedOutput()
	if err != nil {
		t.Fatalf("edgelb -version: %v\n%s", err, out)
	}
	line := strings.TrimSuffix(string(out), "\n")
	if !strings.HasPrefix(line, "edgelb ") || strings.Contains(line, "\n") ||
		!strings.HasSuffix(line, fmt.Sprintf(" %s %s/%s", runtime.Version(), runtime.GOOS, runtime.GOARCH)) {
		t.Fatalf("edgelb -version printed %q", out)
	}

	makefile, err := os.ReadFile("../../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(makefile), "-X "+versionVar+"=") {
		t.Fatalf("the Makefile does not stamp %s", versionVar)
	}
	stamped := filepath.Join(t.TempDir(), "edgelb")
	if out, err := exec.Command("go", "build", "-ldflags", "-X "+versionVar+"=v1.2.3-test", "-o", stamped, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err = exec.Command(stamped, "-version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "edgelb v1.2.3-test ") {
		t.Fatalf("stamped edgelb -version: %v %q", err, out)
	}

	dir := t.TempDir()
	listen, admin := freeAddr(t), freeAddr(t)
	path := filepath.Join(dir, "edgelb.yaml")
	writeConfig(t, path, fmt.Sprintf("listen: %s\nadmin: %s\nstate_dir: %s\nservices:\n  web: {static: [%s]}\nroutes: [{service: web}]\n",
		listen, admin, filepath.Join(dir, "state"), startOrigin(t)))
	cmd := exec.Command(stamped, "-config", path)
	startLogged(t, dir, cmd)
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	var status struct {
		Version string `json:"version"`
	}
	waitFor(t, "/status", func() bool {
		code, body := get("http://" + admin + "/status")
		return code == 200 && json.Unmarshal([]byte(body), &status) == nil
	})
	if status.Version != "v1.2.3-test" {
		t.Fatalf("/status version %q, want v1.2.3-test", status.Version)
	}
}
