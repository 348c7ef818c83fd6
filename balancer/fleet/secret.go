package fleet

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"log/slog"
	"sync"

	"github.com/hashicorp/consul/api"
)

// DefaultSecretKey is the Consul KV key that keeps the fleet's peer fill
// secret when the config gives none.
const DefaultSecretKey = "edgelb/peer_fill/secret"

// Secret follows a secret that the instances of a fleet share through one
// Consul KV key. The first instance that finds the key empty writes a
// random secret there with a check-and-set, which never overwrites one
// another instance wrote, so every instance ends up with the same. A
// change to the key (a rotation) reaches every instance through a
// blocking query.
//
// Methods are safe for concurrent use.
type Secret struct {
	client *api.Client
	addr   string
	key    string
	log    *slog.Logger
	// set is told every new value.
	set func(string)

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	mu   sync.Mutex
	last string
}

// NewSecret returns a follower of the secret under key through client
// (Consul at addr), which tells set every new value. Start starts it.
func NewSecret(client *api.Client, addr, key string, set func(string), log *slog.Logger) *Secret {
	if log == nil {
		log = slog.Default()
	}
	s := &Secret{client: client, addr: addr, key: key, set: set, log: log.With("component", "fleet", "key", key), done: make(chan struct{})}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s
}

// Key returns the KV key followed.
func (s *Secret) Key() string { return s.key }

// Start follows the key in the background.
func (s *Secret) Start() {
	go func() {
		defer close(s.done)
		runAgain(s.ctx, s.log, "panic following the peer fill secret; starting again", "secret", s.run)
	}()
}

func (s *Secret) run() {
	follow(s.ctx, func(q *api.QueryOptions) (uint64, error) {
		pair, meta, err := s.client.KV().Get(s.key, q)
		if err != nil {
			return 0, err
		}
		if pair == nil || len(bytes.TrimSpace(pair.Value)) == 0 {
			// None yet: make one. Whether this write or another
			// instance's wins, the next read (at once: index 0) has it.
			var idx uint64
			if pair != nil {
				idx = pair.ModifyIndex
			}
			var b [32]byte
			crand.Read(b[:])
			_, _, err := s.client.KV().CAS(&api.KVPair{Key: s.key, Value: []byte(hex.EncodeToString(b[:])), ModifyIndex: idx},
				(&api.WriteOptions{}).WithContext(s.ctx))
			return 0, err
		}
		v := string(bytes.TrimSpace(pair.Value))
		s.mu.Lock()
		changed := v != s.last
		first := s.last == ""
		s.last = v
		s.mu.Unlock()
		if changed {
			s.set(v)
			if !first {
				s.log.Info("peer fill secret changed in Consul")
			}
		}
		return meta.LastIndex, nil
	}, func(err error, failures int) {
		if failures == 1 || failures%30 == 0 {
			s.log.Warn("cannot read or write the peer fill secret in Consul; peer fill waits for it", "err", describe(s.addr, err), "failures", failures)
		}
	})
}

// Stop ends the watch.
func (s *Secret) Stop() {
	s.cancel()
	<-s.done
}
