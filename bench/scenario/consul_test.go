package scenario

import (
	"fmt"
	"net"
	"net/http"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/edgelb/edgelb/discovery/consultest"
)

// routedTo polls GET url until the X-Origin header is want ("" for "no
// longer routed to anything but an error") and returns how long it took.
func routedTo(t *testing.T, url, want string) time.Duration {
	t.Helper()
	start := time.Now()
	for time.Since(start) < 20*time.Second {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			got := resp.Header.Get("X-Origin")
			if got == want || (want == "" && resp.StatusCode >= 400) {
				return time.Since(start)
			}
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("%s never routed to %q", url, want)
	return 0
}

// TestConsulPropagation measures how long a registration and a
// deregistration in Consul take to change what clients get, through a real
// edgelb process and a real Consul agent.
func TestConsulPropagation(t *testing.T) {
	a := consultest.Start(t)
	o := StartOrigin(t, "api-1")
	e := StartEdge(t, fmt.Sprintf("consul: {address: %s, tag_routes: true}\n", a.Addr()), t.TempDir())
	_, portStr, _ := net.SplitHostPort(o.Addr)
	port, _ := strconv.Atoi(portStr)
	url := "http://" + e.Addr + "/api"
	// edgelb's watches made their first calls at start; changes are
	// measured from a steady state, past the 1s spacing of calls.
	time.Sleep(1100 * time.Millisecond)
	var lat []time.Duration
	for i := 0; i < 5; i++ {
		a.Register("api-1", "api", port, []string{"edge.route=*/api"}, 0)
		lat = append(lat, routedTo(t, url, "api-1"))
		time.Sleep(1100 * time.Millisecond) // edgelb spaces calls to one endpoint by 1s
		a.Deregister("api-1")
		lat = append(lat, routedTo(t, url, ""))
		time.Sleep(1100 * time.Millisecond)
	}
	t.Logf("in order (register, deregister, ...): %v", lat)
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	t.Logf("registration/deregistration to routing change over %d events: p50 %s, max %s", len(lat), lat[len(lat)/2], lat[len(lat)-1])
	if lat[len(lat)-1] > 5*time.Second { // generous: the target (100ms) is measured, not asserted
		t.Fatalf("a change took %s to reach routing", lat[len(lat)-1])
	}
}
