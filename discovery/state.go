package discovery

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
)

// StateFileName is the file under state_dir that keeps the last-known-good
// sets of the Consul source.
const StateFileName = "discovery.json"

// stateFile keeps the last-known-good sets in state_dir, so that a restart
// during a registry outage still knows where the backends are. Callers
// serialize save.
type stateFile struct {
	path string
	log  *slog.Logger
}

func newStateFile(dir string, log *slog.Logger) *stateFile {
	return &stateFile{path: filepath.Join(dir, StateFileName), log: log}
}

// stateVersion changes when the file's format does; other versions are
// ignored.
const stateVersion = 1

type stateDoc struct {
	Version int             `json:"version"`
	Sets    map[string]*Set `json:"sets"`
}

// load returns the persisted sets, normalised; a missing file is an empty
// state, and a corrupt one is logged and ignored.
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
	if err := json.Unmarshal(data, &doc); err != nil || doc.Version != stateVersion {
		if err == nil {
			err = fmt.Errorf("version %d, want %d", doc.Version, stateVersion)
		}
		f.log.Error("cannot parse discovery state; ignoring it (it is rewritten on the next change)", "path", f.path, "err", err)
		return nil
	}
	for name, s := range doc.Sets {
		if s == nil || s.Service != name {
			delete(doc.Sets, name)
			continue
		}
		routes := s.Routes
		*s = *NewSet(s.Service, s.Source, s.Instances, s.UpdatedAt)
		sortRoutes(routes)
		s.Routes = routes
	}
	return doc.Sets
}

// save writes the sets atomically: a synced temp file renamed over the old
// one, so that a crash leaves either the old or the new state.
func (f *stateFile) save(sets map[string]*Set) {
	if err := writeFileAtomic(f.path, stateDoc{Version: stateVersion, Sets: sets}); err != nil {
		f.log.Error("cannot persist discovery state", "path", f.path, "err", err)
	}
}

func writeFileAtomic(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("cannot encode %s: %w", path, err)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("cannot create %s: %w", dir, err)
	}
	tmp, err := os.CreateTemp(dir, ".tmp-"+filepath.Base(path))
	if err != nil {
		return fmt.Errorf("cannot create a temp file in %s: %w", dir, err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("cannot write %s: %w", tmp.Name(), err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("cannot replace %s: %w", path, err)
	}
	return nil
}
