package discovery

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// A failover datacenter that answers, even to refuse edgelb's token, is in
// reach: a prepared query that comes back empty while the service serves
// from it is believed, and its instances leave the service. Only a
// datacenter Consul cannot reach keeps its last instances.
func TestPreparedQueryEmptyFailoverRefusedTokenIsReachable(t *testing.T) {
	var empty atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Consul-Index", "7")
		switch {
		case r.URL.Path == "/v1/query/web-q/execute":
			w.Header().Set("Content-Type", "application/json")
			if empty.Load() {
				fmt.Fprint(w, `{"Service":"web","Nodes":[],"Datacenter":"dc1","Failovers":0}`)
				return
			}
			fmt.Fprint(w, `{"Service":"web","Datacenter":"dc2","Failovers":1,"Nodes":[{"Node":{"Node":"n1","Address":"127.0.0.1","Datacenter":"dc2"},`+
				`"Service":{"ID":"b1","Service":"web","Address":"127.0.0.1","Port":9101},"Checks":[]}]}`)
		case strings.HasPrefix(r.URL.Path, "/v1/health/service/"):
			// dc2's servers answer: the token may not read the service.
			http.Error(w, "Permission denied", http.StatusForbidden)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	rec := newRecorder()
	c, err := NewConsul(ConsulConfig{Address: strings.TrimPrefix(srv.URL, "http://")}, map[string]ConsulService{"fo-q": {Query: "web-q"}}, "", rec, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	t.Cleanup(c.Stop)
	eventually(t, "the dc2 instance", func() bool { return rec.addrs("fo-q") == "127.0.0.1:9101*1" })
	empty.Store(true)
	took := eventually(t, "no instance once dc2, which answers, has none", func() bool { return rec.addrs("fo-q") == "" })
	t.Logf("emptied after %v", took.Round(time.Millisecond))
}

// A failover datacenter found out of reach before any answer from it was
// applied (the answer that named it was dropped for a Consul restart seen
// meanwhile) is recorded as that datacenter's failure, not a panic.
func TestPreparedQueryUnreachableDatacenterNotYetApplied(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Consul-Index", "7")
		if r.URL.Path == "/v1/query/web-q/execute" {
			fmt.Fprint(w, `{"Service":"web","Nodes":[],"Datacenter":"dc1","Failovers":0}`)
			return
		}
		http.NotFound(w, r)
	}))
	t.Cleanup(srv.Close)
	c, err := NewConsul(ConsulConfig{Address: strings.TrimPrefix(srv.URL, "http://")}, map[string]ConsulService{"fo-q": {Query: "web-q"}}, "", newRecorder(), testLogger())
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	t.Cleanup(c.Stop)
	c.mu.Lock()
	w := c.watches["fo-q"]
	c.mu.Unlock()
	f := &queryFollower{c: c, w: w, dc: "dc3", rank: 2}
	f.failed(&unreachableDC{dc: "dc3", rank: 2, err: fmt.Errorf("Unexpected response code: 500 (No path to datacenter)")}, 1)
	for _, d := range c.Failover("fo-q").Datacenters {
		if d.Name == "dc3" && strings.Contains(d.LastError, "No path to datacenter") {
			return
		}
	}
	t.Fatalf("dc3's failure is not in the status: %+v", c.Failover("fo-q"))
}
