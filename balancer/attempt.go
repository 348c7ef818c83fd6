package balancer

import (
	"bufio"
	"bytes"
	"time"

	"github.com/valyala/fasthttp"
)

// attempt is where a client request's tries stand when the event loop
// hands its connection to the fasthttp path: when the request began, its
// deadline, the backends tried, how the last try ended, and the answer it
// got, if any. The fasthttp path goes on from there instead of starting
// over, so that whichever engine serves a request, its time and retry
// budget are spent once, no backend is asked twice for it, and each try is
// counted once, by the engine that made it.
//
// The loop makes one per hand-over that follows a try (slow path); the
// fasthttp path takes it with the first request it reads on that
// connection.
type attempt struct {
	start, deadline time.Time
	tried           tried
	// tries counts the tries made.
	tries int
	// code is the last try's failure; errNone when a backend answered.
	code errCode
	// resp is that answer, head and body as the backend sent them; head
	// is set when it answers a HEAD request.
	resp []byte
	head bool
}

// readResponse puts the answer a carried try received in resp.
func (a *attempt) readResponse(resp *fasthttp.Response) error {
	resp.Reset()
	resp.Header.SetNoDefaultContentType(true)
	resp.Header.DisableNormalizing()
	resp.SkipBody = a.head
	return resp.Read(bufio.NewReader(bytes.NewReader(a.resp)))
}
