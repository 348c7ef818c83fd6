package discovery

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestStateRoundTrip(t *testing.T) {
	dir := t.TempDir()
	f := newStateFile(dir, testLogger())
	if sets, ok := f.load(); sets != nil || ok {
		t.Fatalf("missing file loaded: %v", sets)
	}
	web := NewSet("web", "consul", []Instance{{Addr: "b:1"}, {Addr: "a:1", Weight: 4}}, testTime)
	web.Routes = []Route{{Host: "*", Path: "/"}}
	f.save(map[string]*Set{"web": web})
	f.save(map[string]*Set{"web": web, "api": NewSet("api", "consul", nil, testTime)})
	sets, _ := f.load()
	got := fmt.Sprint(len(sets), sets["web"].Instances, sets["web"].Routes, sets["web"].UpdatedAt.Equal(testTime), sets["api"].Instances)
	if got != "2 [{a:1 4} {b:1 1}] [{* /}] true []" {
		t.Fatalf("round trip: %s", got)
	}
	var names []string
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if fmt.Sprint(names) != "[discovery.json discovery.json.old]" {
		t.Fatalf("files in state_dir: %v", names)
	}
}

func TestStateCorrupt(t *testing.T) {
	f := func(content, wantLog string) {
		t.Helper()
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, StateFileName), []byte(content), 0o644)
		var logs bytes.Buffer
		sets, _ := newStateFile(dir, slog.New(slog.NewTextHandler(&logs, nil))).load()
		if len(sets) != 0 {
			t.Errorf("%q: loaded %v", content, sets)
		}
		if !strings.Contains(logs.String(), wantLog) {
			t.Errorf("%q: log %q, want %q", content, logs.String(), wantLog)
		}
	}
	f("{not json", "cannot use discovery state")
	f("", "cannot use discovery state")
	f(`{"version": 7, "sets": {}}`, "version 7, want 1")
	// A set filed under another name than its own is dropped.
	f(`{"version": 1, "sets": {"web": {"service": "api"}, "x": null}}`, "")
}

func TestCorruptStateIsIgnored(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, StateFileName), []byte("{not json"), 0o644)
	if sets, ok := newStateFile(dir, testLogger()).load(); sets != nil || ok {
		t.Fatalf("corrupt state loaded: %v", sets)
	}
	f := newStateFile(dir, testLogger())
	f.save(map[string]*Set{"web": {Service: "web", Source: "consul", Instances: []Instance{{Addr: "b:1"}, {Addr: "a:1"}}, Routes: []Route{{Host: "*", Path: "/"}}}})
	sets, ok := f.load()
	if got := fmt.Sprint(sets["web"].Instances, sets["web"].Routes); !ok || got != "[{a:1 1} {b:1 1}] [{* /}]" {
		t.Fatalf("round trip: %s", got)
	}
	// The damaged file was not kept as the previous copy.
	if _, err := os.Stat(filepath.Join(dir, StateFileName+".old")); !os.IsNotExist(err) {
		t.Fatalf("a damaged state became the previous copy: %v", err)
	}
}

func TestDamagedStateFallsBackToPreviousCopy(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, StateFileName)
	f := newStateFile(dir, testLogger())
	set := func(addr string) map[string]*Set {
		return map[string]*Set{"api": {Service: "api", Source: "consul", Instances: []Instance{{Addr: addr}}, Routes: []Route{{Host: "*", Path: "/api"}}}}
	}
	load := func() string {
		t.Helper()
		sets, ok := newStateFile(dir, testLogger()).load()
		if !ok {
			return "nothing"
		}
		return fmt.Sprint(sets["api"].Instances, sets["api"].Routes)
	}
	f.save(set("a:1"))
	f.save(set("b:1"))
	if got := load(); got != "[{b:1 1}] [{* /api}]" {
		t.Fatalf("current copy: %s", got)
	}
	// Damage of every kind: the previous good copy is used.
	for _, damage := range []string{"", "{\"version\": 1, \"sets\": {\"api\"", "\x00\x00\x00", "{\"version\": 7}"} {
		os.WriteFile(path, []byte(damage), 0o644)
		if got := load(); got != "[{a:1 1}] [{* /api}]" {
			t.Fatalf("with discovery.json %q: %s", damage, got)
		}
	}
	// A save over a damaged file keeps the good previous copy.
	f.save(set("c:1"))
	os.WriteFile(path, nil, 0o644)
	if got := load(); got != "[{a:1 1}] [{* /api}]" {
		t.Fatalf("after a save over a damaged file: %s", got)
	}
	// Only the previous copy left (a crash between the renames): used.
	f.save(set("d:1"))
	f.save(set("e:1"))
	os.Remove(path)
	if got := load(); got != "[{d:1 1}] [{* /api}]" {
		t.Fatalf("with only the previous copy: %s", got)
	}
	os.WriteFile(path+".old", []byte("{"), 0o644)
	if got := load(); got != "nothing" {
		t.Fatalf("with both copies damaged: %s", got)
	}
}
