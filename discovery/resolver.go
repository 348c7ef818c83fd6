package discovery

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/miekg/dns"
)

// Results of one resolution, as the result label of
// edgelb_dns_resolutions_total counts them.
const (
	resultOK          = "ok"          // answered by a DNS server
	resultHosts       = "hosts"       // answered from the hosts file
	resultNXDomain    = "nxdomain"    // the name does not exist
	resultNoData      = "nodata"      // the name exists, without A or AAAA records
	resultServFail    = "servfail"    // a server answered SERVFAIL
	resultRefused     = "refused"     // a server answered REFUSED
	resultTimeout     = "timeout"     // no answer in time
	resultUnreachable = "unreachable" // nothing listens at the server's address
	resultError       = "error"       // anything else: another rcode, a malformed answer
)

// udpSize is the EDNS0 buffer size advertised: the size that avoids IP
// fragmentation on the Internet (DNS flag day 2020). Larger answers come
// truncated and are asked again over TCP.
const udpSize = 1232

// resolveError is a failed resolution: a metric result and its words.
type resolveError struct {
	result string
	msg    string
}

func (e *resolveError) Error() string { return e.msg }

// answer is a successful resolution.
type answer struct {
	// addrs are sorted and unique.
	addrs []netip.Addr
	// ttl is the smallest TTL of the records used; -1 for the hosts file,
	// which has none.
	ttl time.Duration
	// from says what answered: "DNS server 10.0.0.2:53" or
	// "hosts file /etc/hosts".
	from string
	// result is resultOK or resultHosts.
	result string
}

// resolver answers A and AAAA questions for a host name: from the hosts
// file first, as the system resolver does with "files dns", then from DNS
// servers, in order.
type resolver struct {
	servers []string // host:port
	// search and ndots come from resolv.conf, and only when its servers
	// are used: with servers of its own, a name is asked as written.
	search    []string
	ndots     int
	timeout   time.Duration
	hostsFile string
}

// newResolver returns the resolver of cfg, whose defaults are applied and
// which was validated. The note, if not empty, tells why resolv.conf could
// not give the servers.
func newResolver(cfg DNSConfig) (r *resolver, note string) {
	r = &resolver{servers: cfg.Servers, ndots: 1, timeout: cfg.Timeout, hostsFile: cfg.HostsFile}
	if len(r.servers) > 0 {
		return r, ""
	}
	cc, err := dns.ClientConfigFromFile(cfg.ResolvConf)
	if err == nil && len(cc.Servers) == 0 {
		err = errors.New("no nameserver line")
	}
	if err != nil {
		// As the Go and C resolvers do without a usable resolv.conf.
		r.servers = []string{"127.0.0.1:53", "[::1]:53"}
		return r, fmt.Sprintf("cannot use %s (%v): asking %s", cfg.ResolvConf, err, strings.Join(r.servers, " and "))
	}
	for _, s := range cc.Servers {
		r.servers = append(r.servers, net.JoinHostPort(s, cc.Port))
	}
	r.search, r.ndots = cc.Search, cc.Ndots
	return r, ""
}

// resolve returns the addresses of host, a name as written in the config
// (a trailing dot allowed). ctx ending stops it.
func (r *resolver) resolve(ctx context.Context, host string) (answer, *resolveError) {
	if addrs := lookupHosts(r.hostsFile, host); len(addrs) > 0 {
		return answer{addrs: addrs, ttl: -1, from: "hosts file " + r.hostsFile, result: resultHosts}, nil
	}
	names := r.candidates(host)
	var err *resolveError
	for _, name := range names {
		var ans answer
		ans, err = r.askServers(ctx, name)
		if err == nil {
			return ans, nil
		}
		if err.result != resultNXDomain && err.result != resultNoData {
			// The servers fail: another search domain would fail alike.
			return answer{}, err
		}
	}
	if len(names) > 1 {
		err.msg += " (tried with the search domains of resolv.conf: " + strings.Join(names, ", ") + ")"
	}
	return answer{}, err
}

// candidates returns the names to ask for host, as FQDNs: host itself, or
// with the search domains of resolv.conf when its servers are used, in the
// order its ndots gives.
func (r *resolver) candidates(host string) []string {
	if len(r.search) == 0 || dns.IsFqdn(host) {
		return []string{dns.Fqdn(host)}
	}
	cc := dns.ClientConfig{Search: r.search, Ndots: r.ndots}
	return cc.NameList(host)
}

