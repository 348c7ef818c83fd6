package fleet

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/hashicorp/consul/api"

	"github.com/edgelb/edgelb/discovery"
)

// PurgeConfig is consul.purge: where purges of the stale store are
// published for every instance, and how long they are kept. The zero
// value selects the defaults.
type PurgeConfig struct {
	// Disabled keeps purges to the instance that got them, as without
	// Consul.
	Disabled bool `yaml:"disabled"`

	// Prefix is the KV prefix of the purge log; instances that share it
	// purge together. DefaultPurgePrefix is used if not set.
	Prefix string `yaml:"prefix"`

	// Retention is how long a purge stays in the log: an instance away
	// for longer purges its whole store when it comes back, since what it
	// missed may be gone. DefaultPurgeRetention is used if not set.
	Retention time.Duration `yaml:"retention"`
}

// Defaults of PurgeConfig.
const (
	DefaultPurgePrefix    = "edgelb/purge/"
	DefaultPurgeRetention = time.Hour

	// minPurgeRetention bounds retention from below: an instance
	// restarting, or cut off from Consul for a moment, must find what it
	// missed.
	minPurgeRetention = time.Minute
)

// ApplyDefaults fills in every unset field that has a default.
func (c *PurgeConfig) ApplyDefaults() {
	if c.Prefix == "" {
		c.Prefix = DefaultPurgePrefix
	}
	if c.Retention == 0 {
		c.Retention = DefaultPurgeRetention
	}
}

// Validate checks c after ApplyDefaults; it returns every problem, each
// naming its key under path.
func (c *PurgeConfig) Validate(path string) []error {
	var errs []error
	if err := checkKVPath(c.Prefix, true); err != nil {
		errs = append(errs, fmt.Errorf("%s.prefix: %v", path, err))
	}
	if c.Retention < minPurgeRetention {
		errs = append(errs, fmt.Errorf("%s.retention: must be at least %v (got %v)", path, minPurgeRetention, c.Retention))
	}
	return errs
}

// checkKVPath checks a Consul KV key, or with prefix a key prefix, which
// must end with "/".
func checkKVPath(k string, prefix bool) error {
	switch {
	case k == "":
		return errors.New("empty")
	case strings.HasPrefix(k, "/"):
		return fmt.Errorf("%q: a Consul key does not start with /", k)
	case strings.ContainsAny(k, " \t\r\n?#%"):
		return fmt.Errorf("%q: white space, ?, # and %% do not belong in a Consul key", k)
	case prefix && !strings.HasSuffix(k, "/"):
		return fmt.Errorf("%q: must end with /, so that it holds its keys only", k)
	case !prefix && strings.HasSuffix(k, "/"):
		return fmt.Errorf("%q: a key, not a folder (no trailing /)", k)
	}
	return nil
}

// Layout of the purge log under its prefix: one key per purge under
// logDir, and metaKey. Purges are ordered by their ModifyIndex, the raft
// index of the write that made them, never by a clock.
const (
	logDir  = "log/"
	metaKey = "meta"
)

// Record is one purge of the log.
type Record struct {
	// URL is the absolute URL purged; empty for everything.
	URL string `json:"url,omitempty"`
	// At is when the instance By published it, by its clock; it only
	// decides when the record is old enough to be collected.
	At time.Time `json:"at"`
	By string    `json:"by"`

	// Key and Index are the record's key and ModifyIndex, once written.
	Key   string `json:"-"`
	Index uint64 `json:"-"`
}

// What words the purge for logs and messages.
func (r *Record) What() string {
	if r.URL == "" {
		return "everything"
	}
	return r.URL
}

// logMeta is the log's metaKey. Epoch changes when the log starts anew
// (Consul lost its data, or a new prefix), which makes earlier indexes
// meaningless. GCIndex is the highest index collected: an instance whose
// cursor is below it may have missed purges that are gone.
type logMeta struct {
	Epoch   string `json:"epoch"`
	GCIndex uint64 `json:"gc_index"`
}

