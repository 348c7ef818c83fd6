// Package stale keeps copies of good responses that edgelb serves when
// origins fail, instead of a 502.
//
// Only what RFC 9111 lets a shared cache store is kept. Entries live in a
// bounded, GC-free fastcache, survive restarts through SaveTo/LoadFrom, and
// are served with Age and an RFC 9211 Cache-Status header. Vary is honoured:
// each variant is stored apart, behind a per-URL index of the Vary names.
package stale

import (
	"bytes"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/fastcache"
	"github.com/VictoriaMetrics/metrics"
	"github.com/cespare/xxhash/v2"
	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/h1"
)

// Config configures a Store. The zero value selects the defaults.
type Config struct {
	// MaxBytes bounds the memory the store holds entries in. fastcache
	// rounds it up to at least 32 MiB. DefaultMaxBytes is used if not set.
	MaxBytes int `yaml:"max_bytes"`

	// MaxEntryBytes is the largest response body stored; responses with
	// larger bodies are not stored. DefaultMaxEntryBytes is used if not
	// set.
	MaxEntryBytes int `yaml:"max_entry_bytes"`

	// RefreshInterval is the least time between two stores of one URL
	// (one Vary variant of it) from live traffic: in between, Save returns
	// at once. It is counted in milliseconds. DefaultRefreshInterval is
	// used if not set.
	RefreshInterval time.Duration `yaml:"refresh_interval"`

	// Statuses lists the response statuses stored. DefaultStatuses is
	// used if not set.
	Statuses []int `yaml:"statuses"`

	// Logger receives the errors of Persist and RunPersist and the panics
	// recovered while saving or loading. slog.Default() is used if not set.
	Logger *slog.Logger `yaml:"-"`
}

// Defaults of Config.
const (
	// DefaultMaxBytes is used if Config.MaxBytes is not set: 64 MiB.
	DefaultMaxBytes = 64 << 20

	// DefaultMaxEntryBytes is used if Config.MaxEntryBytes is not set:
	// 1 MiB.
	DefaultMaxEntryBytes = 1 << 20

	// DefaultRefreshInterval is used if Config.RefreshInterval is not set.
	DefaultRefreshInterval = time.Second
)

// DefaultStatuses are the statuses stored unless Config.Statuses is set:
// those RFC 9110 section 15.1 calls heuristically cacheable, less 206
// (partial), 405, 414 and 501 (errors an origin may stop returning).
var DefaultStatuses = []int{200, 203, 204, 300, 301, 308, 404, 410}

// Validate returns every invalid setting of c, each naming its YAML key
// under prefix (as "prefix.statuses[2]"). The errors are *ConfigError.
func (c *Config) Validate(prefix string) []error {
	var errs []error
	bad := func(key, reason string) {
		errs = append(errs, &ConfigError{Key: prefix + "." + key, Reason: reason})
	}
	if c.MaxBytes < 0 {
		bad("max_bytes", "must not be negative (got "+strconv.Itoa(c.MaxBytes)+")")
	}
	if c.MaxEntryBytes < 0 {
		bad("max_entry_bytes", "must not be negative (got "+strconv.Itoa(c.MaxEntryBytes)+")")
	}
	if c.RefreshInterval < 0 {
		bad("refresh_interval", "must not be negative (got "+c.RefreshInterval.String()+")")
	}
	for i, st := range c.Statuses {
		if st < 100 || st > 599 {
			bad("statuses["+strconv.Itoa(i)+"]", strconv.Itoa(st)+" is not an HTTP status (100 to 599)")
		}
	}
	return errs
}

// ConfigError is an invalid Config setting.
type ConfigError struct {
	// Key is the full dotted YAML key of the setting.
	Key string
	// Reason says what is wrong with it.
	Reason string
}

// Error implements error.
func (e *ConfigError) Error() string { return e.Key + ": " + e.Reason }

// Policy says when a stored response may be served. It is per service.
type Policy struct {
	// MaxStale is how long past its freshness a response may be served.
	// A response's own stale-if-error extends it.
	MaxStale time.Duration

	// IgnoreRevalidate serves responses anyway that forbid it: no-cache
	// ones, and, once stale, must-revalidate, proxy-revalidate and s-maxage
	// ones (s-maxage implies proxy-revalidate for a shared cache, RFC 9111
	// section 5.2.2.10, unless the response also sets stale-if-error).
	IgnoreRevalidate bool
}

