//go:build linux

package balancer

import (
	"net"
	"net/netip"
	"os"
	"syscall"
)

// fdConn is a client socket handed over by an event loop, read and written
// through an *os.File. Unlike net.FileConn, which duplicates the
// descriptor, it needs no second one, which a process at its descriptor
// limit does not have.
type fdConn struct {
	*os.File
	local, remote net.Addr
}

// newFDConn returns a connection owning the non-blocking socket fd, whose
// peer is remote; local stands in for its own address if the socket cannot
// tell it.
func newFDConn(fd int, remote netip.AddrPort, local net.Addr) *fdConn {
	// As on Go's own TCP connections; the loop may not have set it yet.
	syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	if sa, err := syscall.Getsockname(fd); err == nil {
		switch a := sa.(type) {
		case *syscall.SockaddrInet4:
			local = &net.TCPAddr{IP: a.Addr[:], Port: a.Port}
		case *syscall.SockaddrInet6:
			local = &net.TCPAddr{IP: a.Addr[:], Port: a.Port}
		}
	}
	return &fdConn{File: os.NewFile(uintptr(fd), ""), local: local, remote: net.TCPAddrFromAddrPort(remote)}
}

// LocalAddr implements net.Conn.
func (c *fdConn) LocalAddr() net.Addr { return c.local }

// RemoteAddr implements net.Conn.
func (c *fdConn) RemoteAddr() net.Addr { return c.remote }

// CloseWrite half-closes the socket, as net.TCPConn.CloseWrite does.
func (c *fdConn) CloseWrite() error {
	rc, err := c.File.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = syscall.Shutdown(int(fd), syscall.SHUT_WR) }); err != nil {
		return err
	}
	return serr
}
