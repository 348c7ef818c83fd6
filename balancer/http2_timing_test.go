package balancer

import (
	"bytes"
	"crypto/tls"
	"io"
	"net/http"
	"testing"

	"github.com/valyala/fasthttp"
)

// BenchmarkTLSGet measures a proxied GET with a 64-byte body over TLS,
// from Go's client on one connection: HTTP/1.1 (a connection per request
// in flight) and HTTP/2 (streams of one connection). Allocations count
// the client's too.
func BenchmarkTLSGet(b *testing.B) {
	body := bytes.Repeat([]byte("x"), 64)
	o := startOrigin(b, "a", func(ctx *fasthttp.RequestCtx) { ctx.SetBody(body) })
	e := startH2Edge(b, "", "services:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
	h1 := &http.Client{Transport: &http.Transport{
		TLSClientConfig:     e.pki.client("shop.example"),
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{},
		MaxIdleConnsPerHost: 256,
	}}
	for _, c := range []struct {
		name   string
		client *http.Client
	}{{"http1.1", h1}, {"http2", e.client(b)}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					resp, err := c.client.Get("https://" + e.TLSAddr() + "/static/app.js?v=1")
					if err != nil {
						b.Fatal(err)
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						b.Fatalf("status %d", resp.StatusCode)
					}
				}
			})
		})
	}
}