// Store is a bounded store of responses. It is safe for concurrent use;
// Save and Serve take no lock and allocate nothing in steady state. Create
// it with New.
type Store struct {
	cfg      Config
	log      *slog.Logger
	cache    atomic.Pointer[fastcache.Cache]
	statuses [600]bool

	// slots holds, per key hash slot, a stamp of when a key was last
	// stored: its hash's top bits and the time, to refresh each key at
	// most once per RefreshInterval without a lock. Approximate by design:
	// two keys sharing a slot only cost extra stores.
	slots    []atomic.Uint64
	slotMask uint64

	// gen numbers Vary indexes, so that a purged URL's variants stay
	// unreachable when the URL is stored again. Seeded with the time, it
	// does not repeat numbers of a store saved before a restart.
	gen atomic.Uint64

	// purged remembers the recent purges, so that Import never brings
	// back a copy stored before one (see peer.go).
	purged purgeLog

	persistMu sync.Mutex
	// saveHook, if set, runs at the start of each SaveTo: tests make a
	// save panic with it.
	saveHook func()
}

// New returns an empty store.
func New(cfg Config) *Store {
	if cfg.MaxBytes <= 0 {
		cfg.MaxBytes = DefaultMaxBytes
	}
	if cfg.MaxEntryBytes <= 0 {
		cfg.MaxEntryBytes = DefaultMaxEntryBytes
	}
	if cfg.RefreshInterval <= 0 {
		cfg.RefreshInterval = DefaultRefreshInterval
	}
	if len(cfg.Statuses) == 0 {
		cfg.Statuses = DefaultStatuses
	}
	s := &Store{cfg: cfg, log: cfg.Logger}
	if s.log == nil {
		s.log = slog.Default()
	}
	for _, st := range cfg.Statuses {
		if st > 0 && st < len(s.statuses) {
			s.statuses[st] = true
		}
	}
	// About one slot per KiB of store, a power of two.
	n := 1 << 12
	for n < cfg.MaxBytes>>10 && n < 1<<20 {
		n <<= 1
	}
	s.slots = make([]atomic.Uint64, n)
	s.slotMask = uint64(n - 1)
	s.gen.Store(uint64(time.Now().UnixNano()))
	s.cache.Store(fastcache.New(cfg.MaxBytes))
	registerStats(s)
	return s
}

// Metrics, made once and shared by every Store.
var (
	storedTotal    = metrics.GetOrCreateCounter(`edgelb_stale_stored_total`)
	servedTotal    = metrics.GetOrCreateCounter(`edgelb_stale_served_total`)
	missAbsent     = metrics.GetOrCreateCounter(`edgelb_stale_misses_total{reason="absent"}`)
	missTooOld     = metrics.GetOrCreateCounter(`edgelb_stale_misses_total{reason="too_old"}`)
	missRevalidate = metrics.GetOrCreateCounter(`edgelb_stale_misses_total{reason="revalidate"}`)
	statsOnce      sync.Once
	statsStore     atomic.Pointer[Store]
)

// registerStats exposes the fastcache figures of the newest store.
func registerStats(s *Store) {
	statsStore.Store(s)
	statsOnce.Do(func() {
		stat := func(f func(*fastcache.Stats) uint64) func() float64 {
			return func() float64 {
				var st fastcache.Stats
				if s := statsStore.Load(); s != nil {
					s.cache.Load().UpdateStats(&st)
				}
				return float64(f(&st))
			}
		}
		metrics.GetOrCreateGauge(`edgelb_stale_bytes`, stat(func(st *fastcache.Stats) uint64 { return st.BytesSize }))
		metrics.GetOrCreateGauge(`edgelb_stale_max_bytes`, stat(func(st *fastcache.Stats) uint64 { return st.MaxBytesSize }))
		metrics.GetOrCreateGauge(`edgelb_stale_entries`, stat(func(st *fastcache.Stats) uint64 { return st.EntriesCount }))
		metrics.GetOrCreateGauge(`edgelb_stale_evicted_bytes_total`, stat(func(st *fastcache.Stats) uint64 { return st.EvictedBytes }))
	})
}

// buf holds the scratch space of one Save or Serve.
type buf struct {
	key, val, vary []byte
	// headers holds a request's headers as name, value pairs.
	headers [][2][]byte
}

// appendVariant appends to b.key the variant key of req, generation gen,
// for the header names in b.vary.
func (b *buf) appendVariant(gen uint64, req *fasthttp.Request) {
	b.headers = b.headers[:0]
	for k, v := range req.Header.All() {
		b.headers = append(b.headers, [2][]byte{k, v})
	}
	b.key = appendVariantKey(b.key, gen, b.vary, b.headers)
}

var bufPool sync.Pool

