package balancer

import (
	"errors"
	"net"
	"os"
	"syscall"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/health"
)

// errCode is the cause of a response that edgelb generates itself, sent to
// clients in the Edgelb-Error header.
type errCode uint8

const (
	errNone errCode = iota
	errNoRoute
	errNoHealthyBackend
	errConnectFailed
	errTimeout
	errInvalidResponse
	errOverloaded
	errResponseTooLarge

	numErrCodes
)

// String returns the code as sent in the Edgelb-Error header.
func (c errCode) String() string { return errCodeNames[c] }

var errCodeNames = [numErrCodes]string{
	errNone:             "",
	errNoRoute:          "no_route",
	errNoHealthyBackend: "no_healthy_backend",
	errConnectFailed:    "upstream_connect_failed",
	errTimeout:          "upstream_timeout",
	errInvalidResponse:  "upstream_invalid_response",
	errOverloaded:       "overloaded",
	errResponseTooLarge: "upstream_response_too_large",
}

// errCodeValues holds the header values as bytes so that writing them
// does not convert.
var errCodeValues = func() (v [numErrCodes][]byte) {
	for i, n := range errCodeNames {
		v[i] = []byte(n)
	}
	return v
}()

// backendCause reports whether c describes a failure of one backend
// (counted per backend) rather than of the route.
func (c errCode) backendCause() bool {
	return c == errConnectFailed || c == errTimeout || c == errInvalidResponse || c == errOverloaded ||
		c == errResponseTooLarge
}

// status is the HTTP status of a response generated for c.
func (c errCode) status() int {
	switch c {
	case errNoRoute:
		return fasthttp.StatusNotFound
	case errNoHealthyBackend, errOverloaded:
		return fasthttp.StatusServiceUnavailable
	case errTimeout:
		return fasthttp.StatusGatewayTimeout
	}
	return fasthttp.StatusBadGateway
}

// body is the short text of a response generated for c. It never names a
// backend: the log and /status do.
func (c errCode) body() []byte { return errBodies[c] }

var errBodies = [numErrCodes][]byte{
	errNoRoute:          []byte("edgelb: no route for this host and path\n"),
	errNoHealthyBackend: []byte("edgelb: no healthy backend for this service\n"),
	errConnectFailed:    []byte("edgelb: could not connect to any backend\n"),
	errTimeout:          []byte("edgelb: backend did not answer in time\n"),
	errInvalidResponse:  []byte("edgelb: backend sent an invalid response\n"),
	errOverloaded:       []byte("edgelb: service overloaded, retry later\n"),
	errResponseTooLarge: []byte("edgelb: backend response larger than this service allows\n"),
}

// classifyErr maps an error from forwardOnce to a health outcome and an
// error code. Only what a backend did counts against it: a response larger
// than max_response_body is edgelb's own limit, not a failure of the
// backend. Slow path: only called on errors.
func classifyErr(err error) (health.Outcome, errCode) {
	switch {
	case err == fasthttp.ErrBodyTooLarge, isSmallBuffer(err):
		// A head over edgelb's buffer is its limit too: a backend that
		// echoes a long URL into Location must not be ejected for it.
		return health.OutcomeCanceled, errResponseTooLarge
	case err == fasthttp.ErrNoFreeConns:
		return health.OutcomeLocalOverload, errOverloaded
	case errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE):
		// edgelb is out of file descriptors: not the backend's fault.
		return health.OutcomeLocalOverload, errOverloaded
	case isDialErr(err), errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, syscall.EPIPE), err == fasthttp.ErrConnectionClosed, err == errTooManyStaleConns:
		// Connecting that timed out included.
		return health.OutcomeConnectFailed, errConnectFailed
	case err == fasthttp.ErrTimeout || errors.Is(err, os.ErrDeadlineExceeded):
		return health.OutcomeTimeout, errTimeout
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return health.OutcomeTimeout, errTimeout
	}
	return health.OutcomeInvalidResponse, errInvalidResponse
}

func isSmallBuffer(err error) bool {
	var small *fasthttp.ErrSmallBuffer
	return errors.As(err, &small)
}

// isDialErr reports whether err happened while connecting, so that the
// request was never sent and may be retried whatever its method.
func isDialErr(err error) bool {
	// The HostClient wraps its dialer's timeout with the address.
	if errors.Is(err, fasthttp.ErrDialTimeout) {
		return true
	}
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "dial"
}