// Applied is a purge as an instance applied it.
type Applied struct {
	Index       uint64    `json:"index"`
	URL         string    `json:"url,omitempty"`
	All         bool      `json:"all,omitempty"`
	PublishedAt time.Time `json:"published_at"`
	By          string    `json:"by"`
	AppliedAt   time.Time `json:"applied_at"`
}

// PurgeStatus is the purge log in /status.
type PurgeStatus struct {
	Prefix string `json:"prefix"`
	// LastApplied is the last purge of the log this instance applied.
	LastApplied *Applied `json:"last_applied,omitempty"`
	// Cursor is the index up to which the log is applied; Epoch names the
	// log it counts in.
	Cursor uint64 `json:"cursor"`
	Epoch  string `json:"epoch,omitempty"`
	// Pending counts purges made here and not yet published.
	Pending     int       `json:"pending"`
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
}

// Purge log metrics.
var (
	purgesPublished   = metrics.NewCounter(`edgelb_purges_published_total`)
	purgesApplied     = metrics.NewCounter(`edgelb_purges_applied_total`)
	purgePublishError = metrics.NewCounter(`edgelb_purge_log_errors_total{op="publish"}`)
	purgeWatchError   = metrics.NewCounter(`edgelb_purge_log_errors_total{op="watch"}`)
	purgeGCError      = metrics.NewCounter(`edgelb_purge_log_errors_total{op="gc"}`)
	purgesCollected   = metrics.NewCounter(`edgelb_purges_collected_total`)
)

// PurgeStateFile is the file under state_dir that keeps how far an
// instance applied the purge log.
const PurgeStateFile = "purges.json"

// purgeState is what PurgeStateFile holds.
type purgeState struct {
	Version int    `json:"version"`
	Prefix  string `json:"prefix"`
	Epoch   string `json:"epoch"`
	// Cursor is the index up to which the log is applied; StoreIndex the
	// cursor when the stale store on disk was saved, from which a
	// restarted instance applies the log again.
	Cursor     uint64   `json:"cursor"`
	StoreIndex uint64   `json:"store_index"`
	Last       *Applied `json:"last,omitempty"`
	// Pending are purges made here and not yet published.
	Pending []Record `json:"pending,omitempty"`
}

const purgeStateVersion = 1

// Purges publishes the purges made on this instance to a log in Consul's
// KV store, and applies every purge of the log, its own included, in the
// order of their ModifyIndex, each once. How far it applied the log is
// kept in state_dir: a restarted instance applies what was published
// since the stale store it loaded was saved.
//
// Methods are safe for concurrent use.
type Purges struct {
	client   *api.Client
	addr     string // Consul's address, for messages
	cfg      PurgeConfig
	path     string // state file; "" without a state_dir
	instance string
	apply    func(Record)
	log      *slog.Logger

	// gcEvery is how often the log is collected; tests shorten it.
	gcEvery time.Duration

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	st      purgeState
	lastErr string
	errAt   time.Time
}

