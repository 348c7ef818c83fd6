package stale

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
	"time"
)

// TestCopyImport hands entries from one store to another as peers do:
// the copy serves with the Age it would have had on the peer, each Vary
// variant goes to the request it answers, HEAD gets the GET's copy, and
// what a store never keeps is refused.
func TestCopyImport(t *testing.T) {
	a, b := New(Config{MaxBytes: 1 << 20}), New(Config{MaxBytes: 1 << 20})
	a.Save(t0, schemeHTTP, newReq("GET", "shop.example", "/p"), newResp(200, "page", "Cache-Control", "max-age=60", "Age", "5", "X-Kept", "1"))
	a.Save(t0, schemeHTTP, newReq("GET", "shop.example", "/v", "Accept-Language", "de"), newResp(200, "Hallo", "Cache-Control", "max-age=60", "Vary", "Accept-Language"))
	a.Save(t0, schemeHTTP, newReq("GET", "shop.example", "/v", "Accept-Language", "fr"), newResp(200, "Bonjour", "Cache-Control", "max-age=60", "Vary", "Accept-Language"))

	// b's clock is an hour ahead of a's: what counts is the time since
	// a stored the copy.
	skew := time.Hour
	f := func(req string, hdr []string, want, wantAge string) {
		t.Helper()
		at := t0.Add(100 * time.Second)
		r := newReq("GET", "shop.example", req, hdr...)
		val, elapsed, ok := a.Copy(nil, at, schemeHTTP, r)
		if !ok {
			if want != "miss" {
				t.Fatalf("Copy %s %v: miss", req, hdr)
			}
			return
		}
		if elapsed != 100*time.Second {
			t.Errorf("Copy %s: elapsed %v, want 100s", req, elapsed)
		}
		if err := b.Import(at.Add(skew), schemeHTTP, r, val, elapsed); err != nil {
			t.Fatalf("Import %s: %v", req, err)
		}
		got, resp := serve(b, at.Add(skew), r, hour)
		if got != want {
			t.Errorf("%s %v on b: %q, want %q", req, hdr, got, want)
		}
		if age := string(resp.Header.Peek("Age")); want != "miss" && age != wantAge {
			t.Errorf("%s %v: Age %q, want %s", req, hdr, age, wantAge)
		}
	}
	f("/p", nil, "200 page", "105") // 5 at store, 100 on the peer
	f("/v", []string{"Accept-Language", "fr"}, "200 Bonjour", "100")
	f("/v", []string{"Accept-Language", "de"}, "200 Hallo", "100")
	f("/v", []string{"Accept-Language", "en"}, "miss", "")
	f("/nothing", nil, "miss", "")
	// Both variants stay on b, each for its own request.
	at := t0.Add(100*time.Second + skew)
	if got, _ := serve(b, at, newReq("GET", "shop.example", "/v", "Accept-Language", "fr"), hour); got != "200 Bonjour" {
		t.Errorf("fr after de was imported: %q", got)
	}
	if got, _ := serve(b, at, newReq("GET", "shop.example", "/v"), hour); got != "miss" {
		t.Errorf("no Accept-Language: %q, want miss", got)
	}
	// HEAD: the GET's entry, body included, so that a GET later finds it.
	c := New(Config{MaxBytes: 1 << 20})
	head := newReq("HEAD", "shop.example", "/p")
	val, elapsed, ok := a.Copy(nil, t0, schemeHTTP, head)
	if !ok || c.Import(t0, schemeHTTP, head, val, elapsed) != nil {
		t.Fatal("HEAD: no copy")
	}
	if got, _ := serve(c, t0, newReq("GET", "shop.example", "/p"), hour); got != "200 page" {
		t.Errorf("GET after a HEAD's import: %q", got)
	}

	// Refused: damaged, a status not stored here, too big, Set-Cookie.
	r := newReq("GET", "shop.example", "/p")
	val, _, _ = a.Copy(nil, t0, schemeHTTP, r)
	bad := func(what string, val []byte, s *Store) {
		t.Helper()
		if err := s.Import(t0, schemeHTTP, r, val, 0); !errors.Is(err, ErrImport) {
			t.Errorf("%s: %v, want ErrImport", what, err)
		} else {
			t.Logf("%s: %v", what, err)
		}
	}
	bad("damaged", val[:len(val)/2][:entryFixedLen-1], b)
	bad("status 200 not stored", val, New(Config{MaxBytes: 1 << 20, Statuses: []int{404}}))
	bad("body over max_entry_bytes", val, New(Config{MaxBytes: 1 << 20, MaxEntryBytes: 2}))
	// An entry with a Set-Cookie header, which appendEntry never writes.
	withCookie := appendEntry(nil, t0, newResp(200, "x", "X-Set-Cookie", "sid=1"), &respInfo{}, nil)
	i := bytes.Index(withCookie, []byte("X-Set-Cookie"))
	withCookie = append(withCookie[:i:i], withCookie[i+2:]...)
	binary.LittleEndian.PutUint16(withCookie[i-4:], uint16(len("Set-Cookie")))
	binary.LittleEndian.PutUint32(withCookie[39:], binary.LittleEndian.Uint32(withCookie[39:])-2)
	bad("Set-Cookie", withCookie, b)
}

// TestImportAfterPurge: a copy stored before this store purged its URL,
// or everything, is refused, as a peer that has not applied the purge yet
// must not undo it; one stored after is taken.
func TestImportAfterPurge(t *testing.T) {
	a := New(Config{MaxBytes: 1 << 20})
	now := time.Now()
	req := newReq("GET", "shop.example", "/p")
	a.Save(now.Add(-time.Minute), schemeHTTP, req, newResp(200, "old", "Cache-Control", "max-age=600"))
	old, oldElapsed, _ := a.Copy(nil, now, schemeHTTP, req)

	b := New(Config{MaxBytes: 1 << 20})
	if err := b.Purge("http://shop.example/p"); err != nil {
		t.Fatal(err)
	}
	if err := b.Import(time.Now(), schemeHTTP, req, old, oldElapsed); !errors.Is(err, ErrImport) {
		t.Fatalf("a copy from before the purge: %v, want refused", err)
	} else {
		t.Log(err)
	}
	// Another URL is not concerned.
	other := newReq("GET", "shop.example", "/q")
	a.Save(now.Add(-time.Minute), schemeHTTP, other, newResp(200, "q", "Cache-Control", "max-age=600"))
	q, qElapsed, _ := a.Copy(nil, now, schemeHTTP, other)
	if err := b.Import(time.Now(), schemeHTTP, other, q, qElapsed); err != nil {
		t.Fatalf("another URL: %v", err)
	}
	// A copy stored after the purge is taken.
	if err := b.Import(time.Now(), schemeHTTP, req, old, 0); err != nil {
		t.Fatalf("a copy stored after the purge: %v", err)
	}
	b.PurgeAll()
	if err := b.Import(time.Now(), schemeHTTP, other, q, qElapsed); !errors.Is(err, ErrImport) {
		t.Fatalf("a copy from before a purge of everything: %v, want refused", err)
	}
	// A flood of purges is remembered as one purge of everything.
	var l purgeLog
	t0 := time.Now()
	for i := range maxPurgesRemembered + 1 {
		l.add(uint64(i), t0.Add(time.Duration(i)))
	}
	if got := l.since(1 << 40); got != t0.Add(maxPurgesRemembered-1).UnixNano() {
		t.Errorf("after a flood, a URL never purged: %d, want the last forgotten purge", got)
	}
}
