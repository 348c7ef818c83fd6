package main

import (
	"bytes"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"
)

// Fault modes.
const (
	modeNone        = "none"
	modeHang        = "hang"
	modeSlow        = "slow"
	modeError500    = "error500"
	modeError500App = "error500-app"
	modeOverload    = "overload"
	modeGarbage     = "garbage"
	modeClose       = "close"
	modeReset       = "reset"
)

var modes = []string{modeNone, modeHang, modeSlow, modeError500, modeError500App, modeOverload, modeGarbage, modeClose, modeReset}

type fault struct {
	mode  string
	delay time.Duration
}

// origin serves requests according to its current fault.
type origin struct {
	name  string
	body  []byte
	fault atomic.Pointer[fault]
	srv   *fasthttp.Server

	// conns maps remote addresses to the raw connections, for the reset
	// mode: a hijacked connection hides its *net.TCPConn.
	conns sync.Map

	// hung is closed to release the requests a hang holds.
	mu   sync.Mutex
	hung chan struct{}
}

func newOrigin(name string, bodySize int) (*origin, error) {
	if bodySize < 0 {
		return nil, fmt.Errorf("-body-size must not be negative")
	}
	body := bytes.Repeat([]byte("x"), bodySize)
	copy(body, name+" ")
	o := &origin{name: name, body: body, hung: make(chan struct{})}
	o.fault.Store(&fault{mode: modeNone})
	o.srv = &fasthttp.Server{Handler: o.handle, Name: "demo-origin", CloseOnShutdown: true, KeepHijackedConns: true,
		ConnState: o.track}
	return o, nil
}

func (o *origin) setFault(mode string, delay time.Duration) error {
	ok := false
	for _, m := range modes {
		ok = ok || m == mode
	}
	if !ok {
		return fmt.Errorf("unknown mode %q (one of %s)", mode, strings.Join(modes, ", "))
	}
	if mode != modeHang {
		o.release()
	}
	o.fault.Store(&fault{mode: mode, delay: delay})
	return nil
}

// release frees the requests held by a hang.
func (o *origin) release() {
	o.mu.Lock()
	defer o.mu.Unlock()
	select {
	case <-o.hung:
	default:
		close(o.hung)
	}
	o.hung = make(chan struct{})
}

func (o *origin) hangCh() chan struct{} {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.hung
}

func (o *origin) serve(ln net.Listener) error { return o.srv.Serve(ln) }

func (o *origin) track(c net.Conn, st fasthttp.ConnState) {
	switch st {
	case fasthttp.StateNew:
		if tc, ok := c.(*net.TCPConn); ok {
			o.conns.Store(c.RemoteAddr().String(), tc)
		}
	case fasthttp.StateClosed:
		o.conns.Delete(c.RemoteAddr().String())
	}
}

func (o *origin) handle(ctx *fasthttp.RequestCtx) {
	path := string(ctx.Path())
	if path == "/_fault" {
		o.handleFault(ctx)
		return
	}
	f := o.fault.Load()
	defer ctx.Response.Header.Set("X-Origin", o.name)
	switch f.mode {
	case modeHang:
		// Like a stopped process that is continued: held requests are
		// answered normally once the hang ends, never with a made-up reply.
		<-o.hangCh()
	case modeSlow:
		time.Sleep(f.delay)
	case modeError500:
		ctx.Error("demo-origin: injected error\n", fasthttp.StatusInternalServerError)
		return
	case modeError500App:
		if path != "/health" {
			ctx.Error("demo-origin: injected error\n", fasthttp.StatusInternalServerError)
			return
		}
	case modeOverload:
		ctx.Error("demo-origin: overloaded\n", fasthttp.StatusServiceUnavailable)
		ctx.Response.Header.Set("Retry-After", "1")
		return
	case modeGarbage, modeClose, modeReset:
		mode := f.mode
		ctx.HijackSetNoResponse(true)
		ctx.Hijack(func(c net.Conn) {
			defer o.conns.Delete(c.RemoteAddr().String())
			defer c.Close()
			switch mode {
			case modeGarbage:
				c.Write([]byte("this is not HTTP\r\n\x00\x01\x02\r\n\r\n"))
			case modeReset:
				if tc, ok := o.conns.Load(c.RemoteAddr().String()); ok {
					tc.(*net.TCPConn).SetLinger(0)
				}
			}
		})
		return
	}
	switch path {
	case "/ws":
		o.handleWS(ctx)
	case "/health":
		ctx.SetContentType("text/plain")
		ctx.WriteString("ok\n")
	case "/echo":
		ctx.SetContentType("text/plain")
		ctx.Write(ctx.Request.Header.Header())
	default:
		ctx.SetContentType("text/plain")
		ctx.Response.Header.Set("Cache-Control", "public, max-age=5")
		ctx.SetBody(o.body)
	}
}

func (o *origin) handleFault(ctx *fasthttp.RequestCtx) {
	args := ctx.QueryArgs()
	mode := string(args.Peek("mode"))
	if mode == "" {
		fmt.Fprintf(ctx, "mode=%s\n", o.fault.Load().mode)
		return
	}
	delay := 50 * time.Millisecond
	if d := args.Peek("delay"); len(d) > 0 {
		var err error
		if delay, err = time.ParseDuration(string(d)); err != nil {
			ctx.Error(fmt.Sprintf("invalid delay %q: %v\n", d, err), fasthttp.StatusBadRequest)
			return
		}
	}
	if err := o.setFault(mode, delay); err != nil {
		ctx.Error(err.Error()+"\n", fasthttp.StatusBadRequest)
		return
	}
	fmt.Fprintf(ctx, "%s: mode=%s\n", o.name, mode)
}
