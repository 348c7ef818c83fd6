package scenario

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"time"

	"github.com/edgelb/edgelb/discovery/dnstest"
)

// dnsName is the name under which the dns scenario's DNS server gives
// the origins.
const dnsName = "origins.bench.test"

// dnsStopAfter is how far into the load the dns scenario stops its DNS
// server, unless a third of the load is shorter.
const dnsStopAfter = 5 * time.Second

// setupDNS starts a DNS server in this process, three origins on
// 127.0.0.1, 127.0.0.2 and 127.0.0.3 on one port, and edgelb finding them
// by the name the server gives them (TTL 1s, dns.interval 2s, so that the
// outage is seen at once and tried again and again).
func (s *session) setupDNS() error {
	srv, err := dnstest.Start()
	if err != nil {
		return err
	}
	s.dns = srv
	port, err := s.originsOnOnePort(3)
	if err != nil {
		return err
	}
	srv.Set(dnsName, 1, "127.0.0.1", "127.0.0.2", "127.0.0.3")
	config := fmt.Sprintf("dns: {servers: [%s], interval: 2s, timeout: 500ms}\n", srv.Addr()) +
		EdgeConfig([]string{net.JoinHostPort(dnsName, strconv.Itoa(port))})
	e, err := s.g.StartEdge(config, filepath.Join(s.g.Dir, "state"))
	if err != nil {
		return err
	}
	s.edge, s.url, s.pid = e, "http://"+e.Addr+"/", e.Pid()
	return nil
}

// originsOnOnePort starts n origins, o1 on 127.0.0.1, o2 on 127.0.0.2 and
// so on, on one port free on every one of these addresses.
func (s *session) originsOnOnePort(n int) (int, error) {
	for range 20 {
		addr, err := FreeAddr()
		if err != nil {
			return 0, err
		}
		_, p, _ := net.SplitHostPort(addr)
		if !portFree(p, n) {
			continue
		}
		s.origins = s.origins[:0]
		for i := 1; i <= n; i++ {
			o, err := s.g.StartOriginAt("o"+strconv.Itoa(i), fmt.Sprintf("127.0.0.%d:%s", i, p))
			if err != nil {
				return 0, err
			}
			s.origins = append(s.origins, o)
		}
		port, _ := strconv.Atoi(p)
		return port, nil
	}
	return 0, errors.New("no port free on 127.0.0.1 to 127.0.0.3")
}

// portFree reports whether port is free on 127.0.0.1 to 127.0.0.n.
func portFree(port string, n int) bool {
	for i := 1; i <= n; i++ {
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.%d:%s", i, port))
		if err != nil {
			return false
		}
		ln.Close()
	}
	return true
}

// dnsScript stops the DNS server a few seconds into the load, for good,
// and marks when edgelb sees its resolutions fail.
func dnsScript(s *session) error {
	if err := s.sleep(min(dnsStopAfter, s.o.Duration/3)); err != nil {
		return err
	}
	s.dns.Stop()
	s.mark("DNS server stopped")
	for s.ctx.Err() == nil {
		if since, ok := s.edge.dnsFailingSince(dnsName); ok {
			s.markAt(since, "edgelb: resolution failing, last addresses kept")
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

// dnsFailingSince returns when the resolutions of name began to fail, as
// edgelb's /status says, and whether they fail.
func (e *Edge) dnsFailingSince(name string) (time.Time, bool) {
	st, err := e.Status()
	if err != nil {
		return time.Time{}, false
	}
	entries, _ := st["discovery"].([]any)
	for _, d := range entries {
		d, _ := d.(map[string]any)
		if d["source"] != "dns" || d["name"] != name {
			continue
		}
		since, _ := d["failing_since"].(string)
		t, err := time.Parse(time.RFC3339Nano, since)
		return t, err == nil
	}
	return time.Time{}, false
}
