package discovery

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"
)

// StateFileName is the file under state_dir that keeps the last-known-good
// sets of the Consul source. The copy it replaced is kept beside it, with
// ".old" appended, and used when it is damaged.
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

// oldSuffix names the previous good copy of the state file, kept beside it
// so that a damaged file does not lose every route.
const oldSuffix = ".old"

// load returns the persisted sets, normalised, and whether a usable file
// was found. A damaged file is logged and the previous good copy
// (discovery.json.old) is used instead; a missing one is an empty state.
func (f *stateFile) load() (map[string]*Set, bool) {
	sets, err := readState(f.path)
	if err == nil {
		return sets, true
	}
	if !os.IsNotExist(err) {
		f.log.Error("cannot use discovery state; trying the previous copy", "path", f.path, "err", err)
	}
	old := f.path + oldSuffix
	sets, oerr := readState(old)
	switch {
	case oerr == nil:
		f.log.Warn("using the previous copy of the discovery state", "path", old, "saved_at", latestUpdate(sets))
		return sets, true
	case !os.IsNotExist(oerr):
		f.log.Error("cannot use the previous copy of the discovery state either; starting without it", "path", old, "err", oerr)
	case !os.IsNotExist(err):
		f.log.Error("no previous copy of the discovery state; starting without it (it is rewritten on the next change)", "path", old)
	}
	return nil, false
}

// readState reads and normalises one state file.
func readState(path string) (map[string]*Set, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var doc stateDoc
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("cannot parse %s: %w", path, err)
	}
	if doc.Version != stateVersion {
		return nil, fmt.Errorf("cannot parse %s: version %d, want %d", path, doc.Version, stateVersion)
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
	if doc.Sets == nil {
		doc.Sets = map[string]*Set{}
	}
	return doc.Sets, nil
}

// latestUpdate returns the newest UpdatedAt of sets.
func latestUpdate(sets map[string]*Set) time.Time {
	var t time.Time
	for _, s := range sets {
		if s.UpdatedAt.After(t) {
			t = s.UpdatedAt
		}
	}
	return t
}

// save writes the sets atomically: a synced temp file renamed over the old
// one, so that a crash leaves either the old or the new state. The file it
// replaces becomes the previous good copy, unless it is damaged: then the
// previous copy stays.
func (f *stateFile) save(sets map[string]*Set) {
	if _, err := readState(f.path); err == nil {
		if err := os.Rename(f.path, f.path+oldSuffix); err != nil {
			f.log.Error("cannot keep the previous discovery state", "path", f.path+oldSuffix, "err", err)
		}
	}
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
