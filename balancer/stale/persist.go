package stale

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/VictoriaMetrics/fastcache"
	"github.com/cespare/xxhash/v2"

	"github.com/edgelb/edgelb/internal/panics"
)

// On disk, a store saved under a state dir is the directory stateDirName:
// fastcache's metadata.bin and data.N.bin, and a manifest with the size
// and checksum of each. Only a directory whose files match its manifest
// is handed to fastcache, whose loader can crash on files it did not
// write.
const (
	stateDirName   = "stale"
	oldDirSuffix   = ".old"
	tmpDirPrefix   = ".stale-tmp-"
	manifestName   = "manifest"
	manifestHeader = "edgelb-stale 2"
)

// DefaultPersistInterval is used by RunPersist if its interval is not set.
const DefaultPersistInterval = time.Minute

// ErrCorrupt is returned, wrapped, by LoadFrom for a saved store that
// cannot be used.
var ErrCorrupt = errors.New("stale: saved store is unusable")

var dataFileRE = regexp.MustCompile(`^(metadata|data\.\d+)\.bin$`)

// SaveTo writes the store under dir (dir/stale), replacing an older copy
// atomically: the copy is written and checksummed beside it, then renamed
// into place. It may run concurrently with Save and Serve.
func (s *Store) SaveTo(dir string) error {
	s.persistMu.Lock()
	defer s.persistMu.Unlock()
	if s.saveHook != nil {
		s.saveHook()
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("cannot save stale store: %w", err)
	}
	tmp, err := os.MkdirTemp(dir, tmpDirPrefix)
	if err != nil {
		return fmt.Errorf("cannot save stale store: %w", err)
	}
	defer os.RemoveAll(tmp)
	snap := filepath.Join(tmp, stateDirName)
	if err := s.cache.Load().SaveToFileConcurrent(snap, 0); err != nil {
		return fmt.Errorf("cannot save stale store under %q: %w", dir, err)
	}
	if err := writeManifest(snap, s.cfg.MaxBytes); err != nil {
		return fmt.Errorf("cannot save stale store under %q: %w", dir, err)
	}

	// A crash between the two renames leaves only the .old copy, which
	// LoadFrom falls back to.
	final := filepath.Join(dir, stateDirName)
	old := final + oldDirSuffix
	if err := os.RemoveAll(old); err != nil {
		return fmt.Errorf("cannot save stale store: %w", err)
	}
	if err := os.Rename(final, old); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("cannot save stale store: %w", err)
	}
	if err := os.Rename(snap, final); err != nil {
		return fmt.Errorf("cannot save stale store: %w", err)
	}
	syncDir(dir)
	if err := os.RemoveAll(old); err != nil {
		return fmt.Errorf("cannot remove the older stale store: %w", err)
	}
	return nil
}

// writeManifest checksums and syncs the files fastcache wrote in dir and
// lists them in its manifest.
func writeManifest(dir string, maxBytes int) error {
	names, err := dataFiles(dir)
	if err != nil {
		return err
	}
	var m strings.Builder
	fmt.Fprintf(&m, "%s\nmax_bytes %d\n", manifestHeader, maxBytes)
	for _, name := range names {
		size, sum, err := checksum(filepath.Join(dir, name), true)
		if err != nil {
			return err
		}
		fmt.Fprintf(&m, "%s %d %016x\n", name, size, sum)
	}
	f, err := os.Create(filepath.Join(dir, manifestName))
	if err != nil {
		return err
	}
	if _, err := f.WriteString(m.String()); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	syncDir(dir)
	return nil
}

// dataFiles lists the fastcache files in dir.
func dataFiles(dir string) ([]string, error) {
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, de := range des {
		if dataFileRE.MatchString(de.Name()) {
			names = append(names, de.Name())
		}
	}
	return names, nil
}

// checksum returns the size and xxhash of a file, syncing it to disk first
// if asked.
func checksum(path string, sync bool) (int64, uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	if sync {
		if err := f.Sync(); err != nil {
			return 0, 0, err
		}
	}
	d := xxhash.New()
	n, err := io.Copy(d, f)
	if err != nil {
		return 0, 0, err
	}
	return n, d.Sum64(), nil
}

// syncDir makes renames and new files in dir durable, as far as the file
// system allows.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
}

