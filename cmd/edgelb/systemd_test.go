package main

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/edgelb/edgelb/balancer"
)

const unitPath = "../../configs/edgelb.service"

// readUnit returns the [Service] settings of the systemd unit, each key
// with its values in order.
func readUnit(t *testing.T) map[string][]string {
	t.Helper()
	f, err := os.Open(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	settings := make(map[string][]string)
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[':
			section = line
		case section == "[Service]":
			k, v, ok := strings.Cut(line, "=")
			if !ok {
				t.Fatalf("%s: %q is not KEY=VALUE", unitPath, line)
			}
			settings[k] = append(settings[k], v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return settings
}

// TestSystemdUnit: the unit starts edgelb on its config after checking
// it, reloads with SIGHUP, stops with SIGTERM and waits longer than the
// default drain, and runs edgelb unprivileged and confined, with its
// state_dir writable.
func TestSystemdUnit(t *testing.T) {
	u := readUnit(t)
	f := func(key, want string) {
		t.Helper()
		if got := u[key]; len(got) == 0 || got[len(got)-1] != want {
			t.Errorf("%s=%q, want %q", key, got, want)
		}
	}
	f("ExecStart", "/usr/local/bin/edgelb -config /etc/edgelb/edgelb.yaml")
	f("ExecStartPre", "/usr/local/bin/edgelb -config /etc/edgelb/edgelb.yaml -check")
	f("ExecReload", "/bin/kill -HUP $MAINPID")
	f("KillSignal", "SIGTERM")
	f("NoNewPrivileges", "yes")
	f("ProtectSystem", "strict")
	f("ProtectHome", "yes")
	f("PrivateTmp", "yes")
	f("AmbientCapabilities", "CAP_NET_BIND_SERVICE")
	f("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE")
	f("StateDirectory", "edgelb")
	f("ReadWritePaths", "/var/lib/edgelb")
	if n, err := strconv.Atoi(strings.Join(u["LimitNOFILE"], "")); err != nil || n < 65536 {
		t.Errorf("LimitNOFILE=%q, want a number of at least 65536", u["LimitNOFILE"])
	}
	if u["User"] == nil || u["User"][0] == "root" {
		t.Errorf("User=%q: edgelb needs no root", u["User"])
	}
	stop, err := time.ParseDuration(strings.Join(u["TimeoutStopSec"], ""))
	if err != nil || stop <= balancer.DefaultDrainTimeout+5*time.Second {
		t.Errorf("TimeoutStopSec=%q, want a duration well above the default drain_timeout %s, or systemd kills edgelb mid-drain",
			u["TimeoutStopSec"], balancer.DefaultDrainTimeout)
	}
}

// TestSystemdUnitVerifies runs systemd-analyze verify on the unit, with the
// binary path pointing at a real edgelb (verify checks that it is
// executable), and fails on any complaint about the unit. It also wants
// systemd-analyze's offline security review to rate the unit's exposure
// low. It is skipped where systemd-analyze is not installed, as in CI
// containers without systemd; TestSystemdUnit checks the unit's keys
// everywhere.
func TestSystemdUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed here (no systemd); TestSystemdUnit still checks the unit's settings")
	}
	unit, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "edgelb.service")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(string(unit), "/usr/local/bin/edgelb", edgelbBin)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", path).CombinedOutput()
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if strings.Contains(line, "edgelb.service") {
			t.Errorf("systemd-analyze verify: %s", line)
		} else if line != "" {
			t.Logf("systemd-analyze verify, about other units: %s", line)
		}
	}
	if err != nil {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}

	out, err = exec.Command(analyze, "security", "--offline=true", "--no-pager", path).CombinedOutput()
	m := regexp.MustCompile(`Overall exposure level for edgelb\.service: ([0-9.]+)`).FindSubmatch(out)
	if err != nil || m == nil {
		// --offline came with systemd 250.
		t.Logf("systemd-analyze security --offline is not available here (%v); exposure not rated:\n%s", err, out)
		return
	}
	if level, _ := strconv.ParseFloat(string(m[1]), 64); level > 2.5 {
		t.Errorf("systemd-analyze security rates the unit's exposure %s, want 2.5 or less (OK):\n%s", m[1], out)
	} else {
		t.Logf("systemd-analyze security: exposure %s", m[1])
	}
}
