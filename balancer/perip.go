package balancer

import (
	"hash/maphash"
	"net/netip"
	"sync"
)

// ipConns counts the open client connections of every client address, for
// server.max_conns_per_ip. An address is in it only while it has a
// connection open, so that its size is bounded by the open connections.
// It is safe for concurrent use: the engines' accepts and closes take the
// lock of one shard of it.
type ipConns struct {
	max    int32
	seed   maphash.Seed
	shards [ipConnsShards]ipConnsShard
}

const ipConnsShards = 64

type ipConnsShard struct {
	mu sync.Mutex
	m  map[netip.Addr]int32
	_  [48]byte // a cache line each
}

// newIPConns returns a table capping every address at max connections,
// or nil when max is 0 (no cap), which costs the engines nothing.
func newIPConns(max int) *ipConns {
	if max <= 0 {
		return nil
	}
	t := &ipConns{max: int32(max), seed: maphash.MakeSeed()}
	for i := range t.shards {
		t.shards[i].m = make(map[netip.Addr]int32)
	}
	return t
}

func (t *ipConns) shard(ip netip.Addr) *ipConnsShard {
	b := ip.As16()
	return &t.shards[maphash.Bytes(t.seed, b[:])%ipConnsShards]
}

// acquire counts a new connection from ip, unless ip has max open
// already. An invalid ip (not TCP) is never capped.
func (t *ipConns) acquire(ip netip.Addr) bool {
	if !ip.IsValid() {
		return true
	}
	sh := t.shard(ip)
	sh.mu.Lock()
	n := sh.m[ip]
	ok := n < t.max
	if ok {
		sh.m[ip] = n + 1
	}
	sh.mu.Unlock()
	return ok
}

// release counts a connection from ip closed.
func (t *ipConns) release(ip netip.Addr) {
	if !ip.IsValid() {
		return
	}
	sh := t.shard(ip)
	sh.mu.Lock()
	switch n := sh.m[ip]; {
	case n > 1:
		sh.m[ip] = n - 1
	case n == 1:
		delete(sh.m, ip)
	default:
		sh.mu.Unlock()
		panic("BUG: a client connection released twice")
	}
	sh.mu.Unlock()
}

// open returns the connections counted for ip.
func (t *ipConns) open(ip netip.Addr) int {
	sh := t.shard(ip)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	return int(sh.m[ip])
}

// size returns how many addresses have connections open.
func (t *ipConns) size() int {
	n := 0
	for i := range t.shards {
		sh := &t.shards[i]
		sh.mu.Lock()
		n += len(sh.m)
		sh.mu.Unlock()
	}
	return n
}