// NewPurges returns the purge log of cfg through client (Consul at addr).
// apply purges the stale store as a record says; it must not block.
// stateDir keeps how far the log is applied.
func NewPurges(client *api.Client, addr string, cfg PurgeConfig, stateDir, instance string, apply func(Record), log *slog.Logger) *Purges {
	if log == nil {
		log = slog.Default()
	}
	p := &Purges{
		client: client, addr: addr, cfg: cfg, instance: instance, apply: apply,
		log:     log.With("component", "fleet", "purge_log", cfg.Prefix),
		gcEvery: min(max(cfg.Retention/10, 10*time.Second), 10*time.Minute),
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	if stateDir != "" {
		p.path = filepath.Join(stateDir, PurgeStateFile)
	}
	p.load()
	return p
}

// load reads the state file. The log is applied again from the index at
// which the stale store on disk was saved: purges applied after it are
// not in that copy.
func (p *Purges) load() {
	p.st = purgeState{Version: purgeStateVersion, Prefix: p.cfg.Prefix}
	if p.path == "" {
		return
	}
	data, err := os.ReadFile(p.path)
	if err != nil {
		if !os.IsNotExist(err) {
			p.log.Error("cannot read the purge state; applying the whole purge log", "path", p.path, "err", err)
		}
		return
	}
	var st purgeState
	if err := json.Unmarshal(data, &st); err != nil || st.Version != purgeStateVersion {
		p.log.Error("cannot use the purge state; applying the whole purge log", "path", p.path, "err", err, "version", st.Version)
		return
	}
	if st.Prefix != p.cfg.Prefix {
		p.log.Info("purge log prefix changed; applying the new log from its start", "was", st.Prefix)
		p.st.Pending = st.Pending
		return
	}
	st.Cursor = st.StoreIndex
	p.st = st
}

// saveLocked writes the state file.
func (p *Purges) saveLocked() {
	if p.path == "" {
		return
	}
	data, _ := json.MarshalIndent(p.st, "", "  ")
	err := os.MkdirAll(filepath.Dir(p.path), 0o755)
	if err == nil {
		err = writeFileAtomic(p.path, data)
	}
	if err != nil {
		p.log.Error("cannot save the purge state", "path", p.path, "err", err)
	}
}

// CatchUp applies, before the instance serves, what the log holds that
// the stale store loaded from state_dir has not seen, waiting for Consul
// at most timeout. It reports whether Consul answered.
func (p *Purges) CatchUp(timeout time.Duration) bool {
	ctx, cancel := context.WithTimeout(p.ctx, timeout)
	defer cancel()
	pairs, _, err := p.client.KV().List(p.cfg.Prefix, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		p.failed(purgeWatchError, "cannot read the purge log at start; purges published meanwhile apply when Consul answers", err, 1)
		return false
	}
	p.handle(pairs)
	return true
}

// Start follows the log and collects its old records in the background.
func (p *Purges) Start() {
	p.goSafe("purge log", func() {
		follow(p.ctx, func(q *api.QueryOptions) (uint64, error) {
			pairs, meta, err := p.client.KV().List(p.cfg.Prefix, q)
			if err != nil {
				return 0, err
			}
			p.handle(pairs)
			p.flush()
			return meta.LastIndex, nil
		}, func(err error, failures int) {
			p.failed(purgeWatchError, "purge log watch failing; purges published meanwhile apply when Consul answers", err, failures)
		})
	})
	p.goSafe("purge log collection", p.collectLoop)
}

// Stop ends the background work.
func (p *Purges) Stop() {
	p.cancel()
	p.wg.Wait()
}

// goSafe runs f in a goroutine, again after a backoff if it panics, until
// Stop.
func (p *Purges) goSafe(name string, f func()) {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		runAgain(p.ctx, p.log, "panic in the purge log; starting it again", name, f)
	}()
}

// handle applies an answer of the log: the purges above the cursor, in
// order.
func (p *Purges) handle(pairs api.KVPairs) {
	var meta *logMeta
	var recs []Record
	for _, kv := range pairs {
		rest, _ := strings.CutPrefix(kv.Key, p.cfg.Prefix)
		switch {
		case rest == metaKey:
			var m logMeta
			if err := json.Unmarshal(kv.Value, &m); err == nil && m.Epoch != "" {
				meta = &m
			}
		case strings.HasPrefix(rest, logDir):
			var r Record
			if err := json.Unmarshal(kv.Value, &r); err != nil {
				p.log.Warn("ignoring a malformed purge record", "key", kv.Key, "err", err)
				continue
			}
			r.Key, r.Index = kv.Key, kv.ModifyIndex
			recs = append(recs, r)
		}
	}
	if meta == nil {
		// A new log (or a Consul that lost its data): the first instance
		// to see it so names its epoch; the write wakes every watch.
		p.createMeta()
		return
	}
	sort.Slice(recs, func(i, j int) bool { return recs[i].Index < recs[j].Index })

	p.mu.Lock()
	defer p.mu.Unlock()
	changed := false
	if p.st.Epoch != meta.Epoch {
		if p.st.Epoch != "" {
			p.log.Warn("the purge log started anew (Consul lost its data, or it was deleted); applying it from its start", "epoch", meta.Epoch, "was", p.st.Epoch)
		}
		p.st.Epoch, p.st.Cursor, p.st.StoreIndex = meta.Epoch, 0, 0
		changed = true
	}
	now := time.Now()
	if p.st.Cursor < meta.GCIndex {
		// Purges between the cursor and what was collected may be gone:
		// only purging everything is sure to cover them.
		p.log.Warn("purges older than the retention were missed; purging the whole stale store", "cursor", p.st.Cursor, "collected_up_to", meta.GCIndex)
		p.applyLocked(Record{At: now, By: p.instance + " (missed purges)", Index: meta.GCIndex}, now)
		changed = true
	}
	n := 0
	for _, r := range recs {
		if r.Index <= p.st.Cursor {
			continue
		}
		p.applyLocked(r, now)
		n++
		changed = true
	}
	if n > 0 {
		p.log.Info("purges applied from the fleet", "count", n, "cursor", p.st.Cursor, "last", p.st.Last.URL)
	}
	if changed {
		p.saveLocked()
	}
}

