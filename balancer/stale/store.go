// Package stale keeps copies of good responses that edgelb serves when
// origins fail, instead of a 502.
//
// Only what RFC 9111 lets a shared cache store is kept. Entries live in a
// bounded, GC-free fastcache, survive restarts through SaveTo/LoadFrom, and
// are served with Age and an RFC 9211 Cache-Status header.
package stale

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/fastcache"
	"github.com/VictoriaMetrics/metrics"
	"github.com/cespare/xxhash/v2"
	"github.com/valyala/fasthttp"
)

// Config configures a Store. Zero values select the defaults.
type Config struct {
	// MaxBytes bounds the memory of the store. DefaultMaxBytes is used if
	// not set.
	MaxBytes int `yaml:"max_bytes"`

	// MaxEntryBytes is the largest response stored, headers included.
	// DefaultMaxEntryBytes is used if not set.
	MaxEntryBytes int `yaml:"max_entry_bytes"`

	// RefreshInterval is how often one URL's stored copy is refreshed
	// from live traffic. DefaultRefreshInterval is used if not set.
	RefreshInterval time.Duration `yaml:"refresh_interval"`

	// Statuses lists the storable statuses. DefaultStatuses is used if not
	// set.
	Statuses []int `yaml:"statuses"`
}

// Defaults of Config.
const (
	DefaultMaxBytes        = 64 << 20
	DefaultMaxEntryBytes   = 1 << 20
	DefaultRefreshInterval = time.Second
)

// DefaultStatuses are the statuses stored unless Config.Statuses is set:
// those RFC 9110 calls heuristically cacheable, less 206 and 405, 414, 501.
var DefaultStatuses = []int{200, 203, 204, 300, 301, 308, 404, 410}

// Policy says when a stored response may be served, per service.
type Policy struct {
	// MaxStale is how long past its freshness a response may be served.
	// A response's own stale-if-error extends it.
	MaxStale time.Duration

	// IgnoreRevalidate serves responses marked must-revalidate,
	// proxy-revalidate or no-cache anyway.
	IgnoreRevalidate bool
}

// Store is a bounded store of responses. It is safe for concurrent use.
// Save and Serve take no lock of their own and allocate nothing in steady
// state.
type Store struct {
	cfg      Config
	cache    atomic.Pointer[fastcache.Cache]
	statuses [600]bool

	// lastSaved holds, per key hash slot, when a key in the slot was last
	// stored (unix seconds), to refresh each URL at most once per
	// RefreshInterval. Approximate by design.
	lastSaved []atomic.Int64

	stored, served, misses *metrics.Counter
}

const refreshSlots = 1 << 16

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
	s := &Store{cfg: cfg, lastSaved: make([]atomic.Int64, refreshSlots)}
	for _, c := range cfg.Statuses {
		if c >= 0 && c < len(s.statuses) {
			s.statuses[c] = true
		}
	}
	s.cache.Store(fastcache.New(cfg.MaxBytes))
	s.stored = metrics.GetOrCreateCounter(`edgelb_stale_stored_total`)
	s.served = metrics.GetOrCreateCounter(`edgelb_stale_served_total`)
	s.misses = metrics.GetOrCreateCounter(`edgelb_stale_misses_total`)
	registerStats(s)
	return s
}

var (
	statsMu    sync.Mutex
	statsStore atomic.Pointer[Store]
)

// registerStats exposes the fastcache figures of the newest store.
func registerStats(s *Store) {
	statsMu.Lock()
	defer statsMu.Unlock()
	if statsStore.Swap(s) != nil {
		return
	}
	stat := func(f func(*fastcache.Stats) uint64) func() float64 {
		return func() float64 {
			var st fastcache.Stats
			if s := statsStore.Load(); s != nil {
				s.cache.Load().UpdateStats(&st)
			}
			return float64(f(&st))
		}
	}
	metrics.NewGauge(`edgelb_stale_bytes`, stat(func(st *fastcache.Stats) uint64 { return st.BytesSize }))
	metrics.NewGauge(`edgelb_stale_max_bytes`, stat(func(st *fastcache.Stats) uint64 { return st.MaxBytesSize }))
	metrics.NewGauge(`edgelb_stale_entries`, stat(func(st *fastcache.Stats) uint64 { return st.EntriesCount }))
	metrics.NewGauge(`edgelb_stale_evicted_bytes_total`, stat(func(st *fastcache.Stats) uint64 { return st.EvictedBytes }))
}

