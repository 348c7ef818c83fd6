package scenario

import "syscall"

// childAttr makes a started process die with the bench, even on SIGKILL.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
