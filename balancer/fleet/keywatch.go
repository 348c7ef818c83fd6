package fleet

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/hashicorp/consul/api"
)

// CheckKey checks a Consul KV key (consul.config_key).
func CheckKey(k string) error { return checkKVPath(k, false) }

// KeyValue is a value of a watched key.
type KeyValue struct {
	Key string
	// Value is the key's value; nil when the key does not exist.
	Value []byte
	// Index is the key's ModifyIndex (or, when it does not exist, the
	// index of Consul's answer).
	Index  uint64
	Exists bool
	// FromDisk is set for the last good value kept in state_dir.
	FromDisk bool
	// SavedAt is when the copy in state_dir was written.
	SavedAt time.Time
}

// KeyCopyFile is the file under state_dir that keeps the last good value
// of the config key.
const KeyCopyFile = "config_key.json"

// keyCopy is what KeyCopyFile holds.
type keyCopy struct {
	Key     string    `json:"key"`
	Index   uint64    `json:"index"`
	Value   string    `json:"value"`
	SavedAt time.Time `json:"saved_at"`
}

var keyWatchErrors = metrics.NewCounter(`edgelb_config_key_watch_errors_total`)

// KeyWatch follows one KV key with blocking queries and hands every new
// value to its callback, and keeps the last value the caller found good
// in state_dir, for a start while Consul does not answer.
//
// Methods are safe for concurrent use.
type KeyWatch struct {
	client *api.Client
	addr   string
	key    string
	path   string // the copy in state_dir; "" without one
	on     func(KeyValue)
	log    *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	last    KeyValue // the last value handed over
	seen    bool
	lastErr string
	errAt   time.Time
}

// NewKeyWatch returns a watch of key through client (Consul at addr) that
// calls on, from its own goroutine, with each value that differs from the
// last one handed over. stateDir keeps the last good value.
func NewKeyWatch(client *api.Client, addr, key, stateDir string, on func(KeyValue), log *slog.Logger) *KeyWatch {
	if log == nil {
		log = slog.Default()
	}
	w := &KeyWatch{client: client, addr: addr, key: key, on: on, log: log.With("component", "fleet", "config_key", key)}
	w.ctx, w.cancel = context.WithCancel(context.Background())
	if stateDir != "" {
		w.path = filepath.Join(stateDir, KeyCopyFile)
	}
	return w
}

// Key returns the watched key.
func (w *KeyWatch) Key() string { return w.key }

// First reads the key once, waiting for Consul at most timeout. The value
// it returns counts as handed over: the watch calls back for later ones.
func (w *KeyWatch) First(timeout time.Duration) (KeyValue, error) {
	ctx, cancel := context.WithTimeout(w.ctx, timeout)
	defer cancel()
	kv, _, err := w.get((&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		w.failed(err, 1)
		return KeyValue{}, err
	}
	w.mu.Lock()
	w.last, w.seen = kv, true
	w.mu.Unlock()
	return kv, nil
}

// get reads the key.
func (w *KeyWatch) get(q *api.QueryOptions) (KeyValue, uint64, error) {
	pair, meta, err := w.client.KV().Get(w.key, q)
	if err != nil {
		return KeyValue{}, 0, err
	}
	kv := KeyValue{Key: w.key, Index: meta.LastIndex}
	if pair != nil {
		kv.Value, kv.Index, kv.Exists = pair.Value, pair.ModifyIndex, true
		if kv.Value == nil {
			kv.Value = []byte{}
		}
	}
	return kv, meta.LastIndex, nil
}

// Start follows the key in the background.
func (w *KeyWatch) Start() {
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		runAgain(w.ctx, w.log, "panic in the config key watch; starting it again", "config key", w.run)
	}()
}

func (w *KeyWatch) run() {
	follow(w.ctx, func(q *api.QueryOptions) (uint64, error) {
		kv, index, err := w.get(q)
		if err != nil {
			return 0, err
		}
		w.mu.Lock()
		same := w.seen && kv.Exists == w.last.Exists && bytes.Equal(kv.Value, w.last.Value) && (!kv.Exists || kv.Index == w.last.Index)
		if !same {
			w.last, w.seen = kv, true
		}
		w.lastErr = ""
		w.mu.Unlock()
		if !same {
			w.on(kv)
		}
		return index, nil
	}, w.failed)
}

// failed records the failures-th failed call in a row.
func (w *KeyWatch) failed(err error, failures int) {
	keyWatchErrors.Inc()
	msg := describe(w.addr, err)
	w.mu.Lock()
	w.lastErr, w.errAt = msg, time.Now()
	w.mu.Unlock()
	if failures == 1 || failures%30 == 0 {
		w.log.Error("config key watch failing; the running services and routes stay", "err", msg, "failures", failures)
	}
}

// Err returns the last failed call's error while the watch fails, and
// when it failed.
func (w *KeyWatch) Err() (string, time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.lastErr, w.errAt
}

// Stop ends the watch and waits for its goroutine; the callback must not
// be waiting on the caller.
func (w *KeyWatch) Stop() {
	w.cancel()
	w.wg.Wait()
}

// LastGood returns the value kept in state_dir by SaveGood, if it is of
// the watched key.
func (w *KeyWatch) LastGood() (KeyValue, bool) {
	if w.path == "" {
		return KeyValue{}, false
	}
	data, err := os.ReadFile(w.path)
	if err != nil {
		if !os.IsNotExist(err) {
			w.log.Error("cannot read the last good value of the config key", "path", w.path, "err", err)
		}
		return KeyValue{}, false
	}
	var c keyCopy
	if err := json.Unmarshal(data, &c); err != nil {
		w.log.Error("cannot use the last good value of the config key", "path", w.path, "err", err)
		return KeyValue{}, false
	}
	if c.Key != w.key {
		return KeyValue{}, false
	}
	return KeyValue{Key: c.Key, Value: []byte(c.Value), Index: c.Index, Exists: true, FromDisk: true, SavedAt: c.SavedAt}, true
}

// SaveGood keeps v in state_dir as the last good value.
func (w *KeyWatch) SaveGood(v KeyValue) {
	if w.path == "" || v.FromDisk {
		return
	}
	data, _ := json.MarshalIndent(keyCopy{Key: v.Key, Index: v.Index, Value: string(v.Value), SavedAt: time.Now()}, "", "  ")
	err := os.MkdirAll(filepath.Dir(w.path), 0o755)
	if err == nil {
		err = writeFileAtomic(w.path, data)
	}
	if err != nil {
		w.log.Error("cannot keep the config key's value in state_dir", "path", w.path, "err", err)
	}
}
