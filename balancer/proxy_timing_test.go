package balancer

import (
	"bufio"
	"bytes"
	"strings"
	"testing"

	"github.com/valyala/fasthttp"
)

// BenchmarkProxyGet measures the whole hot path of a proxied keep-alive GET
// with a 64-byte body: route, pick, forward over loopback, respond.
func BenchmarkProxyGet(b *testing.B) {
	body := bytes.Repeat([]byte("x"), 64)
	o1 := startOrigin(b, "a", func(ctx *fasthttp.RequestCtx) { ctx.SetBody(body) })
	o2 := startOrigin(b, "b", func(ctx *fasthttp.RequestCtx) { ctx.SetBody(body) })
	s := startEdge(b, "services:\n  web: {static: "+staticList(o1, o2)+"}\nroutes: [{service: web}]\n")
	h := s.Handler()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		var req fasthttp.Request
		req.SetRequestURI("/static/app.js?v=1")
		req.Header.SetHost("www.example.com")
		ctx := newBenchCtx(&req)
		for pb.Next() {
			req.CopyTo(&ctx.Request)
			ctx.Response.Reset()
			h(ctx)
			if ctx.Response.StatusCode() != 200 {
				b.Fatalf("status %d", ctx.Response.StatusCode())
			}
		}
	})
}

// BenchmarkRouteMatch measures the route lookup alone.
func BenchmarkRouteMatch(b *testing.B) {
	rt := newRouteTable([]route{
		{host: "*", path: "/"}, {host: "*", path: "/api"}, {host: "*", path: "/api/v2"},
		{host: "shop.example.com", path: "/"}, {host: "shop.example.com", path: "/cart"},
	})
	host, path := []byte("shop.example.com"), []byte("/api/v2/items/42")
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if rt.match(host, path) == nil {
				b.Fatal("no match")
			}
		}
	})
}

// BenchmarkPrepareResponse measures the removal of hop-by-hop headers from
// a response as nginx sends it, with its names as sent and normalized.
func BenchmarkPrepareResponse(b *testing.B) {
	raw := "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 25 Nov 2026 12:00:00 GMT\r\n" +
		"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
	for _, normalize := range []bool{true, false} {
		name := "normalized"
		if !normalize {
			name = "as-sent"
		}
		b.Run(name, func(b *testing.B) {
			var src, resp fasthttp.Response
			if !normalize {
				src.Header.DisableNormalizing()
			}
			if err := src.Read(bufio.NewReader(strings.NewReader(raw))); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				src.Header.CopyTo(&resp.Header)
				prepareResponse(&resp, false)
			}
		})
	}
}
