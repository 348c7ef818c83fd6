package balancer

import (
	"testing"
	"time"

	"github.com/edgelb/edgelb/discovery"
)

// weighted gives p three backends of weights 1, 2 and 3.
func weighted(p *Pool) {
	p.update(discovery.NewSet("web", "static", []discovery.Instance{
		{Addr: "127.0.0.1:1", Weight: 1}, {Addr: "127.0.0.2:1", Weight: 2}, {Addr: "127.0.0.3:1", Weight: 3},
	}, time.Now()))
}

// BenchmarkPoolPick measures pick alone for each selection policy, over
// three backends of unequal weights, from concurrent goroutines.
func BenchmarkPoolPick(b *testing.B) {
	for _, balance := range []string{"p2c", "round_robin", "random"} {
		b.Run(balance, func(b *testing.B) {
			p := testPool(b, "{static: [127.0.0.1:1], balance: "+balance+"}")
			weighted(p)
			now := time.Now().UnixNano()
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					var tr tried
					if p.pick(now, &tr) == nil {
						b.Fatal("no backend picked")
					}
				}
			})
		})
	}
}
