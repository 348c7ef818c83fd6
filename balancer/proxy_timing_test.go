package balancer

import (
	"bytes"
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
