//go:build linux

package balancer

import (
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// An ioRing sends on, or reads from, many sockets with one system call:
// an io_uring instance whose submissions are sends or recvs with
// MSG_DONTWAIT, each of which the kernel completes before io_uring_enter
// returns, as sendto or recvfrom would have: done, in part or not at all. Where a system call costs as much
// as a small send's own work (on virtual machines it can be a
// microsecond), one per batch instead of one per send is most of a
// forwarded request's cost saved. Only the event loop's goroutine uses
// its loop's ring.
type ioRing struct {
	fd     int
	sqHead *uint32
	sqTail *uint32
	sqMask uint32
	sqes   []uringSQE
	cqHead *uint32
	cqTail *uint32
	cqMask uint32
	cqes   []uringCQE
	// mem and sqeMem are the mappings, unmapped by close.
	mem, sqeMem []byte
}

// The io_uring ABI (include/uapi/linux/io_uring.h).
const (
	sysIOUringSetup    = 425
	sysIOUringEnter    = 426
	sysIOUringRegister = 427

	uringOffSQRing = 0
	uringOffSQEs   = 0x10000000

	uringOpSend = 26
	uringOpRecv = 27

	uringEnterGetEvents = 1 << 0

	uringRegisterProbe = 8
	uringOpSupported   = 1 << 0

	uringSetupSubmitAll   = 1 << 7
	uringSetupCoopTaskrun = 1 << 8

	uringFeatSingleMmap = 1 << 0
	uringFeatNoDrop     = 1 << 1
)

type uringSQOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type uringCQOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type uringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	resv                                                                   [3]uint32
	sqOff                                                                  uringSQOffsets
	cqOff                                                                  uringCQOffsets
}

type uringSQE struct {
	opcode      uint8
	flags       uint8
	ioprio      uint16
	fd          int32
	off         uint64
	addr        uint64
	len         uint32
	opFlags     uint32
	userData    uint64
	bufIndex    uint16
	personality uint16
	spliceFD    int32
	addr3       uint64
	_           uint64
}

type uringCQE struct {
	userData uint64
	res      int32
	flags    uint32
}

// uringProbe is struct io_uring_probe with room for the opcodes up to
// recv's.
type uringProbe struct {
	lastOp uint8
	opsLen uint8
	_      uint16
	_      [3]uint32
	ops    [uringOpRecv + 1]struct {
		op    uint8
		_     uint8
		flags uint16
		_     uint32
	}
}

// uringCanSend reports whether the kernel of the ring fd sends and
// receives (IORING_OP_SEND and IORING_OP_RECV, Linux 5.6): the io_uring
// of 5.5 has the features newIORing checks, but fails every send and
// recv with EINVAL, and has no probe.
func uringCanSend(fd int) bool {
	var p uringProbe
	e := syscall.EINTR
	for e == syscall.EINTR {
		// Older kernels wait for the ring to be idle first, which a
		// signal interrupts. The probe must be all zeroes.
		p = uringProbe{}
		_, _, e = syscall.Syscall6(sysIOUringRegister, uintptr(fd), uringRegisterProbe, uintptr(unsafe.Pointer(&p)), uintptr(len(p.ops)), 0, 0)
	}
	return e == 0 && int(p.opsLen) > uringOpRecv && p.ops[uringOpSend].flags&uringOpSupported != 0 &&
		p.ops[uringOpRecv].flags&uringOpSupported != 0
}

// uringCheckBuf is what checkNoWait's recv may write to, whatever
// becomes of the ring.
var uringCheckBuf [16]byte

