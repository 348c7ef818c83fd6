package scenario

import (
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/edgelb/edgelb/bench/report"
)

// failoverHold is dc-failover's failover_hold: short enough that the
// way back shows within a short load.
const failoverHold = 3 * time.Second

// failoverTarget is how soon after dc1 loses its instances the answers
// must come from dc2.
const failoverTarget = time.Second

// setupFailover starts the Consul servers of dc1 and dc2 joined over the
// WAN, origins dc1-1 and dc1-2 registered as web in dc1 and dc2-1 and
// dc2-2 in dc2, and edgelb discovering web in dc1 with failover to dc2.
func (s *session) setupFailover() error {
	dc1, err := s.g.StartConsulDC(s.o.Consul, "dc1")
	if err != nil {
		return err
	}
	dc2, err := s.g.StartConsulDC(s.o.Consul, "dc2")
	if err != nil {
		return err
	}
	if err := dc1.JoinWAN(dc2); err != nil {
		return err
	}
	s.consul, s.consul2 = dc1, dc2
	for _, dc := range []*Consul{dc1, dc2} {
		for i := 1; i <= 2; i++ {
			p, err := s.g.StartOrigin(fmt.Sprintf("%s-%d", dc.Datacenter(), i))
			if err != nil {
				return err
			}
			if err := dc.Register(p.Name, "web", port(p.Addr)); err != nil {
				return err
			}
			s.origins = append(s.origins, p)
		}
	}
	e, err := s.g.StartEdge(fmt.Sprintf(`consul: {address: %s}
services:
  web:
    consul: {name: web, failover: [dc2], failover_hold: %s}
    connect_timeout: %s
    try_timeout: %s
    retries: %d
    health:
      active: {path: /health, interval: 1s}
routes: [{service: web}]
`, dc1.Addr(), failoverHold, connectTimeout, tryTimeout, retries), filepath.Join(s.g.Dir, "state"))
	if err != nil {
		return err
	}
	s.edge, s.url, s.pid = e, "http://"+e.Addr+"/", e.Pid()
	if err := WaitHTTP(s.url, DefaultWaitTimeout); err != nil {
		return fmt.Errorf("edgelb never routed the Consul service: %w\n%s", err, e.Output())
	}
	return nil
}

// failoverScript deregisters the dc1 origins at a quarter of the load and
// registers them again at half, and times how long until the answers come
// from dc2, then from dc1 again.
func failoverScript(s *session) error {
	s.took = map[string]time.Duration{}
	dc1 := s.origins[:2]
	if err := s.at(1.0 / 4); err != nil {
		return err
	}
	t0 := time.Now()
	for _, o := range dc1 {
		if err := s.consul.Deregister(o.Name); err != nil {
			return err
		}
	}
	s.markAt(t0, "dc1 instances deregistered")
	if d, ok := s.waitOrigin("dc2-", t0); ok {
		s.markAt(t0.Add(d), "answers from dc2")
		s.took["to dc2"] = d
	}
	if err := s.at(1.0 / 2); err != nil {
		return err
	}
	t1 := time.Now()
	for _, o := range dc1 {
		if err := s.consul.Register(o.Name, "web", port(o.Addr)); err != nil {
			return err
		}
	}
	s.markAt(t1, "dc1 instances registered again")
	if d, ok := s.waitOrigin("dc1-", t1); ok {
		s.markAt(t1.Add(d), "answers from dc1 again")
		s.took["back to dc1"] = d
	}
	return nil
}

// waitOrigin polls edgelb until an origin whose name starts with prefix
// answers, for at most 10s, and returns the time since t0.
func (s *session) waitOrigin(prefix string, t0 time.Time) (time.Duration, bool) {
	c := &http.Client{Timeout: time.Second}
	for time.Since(t0) < 10*time.Second && s.ctx.Err() == nil {
		resp, err := c.Get(s.url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 && strings.HasPrefix(resp.Header.Get("X-Origin"), prefix) {
				return time.Since(t0), true
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	return 0, false
}

// failoverJudge words the failover's errors and timings against the
// targets, and what edgelb's metrics counted.
func failoverJudge(s *session, run *report.Run) []string {
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "NOT met"
	}
	var notes []string
	notes = append(notes, fmt.Sprintf("errors during the load: %d, target 0: %s", run.Result.Errors, verdict(run.Result.Errors == 0)))
	if d, ok := s.took["to dc2"]; ok {
		notes = append(notes, fmt.Sprintf("answers from dc2 %.0fms after the dc1 instances were deregistered, target within %v: %s",
			ms(d), failoverTarget, verdict(d <= failoverTarget)))
	} else {
		notes = append(notes, "no answer from dc2 within 10s of the deregistration: NOT met")
	}
	if d, ok := s.took["back to dc1"]; ok {
		notes = append(notes, fmt.Sprintf("answers from dc1 again %.0fms after its instances were registered again, failover_hold %v: %s",
			ms(d), failoverHold, verdict(d >= failoverHold-100*time.Millisecond)))
	} else {
		notes = append(notes, "no answer from dc1 within 10s of the registration: NOT met")
	}
	if m, err := s.edge.Metrics(); err == nil {
		notes = append(notes, fmt.Sprintf("edgelb_discovery_failovers_total: dc1 to dc2 %.0f, dc2 to dc1 %.0f; serving at the end: dc1 %.0f, dc2 %.0f",
			m[`edgelb_discovery_failovers_total{service="web",from="dc1",to="dc2"}`], m[`edgelb_discovery_failovers_total{service="web",from="dc2",to="dc1"}`],
			m[`edgelb_discovery_datacenter_serving{service="web",datacenter="dc1"}`], m[`edgelb_discovery_datacenter_serving{service="web",datacenter="dc2"}`]))
	}
	return notes
}