// applyLocked applies one purge and moves the cursor past it.
func (p *Purges) applyLocked(r Record, now time.Time) {
	p.apply(r)
	purgesApplied.Inc()
	p.st.Cursor = r.Index
	p.st.Last = &Applied{Index: r.Index, URL: r.URL, All: r.URL == "", PublishedAt: r.At, By: r.By, AppliedAt: now}
	p.log.Debug("purge applied", "what", r.What(), "index", r.Index, "by", r.By)
}

// createMeta writes the log's metaKey if no instance has.
func (p *Purges) createMeta() {
	var b [8]byte
	crand.Read(b[:])
	data, _ := json.Marshal(logMeta{Epoch: hex.EncodeToString(b[:])})
	ctx, cancel := context.WithTimeout(p.ctx, 5*time.Second)
	defer cancel()
	if _, _, err := p.client.KV().CAS(&api.KVPair{Key: p.cfg.Prefix + metaKey, Value: data}, (&api.WriteOptions{}).WithContext(ctx)); err != nil {
		p.failed(purgeWatchError, "cannot start the purge log", err, 1)
	}
}

// Publish writes a purge of url (everything if empty) to the log, for
// every instance. The caller has purged its own store already. When
// Consul cannot take it, the purge is kept and published once Consul
// answers again, and the error says why.
func (p *Purges) Publish(ctx context.Context, url string) (Record, error) {
	r := Record{URL: url, At: time.Now(), By: p.instance}
	if err := p.write(ctx, &r); err != nil {
		p.mu.Lock()
		p.st.Pending = append(p.st.Pending, r)
		p.saveLocked()
		p.mu.Unlock()
		p.failed(purgePublishError, "cannot publish a purge; it is kept and published when Consul answers", err, 1)
		return r, errors.New(describe(p.addr, err))
	}
	return r, nil
}

// write writes r under a key of its own and learns its index.
func (p *Purges) write(ctx context.Context, r *Record) error {
	data, _ := json.Marshal(r)
	for try := 0; ; try++ {
		var b [4]byte
		crand.Read(b[:])
		r.Key = fmt.Sprintf("%s%s%s-%d-%s", p.cfg.Prefix, logDir, p.instance, r.At.UnixMilli(), hex.EncodeToString(b[:]))
		// Index 0: create only, never overwrite another record.
		ok, _, err := p.client.KV().CAS(&api.KVPair{Key: r.Key, Value: data}, (&api.WriteOptions{}).WithContext(ctx))
		if err != nil {
			return err
		}
		if ok {
			break
		}
		if try == 2 {
			return fmt.Errorf("cannot find a free key under %s%s", p.cfg.Prefix, logDir)
		}
	}
	purgesPublished.Inc()
	if kv, _, err := p.client.KV().Get(r.Key, (&api.QueryOptions{}).WithContext(ctx)); err == nil && kv != nil {
		r.Index = kv.ModifyIndex
	}
	p.log.Info("purge published to the fleet", "what", r.What(), "key", r.Key, "index", r.Index)
	return nil
}

