package health

import (
	"testing"
	"time"
)

func BenchmarkTargetRequest(b *testing.B) {
	tg := NewRegistry(nil).Acquire("127.0.0.1:1", PassiveConfig{})
	now := time.Now().UnixNano()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if tg.Available(now) {
				tg.Begin()
				tg.Done(now, OutcomeSuccess, time.Millisecond)
			}
		}
	})
}
