//go:build !race

package balancer

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

func TestProxiedGetAllocatesNothing(t *testing.T) {
	t.Run("plain", func(t *testing.T) { testProxiedGetAllocs(t, "", "") })
	// Every request logged, in either format; request IDs are on by
	// default.
	t.Run("json log", func(t *testing.T) { testProxiedGetAllocs(t, "", accessLogYAML(t, "json", 1)) })
	t.Run("combined log", func(t *testing.T) { testProxiedGetAllocs(t, "", accessLogYAML(t, "combined", 1)) })
	t.Run("sampled log", func(t *testing.T) { testProxiedGetAllocs(t, "", accessLogYAML(t, "json", 0.5)) })
	t.Run("no request ids", func(t *testing.T) { testProxiedGetAllocs(t, "", "request_id: false\n") })
	// The first byte's deadline is set and lifted on every try.
	t.Run("first byte timeout", func(t *testing.T) { testProxiedGetAllocs(t, ", first_byte_timeout: 1s", "") })
}

// accessLogYAML is an access_log block writing to a file of the test's.
func accessLogYAML(t testing.TB, format string, sample float64) string {
	return fmt.Sprintf("access_log: {path: %q, format: %s, sample: %v}\n", filepath.Join(t.TempDir(), "access.log"), format, sample)
}

// testProxiedGetAllocs serves GETs with the service's keys svc (each after
// a comma) and the top-level keys extra.
func testProxiedGetAllocs(t *testing.T, svc, extra string) {
	body := bytes.Repeat([]byte("x"), 64)
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) { ctx.SetBody(body) })
	s := startEdge(t, "services:\n  web: {static: "+staticList(o)+svc+"}\nroutes: [{service: web}]\n"+extra)
	h := s.Handler()

	var req fasthttp.Request
	req.SetRequestURI("/static/app.js?v=1")
	req.Header.SetHost("www.example.com")
	req.Header.Set("X-Forwarded-For", "198.51.100.1")
	req.Header.Set("Connection", "keep-alive")
	ctx := newBenchCtx(&req)
	serve := func() {
		req.CopyTo(&ctx.Request)
		ctx.Response.Reset()
		h(ctx)
		if ctx.Response.StatusCode() != 200 || !bytes.Equal(ctx.Response.Body(), body) {
			t.Fatalf("got %d %q", ctx.Response.StatusCode(), ctx.Response.Body())
		}
	}
	for i := 0; i < 100; i++ {
		serve() // warm up pools and buffers
	}
	lines := accessLogLines.Get()
	if n := testing.AllocsPerRun(1000, serve); n != 0 {
		t.Fatalf("proxied GET allocates %.2f times per request, want 0", n)
	}
	if strings.Contains(extra, "access_log") {
		waitFor(t, "the requests' lines written", func() bool { return accessLogLines.Get() >= lines+100 })
	}
}

func TestPickAllocatesNothing(t *testing.T) {
	for _, balance := range []string{"p2c", "round_robin", "random"} {
		p := testPool(t, "{static: [127.0.0.1:1], balance: "+balance+"}", "127.0.0.1:1", "127.0.0.2:1", "127.0.0.3:1")
		now := time.Now().UnixNano()
		pick := func() {
			var tr tried
			if p.pick(now, &tr) == nil {
				t.Fatalf("%s: no backend picked", balance)
			}
		}
		if n := testing.AllocsPerRun(1000, pick); n != 0 {
			t.Errorf("%s: pick allocates %.2f times, want 0", balance, n)
		}
		weighted(p)
		if n := testing.AllocsPerRun(1000, pick); n != 0 {
			t.Errorf("%s with weights: pick allocates %.2f times, want 0", balance, n)
		}

		// With a backup set: the primaries' fast path, the backups once
		// every primary is out, the last try, and panic mode.
		p = testBackupPool(t, "{static: [127.0.0.1:1], backup: [127.0.0.2:1], balance: "+balance+
			", health: {passive: {consecutive_5xx: 1, max_ejection_percent: 100, base_ejection_time: 1m}}}", []string{p1, p2}, []string{b1, b2})
		set := func(what string, want func(b *Backend) bool, tr tried) {
			t.Helper()
			f := func() {
				tr := tr
				if b := p.pick(now, &tr); b == nil || !want(b) {
					panic("BUG: " + what + ": unexpected pick")
				}
			}
			if n := testing.AllocsPerRun(1000, f); n != 0 {
				t.Errorf("%s, %s: pick allocates %.2f times, want 0", balance, what, n)
			}
		}
		primary := func(b *Backend) bool { return !b.backup }
		backup := func(b *Backend) bool { return b.backup }
		set("primaries up", primary, tried{})
		var last tried
		last.add(p.byAddr[p1])
		last.add(p.byAddr[p2])
		set("the last try", backup, last)
		fail5xx(t, p.byAddr[p1], now)
		fail5xx(t, p.byAddr[p2], now)
		set("primaries out", backup, tried{})
		fail5xx(t, p.byAddr[b1], now)
		fail5xx(t, p.byAddr[b2], now)
		set("panic", primary, tried{})
	}
}
