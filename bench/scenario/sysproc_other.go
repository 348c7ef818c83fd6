//go:build !linux

package scenario

import (
	"errors"
	"syscall"
)

// childAttr: only Linux can tie a child's life to its parent's.
func childAttr() *syscall.SysProcAttr { return &syscall.SysProcAttr{} }

// pinThread: thread affinity is Linux's.
func pinThread(int) error { return errors.ErrUnsupported }
