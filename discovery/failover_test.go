package discovery

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// dcs builds datacenter states from "name:passing" or "name:passing@upSince
// seconds before testTime", "name:?" for one that has not answered, and
// "name:!" for one ignored, "name:x" for one whose every call failed.
func testDCs(specs ...string) []*dcState {
	var out []*dcState
	for _, spec := range specs {
		name, rest, _ := strings.Cut(spec, ":")
		d := &dcState{name: name}
		switch rest {
		case "?":
		case "!":
			d.ignored = "test"
		case "x":
			d.known, d.status.LastError = true, "Consul at 127.0.0.1:8500: No path to datacenter"
		default:
			var n, ago int
			if c, _ := fmt.Sscanf(rest, "%d@%d", &n, &ago); c == 2 {
				d.upSince = testTime.Add(-time.Duration(ago) * time.Second)
			} else {
				fmt.Sscanf(rest, "%d", &n)
			}
			ins := make([]Instance, n)
			for i := range ins {
				ins[i] = Instance{Addr: fmt.Sprintf("%s:%d", name, i)}
			}
			d.set, d.known = NewSet("web", "consul", ins, testTime), true
		}
		out = append(out, d)
	}
	return out
}

func TestChooseDatacenter(t *testing.T) {
	hold := 10 * time.Second
	f := func(cur int, specs string, wantNext int, wantWake time.Duration, wantReason string) {
		t.Helper()
		ch := choose(testDCs(strings.Fields(specs)...), cur, hold, testTime)
		var wake time.Duration
		if !ch.wake.IsZero() {
			wake = ch.wake.Sub(testTime)
		}
		if ch.next != wantNext || wake != wantWake || !strings.Contains(ch.reason, wantReason) {
			t.Errorf("cur %d, %s: got next %d wake %v reason %q; want %d, %v, %q", cur, specs, ch.next, wake, ch.reason, wantNext, wantWake, wantReason)
		}
	}
	// The service's own datacenter first.
	f(-1, "dc1:2 dc2:1", 0, 0, "dc1 has 2 passing instances")
	f(1, "dc1:2 dc2:1", 0, 0, "dc1 has 2 passing instances") // passing since its first answer: no hold
	// It has none: the next one that has, skipping one with none.
	f(0, "dc1:0 dc2:0 dc3:4", 2, 0, "dc1 has no passing instance; dc2 has no passing instance; dc3 has 4 passing instances")
	f(-1, "dc1:0 dc2:1", 1, 0, "dc1 has no passing instance; dc2 has 1 passing instance")
	// Back: only once dc1 has kept its instances for the hold.
	f(1, "dc1:2@3 dc2:1", 1, 7*time.Second, "dc1 has passing instances again since 2024-05-01T11:59:57Z; back to it at 2024-05-01T12:00:07Z if they stay (failover_hold 10s); dc2 has 1")
	f(1, "dc1:2@10 dc2:1", 0, 0, "dc1 has 2 passing instances")
	f(2, "dc1:2@3 dc2:1@20 dc3:1", 1, 7*time.Second, "dc2 has 1 passing instance")
	f(2, "dc1:2@3 dc2:1@4 dc3:1", 2, 6*time.Second, "dc3 has 1")
	// The one serving lost its instances: no hold for the way back.
	f(1, "dc1:2@3 dc2:0", 0, 0, "dc1 has 2")
	// None has any: stay, since moving changes nothing for clients.
	f(1, "dc1:0 dc2:0", 1, 0, "no datacenter has a passing instance (dc1, dc2); staying on dc2")
	f(-1, "dc1:0 dc2:0", 0, 0, "no datacenter has a passing instance (dc1, dc2); staying on dc1")
	// Before the service's own datacenter answers, nothing is chosen.
	f(-1, "dc1:? dc2:3", -1, 0, "waiting for the first answer from dc1")
	f(-1, "dc1:1 dc2:?", 0, 0, "dc1 has 1")
	f(0, "dc1:0 dc2:? dc3:1", 2, 0, "dc2 has not answered yet; dc3 has 1")
	// One that never answered.
	f(-1, "dc1:0 dc9:x dc2:1", 2, 0, "dc1 has no passing instance; dc9 has not answered (Consul at 127.0.0.1:8500: No path to datacenter); dc2 has 1")
	f(-1, "dc1:x dc2:1", 1, 0, "dc1 has not answered")
	// The one serving fails now: its last answer stands, and the reason
	// says so.
	dcs := testDCs("dc1:0", "dc2:1")
	dcs[1].status = Status{LastUpdate: testTime.Add(-time.Minute), LastError: "Consul at 127.0.0.1:8500: boom", LastErrorAt: testTime}
	if ch := choose(dcs, 1, hold, testTime); ch.next != 1 || ch.reason != "dc1 has no passing instance; dc2 has 1 passing instance in its last answer, at 2024-05-01T11:59:00Z; later queries fail: Consul at 127.0.0.1:8500: boom" {
		t.Errorf("dc2 failing: %+v", ch)
	}
	// An ignored datacenter is skipped.
	f(-1, "dc1:0 dc1:! dc2:1", 2, 0, "dc1 has no passing instance; dc2 has 1")
	// The agent's datacenter before its name is known.
	f(-1, ":0 dc2:1", 1, 0, "local has no passing instance; dc2 has 1")
}

