package discovery

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/miekg/dns"

	"github.com/edgelb/edgelb/discovery/dnstest"
)

// testDNSService returns a service of the given backends whose names are
// asked of srv, with an empty hosts file.
func testDNSService(t *testing.T, srv *dnstest.Server, interval time.Duration, backends ...string) DNSService {
	t.Helper()
	svc := DNSService{DNS: DNSConfig{Servers: []string{srv.Addr()}, Interval: interval, Timeout: 300 * time.Millisecond,
		HostsFile: writeFile(t, "hosts", "")}}
	svc.DNS.ApplyDefaults()
	for _, b := range backends {
		addr, w, _ := strings.Cut(b, "*")
		in := Instance{Addr: addr}
		fmt.Sscan(w, &in.Weight)
		svc.Backends = append(svc.Backends, in)
	}
	return svc
}

// startDNSSource configures a DNS source for services, stopped when the
// test ends.
func startDNSSource(t *testing.T, stateDir string, services map[string]DNSService) (*DNS, *recorder) {
	t.Helper()
	rec := newRecorder()
	d := NewDNS(rec, testLogger())
	t.Cleanup(d.Stop)
	d.Configure(stateDir, services)
	return d, rec
}

// nameStatus returns the status of one name of a service.
func nameStatus(t *testing.T, d *DNS, service, name string) Status {
	t.Helper()
	for _, st := range d.Status() {
		if st.Service == service && st.Name == name {
			return st
		}
	}
	t.Fatalf("no status for %s %s in %+v", service, name, d.Status())
	return Status{}
}

func resolutions(name, result string) uint64 {
	return metrics.GetOrCreateCounter(fmt.Sprintf(`edgelb_dns_resolutions_total{name=%q,result=%q}`, name, result)).Get()
}

// TestDNSFollowsTheAnswers: each address of a name is an instance with the
// name's port and weight, beside the backends given by IP address; a new
// answer adds and removes instances as soon as the records' TTL runs out.
func TestDNSFollowsTheAnswers(t *testing.T) {
	t.Parallel()
	srv := startDNS(t)
	srv.Set("web.follow.test", 1, "127.0.0.1", "127.0.0.2")
	ok0 := resolutions("web.follow.test", "ok")
	d, rec := startDNSSource(t, "", map[string]DNSService{
		"web": testDNSService(t, srv, 30*time.Second, "web.follow.test:8080*2", "10.9.9.9:80", "WEB.follow.test.:9090"),
	})
	// Published before Configure returns.
	if got, want := rec.addrs("web"), "10.9.9.9:80*1,127.0.0.1:8080*2,127.0.0.1:9090*1,127.0.0.2:8080*2,127.0.0.2:9090*1"; got != want {
		t.Fatalf("first set %s, want %s", got, want)
	}
	if s := rec.set("web"); s.Source != "dns" {
		t.Fatalf("source %q", s.Source)
	}
	st := nameStatus(t, d, "web", "web.follow.test")
	if strings.Join(st.Addrs, ",") != "127.0.0.1,127.0.0.2" || st.Stale || st.LastError != "" || st.AnsweredBy != "DNS server "+srv.Addr() ||
		st.LastUpdate.IsZero() || st.NextResolve.Sub(st.LastUpdate) != time.Second {
		t.Fatalf("status %+v", st)
	}

	// A TTL of 1s re-resolves within about a second, though the interval
	// is 30s.
	srv.Set("web.follow.test", 1, "127.0.0.2", "127.0.0.3")
	took := eventually(t, "the new answer", func() bool {
		return rec.addrs("web") == "10.9.9.9:80*1,127.0.0.2:8080*2,127.0.0.2:9090*1,127.0.0.3:8080*2,127.0.0.3:9090*1"
	})
	if took > 10*time.Second {
		t.Errorf("the new answer took %v with a TTL of 1s", took)
	}
	if n := resolutions("web.follow.test", "ok") - ok0; n < 2 {
		t.Errorf("edgelb_dns_resolutions_total{result=ok} grew by %d", n)
	}

	// Answers that change nothing publish nothing.
	n := rec.count()
	waitResolutions(t, srv, "web.follow.test", 2)
	if rec.count() != n {
		t.Errorf("%d publications of an unchanged answer", rec.count()-n)
	}
}