// flush publishes the purges kept while Consul did not take them.
func (p *Purges) flush() {
	p.mu.Lock()
	pending := p.st.Pending
	p.mu.Unlock()
	if len(pending) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(p.ctx, 5*time.Second)
	defer cancel()
	done := 0
	for i := range pending {
		if err := p.write(ctx, &pending[i]); err != nil {
			p.failed(purgePublishError, "cannot publish a kept purge yet", err, 1)
			break
		}
		done++
	}
	p.mu.Lock()
	p.st.Pending = p.st.Pending[done:]
	p.saveLocked()
	p.mu.Unlock()
}

// failed records a failed call.
func (p *Purges) failed(c *metrics.Counter, msg string, err error, failures int) {
	c.Inc()
	d := describe(p.addr, err)
	p.mu.Lock()
	p.lastErr, p.errAt = d, time.Now()
	p.mu.Unlock()
	if failures == 1 || failures%30 == 0 {
		p.log.Error(msg, "err", d, "failures", failures)
	}
}

// Cursor returns the index up to which the log is applied, for
// StoreSaved.
func (p *Purges) Cursor() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.st.Cursor
}

// StoreSaved records that the stale store was saved to state_dir when the
// cursor was at index: a restart applies the log again from there.
func (p *Purges) StoreSaved(index uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if index == p.st.StoreIndex || index > p.st.Cursor {
		return
	}
	p.st.StoreIndex = index
	p.saveLocked()
}

// Status returns the log as this instance sees it.
func (p *Purges) Status() PurgeStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := PurgeStatus{Prefix: p.cfg.Prefix, Cursor: p.st.Cursor, Epoch: p.st.Epoch, Pending: len(p.st.Pending),
		LastError: p.lastErr, LastErrorAt: p.errAt}
	if p.st.Last != nil {
		l := *p.st.Last
		st.LastApplied = &l
	}
	return st
}

// collectLoop removes the records older than the retention, now and
// then, at a jittered time so that the instances do not all collect at
// once. Every instance collects; check-and-set writes keep them from
// undoing each other.
func (p *Purges) collectLoop() {
	for {
		d := p.gcEvery/2 + time.Duration(rand.Int64N(int64(p.gcEvery)))
		if !discovery.SleepCtx(p.ctx, d) {
			return
		}
		if err := p.collect(time.Now()); err != nil {
			p.failed(purgeGCError, "cannot collect old purges", err, 1)
		}
	}
}

// collect removes the records published more than the retention before
// now. It first raises the log's GCIndex past them, so that an instance
// whose cursor is below it knows it may have missed some.
func (p *Purges) collect(now time.Time) error {
	ctx, cancel := context.WithTimeout(p.ctx, 10*time.Second)
	defer cancel()
	pairs, _, err := p.client.KV().List(p.cfg.Prefix, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return err
	}
	var metaPair *api.KVPair
	var meta logMeta
	var old []*api.KVPair
	top := uint64(0)
	for _, kv := range pairs {
		rest, _ := strings.CutPrefix(kv.Key, p.cfg.Prefix)
		switch {
		case rest == metaKey:
			if json.Unmarshal(kv.Value, &meta) == nil {
				metaPair = kv
			}
		case strings.HasPrefix(rest, logDir):
			var r Record
			if json.Unmarshal(kv.Value, &r) == nil && now.Sub(r.At) <= p.cfg.Retention {
				continue
			}
			// Malformed records go too.
			old = append(old, kv)
			top = max(top, kv.ModifyIndex)
		}
	}
	if len(old) == 0 || metaPair == nil {
		return nil
	}
	if meta.GCIndex < top {
		meta.GCIndex = top
		data, _ := json.Marshal(meta)
		ok, _, err := p.client.KV().CAS(&api.KVPair{Key: metaPair.Key, Value: data, ModifyIndex: metaPair.ModifyIndex}, (&api.WriteOptions{}).WithContext(ctx))
		if err != nil {
			return err
		}
		if !ok {
			// Another instance is collecting; the next round will see.
			return nil
		}
	}
	n := 0
	for _, kv := range old {
		ok, _, err := p.client.KV().DeleteCAS(kv, (&api.WriteOptions{}).WithContext(ctx))
		if err != nil {
			return err
		}
		if ok {
			n++
		}
	}
	purgesCollected.Add(n)
	p.log.Info("old purges collected", "count", n, "retention", p.cfg.Retention)
	return nil
}