func getBuf() *buf {
	if v := bufPool.Get(); v != nil {
		return v.(*buf)
	}
	return &buf{key: make([]byte, 0, 512), val: make([]byte, 0, 16<<10), vary: make([]byte, 0, 64)}
}

func putBuf(b *buf) { bufPool.Put(b) }

// statusIndex maps a status to an index of Store.statuses; 0 is never set.
func statusIndex(st int) int {
	if st < 0 || st >= 600 {
		return 0
	}
	return st
}

// Due reports whether Save may store a new answer for the URL at host and
// uri (its request target as received) now: false when one was stored
// less than RefreshInterval ago. For a response with Vary, vary holds its
// Vary values and reqHeaders the request's headers as name, value pairs;
// both are empty otherwise. It lets a caller skip building the request and
// response Save takes, and allocates nothing.
func (s *Store) Due(now time.Time, scheme, host, uri []byte, vary [][]byte, reqHeaders [][2][]byte) bool {
	b := getBuf()
	defer putBuf(b)
	b.vary = b.vary[:0]
	star := false
	for _, v := range vary {
		b.vary = appendVaryNames(b.vary, v, &star)
	}
	if star || len(b.vary) > maxVaryNames {
		return false
	}
	b.key = appendKeyParts(b.key[:0], scheme, host, uri)
	if len(b.vary) > 0 {
		b.key = appendVariantKey(b.key, 0, b.vary, reqHeaders)
	}
	if len(b.key) > maxKeyLen {
		return false
	}
	return s.DueKey(xxhash.Sum64(b.key), now)
}

// URLKey returns what Due computes for an answer without Vary to the URL
// at host and uri: a key hash for DueKey, and false if no answer to it
// is ever stored. buf is scratch space, returned for reuse. A caller
// that sees the same URL again keeps the hash and calls DueKey alone.
func URLKey(buf, scheme, host, uri []byte) (h uint64, ok bool, _ []byte) {
	buf = appendKeyParts(buf[:0], scheme, host, uri)
	if len(buf) > maxKeyLen {
		return 0, false, buf
	}
	return xxhash.Sum64(buf), true, buf
}

// DueKey is Due for the URL whose key hash URLKey returned.
func (s *Store) DueKey(h uint64, now time.Time) bool {
	return !s.recent(s.slots[h&s.slotMask].Load(), makeStamp(h, now))
}

// Save stores resp as the answer to req if a shared cache may store it
// (see Storable). It is meant for every successful proxied response: a URL
// is stored again at most once per RefreshInterval, and the check for that
// is cheap. scheme is the client's ("http" or "https"). Save keeps nothing
// of req and resp.
func (s *Store) Save(now time.Time, scheme []byte, req *fasthttp.Request, resp *fasthttp.Response) {
	if !s.storableShape(req, resp) {
		return
	}
	b := getBuf()
	defer putBuf(b)
	var ri respInfo
	b.vary = ri.scan(&resp.Header, b.vary[:0])
	if ri.setCookie || ri.varyStar || ri.varyTooLong {
		return
	}
	b.key = appendKey(b.key[:0], scheme, req)
	primaryLen := len(b.key)
	if len(b.vary) > 0 {
		// Generation 0 for now: the rate limit ignores it.
		b.appendVariant(0, req)
	}
	if len(b.key) > maxKeyLen {
		return
	}
	h := xxhash.Sum64(b.key)
	slot := &s.slots[h&s.slotMask]
	last, stamp := slot.Load(), makeStamp(h, now)
	if s.recent(last, stamp) {
		// Fast path: stored a moment ago.
		return
	}
	ri.parseCacheControl(&resp.Header)
	var rq reqInfo
	rq.scan(&req.Header)
	if !storable(&ri, &rq) || !slot.CompareAndSwap(last, stamp) {
		return // not storable, or another request is storing it
	}

	// Slow path: once per key and RefreshInterval.
	c := s.cache.Load()
	if len(b.vary) > 0 {
		gen := s.varyIndex(c, b, primaryLen)
		putGen(b.key[primaryLen:], gen)
	}
	b.val = appendEntry(b.val[:0], now, resp, &ri, b.vary)
	set(c, b.key, b.val)
	storedTotal.Inc()
}

// storableShape reports what can be told of storability without reading
// headers: a GET answered with a storable status and a body held in memory
// and not too large.
func (s *Store) storableShape(req *fasthttp.Request, resp *fasthttp.Response) bool {
	return req.Header.IsGet() && s.statuses[statusIndex(resp.StatusCode())] &&
		!resp.IsBodyStream() && len(resp.Body()) <= s.cfg.MaxEntryBytes
}

