package balancer

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/discovery"
)

// A backend present before and after a discovery update keeps its health
// state and its connections; only new addresses start afresh.
func TestBackendStateSurvivesDiscoveryUpdate(t *testing.T) {
	// o1 counts the connections it is sent requests on.
	var remotes sync.Map
	var conns atomic.Int64
	o1 := startOrigin(t, "1", func(ctx *fasthttp.RequestCtx) {
		if _, seen := remotes.LoadOrStore(ctx.RemoteAddr().String(), true); !seen {
			conns.Add(1)
		}
		ctx.WriteString("hello from 1")
	})
	o2 := startOrigin(t, "2", nil)
	o3 := startOrigin(t, "3", nil)
	s := startEdge(t, "services:\n  web: {static: "+staticList(o1, o2)+", health: {passive: {consecutive_gateway_failures: 1}}}\nroutes: [{service: web}]\n")
	o2.stop()
	// One client connection, so that its requests always take the same
	// path through the edge and the same backend connections.
	client := &fasthttp.HostClient{Addr: s.Addr(), MaxConns: 1}
	get := func() *fasthttp.Response {
		t.Helper()
		resp := &fasthttp.Response{}
		req := &fasthttp.Request{}
		req.SetRequestURI("http://x/")
		if err := client.DoTimeout(req, resp, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		return resp
	}
	for i := 0; i < 20; i++ {
		if resp := get(); resp.StatusCode() != 200 {
			t.Fatalf("GET with one backend down: %d", resp.StatusCode())
		}
	}
	before := backendsByAddr(s, "web")
	if before[o2.addr].State != "ejected" || before[o1.addr].State != "healthy" {
		t.Fatalf("before the update: %+v", before)
	}
	opened := conns.Load()

	s.Publish(discovery.NewSet("web", "consul", []discovery.Instance{{Addr: o1.addr}, {Addr: o2.addr}, {Addr: o3.addr}}, time.Now()))
	after := backendsByAddr(s, "web")
	for _, addr := range []string{o1.addr, o2.addr} {
		if after[addr].State != before[addr].State || !after[addr].Since.Equal(before[addr].Since) || after[addr].Reason != before[addr].Reason {
			t.Errorf("%s changed across the update: %+v -> %+v", addr, before[addr], after[addr])
		}
	}
	if after[o3.addr].State != "healthy" {
		t.Errorf("new backend: %+v", after[o3.addr])
	}
	for i := 0; i < 20; i++ {
		get()
	}
	if o3.hits.Load() == 0 {
		t.Error("the new backend gets no traffic")
	}
	if n := conns.Load(); n != opened {
		t.Errorf("connections to the kept backend were reopened: %d before, %d after", opened, n)
	}
}

func backendsByAddr(s *Server, service string) map[string]BackendStatus {
	m := make(map[string]BackendStatus)
	for _, b := range s.Status().Services[service].Backends {
		m[b.Addr] = b
	}
	return m
}
