//go:build !linux

package balancer

import "net"

// laneSupported reports whether this platform has the event loop.
const laneSupported = false

type loop struct{ deaf, done chan struct{} }

type laneSlot struct{}

func (l *loop) stop() {}

func (s *Server) startLoops(net.Listener, int) error { return errNoLane }
