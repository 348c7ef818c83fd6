package fleet

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestInstanceID(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	id, err := InstanceID(dir, "127.0.0.1:8080")
	if err != nil || !validID(id) {
		t.Fatalf("first ID %q: %v", id, err)
	}
	again, err := InstanceID(dir, "127.0.0.1:9090")
	if err != nil || again != id {
		t.Fatalf("second ID from the same state_dir: %q (%v), want %q", again, err, id)
	}
	if other, _ := InstanceID(t.TempDir(), "127.0.0.1:8080"); other == id {
		t.Fatalf("two state dirs, one ID %q", id)
	}

	// A state_dir that cannot hold the file: host name and listen port.
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o644)
	id, err = InstanceID(filepath.Join(file, "state"), "0.0.0.0:8080")
	if err == nil || !strings.HasSuffix(id, "-8080") || !validID(id) {
		t.Fatalf("fallback ID %q, err %v", id, err)
	}

	// A damaged file is replaced.
	os.WriteFile(filepath.Join(dir, InstanceIDFile), []byte("no good/\n"), 0o644)
	if id, err := InstanceID(dir, ""); err != nil || !validID(id) {
		t.Fatalf("ID after a damaged file: %q %v", id, err)
	}
}

func TestVersion(t *testing.T) {
	if v := Version(); v == "" {
		t.Fatal("empty version")
	}
}
