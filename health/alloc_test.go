//go:build !race

package health

import (
	"testing"
	"time"
)

func TestRequestPathAllocatesNothing(t *testing.T) {
	tg := NewRegistry(nil).Acquire("127.0.0.1:1", PassiveConfig{})
	now := time.Now().UnixNano()
	n := testing.AllocsPerRun(1000, func() {
		if tg.Available(now) {
			tg.Begin()
			tg.Done(now, OutcomeSuccess, time.Millisecond)
		}
	})
	if n != 0 {
		t.Fatalf("Available+Begin+Done allocate %.1f times", n)
	}
}
