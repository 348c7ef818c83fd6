package stale

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

func TestStorability(t *testing.T) {
	now := time.Now()
	f := func(req *fasthttp.Request, resp *fasthttp.Response, stored bool) {
		t.Helper()
		s := New(Config{MaxBytes: 1 << 20})
		s.Save(now, schemeHTTP, req, resp)
		got, _ := serve(s, now, newReq("GET", string(req.Header.Host()), string(req.Header.RequestURI())), hour)
		if (got != "miss") != stored {
			t.Errorf("%s %s -> %d %s: stored=%v, want %v", req.Header.Method(), req.Header.RequestURI(), resp.StatusCode(), resp.Header.Peek("Cache-Control"), got != "miss", stored)
		}
	}
	f(newReq("GET", "a", "/"), newResp(200, "x"), true)
	f(newReq("GET", "a", "/"), newResp(404, "x"), true)
	f(newReq("GET", "a", "/"), newResp(301, "x", "Location", "/b"), true)
	f(newReq("GET", "a", "/"), newResp(500, "x"), false)
	f(newReq("GET", "a", "/"), newResp(206, "x"), false)
	f(newReq("POST", "a", "/"), newResp(200, "x"), false)
	f(newReq("GET", "a", "/"), newResp(200, "x", "Cache-Control", "no-store"), false)
	f(newReq("GET", "a", "/"), newResp(200, "x", "Cache-Control", "private, max-age=60"), false)
	f(newReq("GET", "a", "/"), newResp(200, "x", "Cache-Control", "max-age=60", "Cache-Control", "no-store"), false)
	f(newReq("GET", "a", "/"), newResp(200, "x", "Set-Cookie", "sid=1"), false)
	f(newReq("GET", "a", "/"), newResp(200, "x", "Vary", "*"), false)
	f(newReq("GET", "a", "/", "Cache-Control", "no-store"), newResp(200, "x"), false)
	f(newReq("GET", "a", "/", "Authorization", "Bearer t"), newResp(200, "x"), false)
	f(newReq("GET", "a", "/", "Authorization", "Bearer t"), newResp(200, "x", "Cache-Control", "public"), true)
	f(newReq("GET", "a", "/", "Authorization", "Bearer t"), newResp(200, "x", "Cache-Control", "s-maxage=10"), true)
}

func TestServeStale(t *testing.T) {
	s := New(Config{MaxBytes: 1 << 20})
	t0 := time.Now()
	s.Save(t0, schemeHTTP, newReq("GET", "Shop.Example", "/p?id=1"), newResp(200, "product 1", "Cache-Control", "max-age=60", "X-Custom", "kept", "Age", "5"))
	got, resp := serve(s, t0.Add(100*time.Second), newReq("GET", "shop.example", "/p?id=1"), hour)
	if got != "200 product 1" {
		t.Fatalf("got %q", got)
	}
	if v := string(resp.Header.Peek("Age")); v != "105" {
		t.Errorf("Age %q, want 105 (5 at store + 100)", v)
	}
	if v := string(resp.Header.Peek("Cache-Status")); v != "edgelb; hit; ttl=-45; detail=upstream_timeout" {
		t.Errorf("Cache-Status %q", v)
	}
	if string(resp.Header.Peek("X-Custom")) != "kept" || string(resp.Header.ContentType()) != "text/plain" {
		t.Errorf("headers lost: %s", resp.Header.String())
	}
	if got, _ := serve(s, t0, newReq("GET", "shop.example", "/p?id=2"), hour); got != "miss" {
		t.Errorf("query is part of the key: %q", got)
	}
	// HEAD is answered from the stored GET, with its length and no body.
	if got, resp := serve(s, t0, newReq("HEAD", "shop.example", "/p?id=1"), hour); got != "200 " || resp.Header.ContentLength() != len("product 1") {
		t.Errorf("HEAD: %q, Content-Length %d", got, resp.Header.ContentLength())
	}
	// Past max_stale: nothing.
	if got, _ := serve(s, t0.Add(2*time.Hour), newReq("GET", "shop.example", "/p?id=1"), hour); got != "miss" {
		t.Errorf("past max_stale: %q", got)
	}
}

