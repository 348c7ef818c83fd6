//go:build linux

package balancer

import (
	"testing"
	"time"
)

// A losing try ends the same way on both engines, counted by what its
// backend did by the try's own deadline, not by when the loop's sweep
// happens to find it.

// A backend that never completes the handshake, behind hedging: its lost
// tries reach connect_timeout unconnected and count as the connect
// failures they are, on both engines, so that passive checks eject it.
func TestHedgedBlackholedBackendEjected(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		hung := hungListener(t)
		fast := slowOrigin(t, "fast", 0)
		s := startEdge(t, "server: {"+engine+"}\nservices:\n  web: {static: ["+hung+", "+fast.addr+"], balance: round_robin, connect_timeout: 200ms,"+
			" try_timeout: 1s, hedge: {after: 20ms}, health: {passive: {consecutive_gateway_failures: 2}}}\nroutes: [{service: web}]\n")
		fastWithin(t, s, "/h", 4, 2*time.Second)
		waitEjected(t, s, hung, "")
		if e := backendErrors(t, s, hung); len(e) != 1 || e["upstream_connect_failed"] < 2 {
			t.Errorf("the black-holed backend's errors: %v, want upstream_connect_failed only", e)
		}
		if e := backendErrors(t, s, fast.addr); len(e) != 0 {
			t.Errorf("the answering backend's errors: %v", e)
		}
	})
}

// A lost try whose answer comes after its try_timeout, but before the
// event loop's once-a-second sweep looks at it, timed out all the same:
// counted once as a timeout on both engines.
func TestHedgedLateAnswerCountsAsTimeout(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		late := slowOrigin(t, "late", 400*time.Millisecond)
		_, s := besideFast(t, engine, late, "try_timeout: 250ms, hedge: {after: 20ms}, health: {passive: {consecutive_gateway_failures: 1000}}")
		fastWithin(t, s, "/h", 4, 2*time.Second)
		tries := len(late.got())
		if tries == 0 {
			t.Fatal("the late backend got no try")
		}
		waitTimeouts(t, s, late.addr, tries)
	})
}
