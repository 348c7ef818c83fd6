package stale

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgelb/edgelb/internal/panics"
)

// A save that panics is counted and logged, and the saves after it still
// run: the store reaches state_dir all the same.
func TestPersistPanicIsCountedAndSavingGoesOn(t *testing.T) {
	dir := t.TempDir()
	var logs bytes.Buffer
	s := New(Config{MaxBytes: 1 << 20, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	s.Save(t0, schemeHTTP, newReq("GET", "a", "/p"), newResp(200, "saved after a panic"))
	var saves atomic.Int32
	s.saveHook = func() {
		if saves.Add(1) == 1 {
			panic("test panic while saving")
		}
	}
	before := panics.Stale.Total()

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.RunPersist(ctx, dir, 5*time.Millisecond)
	}()
	// The third save starts once the second, the first after the panic,
	// has ended.
	deadline := time.Now().Add(10 * time.Second)
	for saves.Load() < 3 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	<-done
	if n := saves.Load(); n < 3 {
		t.Fatalf("RunPersist made %d saves in 10s", n)
	}

	if n := panics.Stale.Total() - before; n != 1 {
		t.Fatalf(`edgelb_panics_total{component="stale"} went up by %d, want 1`, n)
	}
	out := logs.String()
	want := `level=ERROR msg="stale store: panic while saving" component=stale dir=` + dir + ` panic="test panic while saving" stack=`
	if strings.Count(out, `msg="stale store: panic while saving"`) != 1 || !strings.Contains(out, want) || !strings.Contains(out, "persist_test.go") {
		t.Fatalf("log, want one line with %q and the panicking frame:\n%s", want, out)
	}
	s2 := New(Config{MaxBytes: 1 << 20})
	if err := s2.LoadFrom(dir); err != nil {
		t.Fatal(err)
	}
	if got, _ := serve(s2, t0, newReq("GET", "a", "/p"), hour); got != "200 saved after a panic" {
		t.Fatalf("the store saved after the panic serves %q", got)
	}
}
