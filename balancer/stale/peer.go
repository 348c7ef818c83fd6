package stale

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/valyala/fasthttp"
)

// Copies between instances: a peer's Copy hands over an entry in the
// store's own format (see entry.go), and Import stores it here. Only the
// time it was stored changes on the way, as clocks of two hosts differ:
// Copy says how long ago that was, and Import stores it that long before
// its own now, so that Age goes on from where the peer's copy was.

// ErrImport is returned, wrapped, by Import for a copy it does not store.
var ErrImport = errors.New("stale: copy not stored")

// Copy appends to dst the stored entry that Serve would answer req (a GET
// or HEAD) from, whatever a Policy says of its age, in the store's format,
// and reports how long before now it was stored. It reports false when
// there is none.
func (s *Store) Copy(dst []byte, now time.Time, scheme []byte, req *fasthttp.Request) (val []byte, elapsed time.Duration, ok bool) {
	if !req.Header.IsGet() && !req.Header.IsHead() {
		return dst, 0, false
	}
	b := getBuf()
	defer putBuf(b)
	e, ok := s.lookup(b, scheme, req)
	if !ok {
		return dst, 0, false
	}
	return append(dst, b.val...), max(time.Duration(now.UnixNano()-e.storedAt), 0), true
}

// maxCopyHead bounds what a copy holds besides its body: Vary names and
// headers.
const maxCopyHead = 1 << 20

// MaxCopyBytes is the size of the largest copy Import may store: a body of
// Config.MaxEntryBytes and its head.
func (s *Store) MaxCopyBytes() int { return s.cfg.MaxEntryBytes + maxCopyHead }

// Import stores val, an entry that another store's Copy gave for req, as
// the answer to req, stored elapsed before now. The entry is checked as
// this store's own are, and against this store's config: a damaged entry,
// a status it does not store, a body over MaxEntryBytes, a header no
// stored copy holds (Set-Cookie, hop-by-hop) or a URL too long for a key
// is not stored, and the error, wrapping ErrImport, says why. Import keeps
// nothing of req and val.
func (s *Store) Import(now time.Time, scheme []byte, req *fasthttp.Request, val []byte, elapsed time.Duration) error {
	e, ok := decodeEntry(val)
	switch {
	case !ok:
		return fmt.Errorf("%w: not an entry of this version", ErrImport)
	case !s.statuses[statusIndex(e.status)]:
		return fmt.Errorf("%w: status %d is not stored here", ErrImport, e.status)
	case len(e.body) > s.cfg.MaxEntryBytes:
		return fmt.Errorf("%w: body of %d bytes, over max_entry_bytes %d", ErrImport, len(e.body), s.cfg.MaxEntryBytes)
	}
	for h := e.headers; len(h) > 0; {
		var k []byte
		k, _, h = nextHeader(h)
		if notStored(k, nil) {
			return fmt.Errorf("%w: header %q is never stored", ErrImport, k)
		}
	}
	b := getBuf()
	defer putBuf(b)
	star := false
	b.vary = appendVaryNames(b.vary[:0], e.vary, &star)
	if star || len(b.vary) > maxVaryNames || string(b.vary) != string(e.vary) {
		return fmt.Errorf("%w: Vary names %q are not as stored", ErrImport, e.vary)
	}
	b.key = appendKey(b.key[:0], scheme, req)
	primaryLen := len(b.key)
	if len(b.vary) > 0 {
		b.appendVariant(0, req)
	}
	if len(b.key) > maxKeyLen {
		return fmt.Errorf("%w: key of %d bytes, over %d", ErrImport, len(b.key), maxKeyLen)
	}
	storedAt := now.Add(-max(elapsed, 0))
	if p := s.purged.since(xxhash.Sum64(b.key[:primaryLen])); p != 0 && storedAt.UnixNano() <= p {
		// A peer that has not applied the purge yet must not undo it.
		return fmt.Errorf("%w: stored %s before this instance purged it", ErrImport, time.Duration(p-storedAt.UnixNano()).Round(time.Millisecond))
	}
	c := s.cache.Load()
	if len(b.vary) > 0 {
		gen := s.varyIndex(c, b, primaryLen)
		putGen(b.key[primaryLen:], gen)
	}
	b.val = append(b.val[:0], val...)
	binary.LittleEndian.PutUint64(b.val[2:], uint64(storedAt.UnixNano()))
	set(c, b.key, b.val)
	storedTotal.Inc()
	return nil
}

// maxPurgesRemembered bounds the URLs whose purge is remembered; past it,
// they are remembered as a purge of everything at the time of the last.
const maxPurgesRemembered = 1 << 16

// purgeLog remembers when the store was purged: of everything, and of
// each URL (by its primary key's hash) since. A copy stored before the
// purge of its URL predates it for good, so nothing is forgotten by time.
// It is safe for concurrent use; only purges and imports take its lock.
type purgeLog struct {
	mu sync.Mutex
	// all and url hold unix nanoseconds.
	all int64
	url map[uint64]int64
}

func (l *purgeLog) add(h uint64, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.url) >= maxPurgesRemembered {
		// Slow path: a flood of purges. Forgetting them as one purge of
		// everything refuses more copies, never one that was purged.
		for _, t := range l.url {
			l.all = max(l.all, t)
		}
		l.url = nil
	}
	if l.url == nil {
		l.url = make(map[uint64]int64)
	}
	l.url[h] = now.UnixNano()
}

func (l *purgeLog) addAll(now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.all, l.url = now.UnixNano(), nil
}

// since returns the last purge of the URL whose primary key hashes to h,
// of everything included, in unix nanoseconds; 0 if there was none.
func (l *purgeLog) since(h uint64) int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return max(l.url[h], l.all)
}
