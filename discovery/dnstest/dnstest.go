// Package dnstest runs a small programmable DNS server on a loopback port,
// over UDP and TCP, for tests and load scenarios. It answers A and AAAA
// questions from records set with Set, and can be told to fail a name
// (NXDOMAIN, SERVFAIL), to stop answering, or to stop and start again on
// the same port.
//
// Its methods are safe for concurrent use.
package dnstest

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// Server is a running DNS server.
type Server struct {
	addr string

	mu      sync.Mutex
	records map[string]*entry // by lower-case FQDN
	queries map[string]int    // by lower-case FQDN
	silent  bool
	udp     *dns.Server
	tcp     *dns.Server
}

// entry is what the server answers for one name.
type entry struct {
	ttl   uint32
	addrs []netip.Addr
	// cname, when set, is answered instead of the addresses, with the
	// target's records after it.
	cname string
	// truncate answers over UDP with the TC bit and no records, so that the
	// client asks again over TCP.
	truncate bool
	rcode    int
}

// Start starts a server on a free loopback port.
func Start() (*Server, error) {
	s := &Server{records: make(map[string]*entry), queries: make(map[string]int)}
	for range 20 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		// The TCP side takes the same port; another process may hold it.
		ln, err := net.Listen("tcp", pc.LocalAddr().String())
		if err != nil {
			pc.Close()
			continue
		}
		s.addr = pc.LocalAddr().String()
		if err := s.serve(pc, ln); err != nil {
			return nil, err
		}
		return s, nil
	}
	return nil, fmt.Errorf("dnstest: no loopback port free for both UDP and TCP")
}

// Addr returns the server's host:port.
func (s *Server) Addr() string { return s.addr }

func (s *Server) serve(pc net.PacketConn, ln net.Listener) error {
	udp := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(s.handle)}
	tcp := &dns.Server{Listener: ln, Handler: dns.HandlerFunc(s.handle)}
	started := make(chan struct{}, 2)
	udp.NotifyStartedFunc = func() { started <- struct{}{} }
	tcp.NotifyStartedFunc = func() { started <- struct{}{} }
	go udp.ActivateAndServe()
	go tcp.ActivateAndServe()
	for range 2 {
		select {
		case <-started:
		case <-time.After(10 * time.Second):
			return fmt.Errorf("dnstest: server on %s did not start", s.addr)
		}
	}
	s.mu.Lock()
	s.udp, s.tcp = udp, tcp
	s.mu.Unlock()
	return nil
}

// Stop stops the server: queries to its port are refused from then on.
func (s *Server) Stop() {
	s.mu.Lock()
	udp, tcp := s.udp, s.tcp
	s.udp, s.tcp = nil, nil
	s.mu.Unlock()
	if udp != nil {
		udp.Shutdown()
		tcp.Shutdown()
	}
}

// Restart starts a stopped server again on its port.
func (s *Server) Restart() error {
	pc, err := net.ListenPacket("udp", s.addr)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", s.addr)
	if err != nil {
		pc.Close()
		return err
	}
	return s.serve(pc, ln)
}

// Set makes the server answer name with addrs (IPv4 as A, IPv6 as AAAA
// records) and the given TTL; no addrs answers NOERROR with no records.
func (s *Server) Set(name string, ttl uint32, addrs ...string) {
	e := &entry{ttl: ttl}
	for _, a := range addrs {
		e.addrs = append(e.addrs, netip.MustParseAddr(a))
	}
	s.put(name, e)
}

// SetCNAME makes name an alias of target.
func (s *Server) SetCNAME(name string, ttl uint32, target string) {
	s.put(name, &entry{ttl: ttl, cname: dns.Fqdn(strings.ToLower(target))})
}

// SetTruncated makes the server answer name over UDP with the TC bit set
// and no records, and over TCP with addrs.
func (s *Server) SetTruncated(name string, ttl uint32, addrs ...string) {
	s.Set(name, ttl, addrs...)
	s.mu.Lock()
	s.records[key(name)].truncate = true
	s.mu.Unlock()
}

// Fail makes the server answer name with rcode, such as dns.RcodeNameError
// (NXDOMAIN) or dns.RcodeServerFailure.
func (s *Server) Fail(name string, rcode int) { s.put(name, &entry{rcode: rcode}) }

// Silence makes the server read queries and answer none of them (on),
// so that clients time out, or answer again (off).
func (s *Server) Silence(on bool) {
	s.mu.Lock()
	s.silent = on
	s.mu.Unlock()
}

// Queries returns how many questions for name the server got.
func (s *Server) Queries(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.queries[key(name)]
}

func (s *Server) put(name string, e *entry) {
	s.mu.Lock()
	s.records[key(name)] = e
	s.mu.Unlock()
}

func key(name string) string { return dns.Fqdn(strings.ToLower(name)) }

func (s *Server) handle(w dns.ResponseWriter, req *dns.Msg) {
	if len(req.Question) != 1 {
		m := new(dns.Msg)
		w.WriteMsg(m.SetRcodeFormatError(req))
		return
	}
	q := req.Question[0]
	name := key(q.Name)
	_, overTCP := w.RemoteAddr().(*net.TCPAddr)
	s.mu.Lock()
	s.queries[name]++
	silent := s.silent
	m := new(dns.Msg)
	m.SetReply(req)
	m.RecursionAvailable = true
	s.answerLocked(m, name, q.Qtype, overTCP, 0)
	s.mu.Unlock()
	if silent {
		return
	}
	w.WriteMsg(m)
}

// answerLocked fills m with the answer for name, following aliases.
func (s *Server) answerLocked(m *dns.Msg, name string, qtype uint16, overTCP bool, depth int) {
	e := s.records[name]
	switch {
	case e == nil || depth > 8:
		m.Rcode = dns.RcodeNameError
		return
	case e.rcode != 0:
		m.Rcode = e.rcode
		return
	case e.truncate && !overTCP:
		m.Truncated = true
		return
	case e.cname != "":
		m.Answer = append(m.Answer, &dns.CNAME{Hdr: hdr(name, dns.TypeCNAME, e.ttl), Target: e.cname})
		s.answerLocked(m, e.cname, qtype, overTCP, depth+1)
		return
	}
	for _, a := range e.addrs {
		switch {
		case a.Is4() && qtype == dns.TypeA:
			m.Answer = append(m.Answer, &dns.A{Hdr: hdr(name, dns.TypeA, e.ttl), A: a.AsSlice()})
		case a.Is6() && qtype == dns.TypeAAAA:
			m.Answer = append(m.Answer, &dns.AAAA{Hdr: hdr(name, dns.TypeAAAA, e.ttl), AAAA: a.AsSlice()})
		}
	}
}

func hdr(name string, t uint16, ttl uint32) dns.RR_Header {
	return dns.RR_Header{Name: name, Rrtype: t, Class: dns.ClassINET, Ttl: ttl}
}