// buf is a pooled scratch buffer.
type buf struct{ key, val []byte }

var bufPool = sync.Pool{New: func() any { return &buf{key: make([]byte, 0, 256), val: make([]byte, 0, 4096)} }}

// Entry kinds: a response, or the list of Vary header names of a URL.
const (
	kindResponse byte = 'R'
	kindVary     byte = 'V'
	entryVersion byte = 1
)

// Save stores resp as the answer to req if a shared cache may store it.
// It is meant for every successful proxied response: a URL is refreshed at
// most once per RefreshInterval, and the check for that is cheap.
func (s *Store) Save(now time.Time, scheme []byte, req *fasthttp.Request, resp *fasthttp.Response) {
	if !req.Header.IsGet() || !s.statuses[clampStatus(resp.StatusCode())] || resp.IsBodyStream() {
		return
	}
	b := bufPool.Get().(*buf)
	defer bufPool.Put(b)
	b.key = appendKey(b.key[:0], scheme, req)
	slot := &s.lastSaved[xxhash.Sum64(b.key)%refreshSlots]
	sec := now.Unix()
	last := slot.Load()
	if last != 0 && time.Duration(sec-last)*time.Second < s.cfg.RefreshInterval && time.Duration(sec-last) >= 0 {
		// Fast path: stored recently.
		return
	}
	cc := parseCacheControl(resp.Header.Peek(fasthttp.HeaderCacheControl))
	if !storable(req, resp, cc) {
		return
	}
	if len(resp.Body()) > s.cfg.MaxEntryBytes {
		return
	}
	if !slot.CompareAndSwap(last, sec) {
		return // another request is storing it
	}
	c := s.cache.Load()
	vary := resp.Header.Peek(fasthttp.HeaderVary)
	if len(vary) > 0 {
		b.val = append(append(b.val[:0], kindVary, entryVersion), vary...)
		c.SetBig(b.key, b.val)
		b.key = appendVariant(b.key, vary, req)
	}
	b.val = appendEntry(b.val[:0], now, resp, cc)
	if len(b.val) > s.cfg.MaxEntryBytes+64<<10 {
		return
	}
	c.SetBig(b.key, b.val)
	s.stored.Inc()
}

// Serve writes the stored answer to req into resp, with Age and
// Cache-Status, and reports whether there was one that p allows. detail
// names why it is served (an Edgelb-Error code) in Cache-Status.
func (s *Store) Serve(now time.Time, scheme []byte, req *fasthttp.Request, resp *fasthttp.Response, p Policy, detail []byte) bool {
	if !req.Header.IsGet() && !req.Header.IsHead() {
		return false
	}
	b := bufPool.Get().(*buf)
	defer bufPool.Put(b)
	c := s.cache.Load()
	b.key = appendKey(b.key[:0], scheme, req)
	b.val = c.GetBig(b.val[:0], b.key)
	if len(b.val) >= 2 && b.val[0] == kindVary && b.val[1] == entryVersion {
		b.key = appendVariant(b.key, b.val[2:], req)
		b.val = c.GetBig(b.val[:0], b.key)
	}
	e, ok := decodeEntry(b.val)
	if !ok {
		s.misses.Inc()
		return false
	}
	if e.revalidate && !p.IgnoreRevalidate {
		s.misses.Inc()
		return false
	}
	// Age rounds up: a response stored a moment ago with no freshness is
	// already stale, and says so.
	age := e.ageAtStore + int64((now.Sub(time.Unix(0, e.storedAt))+time.Second-1)/time.Second)
	if age < 0 {
		age = 0
	}
	ttl := e.freshness - age
	allowed := int64(p.MaxStale / time.Second)
	if e.staleIfError > allowed {
		allowed = e.staleIfError
	}
	if -ttl > allowed {
		s.misses.Inc()
		return false
	}
	resp.Reset()
	resp.SetStatusCode(e.status)
	h := e.headers
	for len(h) >= 4 {
		kl := int(binary.LittleEndian.Uint16(h))
		vl := int(binary.LittleEndian.Uint16(h[2:]))
		h = h[4:]
		resp.Header.AddBytesKV(h[:kl], h[kl:kl+vl])
		h = h[kl+vl:]
	}
	resp.SetBody(e.body)
	var num [24]byte
	resp.Header.SetBytesKV(strAge, strconv.AppendInt(num[:0], age, 10))
	cs := append(b.key[:0], `edgelb; hit; ttl=`...)
	cs = strconv.AppendInt(cs, ttl, 10)
	if len(detail) > 0 {
		cs = append(append(cs, `; detail=`...), detail...)
	}
	resp.Header.SetBytesKV(strCacheStatus, cs)
	s.served.Inc()
	return true
}

