package balancer

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

func TestServeStaleDuringOutage(t *testing.T) {
	handler := func(name string) func(ctx *fasthttp.RequestCtx) {
		return func(ctx *fasthttp.RequestCtx) {
			ctx.SetContentType("application/json")
			ctx.Response.Header.Set("ETag", `"`+string(ctx.Path())+`"`)
			switch string(ctx.Path()) {
			case "/private":
				ctx.Response.Header.Set("Cache-Control", "private")
			case "/cookie":
				ctx.Response.Header.Set("Set-Cookie", "sid=1")
			}
			fmt.Fprintf(ctx, `{"path":%q}`, ctx.Path())
		}
	}
	o1, o2, o3 := startOrigin(t, "1", handler("1")), startOrigin(t, "2", handler("2")), startOrigin(t, "3", handler("3"))
	state := t.TempDir()
	yaml := "state_dir: " + state + "\nservices:\n  web: {static: " + staticList(o1, o2, o3) + ", health: {passive: {consecutive_gateway_failures: 1}}}\nroutes: [{service: web}]\n"
	s := startEdge(t, yaml)
	urls := []string{"/", "/a", "/b?x=1", "/c/d"}
	for _, u := range urls {
		if resp := do(t, s, "GET", "shop.example", u); resp.StatusCode() != 200 {
			t.Fatalf("priming %s: %d", u, resp.StatusCode())
		}
	}
	do(t, s, "GET", "shop.example", "/private")
	do(t, s, "GET", "shop.example", "/cookie")
	o1.stop()
	o2.stop()
	o3.stop()

	check := func(s *Server, when string) {
		t.Helper()
		for _, u := range urls {
			resp := do(t, s, "GET", "shop.example", u)
			want := fmt.Sprintf(`{"path":%q}`, strings.SplitN(u, "?", 2)[0])
			if resp.StatusCode() != 200 || string(resp.Body()) != want {
				t.Fatalf("%s: GET %s: %d %q %q", when, u, resp.StatusCode(), resp.Body(), resp.Header.Peek(HeaderError))
			}
			if string(resp.Header.ContentType()) != "application/json" || string(resp.Header.Peek("ETag")) == "" {
				t.Fatalf("%s: GET %s: original headers lost: %s", when, u, resp.Header.String())
			}
			cs := string(resp.Header.Peek("Cache-Status"))
			if !strings.HasPrefix(cs, "edgelb; hit; ttl=-") || len(resp.Header.Peek("Age")) == 0 {
				t.Fatalf("%s: GET %s: Cache-Status %q Age %q", when, u, cs, resp.Header.Peek("Age"))
			}
		}
		head := do(t, s, "HEAD", "shop.example", "/a")
		if head.StatusCode() != 200 || head.Header.ContentLength() != len(`{"path":"/a"}`) {
			t.Fatalf("%s: HEAD from a stored GET: %d len %d", when, head.StatusCode(), head.Header.ContentLength())
		}
		for _, u := range []string{"/private", "/cookie", "/never"} {
			start := time.Now()
			resp := do(t, s, "GET", "shop.example", u)
			if resp.StatusCode() < 500 || len(resp.Header.Peek(HeaderError)) == 0 {
				t.Fatalf("%s: GET %s must not be served stale: %d %q", when, u, resp.StatusCode(), resp.Body())
			}
			if d := time.Since(start); d > time.Second {
				t.Fatalf("%s: GET %s took %s with every origin down", when, u, d)
			}
		}
	}
	check(s, "outage")

	// Restart edgelb during the outage: the store comes back from state_dir.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	s.Shutdown(ctx)
	cancel()
	s2 := startEdge(t, yaml)
	check(s2, "after restart")

	// Purge one URL, then everything.
	purge := func(q string) {
		resp, err := http.Post("http://"+s2.AdminAddr()+"/cache/purge"+q, "", nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("purge%s: %v %v", q, err, resp)
		}
		resp.Body.Close()
	}
	purge("?url=http://shop.example/a")
	if resp := do(t, s2, "GET", "shop.example", "/a"); resp.StatusCode() == 200 {
		t.Fatal("purged URL still served")
	}
	if resp := do(t, s2, "GET", "shop.example", "/c/d"); resp.StatusCode() != 200 {
		t.Fatal("other URL lost by a purge of one")
	}
	purge("")
	if resp := do(t, s2, "GET", "shop.example", "/c/d"); resp.StatusCode() == 200 {
		t.Fatal("served after purging all")
	}
}

func TestStaleOnBackendError(t *testing.T) {
	var fail atomic.Bool
	o := startOrigin(t, "o", nil)
	o.reply.Store(ptr(func(ctx *fasthttp.RequestCtx) {
		if fail.Load() {
			ctx.SetStatusCode(503)
			return
		}
		ctx.WriteString("good")
	}))
	s := startEdge(t, "services:\n  web: {static: "+staticList(o)+", stale: {on: ["+"\"503\"]}}\n  off: {static: "+staticList(o)+", stale: {disabled: true}}\nroutes: [{service: web}, {path: /off, service: off}]\n")
	do(t, s, "GET", "x", "/page")
	do(t, s, "GET", "x", "/off")
	fail.Store(true)
	if resp := do(t, s, "GET", "x", "/page"); resp.StatusCode() != 200 || string(resp.Body()) != "good" ||
		!strings.Contains(string(resp.Header.Peek("Cache-Status")), "detail=upstream_status_503") {
		t.Fatalf("503 from the backend: %d %q %q", resp.StatusCode(), resp.Body(), resp.Header.Peek("Cache-Status"))
	}
	if resp := do(t, s, "GET", "x", "/off"); resp.StatusCode() != 503 {
		t.Fatalf("stale disabled: %d", resp.StatusCode())
	}
}

func ptr[T any](v T) *T { return &v }