func TestStaleIfErrorAndRevalidate(t *testing.T) {
	s := New(Config{MaxBytes: 1 << 20})
	t0 := time.Now()
	s.Save(t0, schemeHTTP, newReq("GET", "a", "/sie"), newResp(200, "sie", "Cache-Control", "max-age=0, stale-if-error=7200"))
	s.Save(t0, schemeHTTP, newReq("GET", "a", "/mr"), newResp(200, "mr", "Cache-Control", "max-age=10, must-revalidate"))
	s.Save(t0, schemeHTTP, newReq("GET", "a", "/nc"), newResp(200, "nc", "Cache-Control", "no-cache"))
	if got, _ := serve(s, t0.Add(90*time.Minute), newReq("GET", "a", "/sie"), hour); got != "200 sie" {
		t.Errorf("stale-if-error must extend max_stale: %q", got)
	}
	for _, p := range []string{"/mr", "/nc"} {
		if got, _ := serve(s, t0.Add(time.Minute), newReq("GET", "a", p), hour); got != "miss" {
			t.Errorf("%s served despite revalidation: %q", p, got)
		}
		if got, _ := serve(s, t0.Add(time.Minute), newReq("GET", "a", p), Policy{MaxStale: time.Hour, IgnoreRevalidate: true}); got == "miss" {
			t.Errorf("%s not served with the operator override", p)
		}
	}
}

func TestVary(t *testing.T) {
	s := New(Config{MaxBytes: 1 << 20, RefreshInterval: time.Nanosecond})
	t0 := time.Now()
	s.Save(t0, schemeHTTP, newReq("GET", "a", "/v", "Accept-Language", "en"), newResp(200, "hello", "Vary", "Accept-Language"))
	s.Save(t0.Add(time.Second), schemeHTTP, newReq("GET", "a", "/v", "Accept-Language", "fr"), newResp(200, "bonjour", "Vary", "Accept-Language"))
	f := func(lang, want string) {
		t.Helper()
		if got, _ := serve(s, t0, newReq("GET", "a", "/v", "Accept-Language", lang), hour); got != want {
			t.Errorf("%s: got %q, want %q", lang, got, want)
		}
	}
	f("en", "200 hello")
	f("fr", "200 bonjour")
	f("de", "miss")
}

func TestRefreshInterval(t *testing.T) {
	s := New(Config{MaxBytes: 1 << 20, RefreshInterval: time.Minute})
	t0 := time.Now()
	s.Save(t0, schemeHTTP, newReq("GET", "a", "/r"), newResp(200, "v1"))
	s.Save(t0.Add(time.Second), schemeHTTP, newReq("GET", "a", "/r"), newResp(200, "v2"))
	if got, _ := serve(s, t0, newReq("GET", "a", "/r"), hour); got != "200 v1" {
		t.Errorf("refreshed within the interval: %q", got)
	}
	s.Save(t0.Add(2*time.Minute), schemeHTTP, newReq("GET", "a", "/r"), newResp(200, "v3"))
	if got, _ := serve(s, t0, newReq("GET", "a", "/r"), hour); got != "200 v3" {
		t.Errorf("not refreshed after the interval: %q", got)
	}
}

// Due agrees with Save's own refresh check, Vary variants included.
func TestDue(t *testing.T) {
	s := New(Config{MaxBytes: 1 << 20, RefreshInterval: time.Minute})
	t0 := time.Now()
	due := func(now time.Time, uri string, vary []string, req *fasthttp.Request) bool {
		t.Helper()
		var varyValues [][]byte
		for _, v := range vary {
			varyValues = append(varyValues, []byte(v))
		}
		var headers [][2][]byte
		for k, v := range req.Header.All() {
			headers = append(headers, [2][]byte{k, v})
		}
		return s.Due(now, schemeHTTP, []byte("a"), []byte(uri), varyValues, headers)
	}
	plain, en, fr := newReq("GET", "a", "/p"), newReq("GET", "a", "/v", "Accept-Language", "en"), newReq("GET", "a", "/v", "Accept-Language", "fr")
	vary := []string{"Accept-Language"}
	if !due(t0, "/p", nil, plain) || !due(t0, "/v", vary, en) {
		t.Fatal("not due before any save")
	}
	s.Save(t0, schemeHTTP, plain, newResp(200, "p"))
	s.Save(t0, schemeHTTP, en, newResp(200, "hello", "Vary", "Accept-Language"))
	if due(t0.Add(time.Second), "/p", nil, plain) || due(t0.Add(time.Second), "/v", vary, en) {
		t.Fatal("due a second after a save")
	}
	if !due(t0.Add(time.Second), "/v", vary, fr) {
		t.Fatal("another variant is not due")
	}
	if !due(t0.Add(2*time.Minute), "/p", nil, plain) || !due(t0.Add(2*time.Minute), "/v", vary, en) {
		t.Fatal("not due after the refresh interval")
	}
	if due(t0, "/v", []string{"*"}, en) {
		t.Fatal("Vary: * is due, but never stored")
	}

	// The key hash of a URL says the same as Due, whatever the host's
	// case; a URL too long to store never is.
	h, ok, buf := URLKey(nil, schemeHTTP, []byte("A"), []byte("/p"))
	if !ok || s.DueKey(h, t0.Add(time.Second)) || !s.DueKey(h, t0.Add(2*time.Minute)) {
		t.Fatalf("DueKey disagrees with Due (ok %v)", ok)
	}
	if _, ok, _ := URLKey(buf, schemeHTTP, []byte("a"), []byte("/"+strings.Repeat("x", maxKeyLen))); ok {
		t.Fatal("a URL longer than any key is said storable")
	}
}

