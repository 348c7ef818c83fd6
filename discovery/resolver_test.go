package discovery

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/edgelb/edgelb/discovery/dnstest"
)

// startDNS starts a test DNS server, stopped when the test ends.
func startDNS(t *testing.T) *dnstest.Server {
	t.Helper()
	srv, err := dnstest.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	return srv
}

// writeFile writes content to a new file of the test and returns its path.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// testResolver returns a resolver asking servers, with a hosts file of
// the test (empty unless hosts is set).
func testResolver(t *testing.T, hosts string, servers ...string) *resolver {
	t.Helper()
	cfg := DNSConfig{Servers: servers, Timeout: 300 * time.Millisecond, HostsFile: writeFile(t, "hosts", hosts)}
	cfg.ApplyDefaults()
	r, note := newResolver(cfg)
	if note != "" {
		t.Fatal(note)
	}
	return r
}

func TestResolverAnswers(t *testing.T) {
	srv := startDNS(t)
	srv.Set("api.internal", 60, "10.0.0.2", "10.0.0.1", "fd00::1")
	srv.Set("v6only.internal", 30, "fd00::7")
	srv.SetCNAME("alias.internal", 5, "api.internal")
	srv.SetTruncated("big.internal", 60, "10.0.0.9")
	srv.Set("empty.internal", 60)
	srv.Fail("gone.internal", dns.RcodeNameError)
	srv.Fail("broken.internal", dns.RcodeServerFailure)
	srv.Fail("refusing.internal", dns.RcodeRefused)
	r := testResolver(t, "127.0.0.5 files.internal\n# 127.0.0.6 commented.internal\n::1 files.internal other\n", srv.Addr())

	f := func(host, want string) {
		t.Helper()
		ans, err := r.resolve(context.Background(), host)
		got := ""
		if err != nil {
			got = err.result + ": " + err.msg
		} else {
			got = fmt.Sprintf("%s ttl=%v %s", strings.Join(addrList(ans.addrs), ","), ans.ttl, ans.result)
		}
		if !strings.Contains(got, want) {
			t.Errorf("%s: got %q, want %q", host, got, want)
		}
	}
	f("api.internal", "10.0.0.1,10.0.0.2,fd00::1 ttl=1m0s ok")
	f("API.Internal.", "10.0.0.1,10.0.0.2,fd00::1 ttl=1m0s ok")
	f("v6only.internal", "fd00::7 ttl=30s ok")
	// The alias's TTL is the smaller one.
	f("alias.internal", "10.0.0.1,10.0.0.2,fd00::1 ttl=5s ok")
	f("big.internal", "10.0.0.9 ttl=1m0s ok")
	f("files.internal", "127.0.0.5,::1 ttl=-1ns hosts")
	f("empty.internal", "nodata: empty.internal. has no A or AAAA records (answer from "+srv.Addr()+")")
	f("gone.internal", "nxdomain: gone.internal. does not exist (NXDOMAIN from "+srv.Addr()+")")
	f("broken.internal", "servfail: "+srv.Addr()+" answered SERVFAIL for broken.internal.")
	f("refusing.internal", "refused: "+srv.Addr()+" refused to answer for refusing.internal.")
	f("commented.internal", "nxdomain")
	if n := srv.Queries("files.internal"); n != 0 {
		t.Errorf("a name of the hosts file was asked of the DNS server %d times", n)
	}
	if n := srv.Queries("big.internal"); n != 4 {
		t.Errorf("a truncated answer: %d questions, want 4 (A and AAAA over UDP, then over TCP)", n)
	}
}

func TestResolverServerFailures(t *testing.T) {
	srv := startDNS(t)
	srv.Set("api.internal", 60, "10.0.0.1")
	dead := startDNS(t)
	dead.Stop()
	silent := startDNS(t)
	silent.Silence(true)

	f := func(r *resolver, want string) {
		t.Helper()
		start := time.Now()
		ans, err := r.resolve(context.Background(), "api.internal")
		got := ""
		if err != nil {
			got = err.result + ": " + err.msg
		} else {
			got = strings.Join(addrList(ans.addrs), ",") + " from " + ans.from
		}
		if !strings.Contains(got, want) {
			t.Errorf("got %q, want %q", got, want)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("took %v", d)
		}
	}
	f(testResolver(t, "", dead.Addr()), "unreachable: "+dead.Addr()+" refused the connection: no DNS server listens there")
	f(testResolver(t, "", silent.Addr()), "timeout: no answer from "+silent.Addr()+" for api.internal. A within 300ms")
	// The next server answers when the first fails.
	f(testResolver(t, "", dead.Addr(), silent.Addr(), srv.Addr()), "10.0.0.1 from DNS server "+srv.Addr())
	f(testResolver(t, "", dead.Addr(), silent.Addr()), "timeout: every DNS server failed: "+dead.Addr()+" refused the connection")

	// A resolution stops at once when its context ends.
	r := testResolver(t, "", silent.Addr())
	r.timeout = time.Minute
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	start := time.Now()
	if _, err := r.resolve(ctx, "api.internal"); err == nil || time.Since(start) > 10*time.Second {
		t.Errorf("cancelled resolution: %v after %v", err, time.Since(start))
	}
}

