package balancer

import "syscall"

// deferAcceptSeconds is TCP_DEFER_ACCEPT's wait: the kernel holds a
// connection that has sent nothing for about this long (one SYN-ACK
// retransmission) before edgelb accepts it all the same.
const deferAcceptSeconds = 1

// deferAccept has the kernel hand edgelb a connection once the client's
// first bytes have come with it (TCP_DEFER_ACCEPT), as nginx's `listen ...
// deferred` does. Every protocol edgelb serves has the client speak first
// (an HTTP request, a TLS ClientHello, the HTTP/2 preface), so the first
// read of an accepted connection finds its request: one wake-up serves
// both, where a connection accepted at the handshake costs a second wake
// for its request. A client that connects and sends nothing is accepted
// after deferAcceptSeconds, and header_timeout runs from then.
func deferAccept(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_DEFER_ACCEPT, deferAcceptSeconds)
	})
	if err != nil {
		return err
	}
	return serr
}