func TestPurge(t *testing.T) {
	s := New(Config{MaxBytes: 1 << 20})
	t0 := time.Now()
	s.Save(t0, schemeHTTP, newReq("GET", "a", "/1"), newResp(200, "one"))
	s.Save(t0, schemeHTTP, newReq("GET", "a", "/2", "Accept", "x"), newResp(200, "two", "Vary", "Accept"))
	if err := s.Purge("http://a/2"); err != nil {
		t.Fatal(err)
	}
	if got, _ := serve(s, t0, newReq("GET", "a", "/2", "Accept", "x"), hour); got != "miss" {
		t.Errorf("purged variant served: %q", got)
	}
	if got, _ := serve(s, t0, newReq("GET", "a", "/1"), hour); got != "200 one" {
		t.Errorf("other URL lost: %q", got)
	}
	if err := s.Purge("/relative"); err == nil {
		t.Error("a relative URL must be refused")
	}
	s.PurgeAll()
	if got, _ := serve(s, t0, newReq("GET", "a", "/1"), hour); got != "miss" {
		t.Errorf("after PurgeAll: %q", got)
	}
}

func TestPersistence(t *testing.T) {
	dir := t.TempDir()
	s := New(Config{MaxBytes: 1 << 20})
	t0 := time.Now()
	s.Save(t0, schemeHTTP, newReq("GET", "a", "/p"), newResp(200, "persisted", "X-H", "v"))
	if err := s.SaveTo(dir); err != nil {
		t.Fatal(err)
	}
	s2 := New(Config{MaxBytes: 1 << 20})
	if err := s2.LoadFrom(dir); err != nil {
		t.Fatal(err)
	}
	got, resp := serve(s2, t0, newReq("GET", "a", "/p"), hour)
	if got != "200 persisted" || string(resp.Header.Peek("X-H")) != "v" {
		t.Fatalf("after reload: %q %s", got, resp.Header.String())
	}
	if err := New(Config{}).LoadFrom(t.TempDir()); err != nil {
		t.Fatalf("a missing store is no error: %v", err)
	}
	bad := t.TempDir()
	os.MkdirAll(filepath.Join(bad, stateDirName), 0o755)
	os.WriteFile(filepath.Join(bad, stateDirName, "metadata.bin"), []byte("junk"), 0o644)
	s3 := New(Config{MaxBytes: 1 << 20})
	if err := s3.LoadFrom(bad); err == nil {
		t.Fatal("a corrupt store must be reported")
	}
	if got, _ := serve(s3, t0, newReq("GET", "a", "/p"), hour); got != "miss" {
		t.Fatalf("corrupt store served: %q", got)
	}
}

func TestDamagedCopyIsRefused(t *testing.T) {
	dir := t.TempDir()
	s := New(Config{MaxBytes: 1 << 20})
	s.Save(t0, schemeHTTP, newReq("GET", "a", "/p"), newResp(200, "v1"))
	if err := s.SaveTo(dir); err != nil {
		t.Fatal(err)
	}
	data, _ := filepath.Glob(filepath.Join(dir, stateDirName, "data.*.bin"))
	if len(data) == 0 {
		t.Fatal("no data files saved")
	}
	f, err := os.OpenFile(data[0], os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write([]byte("flipped"))
	f.Close()

	// A store that already holds entries keeps them.
	s2 := New(Config{MaxBytes: 1 << 20})
	s2.Save(t0, schemeHTTP, newReq("GET", "a", "/kept"), newResp(200, "kept"))
	err = s2.LoadFrom(dir)
	if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "manifest says") {
		t.Fatalf("damaged copy: got %v", err)
	}
	if got, _ := serve(s2, t0, newReq("GET", "a", "/kept"), hour); got != "200 kept" {
		t.Fatalf("entries lost after a refused load: %q", got)
	}
}