// waitResolutions waits until the server has answered n more resolutions
// (A and AAAA each) of name.
func waitResolutions(t *testing.T, srv *dnstest.Server, name string, n int) {
	t.Helper()
	q := srv.Queries(name)
	eventually(t, fmt.Sprintf("%d more resolutions of %s", n, name), func() bool { return srv.Queries(name) >= q+2*n })
}

// TestDNSIntervalCapsTheTTL: a long TTL waits no longer than the interval.
func TestDNSIntervalCapsTheTTL(t *testing.T) {
	t.Parallel()
	srv := startDNS(t)
	srv.Set("web.cap.test", 3600, "127.0.0.1")
	_, rec := startDNSSource(t, "", map[string]DNSService{"web": testDNSService(t, srv, time.Second, "web.cap.test:80")})
	srv.Set("web.cap.test", 3600, "127.0.0.4")
	if took := eventually(t, "the new answer", func() bool { return rec.addrs("web") == "127.0.0.4:80*1" }); took > 10*time.Second {
		t.Errorf("took %v with an interval of 1s", took)
	}
}

// TestDNSFailuresKeepTheLastAddresses: whatever the failure, the last good
// addresses stay, and the status says what fails and since when.
func TestDNSFailuresKeepTheLastAddresses(t *testing.T) {
	t.Parallel()
	const want = "127.0.0.1:80*1,[::1]:80*1"
	f := func(name, result, wantErr string, fail func(*dnstest.Server), heal func(*testing.T, *dnstest.Server)) {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			srv := startDNS(t)
			host := result + ".fail.test"
			srv.Set(host, 1, "127.0.0.1", "::1")
			d, rec := startDNSSource(t, "", map[string]DNSService{"web": testDNSService(t, srv, 2*time.Second, host+":80")})
			if got := rec.addrs("web"); got != want {
				t.Fatalf("first set %s", got)
			}
			wantErr = strings.ReplaceAll(strings.ReplaceAll(wantErr, "SRV", srv.Addr()), "HOST", host)
			before := resolutions(host, result)
			start := time.Now()
			fail(srv)
			// With the server stopped, two failures in a row show that
			// failing_since stays put.
			failures := 1
			if result == "unreachable" {
				failures = 2
			}
			eventually(t, "failures", func() bool { return nameStatus(t, d, "web", host).Failures >= failures })
			st := nameStatus(t, d, "web", host)
			if !strings.Contains(st.LastError, wantErr) || !st.Stale || st.FailingSince.Before(start) ||
				failures == 2 && !st.LastErrorAt.After(st.FailingSince) ||
				strings.Join(st.Addrs, ",") != "127.0.0.1,::1" {
				t.Errorf("status %+v, want the error %q", st, wantErr)
			}
			if got := rec.addrs("web"); got != want {
				t.Errorf("set %s, want the last good %s", got, want)
			}
			if n := resolutions(host, result) - before; n < uint64(failures) {
				t.Errorf("edgelb_dns_resolutions_total{result=%q} grew by %d", result, n)
			}
			if heal != nil {
				heal(t, srv)
			}
			srv.Set(host, 1, "127.0.0.1", "::1")
			eventually(t, "healed", func() bool { return nameStatus(t, d, "web", host).Failures == 0 })
			if st := nameStatus(t, d, "web", host); st.LastError != "" || !st.FailingSince.IsZero() || st.Stale {
				t.Errorf("healed: status %+v", st)
			}
		})
	}
	f("NXDOMAIN", "nxdomain", "HOST. does not exist (NXDOMAIN from SRV)",
		func(srv *dnstest.Server) { srv.Fail("nxdomain.fail.test", dns.RcodeNameError) }, nil)
	f("SERVFAIL", "servfail", "SRV answered SERVFAIL for HOST.",
		func(srv *dnstest.Server) { srv.Fail("servfail.fail.test", dns.RcodeServerFailure) }, nil)
	f("no records", "nodata", "HOST. has no A or AAAA records (answer from SRV)",
		func(srv *dnstest.Server) { srv.Set("nodata.fail.test", 1) }, nil)
	f("silent server", "timeout", "no answer from SRV for HOST.",
		func(srv *dnstest.Server) { srv.Silence(true) }, func(_ *testing.T, srv *dnstest.Server) { srv.Silence(false) })
	f("server stopped", "unreachable", "SRV refused the connection: no DNS server listens there",
		(*dnstest.Server).Stop, func(t *testing.T, srv *dnstest.Server) {
			if err := srv.Restart(); err != nil {
				t.Fatal(err)
			}
		})
}

