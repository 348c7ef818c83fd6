package acme

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"github.com/hashicorp/consul/api"
)

// DefaultConsulPrefix is the Consul KV folder of the ACME accounts,
// certificates, keys and locks if ConsulStorage.Prefix is not set.
const DefaultConsulPrefix = "edgelb/certmagic/"

// Consul lock sessions: a lock whose holder dies (stops renewing its
// session) is released once the session's TTL runs out, which Consul
// may stretch to twice the TTL. lockSessionTTL is Consul's minimum.
const (
	lockSessionTTL = "10s"
	// lockDelay is how long Consul keeps a lock from being taken again
	// after its session was invalidated (15s by default). An ACME order
	// done twice costs little, a fleet waiting for a dead holder costs
	// certificates: keep it short.
	lockDelay = time.Millisecond
	// lockWait is how long one blocking query waits for a held lock.
	lockWait = 15 * time.Second
)

// ConsulStorage is a certmagic.Storage on the Consul KV store, so that
// edgelb instances sharing a Consul share ACME accounts and certificates,
// and answer each other's challenges. Its locks are Consul locks held by a
// session with a TTL: a holder that dies releases them once its session
// expires.
//
// Values keep their modification time in the KV pair's flags, as Consul
// stores none. ConsulStorage is safe for concurrent use.
type ConsulStorage struct {
	client *api.Client
	prefix string

	mu    sync.Mutex
	locks map[string]*api.Lock
}

