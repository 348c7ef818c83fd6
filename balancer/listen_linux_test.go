//go:build linux

package balancer

import (
	"net"
	"syscall"
	"testing"
)

// Both client-facing listeners, plain and TLS, are plain TCP sockets, not
// the Multipath TCP ones Go makes by default where the kernel has MPTCP,
// and accept a connection once its first bytes have come.
func TestListenersArePlainDeferredTCP(t *testing.T) {
	pki := newTestPKI(t)
	cert, key := pki.issue("www", "www.example")
	s := startEdge(t, tlsYAML("", cert, key)+"services:\n  web: {static: [127.0.0.1:1]}\nroutes: [{service: web}]\n")
	f := func(name string, ln net.Listener) {
		t.Helper()
		rc, err := ln.(*net.TCPListener).SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		proto, serr := 0, error(nil)
		if err := rc.Control(func(fd uintptr) {
			proto, serr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_PROTOCOL)
		}); err != nil || serr != nil {
			t.Fatal(err, serr)
		}
		if proto != syscall.IPPROTO_TCP {
			t.Errorf("the %s listener's protocol is %d, want %d (TCP)", name, proto, syscall.IPPROTO_TCP)
		}
		deferred := 0
		if err := rc.Control(func(fd uintptr) {
			deferred, serr = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_DEFER_ACCEPT)
		}); err != nil || serr != nil {
			t.Fatal(err, serr)
		}
		if deferred <= 0 {
			t.Errorf("the %s listener's TCP_DEFER_ACCEPT is %d: it accepts connections before their first bytes", name, deferred)
		}
	}
	f("plain", s.ln)
	f("TLS", s.tls.ln)
}