var (
	strAge         = []byte("Age")
	strCacheStatus = []byte("Cache-Status")
)

func clampStatus(c int) int {
	if c < 0 || c >= 600 {
		return 0
	}
	return c
}

// appendKey appends the primary key of req: scheme, lower-cased host, and
// the request URI as sent.
func appendKey(dst, scheme []byte, req *fasthttp.Request) []byte {
	dst = append(dst, scheme...)
	dst = append(dst, "://"...)
	for _, c := range req.Header.Host() {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		dst = append(dst, c)
	}
	return append(dst, req.Header.RequestURI()...)
}

// appendVariant appends to a primary key the request's values of the
// headers that vary lists.
func appendVariant(dst, vary []byte, req *fasthttp.Request) []byte {
	for len(vary) > 0 {
		var name []byte
		name, vary, _ = bytes.Cut(vary, strComma)
		name = bytes.TrimSpace(name)
		if len(name) == 0 {
			continue
		}
		dst = append(dst, 0)
		dst = append(dst, name...)
		dst = append(dst, ':')
		dst = append(dst, req.Header.PeekBytes(name)...)
	}
	return dst
}

var strComma = []byte(",")

// entry is a decoded stored response; its slices point into the buffer it
// was decoded from.
type entry struct {
	storedAt     int64 // unix nano
	ageAtStore   int64 // seconds
	freshness    int64 // seconds
	staleIfError int64 // seconds, -1 if none
	revalidate   bool
	status       int
	headers      []byte
	body         []byte
}

// hop-by-hop and per-response headers that are not stored.
var skipHeaders = [][]byte{
	[]byte("Age"), []byte("Connection"), []byte("Keep-Alive"), []byte("Transfer-Encoding"),
	[]byte("Proxy-Authenticate"), []byte("Trailer"), []byte("Upgrade"), []byte("Content-Length"),
	[]byte("Set-Cookie"), []byte("Cache-Status"),
}

func skipHeader(k []byte) bool {
	for _, s := range skipHeaders {
		if bytes.EqualFold(k, s) {
			return true
		}
	}
	return false
}

// Entry layout: kind, version, storedAt(8), ageAtStore(8), freshness(8),
// staleIfError(8), flags(1), status(2), headersLen(4), headers, body.
func appendEntry(dst []byte, now time.Time, resp *fasthttp.Response, cc cacheControl) []byte {
	dst = append(dst, kindResponse, entryVersion)
	dst = binary.LittleEndian.AppendUint64(dst, uint64(now.UnixNano()))
	dst = binary.LittleEndian.AppendUint64(dst, uint64(seconds(resp.Header.PeekBytes(strAge))))
	dst = binary.LittleEndian.AppendUint64(dst, uint64(freshness(now, resp, cc)))
	dst = binary.LittleEndian.AppendUint64(dst, uint64(cc.staleIfError))
	var flags byte
	if cc.mustRevalidate || cc.noCache {
		flags |= 1
	}
	dst = append(dst, flags)
	dst = binary.LittleEndian.AppendUint16(dst, uint16(resp.StatusCode()))
	lenAt := len(dst)
	dst = append(dst, 0, 0, 0, 0)
	for k, v := range resp.Header.All() {
		if skipHeader(k) || len(k) > 0xffff || len(v) > 0xffff {
			continue
		}
		dst = binary.LittleEndian.AppendUint16(dst, uint16(len(k)))
		dst = binary.LittleEndian.AppendUint16(dst, uint16(len(v)))
		dst = append(dst, k...)
		dst = append(dst, v...)
	}
	binary.LittleEndian.PutUint32(dst[lenAt:], uint32(len(dst)-lenAt-4))
	return append(dst, resp.Body()...)
}