// Storable reports whether Save would store resp as the answer to req, the
// refresh rate limit aside: a GET; a status in Config.Statuses; a body in
// memory (not streamed) of at most Config.MaxEntryBytes; no Cache-Control
// no-store or private and no Set-Cookie in the response, no Vary: *; no
// Cache-Control no-store in the request, and no Authorization in it unless
// the response has public, s-maxage or must-revalidate (RFC 9111 section 3).
func (s *Store) Storable(req *fasthttp.Request, resp *fasthttp.Response) bool {
	if !s.storableShape(req, resp) {
		return false
	}
	var ri respInfo
	ri.scan(&resp.Header, nil)
	ri.parseCacheControl(&resp.Header)
	var rq reqInfo
	rq.scan(&req.Header)
	return storable(&ri, &rq)
}

// Refresh stamps: the top stampShift bits of a key's hash, then the time
// in unix milliseconds modulo 2^42 (139 years).
const (
	stampShift = 42
	stampMask  = 1<<stampShift - 1
)

func makeStamp(h uint64, now time.Time) uint64 {
	return h>>stampShift<<stampShift | uint64(now.UnixMilli())&stampMask
}

// recent reports whether stamp follows last, of the same key, by less
// than RefreshInterval. A clock going back makes the gap huge, not recent.
func (s *Store) recent(last, stamp uint64) bool {
	if last == 0 || last>>stampShift != stamp>>stampShift {
		return false
	}
	gap := (stamp - last) & stampMask
	return time.Duration(gap)*time.Millisecond < s.cfg.RefreshInterval
}

// varyIndex returns the generation of the Vary index of the URL whose
// primary key b.key starts with, and writes the index, refreshing it so
// that it does not age out of fastcache before its variants.
func (s *Store) varyIndex(c *fastcache.Cache, b *buf, primaryLen int) uint64 {
	key := b.key[:primaryLen]
	b.val = c.Get(b.val[:0], key)
	gen, names, ok := decodeVaryIndex(b.val)
	if !ok || !bytes.Equal(names, b.vary) {
		gen = s.gen.Add(1)
	}
	b.val = appendVaryIndex(b.val[:0], gen, b.vary)
	c.Set(key, b.val)
	return gen
}

// putGen writes gen into a variant key suffix made by appendVariantKey.
func putGen(suffix []byte, gen uint64) {
	for i := 0; i < 8; i++ {
		suffix[2+i] = byte(gen >> (56 - 8*i))
	}
}

// chunkLimit is what fastcache's Set stores at most: 4 length bytes, key
// and value must be below one 64 KiB chunk.
const chunkLimit = 64<<10 - 4

// set stores val under key: with Set when it fits in one fastcache chunk,
// else with SetBig under the key's nsBig twin and a pointer under key.
func set(c *fastcache.Cache, key, val []byte) {
	if len(key)+len(val) < chunkLimit {
		c.Set(key, val)
		return
	}
	// Slow path: a big entry.
	key[0] = nsBig
	c.SetBig(key, val)
	key[0] = nsKey
	c.Set(key, bigPointer)
}

// get appends the value under key to dst[:0], following a big pointer.
func get(c *fastcache.Cache, dst, key []byte) []byte {
	dst = c.Get(dst[:0], key)
	if len(dst) == len(bigPointer) && dst[0] == kindBig && dst[1] == formatV {
		key[0] = nsBig
		dst = c.GetBig(dst[:0], key)
		key[0] = nsKey
	}
	return dst
}

