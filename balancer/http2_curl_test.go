package balancer

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/valyala/fasthttp"
)

// TestHTTP2WithCurl: the real curl speaks HTTP/2 to edgelb: --http2 over
// TLS (ALPN h2), --http2-prior-knowledge to the plain listener with
// server.h2c; GET, HEAD and a POST with a body reach the backend as
// HTTP/1.1 requests with the forwarding headers, and curl without
// HTTP/2 still gets HTTP/1.1.
func TestHTTP2WithCurl(t *testing.T) {
	curl := curlBinary(t)
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		ctx.Response.Header.Set("X-Seen", string(ctx.Method())+" "+string(ctx.Request.Header.Protocol())+" "+
			string(ctx.Request.Header.Peek("X-Forwarded-Proto"))+" len="+string(ctx.Request.Header.Peek("Content-Length")))
		ctx.WriteString("body=")
		ctx.Write(ctx.PostBody())
	})
	e := startH2Edge(t, "  h2c: true\n", "services:\n  web: {static: ["+o.addr+"]}\nroutes: [{service: web}]\n")
	caFile := filepath.Join(e.pki.dir, "ca.pem")
	if err := os.WriteFile(caFile, e.pki.ca.PEM, 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(curl, append([]string{"--silent", "--show-error", "--max-time", "20", "--include", "--cacert", caFile}, args...)...)
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		if err := cmd.Run(); err != nil {
			t.Fatalf("curl %v: %v\n%s%s", args, err, out.String(), errOut.String())
		}
		return strings.ReplaceAll(out.String(), "\r\n", "\n")
	}
	tlsURL := "https://shop.example:" + portOf(e.TLSAddr()) + "/p"
	resolve := "shop.example:" + portOf(e.TLSAddr()) + ":127.0.0.1"
	f := func(out, wantStatus, wantSeen, wantBody string) {
		t.Helper()
		if !strings.HasPrefix(out, wantStatus+" \n") && !strings.HasPrefix(out, wantStatus+"\n") && !strings.HasPrefix(out, wantStatus+" OK\n") {
			t.Errorf("want %q:\n%s", wantStatus, out)
		}
		if !strings.Contains(strings.ToLower(out), "x-seen: "+strings.ToLower(wantSeen)+"\n") || !strings.HasSuffix(out, wantBody) {
			t.Errorf("want X-Seen %q and body %q:\n%s", wantSeen, wantBody, out)
		}
	}
	f(run("--http2", "--resolve", resolve, tlsURL), "HTTP/2 200", "GET HTTP/1.1 https len=", "\n\nbody=")
	f(run("--http2", "--resolve", resolve, "--data-binary", "hello h2", tlsURL), "HTTP/2 200", "POST HTTP/1.1 https len=8", "\n\nbody=hello h2")
	if out := run("--http2", "--resolve", resolve, "--head", tlsURL); !strings.HasPrefix(out, "HTTP/2 200") || !strings.Contains(out, "content-length: 5\n") {
		t.Errorf("curl --http2 --head:\n%s", out)
	}
	plainURL := "http://127.0.0.1:" + portOf(e.Addr()) + "/p"
	f(run("--http2-prior-knowledge", plainURL), "HTTP/2 200", "GET HTTP/1.1 http len=", "\n\nbody=")
	f(run("--http2-prior-knowledge", "--data-binary", "hello h2c", plainURL), "HTTP/2 200", "POST HTTP/1.1 http len=9", "\n\nbody=hello h2c")
	f(run("--http1.1", "--resolve", resolve, tlsURL), "HTTP/1.1 200", "GET HTTP/1.1 https len=", "\n\nbody=")
	f(run(plainURL), "HTTP/1.1 200", "GET HTTP/1.1 http len=", "\n\nbody=")
}

// portOf returns the port of a host:port address.
func portOf(addr string) string {
	i := strings.LastIndexByte(addr, ':')
	return addr[i+1:]
}
