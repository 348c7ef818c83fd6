package scenario

import (
	"fmt"
	"syscall"
	"unsafe"
)

// childAttr makes a started process die with the bench, even on SIGKILL.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}

// pinThread binds the calling thread to one CPU.
func pinThread(cpu int) error {
	var mask [1024 / 64]uint64
	if cpu < 0 || cpu >= len(mask)*64 {
		return fmt.Errorf("CPU %d out of range", cpu)
	}
	mask[cpu/64] |= 1 << (cpu % 64)
	_, _, e := syscall.RawSyscall(syscall.SYS_SCHED_SETAFFINITY, 0, unsafe.Sizeof(mask), uintptr(unsafe.Pointer(&mask)))
	if e != 0 {
		return e
	}
	return nil
}
