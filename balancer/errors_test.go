package balancer

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/health"
)

func TestClassifyErr(t *testing.T) {
	f := func(err error, wantOutcome health.Outcome, wantCode errCode, wantDial bool) {
		t.Helper()
		o, c := classifyErr(err)
		if o != wantOutcome || c != wantCode {
			t.Errorf("%v: %v %s, want %v %s", err, o, c, wantOutcome, wantCode)
		}
		if d := isDialErr(err); d != wantDial {
			t.Errorf("%v: isDialErr %v, want %v", err, d, wantDial)
		}
	}
	// Connecting that timed out, as the HostClient reports it (wrapped
	// with the address) or as the dialer does.
	f(fmt.Errorf("error when dialing 127.0.0.1:1: %w", fasthttp.ErrDialTimeout), health.OutcomeConnectFailed, errConnectFailed, true)
	f(&net.OpError{Op: "dial", Net: "tcp", Err: os.ErrDeadlineExceeded}, health.OutcomeConnectFailed, errConnectFailed, true)
	f(&net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}, health.OutcomeConnectFailed, errConnectFailed, true)
	f(fasthttp.ErrConnectionClosed, health.OutcomeConnectFailed, errConnectFailed, false)
	f(&net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}, health.OutcomeConnectFailed, errConnectFailed, false)
	f(fasthttp.ErrTimeout, health.OutcomeTimeout, errTimeout, false)
	f(&net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}, health.OutcomeTimeout, errTimeout, false)
	f(fasthttp.ErrNoFreeConns, health.OutcomeLocalOverload, errOverloaded, false)
	f(io.ErrUnexpectedEOF, health.OutcomeInvalidResponse, errInvalidResponse, false)
	f(errors.New("cannot parse response status"), health.OutcomeInvalidResponse, errInvalidResponse, false)
}