// TestDNSStartsFromStateDir: a name that cannot be resolved at start takes
// the addresses persisted in state_dir; without them it adds no backend,
// and the status says why.
func TestDNSStartsFromStateDir(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	srv := startDNS(t)
	srv.Set("web.disk.test", 60, "127.0.0.7")
	srv.Set("api.disk.test", 60, "127.0.0.8")
	services := func() map[string]DNSService {
		return map[string]DNSService{
			"web": testDNSService(t, srv, 30*time.Second, "web.disk.test:80"),
			"api": testDNSService(t, srv, 30*time.Second, "api.disk.test:80", "10.1.1.1:80"),
		}
	}
	d1, _ := startDNSSource(t, dir, services())
	d1.Stop()
	data, err := os.ReadFile(filepath.Join(dir, DNSStateFileName))
	if err != nil || !strings.Contains(string(data), `"web.disk.test"`) || !strings.Contains(string(data), `"127.0.0.8"`) {
		t.Fatalf("state file: %v\n%s", err, data)
	}

	srv.Stop()
	start := time.Now()
	d2, rec := startDNSSource(t, dir, services())
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("start took %v with the DNS server down", took)
	}
	if got := rec.addrs("web"); got != "127.0.0.7:80*1" {
		t.Fatalf("web from state_dir: %s", got)
	}
	st := nameStatus(t, d2, "web", "web.disk.test")
	if !st.FromDisk || !st.Stale || st.AnsweredBy != "state_dir" || !strings.Contains(st.LastError, "refused the connection") {
		t.Fatalf("status %+v", st)
	}

	// Without state_dir, the name adds nothing; the other backends serve.
	srv2 := startDNS(t)
	srv2.Stop()
	d3, rec3 := startDNSSource(t, t.TempDir(), map[string]DNSService{"api": testDNSService(t, srv2, 30*time.Second, "api.disk.test:80", "10.1.1.1:80")})
	if got := rec3.addrs("api"); got != "10.1.1.1:80*1" {
		t.Fatalf("api without state: %s", got)
	}
	st = nameStatus(t, d3, "api", "api.disk.test")
	if len(st.Addrs) != 0 || st.FromDisk || !strings.Contains(st.LastError, "no earlier answer (none in state_dir either): the name adds no backend") {
		t.Fatalf("status %+v", st)
	}
}

// TestDNSConfigureKeepsAddresses: a service whose config changes starts
// from the addresses its names had, even while DNS fails; a service that
// does not change is not resolved again; a removed one stops.
func TestDNSConfigureKeepsAddresses(t *testing.T) {
	t.Parallel()
	srv := startDNS(t)
	srv.Set("web.conf.test", 60, "127.0.0.1")
	srv.Set("api.conf.test", 60, "127.0.0.2")
	web := testDNSService(t, srv, 30*time.Second, "web.conf.test:80")
	api := testDNSService(t, srv, 30*time.Second, "api.conf.test:80")
	d, rec := startDNSSource(t, "", map[string]DNSService{"web": web, "api": api})
	srv.Silence(true)
	web2 := web
	web2.Backends = append(web2.Backends, Instance{Addr: "10.2.2.2:80"})
	qAPI := srv.Queries("api.conf.test")
	start := time.Now()
	d.Configure("", map[string]DNSService{"web": web2, "api": api, "gone": testDNSService(t, srv, 30*time.Second, "gone.conf.test:80")})
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("Configure took %v", took)
	}
	if got := rec.addrs("web"); got != "10.2.2.2:80*1,127.0.0.1:80*1" {
		t.Fatalf("changed web: %s", got)
	}
	if n := srv.Queries("api.conf.test"); n != qAPI {
		t.Errorf("unchanged api resolved again (%d questions)", n-qAPI)
	}
	d.Configure("", map[string]DNSService{"web": web2})
	for _, st := range d.Status() {
		if st.Service != "web" {
			t.Errorf("status of a removed service: %+v", st)
		}
	}
}
