//go:build unix

package balancer

import "syscall"

// peekClean reports whether the socket fd has nothing to read and is not
// at end of file, looking without consuming and without blocking.
func peekClean(fd uintptr, buf []byte) bool {
	n, _, err := syscall.Recvfrom(int(fd), buf, syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	return n < 0 && (err == syscall.EAGAIN || err == syscall.EWOULDBLOCK)
}