// checkNoWait checks that the kernel completes a recv with MSG_DONTWAIT
// on an empty socket within the call that submits it, with EAGAIN, as
// every operation of a batch must be: one that waited instead would hold
// the loop in all until bytes came. A ring that fails it is not used.
func (r *ioRing) checkNoWait() error {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer syscall.Close(fds[0])
	defer syscall.Close(fds[1])
	tail := *r.sqTail
	r.sqes[tail&r.sqMask] = uringSQE{opcode: uringOpRecv, fd: int32(fds[0]), len: uint32(len(uringCheckBuf)),
		addr: uint64(uintptr(unsafe.Pointer(&uringCheckBuf[0]))), opFlags: syscall.MSG_DONTWAIT}
	atomic.StoreUint32(r.sqTail, tail+1)
	// Submitted without waiting for its completion.
	if _, _, e := syscall.RawSyscall6(sysIOUringEnter, uintptr(r.fd), 1, 0, 0, 0, 0); e != 0 {
		return e
	}
	res := []int32{ringPending}
	r.reap(1, res)
	switch res[0] {
	case -int32(syscall.EAGAIN):
		return nil
	case ringPending:
		return errors.New("io_uring waits on a MSG_DONTWAIT recv instead of failing it")
	}
	return fmt.Errorf("io_uring recv on an empty socket returned %d, want -EAGAIN", res[0])
}

// ioRingEntries is how many operations one io_uring_enter takes at most.
const ioRingEntries = 256

// newIORing sets up a ring, or says why the kernel would not: io_uring
// missing (before Linux 5.6), disabled (kernel.io_uring_disabled) or
// forbidden (a seccomp profile).
func newIORing() (*ioRing, error) {
	var p uringParams
	p.flags = uringSetupSubmitAll | uringSetupCoopTaskrun
	fd, _, e := syscall.RawSyscall(sysIOUringSetup, ioRingEntries, uintptr(unsafe.Pointer(&p)), 0)
	if e == syscall.EINVAL {
		// A kernel older than these flags (5.18, 5.19).
		p = uringParams{}
		fd, _, e = syscall.RawSyscall(sysIOUringSetup, ioRingEntries, uintptr(unsafe.Pointer(&p)), 0)
	}
	if e != 0 {
		return nil, e
	}
	r := &ioRing{fd: int(fd)}
	syscall.CloseOnExec(r.fd)
	if p.features&uringFeatSingleMmap == 0 || p.features&uringFeatNoDrop == 0 {
		// Before 5.5: one mapping for both rings is what this code
		// maps, and a full completion queue must not lose completions.
		r.close()
		return nil, syscall.ENOSYS
	}
	if !uringCanSend(r.fd) {
		r.close()
		return nil, syscall.ENOSYS
	}
	size := max(p.sqOff.array+p.sqEntries*4, p.cqOff.cqes+p.cqEntries*uint32(unsafe.Sizeof(uringCQE{})))
	mem, err := syscall.Mmap(r.fd, uringOffSQRing, int(size), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED|syscall.MAP_POPULATE)
	if err != nil {
		r.close()
		return nil, err
	}
	r.mem = mem
	sqeMem, err := syscall.Mmap(r.fd, uringOffSQEs, int(p.sqEntries)*int(unsafe.Sizeof(uringSQE{})), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED|syscall.MAP_POPULATE)
	if err != nil {
		r.close()
		return nil, err
	}
	r.sqeMem = sqeMem
	base := unsafe.Pointer(&mem[0])
	r.sqHead = (*uint32)(unsafe.Add(base, p.sqOff.head))
	r.sqTail = (*uint32)(unsafe.Add(base, p.sqOff.tail))
	r.sqMask = *(*uint32)(unsafe.Add(base, p.sqOff.ringMask))
	r.cqHead = (*uint32)(unsafe.Add(base, p.cqOff.head))
	r.cqTail = (*uint32)(unsafe.Add(base, p.cqOff.tail))
	r.cqMask = *(*uint32)(unsafe.Add(base, p.cqOff.ringMask))
	r.sqes = unsafe.Slice((*uringSQE)(unsafe.Pointer(&sqeMem[0])), p.sqEntries)
	r.cqes = unsafe.Slice((*uringCQE)(unsafe.Add(base, p.cqOff.cqes)), p.cqEntries)
	// Submission i always uses entry i: the array maps each slot to
	// itself once and for all.
	array := unsafe.Slice((*uint32)(unsafe.Add(base, p.sqOff.array)), p.sqEntries)
	for i := range array {
		array[i] = uint32(i)
	}
	if err := r.checkNoWait(); err != nil {
		r.close()
		return nil, err
	}
	return r, nil
}