// TestResolverResolvConf: without servers of its own, the resolver asks
// the nameservers of resolv.conf, with its search domains and ndots.
func TestResolverResolvConf(t *testing.T) {
	srv := startDNS(t)
	srv.Set("api.corp.example", 60, "10.0.0.3")
	host, _, _ := strings.Cut(srv.Addr(), ":")
	conf := writeFile(t, "resolv.conf", "nameserver "+host+"\nsearch corp.example other.example\noptions ndots:1\n")
	cfg := DNSConfig{ResolvConf: conf, HostsFile: writeFile(t, "hosts", ""), Timeout: 300 * time.Millisecond}
	cfg.ApplyDefaults()
	r, note := newResolver(cfg)
	if note != "" {
		t.Fatal(note)
	}
	if got := strings.Join(r.servers, ","); got != host+":53" {
		t.Fatalf("servers %s", got)
	}
	// resolv.conf cannot give a port: ask the test server instead.
	r.servers = []string{srv.Addr()}
	ans, err := r.resolve(context.Background(), "api")
	if err != nil || strings.Join(addrList(ans.addrs), ",") != "10.0.0.3" {
		t.Fatalf("api: %v %v", ans.addrs, err)
	}
	_, err = r.resolve(context.Background(), "nope")
	if err == nil || !strings.Contains(err.msg, "nope.corp.example., nope.other.example., nope.") {
		t.Fatalf("nope: %v", err)
	}

	cfg.ResolvConf = filepath.Join(t.TempDir(), "missing")
	r, note = newResolver(cfg)
	if !strings.Contains(note, "asking 127.0.0.1:53 and [::1]:53") || len(r.servers) != 2 {
		t.Fatalf("missing resolv.conf: %q %v", note, r.servers)
	}
}

func TestCheckHostName(t *testing.T) {
	f := func(host, want string) {
		t.Helper()
		err := CheckHostName(host)
		got := ""
		if err != nil {
			got = err.Error()
		}
		if want == "" && got != "" || !strings.Contains(got, want) {
			t.Errorf("CheckHostName(%q) = %q, want %q", host, got, want)
		}
	}
	f("api.internal", "")
	f("api.internal.", "")
	f("localhost", "")
	f("_srv-1.x9.example", "")
	f("", "empty host name")
	f("api..internal", "empty label")
	f(".api", "empty label")
	f("-api.internal", "starting or ending with '-'")
	f("api-.internal", "starting or ending with '-'")
	f("api internal", "has the character ' '")
	f("api/x", "has the character '/'")
	f("10.0.0.300", "is not an IP address")
	f(strings.Repeat("a", 64)+".x", "longer than 63")
	f(strings.Repeat("abcdefg.", 32)+"x", "longer than 253")

	g := func(addr string, want bool) {
		t.Helper()
		if got := HostIsName(addr); got != want {
			t.Errorf("HostIsName(%q) = %v", addr, got)
		}
	}
	g("127.0.0.1:80", false)
	g("[::1]:80", false)
	g("localhost:80", true)
	g("api.internal:8080", true)
}

func TestParseServer(t *testing.T) {
	f := func(in, want string) {
		t.Helper()
		ap, err := parseServer(in)
		got := ap.String()
		if err != nil {
			got = err.Error()
		}
		if !strings.Contains(got, want) {
			t.Errorf("parseServer(%q) = %q, want %q", in, got, want)
		}
	}
	f("10.0.0.2", "10.0.0.2:53")
	f("127.0.0.1:5353", "127.0.0.1:5353")
	f("::1", "[::1]:53")
	f("[::1]", "[::1]:53")
	f("[fd00::2]:5300", "[fd00::2]:5300")
	f("dns.example:53", "a DNS server is given by its IP address, not a name")
	f("dns.example", "want the IP address of a DNS server")
	f("10.0.0.2:0", "port must be a number from 1 to 65535")
	f("10.0.0.2:99999", "port must be a number from 1 to 65535")
}