// LoadFrom replaces the store's content with the copy SaveTo wrote under
// dir. A missing copy is no error and leaves the store as it is. A copy
// that cannot be used (damaged, from another version, saved with another
// max_bytes) leaves the store as it is too, and returns an error wrapping
// ErrCorrupt that says why.
func (s *Store) LoadFrom(dir string) error {
	s.persistMu.Lock()
	defer s.persistMu.Unlock()
	removeTemps(dir)
	path := filepath.Join(dir, stateDirName)
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		// An interrupted SaveTo may have left only the older copy.
		path += oldDirSuffix
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			return nil
		}
	}
	c, err := s.load(path)
	if err != nil {
		return fmt.Errorf("%w: %q (starting with an empty store): %w", ErrCorrupt, path, err)
	}
	if old := s.cache.Swap(c); old != nil {
		old.Reset()
	}
	s.resetSlots()
	return nil
}

// load checks the saved copy in path against its manifest, then loads it.
// A panic of fastcache's loader is counted and logged, and returned as an
// error: the store then starts empty.
func (s *Store) load(path string) (c *fastcache.Cache, err error) {
	if err := verifyManifest(path, s.cfg.MaxBytes); err != nil {
		return nil, err
	}
	if r := panics.Stale.Run(func() { c, err = fastcache.LoadFromFileMaxBytes(path, s.cfg.MaxBytes) },
		s.log, "stale store: panic while loading", "path", path); r != nil {
		return nil, fmt.Errorf("fastcache panicked: %v", r)
	}
	return c, err
}

func verifyManifest(dir string, maxBytes int) error {
	f, err := os.Open(filepath.Join(dir, manifestName))
	if err != nil {
		return fmt.Errorf("no manifest (written by an older edgelb, or not by edgelb): %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(io.LimitReader(f, 1<<20))
	line := func() string {
		if sc.Scan() {
			return sc.Text()
		}
		return ""
	}
	if h := line(); h != manifestHeader {
		return fmt.Errorf("manifest starts with %q, want %q", h, manifestHeader)
	}
	if mb := line(); mb != "max_bytes "+strconv.Itoa(maxBytes) {
		return fmt.Errorf("saved with %q, configured max_bytes %d", mb, maxBytes)
	}
	listed := map[string]bool{}
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) != 3 || !dataFileRE.MatchString(fields[0]) {
			return fmt.Errorf("bad manifest line %q", sc.Text())
		}
		name := fields[0]
		size, sum, err := checksum(filepath.Join(dir, name), false)
		if err != nil {
			return err
		}
		if strconv.FormatInt(size, 10) != fields[1] || fmt.Sprintf("%016x", sum) != fields[2] {
			return fmt.Errorf("%s: size %d checksum %016x, manifest says %s %s", name, size, sum, fields[1], fields[2])
		}
		listed[name] = true
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("cannot read manifest: %w", err)
	}
	names, err := dataFiles(dir)
	if err != nil {
		return err
	}
	for _, name := range names {
		if !listed[name] {
			return fmt.Errorf("%s is not in the manifest", name)
		}
	}
	if !listed["metadata.bin"] {
		return errors.New("metadata.bin is not in the manifest")
	}
	return nil
}

// removeTemps removes what interrupted SaveTo calls left in dir.
func removeTemps(dir string) {
	tmps, _ := filepath.Glob(filepath.Join(dir, tmpDirPrefix+"*"))
	for _, t := range tmps {
		_ = os.RemoveAll(t)
	}
}

// RunPersist saves the store under dir every interval, and once more when
// ctx is done; it returns after that last save. Run it in a goroutine of
// its own. Each save is a Persist. DefaultPersistInterval is used if
// interval is not set.
func (s *Store) RunPersist(ctx context.Context, dir string, interval time.Duration) {
	if interval <= 0 {
		interval = DefaultPersistInterval
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			s.Persist(dir)
			return
		case <-t.C:
			s.Persist(dir)
		}
	}
}

// Persist saves the store under dir as SaveTo does, for saves that nobody
// waits on: an error is logged to Config.Logger, and a panic is recovered,
// counted in edgelb_panics_total{component="stale"} and logged, so that
// the next save still runs. It returns the error, or one for the panic,
// to callers that track what the saved copy holds.
func (s *Store) Persist(dir string) error {
	var err error
	if r := panics.Stale.Run(func() { err = s.SaveTo(dir) }, s.log, "stale store: panic while saving", "dir", dir); r != nil {
		return fmt.Errorf("stale store: panic while saving: %v", r)
	}
	if err != nil {
		s.log.Error("stale store", "err", err)
	}
	return err
}
