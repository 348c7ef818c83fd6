package stale

import (
	"strings"
	"testing"
	"time"
)

func benchmarkStore(b *testing.B, bodySize int, serve bool) {
	s := New(Config{MaxBytes: 64 << 20})
	body := strings.Repeat("x", bodySize)
	now := time.Now()
	s.Save(now, schemeHTTP, newReq("GET", "shop.example", "/static/app.js?v=1"), newResp(200, body, "Cache-Control", "public, max-age=60"))
	b.ReportAllocs()
	b.SetBytes(int64(bodySize))
	b.RunParallel(func(pb *testing.PB) {
		req := newReq("GET", "shop.example", "/static/app.js?v=1")
		resp := newResp(200, body, "Cache-Control", "public, max-age=60")
		out := newResp(200, "")
		for pb.Next() {
			if serve {
				if !s.Serve(now, schemeHTTP, req, out, Policy{MaxStale: time.Hour}, nil) {
					b.Fatal("miss")
				}
			} else {
				// Most calls meet the refresh rate limit, as live traffic does.
				s.Save(now, schemeHTTP, req, resp)
			}
		}
	})
}

func BenchmarkSaveSmall(b *testing.B)  { benchmarkStore(b, 64, false) }
func BenchmarkSave64K(b *testing.B)    { benchmarkStore(b, 64<<10, false) }
func BenchmarkServeSmall(b *testing.B) { benchmarkStore(b, 64, true) }
func BenchmarkServe64K(b *testing.B)   { benchmarkStore(b, 64<<10, true) }
