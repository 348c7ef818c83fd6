package discovery

import (
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/edgelb/edgelb/discovery/consultest"
)

// startTwoDatacenters starts the servers of dc1 and dc2, joined over the
// WAN.
func startTwoDatacenters(t *testing.T) (dc1, dc2 *consultest.Agent) {
	t.Helper()
	dc1 = consultest.StartDatacenter(t, "dc1")
	dc2 = consultest.StartDatacenter(t, "dc2")
	dc1.JoinWAN(dc2)
	return dc1, dc2
}

func startFailoverSource(t *testing.T, a *consultest.Agent, services map[string]ConsulService) (*Consul, *recorder) {
	t.Helper()
	rec := newRecorder()
	c, err := NewConsul(ConsulConfig{Address: a.Addr()}, services, "", rec, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	c.Start()
	t.Cleanup(c.Stop)
	return c, rec
}

// createWebQuery creates in a's datacenter the prepared query web-q: the
// passing instances of service web, with failover to dc2.
func createWebQuery(t *testing.T, a *consultest.Agent) {
	t.Helper()
	_, _, err := a.Client.PreparedQuery().Create(&api.PreparedQueryDefinition{
		Name:    "web-q",
		Service: api.ServiceQuery{Service: "web", OnlyPassing: true, Failover: api.QueryFailoverOptions{Datacenters: []string{"dc2"}}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
}

func failoverCount(service, from, to string) uint64 { return failovers(service, from, to).Get() }

func servingValue(service, dc string) float64 { return servingGauge(service, dc).Get() }

// TestConsulFailoverBetweenDatacenters follows a service in dc1 with
// failover to dc2: when dc1 loses its instances (deregistered, then
// critical) the instances of dc2 are published at once; when dc1 has
// passing instances again they come back after failover_hold; dc2 going
// away while dc1 serves changes nothing.
func TestConsulFailoverBetweenDatacenters(t *testing.T) {
	dc1, dc2 := startTwoDatacenters(t)
	dc1.Register("a1", "web", 9001, nil, 0)
	dc1.Register("a2", "web", 9002, nil, 0)
	dc2.Register("b1", "web", 9101, nil, 0)
	const hold = 3 * time.Second
	c, rec := startFailoverSource(t, dc1, map[string]ConsulService{"fo-web": {Name: "web", Failover: []string{"dc2"}, FailoverHold: hold}})
	local, remote := "127.0.0.1:9001*1,127.0.0.1:9002*1", "127.0.0.1:9101*1"
	eventually(t, "the dc1 instances", func() bool { return rec.addrs("fo-web") == local })
	// The agent's datacenter is learnt: it names the set, /status and the
	// metrics.
	eventually(t, "the failover status", func() bool {
		f := c.Failover("fo-web")
		return f.Datacenter == "dc1" && len(f.Datacenters) == 2 && f.Datacenters[1].Passing == 1
	})
	f := c.Failover("fo-web")
	if rec.set("fo-web").Datacenter != "dc1" || f.Reason != "dc1 has 2 passing instances" || f.Hold != "3s" || f.Datacenters[0].Name != "dc1" || f.Datacenters[0].Passing != 2 {
		t.Fatalf("serving dc1: set from %q, failover %+v", rec.set("fo-web").Datacenter, f)
	}
	if servingValue("fo-web", "dc1") != 1 || servingValue("fo-web", "dc2") != 0 {
		t.Fatalf("serving gauges: dc1 %v, dc2 %v", servingValue("fo-web", "dc1"), servingValue("fo-web", "dc2"))
	}
	toDC2, toDC1 := failoverCount("fo-web", "dc1", "dc2"), failoverCount("fo-web", "dc2", "dc1")

	// Deregistered in dc1: dc2 serves.
	time.Sleep(1100 * time.Millisecond) // past the minimum call spacing
	start := time.Now()
	dc1.Deregister("a1")
	dc1.Deregister("a2")
	d := eventually(t, "the dc2 instances", func() bool { return rec.addrs("fo-web") == remote })
	t.Logf("dc1 deregistered: dc2 instances published %s after the first deregistration call", time.Since(start).Round(time.Millisecond))
	if d > 5*time.Second {
		t.Fatalf("failover took %s", d)
	}
	f = c.Failover("fo-web")
	if rec.set("fo-web").Datacenter != "dc2" || f.Datacenter != "dc2" || f.Reason != "dc1 has no passing instance; dc2 has 1 passing instance" || f.Since.Before(start) {
		t.Fatalf("after dc1 lost its instances: set from %q, failover %+v", rec.set("fo-web").Datacenter, f)
	}
	if n := failoverCount("fo-web", "dc1", "dc2") - toDC2; n != 1 {
		t.Fatalf(`edgelb_discovery_failovers_total{from="dc1",to="dc2"} went up by %d, want 1`, n)
	}
	if servingValue("fo-web", "dc1") != 0 || servingValue("fo-web", "dc2") != 1 {
		t.Fatalf("serving gauges: dc1 %v, dc2 %v", servingValue("fo-web", "dc1"), servingValue("fo-web", "dc2"))
	}

	// Registered again: dc2 serves until dc1 has kept its instances for
	// the hold.
	back := time.Now()
	dc1.Register("a1", "web", 9001, nil, 0)
	dc1.Register("a2", "web", 9002, nil, 0)
	eventually(t, "the hold in the reason", func() bool {
		return strings.Contains(c.Failover("fo-web").Reason, "dc1 has passing instances again since")
	})
	if rec.addrs("fo-web") != remote {
		t.Fatalf("back to dc1 before the hold: %s", rec.addrs("fo-web"))
	}
	eventually(t, "the dc1 instances again", func() bool { return rec.addrs("fo-web") == local })
	took := time.Since(back)
	t.Logf("dc1 registered again: back to dc1 after %s (failover_hold %s)", took.Round(time.Millisecond), hold)
	if took < hold-200*time.Millisecond || took > hold+10*time.Second {
		t.Fatalf("back to dc1 after %s, want about the hold of %s", took, hold)
	}
	if n := failoverCount("fo-web", "dc2", "dc1") - toDC1; n != 1 {
		t.Fatalf(`edgelb_discovery_failovers_total{from="dc2",to="dc1"} went up by %d, want 1`, n)
	}
	if f := c.Failover("fo-web"); f.Datacenter != "dc1" || !strings.HasPrefix(f.Reason, "dc1 has 2 passing instances") {
		t.Fatalf("back on dc1: %+v", f)
	}

	// Critical checks in dc1 count as no instance.
	time.Sleep(1100 * time.Millisecond)
	dc1.SetCheck("check-a1", api.HealthCritical)
	dc1.SetCheck("check-a2", api.HealthCritical)
	d = eventually(t, "the dc2 instances after dc1's checks went critical", func() bool { return rec.addrs("fo-web") == remote })
	t.Logf("dc1 critical: dc2 instances published after %s", d.Round(time.Millisecond))
	dc1.SetCheck("check-a1", api.HealthPassing)
	dc1.SetCheck("check-a2", api.HealthPassing)
	eventually(t, "the dc1 instances after their checks pass", func() bool { return rec.addrs("fo-web") == local })

	// dc2 stops while dc1 serves: nothing changes but dc2's status.
	published := rec.count()
	dc2.Stop()
	eventually(t, "dc2's error in the failover status", func() bool {
		f := c.Failover("fo-web")
		return f.Datacenters[1].LastError != ""
	})
	time.Sleep(1500 * time.Millisecond)
	f = c.Failover("fo-web")
	if rec.count() != published || rec.addrs("fo-web") != local || f.Datacenter != "dc1" || f.Datacenters[1].Passing != 1 {
		t.Fatalf("dc2 stopped: %d publishes (had %d), instances %s, failover %+v", rec.count(), published, rec.addrs("fo-web"), f)
	}
	for _, st := range c.Status() {
		if st.Service == "fo-web" && (st.Stale || st.LastError != "") {
			t.Fatalf("dc2 stopped while dc1 serves: the service's status must stay fresh: %+v", st)
		}
	}
	t.Logf("dc2 stopped: %s", f.Datacenters[1].LastError)
}

// TestConsulFailoverListNamesOwnDatacenter: a failover list that names
// the agent's own datacenter (not known when the config was read) has that
// entry ignored, and a datacenter nobody knows has its error shown.
func TestConsulFailoverListNamesOwnDatacenter(t *testing.T) {
	dc1, dc2 := startTwoDatacenters(t)
	dc2.Register("b1", "web", 9101, nil, 0)
	c, rec := startFailoverSource(t, dc1, map[string]ConsulService{"fo-own": {Name: "web", Failover: []string{"dc1", "dc9", "dc2"}}})
	eventually(t, "the dc2 instances", func() bool { return rec.addrs("fo-own") == "127.0.0.1:9101*1" })
	f := c.Failover("fo-own")
	if len(f.Datacenters) != 4 || !strings.Contains(f.Datacenters[1].Ignored, "is the service's own datacenter") {
		t.Fatalf("failover status: %+v", f)
	}
	if f.Datacenter != "dc2" || !strings.HasPrefix(f.Reason, "dc1 has no passing instance; dc9 has not answered (Consul at "+dc1.Addr()) {
		t.Fatalf("failover status: %+v", f)
	}
	t.Logf("reason: %s", f.Reason)
}

// TestConsulPreparedQueryFailover follows a prepared query with failover
// to dc2: Consul's answer decides the datacenter, and going back waits
// for failover_hold as with a failover list.
func TestConsulPreparedQueryFailover(t *testing.T) {
	dc1, dc2 := startTwoDatacenters(t)
	dc1.Register("a1", "web", 9001, nil, 0)
	dc2.Register("b1", "web", 9101, nil, 0)
	createWebQuery(t, dc1)
	const hold = 2 * time.Second
	c, rec := startFailoverSource(t, dc1, map[string]ConsulService{"fo-q": {Query: "web-q", FailoverHold: hold}})
	eventually(t, "the dc1 instance", func() bool { return rec.addrs("fo-q") == "127.0.0.1:9001*1" })
	if f := c.Failover("fo-q"); f.Datacenter != "dc1" || rec.set("fo-q").Datacenter != "dc1" {
		t.Fatalf("failover status: %+v", f)
	}
	toDC2 := failoverCount("fo-q", "dc1", "dc2")

	start := time.Now()
	dc1.Deregister("a1")
	d := eventually(t, "the dc2 instance", func() bool { return rec.addrs("fo-q") == "127.0.0.1:9101*1" })
	t.Logf("dc1 deregistered: the query's dc2 answer published after %s (executed every %s)", d.Round(time.Millisecond), queryPollInterval)
	f := c.Failover("fo-q")
	if f.Datacenter != "dc2" || f.Since.Before(start) || f.Reason != "local has no passing instance; dc2 has 1 passing instance" && f.Reason != "dc1 has no passing instance; dc2 has 1 passing instance" {
		t.Fatalf("after dc1 lost its instance: %+v", f)
	}
	if n := failoverCount("fo-q", "dc1", "dc2") - toDC2; n != 1 {
		t.Fatalf(`edgelb_discovery_failovers_total{from="dc1",to="dc2"} went up by %d, want 1`, n)
	}

	back := time.Now()
	dc1.Register("a1", "web", 9001, nil, 0)
	eventually(t, "the dc1 instance again", func() bool { return rec.addrs("fo-q") == "127.0.0.1:9001*1" })
	took := time.Since(back)
	t.Logf("dc1 registered again: back to dc1 after %s (failover_hold %s)", took.Round(time.Millisecond), hold)
	if took < hold-200*time.Millisecond {
		t.Fatalf("back to dc1 after %s, before the hold of %s", took, hold)
	}
}

// TestConsulPreparedQueryKeepsUnreachableDatacenter: Consul answers a
// prepared query whose failover datacenter it cannot reach with no
// instance, as if that datacenter had none. While the service serves from
// that datacenter, edgelb tells the two apart: instances that left dc2
// leave the service, but dc2 going out of reach keeps the instances it
// last gave, as a Consul outage does, and /status says why.
func TestConsulPreparedQueryKeepsUnreachableDatacenter(t *testing.T) {
	dc1, dc2 := startTwoDatacenters(t)
	dc2.Register("b1", "web", 9101, nil, 0)
	createWebQuery(t, dc1)
	c, rec := startFailoverSource(t, dc1, map[string]ConsulService{"fo-q": {Query: "web-q"}})
	eventually(t, "the dc2 instance", func() bool { return rec.addrs("fo-q") == "127.0.0.1:9101*1" })

	// Gone from a reachable dc2: gone from the service.
	dc2.Deregister("b1")
	eventually(t, "no instance once dc2 has none", func() bool { return rec.addrs("fo-q") == "" })
	dc2.Register("b1", "web", 9101, nil, 0)
	eventually(t, "the dc2 instance again", func() bool { return rec.addrs("fo-q") == "127.0.0.1:9101*1" })

	// dc2 out of reach: its last instances stay.
	dc2.Stop()
	var f *Failover
	eventually(t, "an error saying dc2 cannot be reached", func() bool {
		if f = c.Failover("fo-q"); f == nil {
			return false
		}
		for _, d := range f.Datacenters {
			if d.Name == "dc2" && strings.Contains(d.LastError, "cannot query datacenter dc2") {
				return true
			}
		}
		return false
	})
	time.Sleep(3 * queryPollInterval)
	if got := rec.addrs("fo-q"); got != "127.0.0.1:9101*1" {
		t.Fatalf("with dc2 out of reach the service has %q, want the last dc2 instance kept", got)
	}
	t.Logf("failover status with dc2 out of reach: %+v", f)
}

// The serving gauges of a watch that stops go to 0, unless a new watch
// of the service took over.
func TestServingGaugesOfStoppedWatch(t *testing.T) {
	w1 := &watch{name: "gauge-test"}
	setServing(w1, []string{"dc1", "dc2"}, "dc2")
	w2 := &watch{name: "gauge-test"}
	setServing(w2, []string{"dc1", "dc2"}, "dc1")
	stopServing(w1)
	setServing(w1, []string{"dc1", "dc2"}, "dc2") // late: ignored
	if servingValue("gauge-test", "dc1") != 1 || servingValue("gauge-test", "dc2") != 0 {
		t.Fatalf("after the old watch stopped: dc1 %v, dc2 %v", servingValue("gauge-test", "dc1"), servingValue("gauge-test", "dc2"))
	}
	stopServing(w2)
	if servingValue("gauge-test", "dc1") != 0 || servingValue("gauge-test", "dc2") != 0 {
		t.Fatalf("after the last watch stopped: dc1 %v, dc2 %v", servingValue("gauge-test", "dc1"), servingValue("gauge-test", "dc2"))
	}
}
