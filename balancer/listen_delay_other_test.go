//go:build !linux

package balancer

// silentAcceptDelay: elsewhere a connection is accepted at its handshake.
const silentAcceptDelay = 0
