package consultest

import "syscall"

// agentAttr puts the agent in its own process group and makes it die with
// the test binary, even on SIGKILL.
func agentAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
