//go:build !linux

package balancer

import "net"

// eventLoopSupported reports whether this platform has the event loop.
const eventLoopSupported = false

type loop struct{ deaf, done chan struct{} }

type loopSlot struct{}

func (l *loop) stop() {}

func (s *Server) startLoops(net.Listener, int) error { return errNoLoop }