// Serve writes the stored answer to req (a GET or HEAD; HEAD is answered
// from the stored GET) into resp, with Age and Cache-Status, and reports
// whether there was one that p allows. detail says why it is served (an
// Edgelb-Error code, say) in Cache-Status; it may be empty.
//
// A stored response is served while its age past freshness is within
// p.MaxStale, or within its own stale-if-error if that is longer. On
// false, resp is untouched.
func (s *Store) Serve(now time.Time, scheme []byte, req *fasthttp.Request, resp *fasthttp.Response, p Policy, detail []byte) bool {
	head := req.Header.IsHead()
	if !head && !req.Header.IsGet() {
		return false
	}
	b := getBuf()
	defer putBuf(b)
	e, ok := s.lookup(b, scheme, req)
	if !ok {
		missAbsent.Inc()
		return false
	}

	// Age rounds up: a response stored a moment ago with no freshness is
	// already stale, and says so.
	age := e.ageAtStore
	if d := now.UnixNano() - e.storedAt; d > 0 {
		age += (d + int64(time.Second) - 1) / int64(time.Second)
	}
	ttl := e.freshness - age
	if !p.IgnoreRevalidate && refused(&e, ttl) {
		missRevalidate.Inc()
		return false
	}
	if ttl < 0 && -ttl > max(int64(p.MaxStale/time.Second), e.staleIfError) {
		missTooOld.Inc()
		return false
	}

	resp.Reset()
	resp.SetStatusCode(e.status)
	for h := e.headers; len(h) > 0; {
		var k, v []byte
		k, v, h = nextHeader(h)
		resp.Header.AddBytesKV(k, v)
	}
	if head {
		resp.SkipBody = true
		resp.Header.SetContentLength(len(e.body))
	} else {
		resp.SetBody(e.body)
	}
	var num [20]byte
	resp.Header.SetBytesKV(strAge, strconv.AppendInt(num[:0], age, 10))
	cs := append(b.key[:0], "edgelb; hit; ttl="...)
	cs = strconv.AppendInt(cs, ttl, 10)
	if len(detail) > 0 {
		cs = append(cs, "; detail="...)
		cs = appendSFItem(cs, detail)
	}
	resp.Header.SetBytesKV(strCacheStatus, cs)
	b.key = cs
	servedTotal.Inc()
	return true
}

// lookup finds the entry stored for req, following the URL's Vary index,
// into b.val; the entry's slices point into it. It reports false when
// there is none, or none the store may serve.
func (s *Store) lookup(b *buf, scheme []byte, req *fasthttp.Request) (entry, bool) {
	c := s.cache.Load()
	b.key = appendKey(b.key[:0], scheme, req)
	b.val = get(c, b.val, b.key)
	b.vary = b.vary[:0]
	if gen, names, ok := decodeVaryIndex(b.val); ok {
		b.vary = append(b.vary, names...)
		b.appendVariant(gen, req)
		b.val = get(c, b.val, b.key)
	}
	e, ok := decodeEntry(b.val)
	if !ok || !bytes.Equal(e.vary, b.vary) || !s.statuses[statusIndex(e.status)] {
		return e, false
	}
	return e, true
}

// refused reports whether the entry's directives forbid serving it
// without revalidation, ttl seconds from the end of its freshness.
func refused(e *entry, ttl int64) bool {
	switch {
	case e.flags&flagNoCache != 0:
		return true
	case ttl >= 0:
		return false
	case e.flags&flagMustRevalidate != 0:
		return true
	default:
		// proxy-revalidate, or s-maxage without an explicit stale-if-error.
		return e.flags&flagProxyRevalidate != 0 && e.flags&flagStaleIfError == 0
	}
}

// appendSFItem appends v as a structured-field token (RFC 8941) if it is
// one, else as a string, dropping what a string cannot hold.
func appendSFItem(dst, v []byte) []byte {
	if isSFToken(v) {
		return append(dst, v...)
	}
	dst = append(dst, '"')
	for _, c := range v {
		switch {
		case c == '"' || c == '\\':
			dst = append(dst, '\\', c)
		case c >= 0x20 && c < 0x7f:
			dst = append(dst, c)
		}
	}
	return append(dst, '"')
}

func isSFToken(v []byte) bool {
	if len(v) == 0 || !(v[0] == '*' || ('a' <= v[0]|0x20 && v[0]|0x20 <= 'z')) {
		return false
	}
	for _, c := range v {
		if !h1.TokenChars[c] && c != ':' && c != '/' {
			return false
		}
	}
	return true
}

// Purge removes the stored answers to one absolute URL
// (scheme://host/path?query, as clients send the path and query), all its
// Vary variants included. It returns ErrPurgeURL for a URL that is not
// absolute.
func (s *Store) Purge(rawURL string) error {
	key, err := appendPurgeKey(nil, rawURL)
	if err != nil {
		return err
	}
	c := s.cache.Load()
	s.purged.add(xxhash.Sum64(key), time.Now())
	// Without their index, variants are unreachable; an index made again
	// later has a new generation, so they stay so.
	c.Del(key)
	key[0] = nsBig
	c.Del(key)
	key[0] = nsKey
	s.slots[xxhash.Sum64(key)&s.slotMask].Store(0)
	return nil
}

// PurgeAll removes every stored answer.
func (s *Store) PurgeAll() {
	s.purged.addAll(time.Now())
	s.cache.Load().Reset()
	s.resetSlots()
}

func (s *Store) resetSlots() {
	for i := range s.slots {
		s.slots[i].Store(0)
	}
}
