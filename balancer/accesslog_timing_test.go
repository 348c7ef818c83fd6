package balancer

import (
	"net/netip"
	"testing"
	"time"
)

// BenchmarkAccessLogLine formats a typical line: a GET answered by its
// first try.
func BenchmarkAccessLogLine(b *testing.B) {
	for _, format := range []string{"json", "combined"} {
		b.Run(format, func(b *testing.B) {
			be := &Backend{addr: "10.0.0.6:8080"}
			now := time.Now().UnixNano()
			var rl reqLog
			rl.begin(now, nil)
			rl.id.set([]byte("7f3c9a01d2e4b5a6000000000000002a"))
			rl.source, rl.service = srcBackend, "web"
			rl.addTry(be, now+900_000, 850_000, tryOK, 200)
			e := logEntry{rl: &rl, client: netip.MustParseAddrPort("203.0.113.7:51234"), method: strGET, host: []byte("shop.example"),
				uri: []byte("/static/app.js?v=1"), proto: strHTTP11, status: 200, out: 5120, end: now + 1_000_000, service: "web",
				referer: []byte("https://shop.example/"), ua: []byte("Mozilla/5.0 (X11; Linux x86_64)")}
			var c logClock
			buf := make([]byte, 0, 1024)
			b.ReportAllocs()
			for b.Loop() {
				if format == "json" {
					buf = appendJSONLine(buf[:0], &e, &c)
				} else {
					buf = appendCombinedLine(buf[:0], &e, &c)
				}
			}
			b.SetBytes(int64(len(buf)))
		})
	}
}
