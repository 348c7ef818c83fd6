//go:build linux

// Raw system calls of the event loop: they allocate nothing and do not go
// through Go's poller, which the loop replaces.

package balancer

import (
	"net/netip"
	"syscall"
	"unsafe"
)

// rawEpollWait polls the epoll descriptor without blocking.
func rawEpollWait(epfd int, events []syscall.EpollEvent) (int, syscall.Errno) {
	n, _, e := syscall.RawSyscall6(syscall.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), 0, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(n), 0
}

// rawRead and rawWrite are recv and send on a non-blocking socket: the
// system call without the runtime's scheduler hooks, which a call that
// never blocks does not need, and without the file layer read and write
// go through.
func rawRead(fd int, p []byte) (int, syscall.Errno) {
	if len(p) == 0 {
		return 0, 0
	}
	n, _, e := syscall.RawSyscall6(syscall.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), 0, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(n), 0
}

func rawWrite(fd int, p []byte) (int, syscall.Errno) {
	if len(p) == 0 {
		return 0, 0
	}
	n, _, e := syscall.RawSyscall6(syscall.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), syscall.MSG_NOSIGNAL, 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(n), 0
}

func rawWritev(fd int, iov *[2]syscall.Iovec, a, b []byte) (int, syscall.Errno) {
	iov[0].Base, iov[0].Len = &a[0], uint64(len(a))
	iov[1].Base, iov[1].Len = &b[0], uint64(len(b))
	n, _, e := syscall.RawSyscall(syscall.SYS_WRITEV, uintptr(fd), uintptr(unsafe.Pointer(&iov[0])), 2)
	iov[0].Base, iov[1].Base = nil, nil
	if e != 0 {
		return -1, e
	}
	return int(n), 0
}

// sockaddr returns a new socket address for ap: syscall.Connect writes into
// the one it is given, so loops cannot share one.
func sockaddr(ap netip.AddrPort) syscall.Sockaddr {
	if a := ap.Addr().Unmap(); a.Is4() {
		return &syscall.SockaddrInet4{Port: int(ap.Port()), Addr: a.As4()}
	}
	return &syscall.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
}
