package scenario

import (
	"errors"
	"os"
	"sync"
	"testing"
	"time"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

func TestMain(m *testing.M) {
	StallProbeMain()
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// Binaries builds edgelb and demo-origin once per test binary and returns
// their directory.
func Binaries(t testing.TB) string {
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "edgelb-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binDir = dir
		buildErr = Build(dir)
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

// testProcs returns a Procs whose processes stop when the test ends, their
// output logged if it failed.
func testProcs(t testing.TB) *Procs {
	g := &Procs{Bin: Binaries(t), Dir: t.TempDir()}
	t.Cleanup(g.Close)
	return g
}

func logOnFailure(t testing.TB, p *Proc) {
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("%s output:\n%s", p.Name, p.Output())
		}
	})
}

// StartOrigin starts a demo origin for the test.
func StartOrigin(t testing.TB, name string, args ...string) *Proc {
	t.Helper()
	p, err := testProcs(t).StartOrigin(name, args...)
	if err != nil {
		t.Fatal(err)
	}
	logOnFailure(t, p)
	return p
}

// StartEdge starts edgelb for the test with the given config body.
func StartEdge(t testing.TB, config, stateDir string) *Edge {
	t.Helper()
	e, err := testProcs(t).StartEdge(config, stateDir)
	if err != nil {
		t.Fatal(err)
	}
	logOnFailure(t, e.Proc)
	return e
}

// backendState returns the state, reason and since of one backend in
// edgelb's /status ("" when it is not listed).
func backendState(t testing.TB, e *Edge, service, addr string) (state, reason string, since time.Time) {
	t.Helper()
	st, err := e.Backend(service, addr)
	if errors.Is(err, ErrNoBackend) {
		return "", "", time.Time{}
	}
	if err != nil {
		t.Fatal(err)
	}
	return st.State, st.Reason, st.Since
}
