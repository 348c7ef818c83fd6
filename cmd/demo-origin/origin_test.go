package main

import (
	"bufio"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

func startTestOrigin(t *testing.T) (*origin, string) {
	t.Helper()
	o, err := newOrigin("t1", 64)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go o.serve(ln)
	t.Cleanup(func() { o.release(); o.srv.Shutdown() })
	return o, ln.Addr().String()
}

// raw sends one request over a fresh connection and returns what came
// back before the connection closed or the deadline passed.
func raw(t *testing.T, addr, path string, wait time.Duration) (string, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(wait))
	c.Write([]byte("GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n"))
	b, err := io.ReadAll(bufio.NewReader(c))
	return string(b), err
}

func TestFaultModes(t *testing.T) {
	o, addr := startTestOrigin(t)
	f := func(mode, path, want string) {
		t.Helper()
		if err := o.setFault(mode, 20*time.Millisecond); err != nil {
			t.Fatal(err)
		}
		got, err := raw(t, addr, path, 500*time.Millisecond)
		switch want {
		case "timeout":
			if ne, ok := err.(net.Error); !ok || !ne.Timeout() || got != "" {
				t.Errorf("%s: want a hang, got %q %v", mode, got, err)
			}
		case "reset":
			if err == nil || !strings.Contains(err.Error(), "reset") {
				t.Errorf("%s: want a reset, got %q %v", mode, got, err)
			}
		default:
			if !strings.Contains(got, want) {
				t.Errorf("%s %s: want %q in %q (err %v)", mode, path, want, got, err)
			}
		}
	}
	f(modeNone, "/", "HTTP/1.1 200 OK")
	f(modeNone, "/health", "ok")
	f(modeSlow, "/", "200 OK")
	f(modeError500, "/health", "500 Internal Server Error")
	f(modeError500App, "/", "500 Internal Server Error")
	f(modeError500App, "/health", "200 OK")
	f(modeOverload, "/", "Retry-After: 1")
	f(modeGarbage, "/", "this is not HTTP")
	f(modeClose, "/", "")
	f(modeReset, "/", "reset")
	f(modeHang, "/", "timeout")
	f(modeNone, "/", "X-Origin: t1")
}

func TestFaultEndpoint(t *testing.T) {
	_, addr := startTestOrigin(t)
	f := func(uri string, wantStatus int) {
		t.Helper()
		req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
		req.Header.SetMethod("POST")
		req.SetRequestURI("http://" + addr + uri)
		if err := fasthttp.DoTimeout(req, resp, 2*time.Second); err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode() != wantStatus {
			t.Errorf("%s: got %d %s", uri, resp.StatusCode(), resp.Body())
		}
	}
	f("/_fault?mode=overload", 200)
	f("/", 503)
	f("/_fault?mode=bogus", 400)
	f("/_fault?mode=slow&delay=nope", 400)
	f("/_fault?mode=none", 200)
	f("/", 200)
}

// A request held by a hang is answered normally once the hang ends, as a
// stopped process answers when it is continued: never with an empty 200
// that a cache in front could store.
func TestHangReleasedAnswersNormally(t *testing.T) {
	o, addr := startTestOrigin(t)
	if err := o.setFault(modeHang, 0); err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 1)
	go func() {
		// raw reads until its deadline: the connection stays open.
		s, _ := raw(t, addr, "/", 2*time.Second)
		got <- s
	}()
	time.Sleep(100 * time.Millisecond)
	if err := o.setFault(modeNone, 0); err != nil {
		t.Fatal(err)
	}
	var s string
	select {
	case s = <-got:
	case <-time.After(8 * time.Second):
		t.Fatal("held request not released")
	}
	if !strings.Contains(s, "200 OK") || !strings.Contains(s, "Content-Length: 64") {
		t.Fatalf("released request got %q", s)
	}
}
