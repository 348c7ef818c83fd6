//go:build !race

package stale

import (
	"testing"
	"time"
)

func TestSaveAndServeAllocatesNothing(t *testing.T) {
	s := New(Config{MaxBytes: 1 << 20, RefreshInterval: time.Nanosecond})
	req := newReq("GET", "shop.example", "/p?id=1", "Accept", "text/html")
	resp := newResp(200, "product page", "Cache-Control", "public, max-age=60", "Vary", "Accept")
	out := newResp(200, "")
	now := time.Now()
	p := Policy{MaxStale: time.Hour}
	f := func() {
		now = now.Add(time.Second)
		s.Save(now, schemeHTTP, req, resp)
		if !s.Serve(now, schemeHTTP, req, out, p, nil) {
			t.Fatal("miss")
		}
	}
	for i := 0; i < 10; i++ {
		f()
	}
	if n := testing.AllocsPerRun(1000, f); n != 0 {
		t.Fatalf("Save+Serve allocate %.1f times", n)
	}
	// The rate-limited path, taken by most requests, too.
	s2 := New(Config{MaxBytes: 1 << 20})
	s2.Save(now, schemeHTTP, req, resp)
	if n := testing.AllocsPerRun(1000, func() { s2.Save(now, schemeHTTP, req, resp) }); n != 0 {
		t.Fatalf("rate-limited Save allocates %.1f times", n)
	}
}
