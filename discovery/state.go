package discovery

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
)

// stateFile keeps the last-known-good sets in state_dir, so that a restart
// during a registry outage still knows where the backends are.
type stateFile struct {
	path string
	log  *slog.Logger
	mu   sync.Mutex
}

// stateFileName is the file under state_dir.
const stateFileName = "discovery.json"

func newStateFile(dir string, log *slog.Logger) *stateFile {
	return &stateFile{path: filepath.Join(dir, stateFileName), log: log}
}

type stateDoc struct {
	Version int             `json:"version"`
	Sets    map[string]*Set `json:"sets"`
}

// load returns the persisted sets; a missing file is an empty state and a
// corrupt one is logged and ignored.
func (f *stateFile) load() map[string]*Set {
	data, err := os.ReadFile(f.path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		f.log.Error("cannot read discovery state; starting without it", "path", f.path, "err", err)
		return nil
	}
	var doc stateDoc
	if err := json.Unmarshal(data, &doc); err != nil || doc.Version != 1 {
		if err == nil {
			err = fmt.Errorf("unknown version %d", doc.Version)
		}
		f.log.Error("cannot parse discovery state; starting without it", "path", f.path, "err", err)
		return nil
	}
	for name, s := range doc.Sets {
		if s == nil || s.Service != name {
			delete(doc.Sets, name)
			continue
		}
		routes := s.Routes
		*s = *NewSet(s.Service, s.Source, s.Instances, s.UpdatedAt)
		s.Routes = routes
	}
	return doc.Sets
}

// save writes the sets atomically: a temp file renamed over the old one.
func (f *stateFile) save(sets map[string]*Set) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := writeFileAtomic(f.path, stateDoc{Version: 1, Sets: sets}); err != nil {
		f.log.Error("cannot persist discovery state", "path", f.path, "err", err)
	}
}

func writeFileAtomic(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
