package h1

import "testing"

// BenchmarkParse measures the event loop's scan of a request head as
// wrk sends it and of a response head as nginx sends it.
func BenchmarkParse(b *testing.B) {
	req := []byte("GET /static/app.js?v=1 HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n")
	resp := []byte("HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 12:00:00 GMT\r\n" +
		"Content-Type: text/plain\r\nContent-Length: 64\r\nConnection: keep-alive\r\n\r\n")
	b.Run("request", func(b *testing.B) {
		var r Request
		b.ReportAllocs()
		for b.Loop() {
			if ParseRequest(req, nil, &r) != Forward {
				b.Fatal("not forwarded")
			}
		}
	})
	b.Run("response", func(b *testing.B) {
		var r Response
		b.ReportAllocs()
		for b.Loop() {
			if ParseResponse(resp, false, nil, &r) != Forward {
				b.Fatal("not forwarded")
			}
		}
	})
}
