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

// A lost try whose answer comes after its try_timeout, however soon
// after, timed out all the same: counted once as a timeout on both
// engines.
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

// A lost try that never answers is counted at its try_timeout, not up to a
// second later: the event loop ends abandoned tries in the sweep it makes
// every 10ms, as the fasthttp path does at the deadline itself.
func TestHedgedLostTryCountedAtItsDeadline(t *testing.T) {
	bothEngines(t, func(t *testing.T, engine string) {
		silent := silentOrigin(t)
		_, s := besideFast(t, engine, silent, "try_timeout: 200ms, hedge: {after: 20ms}, health: {passive: {consecutive_gateway_failures: 1000}}")
		start := time.Now()
		// Round robin: the silent backend gets a first try of one of the
		// two requests at least.
		fastWithin(t, s, "/h", 2, time.Second)
		tries := len(silent.got())
		if tries == 0 {
			t.Fatal("the silent backend got no try")
		}
		waitTimeouts(t, s, silent.addr, tries)
		// 200ms after the try began, with a wide margin for a busy
		// machine; the once-a-second sweep took up to 1.2s.
		if d := time.Since(start); d > 700*time.Millisecond {
			t.Errorf("the lost try was counted %v after it began, want about its try_timeout (200ms)", d)
		}
	})
}
