package acme

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
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
	// lockRetry is how long a lock found free but not acquired (its
	// lock delay) waits before the next try.
	lockRetry = 100 * time.Millisecond
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
	locks map[string]*heldLock
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
	return &ConsulStorage{client: client, prefix: prefix, locks: make(map[string]*heldLock)}
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

// heldLock is a lock this process holds: its session, and what stops
// the session's renewal.
type heldLock struct {
	session string
	stop    chan struct{}
}

// Lock implements certmagic.Locker: it blocks until this process holds the
// Consul lock of name, or ctx is done. The lock is held by a session of
// its own with a TTL, renewed until Unlock: if this process dies, the
// session expires and the lock goes with it.
func (s *ConsulStorage) Lock(ctx context.Context, name string) error {
	key := s.lockKey(name)
	wo := (&api.WriteOptions{}).WithContext(ctx)
	session, _, err := s.client.Session().Create(&api.SessionEntry{
		Name:      "edgelb certmagic " + name,
		TTL:       lockSessionTTL,
		LockDelay: lockDelay,
		// The lock's key goes with the session, so that none is left
		// behind.
		Behavior: api.SessionBehaviorDelete,
	}, wo)
	if err != nil {
		return fmt.Errorf("consul storage: lock %s: cannot create session: %w", name, err)
	}
	held := &heldLock{session: session, stop: make(chan struct{})}
	go s.client.Session().RenewPeriodic(lockSessionTTL, session, nil, held.stop)
	fail := func(err error) error {
		s.end(held)
		return fmt.Errorf("consul storage: lock %s: %w", name, err)
	}
	value := []byte(lockOwner())
	for {
		ok, _, err := s.client.KV().Acquire(&api.KVPair{Key: key, Value: value, Session: session}, wo)
		if ctx.Err() != nil {
			return fail(context.Cause(ctx))
		}
		if err != nil {
			return fail(err)
		}
		if ok {
			s.mu.Lock()
			s.locks[name] = held
			s.mu.Unlock()
			return nil
		}
		if err := s.waitFree(ctx, key); err != nil {
			return fail(err)
		}
	}
}

// waitFree waits until no session holds key.
func (s *ConsulStorage) waitFree(ctx context.Context, key string) error {
	var index uint64
	for {
		p, meta, err := s.client.KV().Get(key, (&api.QueryOptions{WaitIndex: index, WaitTime: lockWait}).WithContext(ctx))
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		if err != nil {
			return err
		}
		if p == nil || p.Session == "" {
			if index == 0 {
				// Free at once, yet not acquired: the lock delay of a
				// session that just ended. Wait it out.
				select {
				case <-ctx.Done():
					return context.Cause(ctx)
				case <-time.After(lockRetry):
				}
			}
			return nil
		}
		index = meta.LastIndex
	}
}

// lockOwner describes this process, as the value of the locks it holds.
func lockOwner() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("edgelb pid %d on %s", os.Getpid(), host)
}

// end ends the session of held, which releases its lock and deletes its
// key.
func (s *ConsulStorage) end(held *heldLock) error {
	close(held.stop)
	_, err := s.client.Session().Destroy(held.session, nil)
	return err
}

// Unlock implements certmagic.Locker: it releases the lock of name by
// ending its session.
func (s *ConsulStorage) Unlock(_ context.Context, name string) error {
	s.mu.Lock()
	held := s.locks[name]
	delete(s.locks, name)
	s.mu.Unlock()
	if held == nil {
		return fmt.Errorf("consul storage: unlock %s: not locked by this process", name)
	}
	if err := s.end(held); err != nil {
		return fmt.Errorf("consul storage: unlock %s: %w", name, err)
	}
	return nil
}