func decodeEntry(b []byte) (entry, bool) {
	const fixed = 2 + 8*4 + 1 + 2 + 4
	if len(b) < fixed || b[0] != kindResponse || b[1] != entryVersion {
		return entry{}, false
	}
	le := binary.LittleEndian
	e := entry{
		storedAt:     int64(le.Uint64(b[2:])),
		ageAtStore:   int64(le.Uint64(b[10:])),
		freshness:    int64(le.Uint64(b[18:])),
		staleIfError: int64(le.Uint64(b[26:])),
		revalidate:   b[34]&1 != 0,
		status:       int(le.Uint16(b[35:])),
	}
	hl := int(le.Uint32(b[37:]))
	if fixed+hl > len(b) {
		return entry{}, false
	}
	e.headers = b[fixed : fixed+hl]
	e.body = b[fixed+hl:]
	return e, true
}

// freshness returns the response's freshness lifetime in seconds: s-maxage,
// max-age, or Expires minus Date; 0 when none is given (only failures
// serve it, so no heuristic freshness is needed).
func freshness(now time.Time, resp *fasthttp.Response, cc cacheControl) int64 {
	switch {
	case cc.sMaxAge >= 0:
		return cc.sMaxAge
	case cc.maxAge >= 0:
		return cc.maxAge
	}
	exp := resp.Header.Peek(fasthttp.HeaderExpires)
	if len(exp) == 0 {
		return 0
	}
	t, err := fasthttp.ParseHTTPDate(exp)
	if err != nil {
		return 0
	}
	date := now
	if d, err := fasthttp.ParseHTTPDate(resp.Header.Peek(fasthttp.HeaderDate)); err == nil {
		date = d
	}
	return max(int64(t.Sub(date)/time.Second), 0)
}

// storable reports whether a shared cache may store resp as the answer to
// req (RFC 9111 section 3).
func storable(req *fasthttp.Request, resp *fasthttp.Response, cc cacheControl) bool {
	if cc.noStore || cc.private {
		return false
	}
	if len(resp.Header.Peek(fasthttp.HeaderSetCookie)) > 0 {
		return false
	}
	if bytes.Equal(bytes.TrimSpace(resp.Header.Peek(fasthttp.HeaderVary)), strStar) {
		return false
	}
	rcc := parseCacheControl(req.Header.Peek(fasthttp.HeaderCacheControl))
	if rcc.noStore {
		return false
	}
	if len(req.Header.Peek(fasthttp.HeaderAuthorization)) > 0 && !cc.public && cc.sMaxAge < 0 && !cc.mustRevalidate {
		return false
	}
	return true
}

var strStar = []byte("*")

// Purge removes the stored answers to one absolute URL
// (scheme://host/path?query), all its Vary variants included.
func (s *Store) Purge(rawURL string) error {
	var u fasthttp.URI
	if err := u.Parse(nil, []byte(rawURL)); err != nil || len(u.Host()) == 0 {
		return fmt.Errorf("cannot purge %q: want an absolute URL such as http://example.com/path", rawURL)
	}
	var req fasthttp.Request
	req.Header.SetHostBytes(u.Host())
	req.Header.SetRequestURIBytes(u.RequestURI())
	key := appendKey(nil, u.Scheme(), &req)
	c := s.cache.Load()
	// Variants hang off the Vary index: without it they are unreachable.
	c.Del(key)
	return nil
}

// PurgeAll removes every stored answer.
func (s *Store) PurgeAll() {
	s.cache.Load().Reset()
	for i := range s.lastSaved {
		s.lastSaved[i].Store(0)
	}
}

// stateDirName is the store's directory under state_dir.
const stateDirName = "stale"

// SaveTo writes the store under dir, atomically replacing an older copy.
func (s *Store) SaveTo(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("cannot save stale store: %w", err)
	}
	if err := s.cache.Load().SaveToFileConcurrent(filepath.Join(dir, stateDirName), 0); err != nil {
		return fmt.Errorf("cannot save stale store under %q: %w", dir, err)
	}
	return nil
}

// LoadFrom replaces the store's content with the copy saved under dir. A
// missing copy leaves the store empty and is not an error; a corrupt one
// leaves it empty and is.
func (s *Store) LoadFrom(dir string) error {
	path := filepath.Join(dir, stateDirName)
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	c, err := fastcache.LoadFromFileMaxBytes(path, s.cfg.MaxBytes)
	if err != nil {
		return fmt.Errorf("cannot load stale store from %q (starting empty): %w", path, err)
	}
	s.cache.Store(c)
	return nil
}
