//go:build !linux

package balancer

import "syscall"

// deferAccept: TCP_DEFER_ACCEPT is Linux's; elsewhere connections are
// accepted at the handshake.
func deferAccept(_, _ string, _ syscall.RawConn) error { return nil }