func TestConsulServiceValidate(t *testing.T) {
	f := func(s ConsulService, defaultDC string, want ...string) {
		t.Helper()
		errs := s.Validate("services.web.consul", defaultDC)
		var got []string
		for _, e := range errs {
			got = append(got, e.Error())
		}
		if len(got) != len(want) {
			t.Errorf("%+v: got %q, want %q", s, got, want)
			return
		}
		for i := range want {
			if !strings.Contains(got[i], want[i]) {
				t.Errorf("%+v: error %d is %q, want %q", s, i, got[i], want[i])
			}
		}
	}
	f(ConsulService{Name: "web", Failover: []string{"dc2", "dc3"}, FailoverHold: 5 * time.Second}, "")
	f(ConsulService{Query: "web-q", Datacenter: "dc1", FailoverHold: time.Second}, "")
	f(ConsulService{}, "", "services.web.consul.name: missing; set name (a Consul service) or query (a Consul prepared query)")
	f(ConsulService{Name: "web", Query: "q"}, "", "services.web.consul: set either name or query, not both")
	f(ConsulService{Query: "q", Tags: []string{"v1"}, Failover: []string{"dc2"}}, "",
		"services.web.consul.tags: does not go with query", "services.web.consul.failover: does not go with query")
	f(ConsulService{Name: "web", Failover: []string{"", " ", "dc2", "DC3", "dc2"}}, "",
		"services.web.consul.failover[0]: empty datacenter name",
		"services.web.consul.failover[1]: empty datacenter name",
		`services.web.consul.failover[3]: "DC3" is not a Consul datacenter name`,
		`services.web.consul.failover[4]: "dc2" is listed twice (also failover[2])`)
	f(ConsulService{Name: "web", Datacenter: "dc1", Failover: []string{"dc1"}}, "dc9",
		`services.web.consul.failover[0]: "dc1" is the service's own datacenter (services.web.consul.datacenter)`)
	f(ConsulService{Name: "web", Failover: []string{"dc2", "dc1"}}, "dc1",
		`services.web.consul.failover[1]: "dc1" is the service's own datacenter (consul.datacenter)`)
	f(ConsulService{Name: "web", FailoverHold: -time.Second, Failover: []string{"dc2"}}, "", "services.web.consul.failover_hold: must not be negative")
	f(ConsulService{Name: "web", FailoverHold: time.Second}, "", "services.web.consul.failover_hold: has no effect without failover or query")
	f(ConsulService{Name: "web", Datacenter: "dc 1"}, "", `services.web.consul.datacenter: "dc 1" is not a Consul datacenter name`)
}
