package balancer

import (
	"bufio"
	"bytes"
	"io"
	"net"
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
	// settled is set when no try is left: the loop handed the request
	// over only to be answered, with a stored copy a peer may give (see
	// peerfill.go).
	settled bool

	// conn, when set, is the backend connection of the last try, which
	// the loop began on backend at tryStart and whose answer is still
	// coming on conn: a body larger than the loop buffers, or a form it
	// does not read; pre holds what of it the loop has read. The
	// fasthttp path reads the rest and counts the try. resp is then an
	// earlier try's answer, kept in case this one fails.
	conn     net.Conn
	pre      []byte
	backend  *Backend
	tryStart time.Time

	// rl is the request's record: its ID, which backends have seen, and
	// its tries so far, which the fasthttp path goes on with.
	rl reqLog
}

// readCarried reads the carried try's answer into resp, by deadline and
// within maxBody, as forwardOnce reads one, and closes its connection.
func (a *attempt) readCarried(resp *fasthttp.Response, deadline time.Time, maxBody int) error {
	conn := a.conn
	a.conn = nil
	defer conn.Close()
	resp.Reset()
	resp.Header.SetNoDefaultContentType(true)
	resp.Header.DisableNormalizing()
	resp.SkipBody = a.head
	if err := conn.SetReadDeadline(deadline); err != nil {
		return err
	}
	// The buffer is the HostClient's, so that a head too large for one
	// is too large here.
	br := bufio.NewReaderSize(io.MultiReader(bytes.NewReader(a.pre), conn), DefaultMaxHeaderBytes)
	err := resp.ReadLimitBody(br, maxBody)
	switch {
	case err == io.EOF:
		return fasthttp.ErrConnectionClosed
	case err != nil:
		return timeoutErr(err)
	case resp.StatusCode() < 200:
		return errInterimResponse
	}
	return nil
}

// readResponse puts the answer a carried try received in resp.
func (a *attempt) readResponse(resp *fasthttp.Response) error {
	resp.Reset()
	resp.Header.SetNoDefaultContentType(true)
	resp.Header.DisableNormalizing()
	resp.SkipBody = a.head
	return resp.Read(bufio.NewReader(bytes.NewReader(a.resp)))
}