// NewConsulStorage returns a storage under prefix (DefaultConsulPrefix if
// empty) of the Consul reached by client.
func NewConsulStorage(client *api.Client, prefix string) *ConsulStorage {
	if prefix == "" {
		prefix = DefaultConsulPrefix
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	return &ConsulStorage{client: client, prefix: prefix, locks: make(map[string]*api.Lock)}
}

var _ certmagic.Storage = (*ConsulStorage)(nil)

// String names the storage in logs.
func (s *ConsulStorage) String() string { return "consul:" + s.prefix }

func (s *ConsulStorage) kvKey(key string) string { return s.prefix + strings.Trim(key, "/") }

func (s *ConsulStorage) lockKey(name string) string { return s.prefix + "locks/" + name }

// Store implements certmagic.Storage.
func (s *ConsulStorage) Store(ctx context.Context, key string, value []byte) error {
	p := &api.KVPair{Key: s.kvKey(key), Value: value, Flags: uint64(time.Now().UnixNano())}
	if _, err := s.client.KV().Put(p, (&api.WriteOptions{}).WithContext(ctx)); err != nil {
		return fmt.Errorf("consul storage: cannot store %s: %w", p.Key, err)
	}
	return nil
}

// Load implements certmagic.Storage.
func (s *ConsulStorage) Load(ctx context.Context, key string) ([]byte, error) {
	p, err := s.get(ctx, key)
	if err != nil {
		return nil, err
	}
	return p.Value, nil
}

// get returns the pair of key, or an error wrapping fs.ErrNotExist.
func (s *ConsulStorage) get(ctx context.Context, key string) (*api.KVPair, error) {
	k := s.kvKey(key)
	p, _, err := s.client.KV().Get(k, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("consul storage: cannot load %s: %w", k, err)
	}
	if p == nil {
		return nil, fmt.Errorf("consul storage: %s: %w", k, fs.ErrNotExist)
	}
	return p, nil
}

// Delete implements certmagic.Storage: key and everything under it as a
// folder, but not keys that merely start with it ("a" holds "a/b", not
// "ab").
func (s *ConsulStorage) Delete(ctx context.Context, key string) error {
	k := s.kvKey(key)
	opts := (&api.WriteOptions{}).WithContext(ctx)
	if _, err := s.client.KV().Delete(k, opts); err != nil {
		return fmt.Errorf("consul storage: cannot delete %s: %w", k, err)
	}
	if _, err := s.client.KV().DeleteTree(k+"/", opts); err != nil {
		return fmt.Errorf("consul storage: cannot delete %s/: %w", k, err)
	}
	return nil
}

// Exists implements certmagic.Storage.
func (s *ConsulStorage) Exists(ctx context.Context, key string) bool {
	if _, err := s.get(ctx, key); err == nil {
		return true
	}
	keys, err := s.keys(ctx, key, "/")
	return err == nil && len(keys) > 0
}

// keys lists the KV keys under the folder key, up to separator.
func (s *ConsulStorage) keys(ctx context.Context, key, separator string) ([]string, error) {
	folder := s.kvKey(key) + "/"
	if strings.Trim(key, "/") == "" {
		folder = s.prefix
	}
	keys, _, err := s.client.KV().Keys(folder, separator, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("consul storage: cannot list %s: %w", folder, err)
	}
	return keys, nil
}

// List implements certmagic.Storage: the keys under the folder prefix,
// files and folders alike, the whole tree if recursive.
func (s *ConsulStorage) List(ctx context.Context, prefix string, recursive bool) ([]string, error) {
	sep := "/"
	if recursive {
		sep = ""
	}
	kvKeys, err := s.keys(ctx, prefix, sep)
	if err != nil {
		return nil, err
	}
	if len(kvKeys) == 0 {
		return nil, fmt.Errorf("consul storage: %s: %w", s.kvKey(prefix), fs.ErrNotExist)
	}
	seen := make(map[string]bool)
	var out []string
	add := func(k string) {
		if k != "" && !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	for _, kv := range kvKeys {
		k := strings.TrimSuffix(strings.TrimPrefix(kv, s.prefix), "/")
		add(k)
		if recursive {
			// Consul lists no folders: a file deep down implies them.
			base := strings.Trim(prefix, "/")
			for d := path.Dir(k); d != "." && d != base && strings.HasPrefix(d, base); d = path.Dir(d) {
				add(d)
			}
		}
	}
	sort.Strings(out)
	return out, nil
}

// Stat implements certmagic.Storage.
func (s *ConsulStorage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	p, err := s.get(ctx, key)
	if err == nil {
		return certmagic.KeyInfo{Key: key, Modified: time.Unix(0, int64(p.Flags)), Size: int64(len(p.Value)), IsTerminal: true}, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return certmagic.KeyInfo{}, err
	}
	keys, lerr := s.keys(ctx, key, "/")
	if lerr != nil {
		return certmagic.KeyInfo{}, lerr
	}
	if len(keys) == 0 {
		return certmagic.KeyInfo{}, err
	}
	return certmagic.KeyInfo{Key: key, IsTerminal: false}, nil
}

// Lock implements certmagic.Locker: it blocks until this process holds the
// Consul lock of name, or ctx is done. The lock is held by a session of
// its own, renewed until Unlock, so that it is released if this process
// dies.
func (s *ConsulStorage) Lock(ctx context.Context, name string) error {
	l, err := s.client.LockOpts(&api.LockOptions{
		Key:          s.lockKey(name),
		SessionName:  "edgelb certmagic " + name,
		SessionTTL:   lockSessionTTL,
		LockDelay:    lockDelay,
		LockWaitTime: lockWait,
	})
	if err != nil {
		return fmt.Errorf("consul storage: lock %s: %w", name, err)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			close(stop)
		case <-done:
		}
	}()
	lost, err := l.Lock(stop)
	close(done)
	switch {
	case err != nil:
		return fmt.Errorf("consul storage: lock %s: %w", name, err)
	case lost == nil:
		return fmt.Errorf("consul storage: lock %s: %w", name, context.Cause(ctx))
	}
	s.mu.Lock()
	s.locks[name] = l
	s.mu.Unlock()
	return nil
}

// Unlock implements certmagic.Locker: it releases the lock of name and
// ends its session.
func (s *ConsulStorage) Unlock(_ context.Context, name string) error {
	s.mu.Lock()
	l := s.locks[name]
	delete(s.locks, name)
	s.mu.Unlock()
	if l == nil {
		return fmt.Errorf("consul storage: unlock %s: not locked by this process", name)
	}
	if err := l.Unlock(); err != nil {
		return fmt.Errorf("consul storage: unlock %s: %w", name, err)
	}
	// The key goes too, unless another process already waits on it.
	if err := l.Destroy(); err != nil && !errors.Is(err, api.ErrLockInUse) {
		return fmt.Errorf("consul storage: unlock %s: %w", name, err)
	}
	return nil
}
