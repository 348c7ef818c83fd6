//go:build !linux

package consultest

import "syscall"

// agentAttr puts the agent in its own process group; only Linux can tie its
// life to the test binary's.
func agentAttr() *syscall.SysProcAttr { return &syscall.SysProcAttr{Setpgid: true} }
