package stale

import (
	"bufio"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var (
	schemeHTTP = []byte("http")
	t0         = time.Unix(1_700_000_000, 0)
	hour       = Policy{MaxStale: time.Hour}
)

// newReq returns a request; hdr holds header names and values in turn.
func newReq(method, host, uri string, hdr ...string) *fasthttp.Request {
	req := &fasthttp.Request{}
	req.Header.SetMethod(method)
	req.Header.SetHost(host)
	req.Header.SetRequestURI(uri)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Add(hdr[i], hdr[i+1])
	}
	return req
}

// newResp returns a text/plain response; hdr holds header names and values
// in turn.
func newResp(status int, body string, hdr ...string) *fasthttp.Response {
	resp := &fasthttp.Response{}
	resp.SetStatusCode(status)
	resp.Header.SetContentType("text/plain")
	for i := 0; i+1 < len(hdr); i += 2 {
		resp.Header.Add(hdr[i], hdr[i+1])
	}
	resp.SetBodyString(body)
	return resp
}

func newStore(cfg Config) *Store {
	if cfg.MaxBytes == 0 {
		cfg.MaxBytes = 32 << 20
	}
	return New(cfg)
}

// serve returns "STATUS BODY" for the stored answer to req, or "miss".
func serve(s *Store, now time.Time, req *fasthttp.Request, p Policy) (string, *fasthttp.Response) {
	resp := &fasthttp.Response{}
	if !s.Serve(now, schemeHTTP, req, resp, p, []byte("upstream_timeout")) {
		return "miss", resp
	}
	return fmt.Sprintf("%d %s", resp.StatusCode(), resp.Body()), resp
}

// parseReq parses a raw HTTP/1.1 request.
func parseReq(t testing.TB, raw string) *fasthttp.Request {
	t.Helper()
	req := &fasthttp.Request{}
	if err := req.Read(bufio.NewReader(strings.NewReader(raw))); err != nil {
		t.Fatalf("cannot parse request %q: %v", raw, err)
	}
	return req
}

// parseResp parses a raw HTTP/1.1 response.
func parseResp(t testing.TB, raw string) *fasthttp.Response {
	t.Helper()
	resp := &fasthttp.Response{}
	if err := resp.Read(bufio.NewReader(strings.NewReader(raw))); err != nil {
		t.Fatalf("cannot parse response %q: %v", raw, err)
	}
	return resp
}
