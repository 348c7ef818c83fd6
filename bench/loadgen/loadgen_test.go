package loadgen

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

func startServer(t *testing.T, h fasthttp.RequestHandler) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &fasthttp.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Shutdown() })
	return ln.Addr().String()
}

func TestRunCountsOutcomes(t *testing.T) {
	var n atomic.Int64
	addr := startServer(t, func(ctx *fasthttp.RequestCtx) {
		switch n.Add(1) % 4 {
		case 0:
			ctx.SetStatusCode(503)
			ctx.Response.Header.Set("Edgelb-Error", "no_healthy_backend")
		case 1:
			ctx.Response.Header.Set("Cache-Status", "edgelb; hit; ttl=-1")
		}
		ctx.WriteString("ok")
	})
	res, err := Run(context.Background(), Options{URL: "http://" + addr + "/", Concurrency: 4, Requests: 400})
	if err != nil {
		t.Fatal(err)
	}
	if res.Requests != 400 || res.ByStatus[503] != 100 || res.ByEdgelbError["no_healthy_backend"] != 100 || res.OK != 300 || res.Stale != 100 {
		t.Fatalf("counts: %+v", res.Counts)
	}
	if res.Latency.P50 <= 0 || res.Latency.P99 < res.Latency.P50 || res.Latency.Max < res.Latency.P99 {
		t.Fatalf("percentiles: %+v", res.Latency)
	}
	var sum int64
	for _, s := range res.Seconds {
		sum += s.Requests
	}
	if sum != 400 {
		t.Fatalf("per-second requests add up to %d", sum)
	}
	if res.Format() == "" {
		t.Fatal("empty summary")
	}
}

func TestRunRateAndTransportErrors(t *testing.T) {
	addr := startServer(t, func(ctx *fasthttp.RequestCtx) {})
	res, err := Run(context.Background(), Options{URL: "http://" + addr + "/", Concurrency: 4, Rate: 200, Duration: 1500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if res.Requests < 150 || res.Requests > 320 {
		t.Fatalf("rate 200/s for 1.5s sent %d requests", res.Requests)
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := ln.Addr().String()
	ln.Close()
	res, err = Run(context.Background(), Options{URL: "http://" + dead + "/", Concurrency: 2, Requests: 10})
	if err != nil {
		t.Fatal(err)
	}
	if res.ByTransport["refused"] != 10 || res.Errors != 10 {
		t.Fatalf("refused: %+v", res.Counts)
	}
	if _, err := Run(context.Background(), Options{URL: "nope"}); err == nil {
		t.Fatal("invalid URL accepted")
	}
}

// TestRunSpreadsOverAddrs sends the load to three servers in turn, one of
// which refuses connections: its share goes to the others, without an
// error; Host stays the URL's.
func TestRunSpreadsOverAddrs(t *testing.T) {
	var hits [2]atomic.Int64
	var hosts atomic.Int64
	a := startServer(t, func(ctx *fasthttp.RequestCtx) {
		hits[0].Add(1)
		if string(ctx.Host()) == "edge.example" {
			hosts.Add(1)
		}
	})
	b := startServer(t, func(ctx *fasthttp.RequestCtx) { hits[1].Add(1) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	res, err := Run(context.Background(), Options{URL: "http://edge.example/", Concurrency: 4, Requests: 300,
		Addrs: func() []string { return []string{a, dead, b} }})
	if err != nil {
		t.Fatal(err)
	}
	if res.Errors != 0 || res.OK != 300 || res.Refused < 50 {
		t.Fatalf("counts: %+v", res.Counts)
	}
	if hits[0].Load() < 100 || hits[1].Load() < 100 || hits[0].Load()+hits[1].Load() != 300 || hosts.Load() != hits[0].Load() {
		t.Fatalf("hits %d %d, Host edge.example %d", hits[0].Load(), hits[1].Load(), hosts.Load())
	}
}
