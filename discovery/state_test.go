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
	if sets := f.load(); sets != nil {
		t.Fatalf("missing file loaded: %v", sets)
	}
	web := NewSet("web", "consul", []Instance{{Addr: "b:1"}, {Addr: "a:1", Weight: 4}}, testTime)
	web.Routes = []Route{{Host: "*", Path: "/"}}
	f.save(map[string]*Set{"web": web})
	f.save(map[string]*Set{"web": web, "api": NewSet("api", "consul", nil, testTime)})
	sets := f.load()
	got := fmt.Sprint(len(sets), sets["web"].Instances, sets["web"].Routes, sets["web"].UpdatedAt.Equal(testTime), sets["api"].Instances)
	if got != "2 [{a:1 4} {b:1 1}] [{* /}] true []" {
		t.Fatalf("round trip: %s", got)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temp files left behind: %v", entries)
	}
}

func TestStateCorrupt(t *testing.T) {
	f := func(content, wantLog string) {
		t.Helper()
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, StateFileName), []byte(content), 0o644)
		var logs bytes.Buffer
		sets := newStateFile(dir, slog.New(slog.NewTextHandler(&logs, nil))).load()
		if len(sets) != 0 {
			t.Errorf("%q: loaded %v", content, sets)
		}
		if !strings.Contains(logs.String(), wantLog) {
			t.Errorf("%q: log %q, want %q", content, logs.String(), wantLog)
		}
	}
	f("{not json", "cannot parse discovery state")
	f("", "cannot parse discovery state")
	f(`{"version": 7, "sets": {}}`, "version 7, want 1")
	// A set filed under another name than its own is dropped.
	f(`{"version": 1, "sets": {"web": {"service": "api"}, "x": null}}`, "")
}