func (r *ioRing) close() {
	if r.sqeMem != nil {
		syscall.Munmap(r.sqeMem)
		r.sqeMem = nil
	}
	if r.mem != nil {
		syscall.Munmap(r.mem)
		r.mem = nil
	}
	if r.fd >= 0 {
		syscall.Close(r.fd)
		r.fd = -1
	}
}

// ringPending marks an operation whose completion has not come yet.
const ringPending = -1 << 31

// sendAll sends bufs[i] on fds[i], at most ioRingEntries of them, and
// sets res[i] to what send returned: the bytes sent, or a negated errno.
// The buffers must stay put until it returns, as Go's heap does. An error
// says the ring is broken: the sends still ringPending in res did not go.
func (r *ioRing) sendAll(fds []int, bufs [][]byte, res []int32) syscall.Errno {
	return r.all(uringOpSend, syscall.MSG_DONTWAIT|syscall.MSG_NOSIGNAL, fds, bufs, res)
}

// recvAll receives into bufs[i] from fds[i], as sendAll sends: res[i] is
// what recv returned, the bytes read (0 at the end of the stream) or a
// negated errno (EAGAIN when nothing was waiting).
func (r *ioRing) recvAll(fds []int, bufs [][]byte, res []int32) syscall.Errno {
	return r.all(uringOpRecv, syscall.MSG_DONTWAIT, fds, bufs, res)
}

// all makes the operations op (a send or a recv, with msgFlags, which
// include MSG_DONTWAIT) on fds and bufs.
func (r *ioRing) all(op uint8, msgFlags uint32, fds []int, bufs [][]byte, res []int32) syscall.Errno {
	n := uint32(len(fds))
	tail := *r.sqTail
	for i := uint32(0); i < n; i++ {
		s := &r.sqes[(tail+i)&r.sqMask]
		b := bufs[i]
		*s = uringSQE{opcode: op, fd: int32(fds[i]), len: uint32(len(b)),
			opFlags: msgFlags, userData: uint64(i)}
		if len(b) > 0 {
			s.addr = uint64(uintptr(unsafe.Pointer(&b[0])))
		}
		res[i] = ringPending
	}
	atomic.StoreUint32(r.sqTail, tail+n)
	// Every operation is complete once io_uring_enter returns
	// (MSG_DONTWAIT has the kernel fail one that would block rather than
	// wait), so waiting for all of them does not block; the loop is for
	// a call interrupted before it submitted them all.
	for got, submit, tries := uint32(0), n, 0; ; tries++ {
		_, _, e := syscall.RawSyscall6(sysIOUringEnter, uintptr(r.fd), uintptr(submit), uintptr(n-got), uringEnterGetEvents, 0, 0)
		// What completed is recorded even when the call failed, so that
		// it is not done again.
		if got += r.reap(n, res); got == n {
			return 0
		}
		switch {
		case e != 0 && e != syscall.EINTR && e != syscall.EAGAIN && e != syscall.EBUSY:
			return e
		case tries == uringMaxTries:
			return syscall.EAGAIN
		}
		submit = tail + n - atomic.LoadUint32(r.sqHead)
	}
}

// uringMaxTries bounds the io_uring_enter calls of one batch: a kernel
// that keeps answering EAGAIN or EBUSY breaks the ring.
const uringMaxTries = 100

// reap records in res the completions of the n operations of a batch,
// and returns how many it found.
func (r *ioRing) reap(n uint32, res []int32) uint32 {
	got := uint32(0)
	head := *r.cqHead
	end := atomic.LoadUint32(r.cqTail)
	for ; head != end; head++ {
		c := &r.cqes[head&r.cqMask]
		if c.userData < uint64(n) && res[c.userData] == ringPending {
			res[c.userData] = c.res
			got++
		}
	}
	atomic.StoreUint32(r.cqHead, head)
	return got
}