// askServers asks the servers in turn for the A and AAAA records of name
// until one answers. An answer that the name does not exist, or has no
// address, is final: the next server would say the same.
func (r *resolver) askServers(ctx context.Context, name string) (answer, *resolveError) {
	var msgs []string
	var last *resolveError
	for _, srv := range r.servers {
		if ctx.Err() != nil {
			return answer{}, &resolveError{result: resultError, msg: "stopped"}
		}
		ans, err := r.ask(ctx, srv, name)
		if err == nil {
			return ans, nil
		}
		if err.result == resultNXDomain || err.result == resultNoData {
			return answer{}, err
		}
		msgs = append(msgs, err.msg)
		last = err
	}
	if len(msgs) > 1 {
		last = &resolveError{result: last.result, msg: "every DNS server failed: " + strings.Join(msgs, "; ")}
	}
	return answer{}, last
}

// ask asks one server for the A and AAAA records of name, both at once.
// The answer needs both: a server that answers one and fails the other
// gives no answer, so that a passing failure never drops the addresses of
// one family.
func (r *resolver) ask(ctx context.Context, srv, name string) (answer, *resolveError) {
	type reply struct {
		qtype uint16
		m     *dns.Msg
		err   error
	}
	replies := make(chan reply, 2)
	for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA} {
		go func() {
			var rp reply
			defer func() {
				// A panic in the DNS client fails this question only.
				if p := recover(); p != nil {
					rp = reply{qtype: qt, err: fmt.Errorf("panic in the DNS client: %v", p)}
				}
				replies <- rp
			}()
			m, err := r.exchange(ctx, srv, name, qt)
			rp = reply{qt, m, err}
		}()
	}
	var got [2]reply
	for i := range got {
		got[i] = <-replies
	}
	if got[0].qtype != dns.TypeA {
		got[0], got[1] = got[1], got[0]
	}
	var nx *resolveError
	for _, rp := range got {
		qt := dns.TypeToString[rp.qtype]
		if rp.err != nil {
			return answer{}, exchangeError(ctx, srv, name, qt, rp.err, r.timeout)
		}
		switch rc := rp.m.Rcode; rc {
		case dns.RcodeSuccess:
		case dns.RcodeNameError:
			nx = &resolveError{result: resultNXDomain, msg: fmt.Sprintf("%s does not exist (NXDOMAIN from %s)", name, srv)}
		case dns.RcodeServerFailure:
			return answer{}, &resolveError{result: resultServFail, msg: fmt.Sprintf("%s answered SERVFAIL for %s %s", srv, name, qt)}
		case dns.RcodeRefused:
			return answer{}, &resolveError{result: resultRefused, msg: fmt.Sprintf("%s refused to answer for %s %s (REFUSED)", srv, name, qt)}
		default:
			return answer{}, &resolveError{result: resultError, msg: fmt.Sprintf("%s answered %s for %s %s", srv, dns.RcodeToString[rc], name, qt)}
		}
	}
	if nx != nil {
		return answer{}, nx
	}
	ans := answer{ttl: -1, from: "DNS server " + srv, result: resultOK}
	for _, rp := range got {
		addrs, ttl := addrsOf(rp.m, name)
		ans.addrs = append(ans.addrs, addrs...)
		if len(addrs) > 0 && (ans.ttl < 0 || ttl < ans.ttl) {
			ans.ttl = ttl
		}
	}
	if len(ans.addrs) == 0 {
		return answer{}, &resolveError{result: resultNoData, msg: fmt.Sprintf("%s has no A or AAAA records (answer from %s)", name, srv)}
	}
	ans.addrs = sortAddrs(ans.addrs)
	return ans, nil
}

// exchange sends one question to srv over UDP, and again over TCP when the
// answer comes truncated.
func (r *resolver) exchange(ctx context.Context, srv, name string, qtype uint16) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	m.SetEdns0(udpSize, false)
	in, err := r.exchangeNet(ctx, "udp", srv, m)
	if err == nil && in.Truncated {
		in, err = r.exchangeNet(ctx, "tcp", srv, m)
	}
	return in, err
}

func (r *resolver) exchangeNet(ctx context.Context, network, srv string, m *dns.Msg) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	c := &dns.Client{Net: network, UDPSize: udpSize}
	conn, err := c.DialContext(ctx, srv)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	// The client reads until the deadline only: closing the connection
	// ends a read at once when ctx is cancelled.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	in, _, err := c.ExchangeWithConnContext(ctx, m, conn)
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	return in, err
}

// exchangeError words a failed exchange.
func exchangeError(ctx context.Context, srv, name, qtype string, err error, timeout time.Duration) *resolveError {
	var ne net.Error
	switch {
	case ctx.Err() != nil:
		return &resolveError{result: resultError, msg: "stopped"}
	case errors.Is(err, syscall.ECONNREFUSED):
		return &resolveError{result: resultUnreachable, msg: fmt.Sprintf("%s refused the connection: no DNS server listens there", srv)}
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, net.ErrClosed), errors.As(err, &ne) && ne.Timeout():
		return &resolveError{result: resultTimeout, msg: fmt.Sprintf("no answer from %s for %s %s within %v", srv, name, qtype, timeout)}
	}
	return &resolveError{result: resultError, msg: fmt.Sprintf("%s for %s %s: %v", srv, name, qtype, err)}
}

// addrsOf returns the addresses that m gives for name, following CNAME
// records, and the smallest TTL of the records used.
func addrsOf(m *dns.Msg, name string) ([]netip.Addr, time.Duration) {
	names := map[string]bool{strings.ToLower(name): true}
	ttl := uint32(1<<32 - 1)
	// A chain may come in any order; each pass follows one more link.
	for changed := true; changed; {
		changed = false
		for _, rr := range m.Answer {
			c, ok := rr.(*dns.CNAME)
			if ok && names[strings.ToLower(c.Hdr.Name)] && !names[strings.ToLower(c.Target)] {
				names[strings.ToLower(c.Target)] = true
				ttl = min(ttl, c.Hdr.Ttl)
				changed = true
			}
		}
	}
	var addrs []netip.Addr
	for _, rr := range m.Answer {
		var ip net.IP
		switch v := rr.(type) {
		case *dns.A:
			ip = v.A
		case *dns.AAAA:
			ip = v.AAAA
		default:
			continue
		}
		if !names[strings.ToLower(rr.Header().Name)] {
			continue
		}
		if a, ok := netip.AddrFromSlice(ip); ok {
			addrs = append(addrs, a.Unmap())
			ttl = min(ttl, rr.Header().Ttl)
		}
	}
	return addrs, time.Duration(ttl) * time.Second
}

// lookupHosts returns the addresses a hosts file gives host, or none.
// A file that cannot be read gives none, as with the system resolver.
func lookupHosts(path, host string) []netip.Addr {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	host = strings.TrimSuffix(host, ".")
	var addrs []netip.Addr
	for line := range strings.Lines(string(data)) {
		line, _, _ = strings.Cut(line, "#")
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		a, err := netip.ParseAddr(f[0])
		if err != nil {
			continue
		}
		for _, n := range f[1:] {
			if strings.EqualFold(strings.TrimSuffix(n, "."), host) {
				addrs = append(addrs, a.Unmap())
				break
			}
		}
	}
	return sortAddrs(addrs)
}

// sortAddrs sorts addrs and drops duplicates.
func sortAddrs(addrs []netip.Addr) []netip.Addr {
	slices.SortFunc(addrs, netip.Addr.Compare)
	return slices.Compact(addrs)
}

// HostIsName reports whether the host of a host:port address is a name to
// resolve rather than an IP address.
func HostIsName(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	_, err = netip.ParseAddr(host)
	return err != nil
}

// CheckHostName reports why host cannot be a DNS name, or nil: a name is
// dot-separated labels of 1 to 63 letters, digits, '-' and '_', not
// starting or ending with '-', 253 characters at most (a trailing dot
// aside), and not only digits and dots (a malformed IPv4 address).
func CheckHostName(host string) error {
	name := strings.TrimSuffix(host, ".")
	switch {
	case name == "":
		return errors.New("empty host name")
	case len(name) > 253:
		return fmt.Errorf("host name longer than 253 characters (%d)", len(name))
	case strings.Trim(name, "0123456789.") == "":
		return fmt.Errorf("%q is not an IP address (each of its 4 numbers must be 0-255) and not a host name", host)
	}
	for label := range strings.SplitSeq(name, ".") {
		switch {
		case label == "":
			return fmt.Errorf("host name %q has an empty label (two dots in a row, or a leading dot)", host)
		case len(label) > 63:
			return fmt.Errorf("host name %q has a label longer than 63 characters", host)
		case label[0] == '-' || label[len(label)-1] == '-':
			return fmt.Errorf("host name %q has a label starting or ending with '-'", host)
		}
		for i := 0; i < len(label); i++ {
			ch := label[i]
			if !(ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || ch == '-' || ch == '_') {
				return fmt.Errorf("host name %q has the character %q; a name holds letters, digits, '-', '_' and '.'", host, ch)
			}
		}
	}
	return nil
}
