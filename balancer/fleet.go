package balancer

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"strconv"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/edgelb/edgelb/balancer/fleet"
)

// FleetStatus is the fleet in /status: how this instance takes part in
// the edge its Consul holds together.
type FleetStatus struct {
	// Instance is the instance's stable ID (state_dir/instance_id).
	Instance string `json:"instance"`
	Version  string `json:"version"`
	// Registration is the instance's own registration in Consul; absent
	// without consul.register.
	Registration *fleet.RegisterStatus `json:"registration,omitempty"`
	// Leaving is set once the instance deregistered to stop, while it
	// still serves for drain_delay.
	Leaving *LeavingStatus `json:"leaving,omitempty"`
	// Purge is the purge log as this instance applies it, the last purge
	// applied included; absent with consul.purge.disabled.
	Purge *fleet.PurgeStatus `json:"purge,omitempty"`
	// Config is consul.config_key: where the services and routes come
	// from and why a value was refused; absent without the key.
	Config *ConfigKeyStatus `json:"config,omitempty"`
	// Peers are the other instances registered under the fleet's service
	// name, ready or not; absent without consul.register.
	Peers *fleet.PeersStatus `json:"peers,omitempty"`
	// PeerFill is consul.peer_fill: whether the instance asks and answers
	// its peers for stored copies, and how that went.
	PeerFill *PeerFillStatus `json:"peer_fill,omitempty"`
}

// LeavingStatus says since when an instance leaves the fleet, and when it
// stops accepting connections.
type LeavingStatus struct {
	Since         time.Time `json:"since"`
	StopAccepting time.Time `json:"stop_accepting"`
}

// purgeCatchUpWait bounds how long a starting instance waits for Consul
// to learn the purges its stale store missed before it serves.
const purgeCatchUpWait = 2 * time.Second

// setInstance sets the instance's stable ID, kept in the state_dir of
// cfg, for the life of the process (a reload may add the consul block).
func (s *Server) setInstance(cfg *Config) {
	id, err := fleet.InstanceID(cfg.StateDir, s.Addr())
	if err != nil {
		s.log.Warn("instance ID", "err", err, "instance", id)
	}
	s.instance = id
}

// startPurges starts the purge log of cfg, having applied what it holds
// that the stale store loaded from state_dir missed.
func (s *Server) startPurges(cfg *Config) error {
	if cfg.Consul == nil || cfg.Consul.Purge.Disabled {
		return nil
	}
	client, err := cfg.Consul.NewClient()
	if err != nil {
		return err
	}
	p := fleet.NewPurges(client, cfg.Consul.Address, cfg.Consul.Purge, cfg.StateDir, s.instance, s.applyPurge, s.log)
	p.CatchUp(purgeCatchUpWait)
	p.Start()
	s.purges.Store(p)
	return nil
}

// reloadPurges restarts the purge log when cfg changes where it is.
func (s *Server) reloadPurges(old, cfg *Config) error {
	same := old.StateDir == cfg.StateDir && reflect.DeepEqual(consulWatching(old), consulWatching(cfg)) &&
		(old.Consul == nil) == (cfg.Consul == nil) && (cfg.Consul == nil || old.Consul.Purge == cfg.Consul.Purge)
	if same {
		return nil
	}
	if p := s.purges.Swap(nil); p != nil {
		p.Stop()
	}
	return s.startPurges(cfg)
}

// applyPurge purges the stale store as a record of the purge log says.
func (s *Server) applyPurge(r fleet.Record) {
	if r.URL == "" {
		s.store.PurgeAll()
		return
	}
	if err := s.store.Purge(r.URL); err != nil {
		s.log.Warn("ignoring a purge of the fleet", "key", r.Key, "err", err)
	}
}

// startFleetLocked starts what cfg asks of the fleet: the instance's
// registration in Consul.
func (s *Server) startFleetLocked(cfg *Config) error {
	if cfg.Consul == nil || cfg.Consul.Register == nil {
		return nil
	}
	client, err := cfg.Consul.NewClient()
	if err != nil {
		return err
	}
	reg := s.registration(cfg)
	s.registrar = fleet.NewRegistrar(client, cfg.Consul.Address, reg, s.log)
	s.registrar.Start()
	s.peers = fleet.NewPeers(client, cfg.Consul.Address, reg.Name, reg.ID, s.log)
	s.peers.Start()
	s.setFillLocked(cfg, reg)
	return nil
}

// setFillLocked makes peer fill run as cfg says, registered as reg: with
// the secret of the config, or else the one kept in Consul, followed.
func (s *Server) setFillLocked(cfg *Config, reg fleet.Registration) {
	adv := reg.Meta[fleet.MetaPeerFill]
	s.fill.set(cfg, s.peers, s.instance, adv)
	if w := s.secretWatch; w != nil {
		w.Stop()
		s.secretWatch = nil
	}
	if adv == "" {
		s.fill.setSecret("", "")
		return
	}
	pf := &cfg.Consul.PeerFill
	if pf.Secret != "" {
		s.fill.setSecret(pf.Secret, "config")
	} else if client, err := cfg.Consul.NewClient(); err != nil {
		s.log.Error("peer fill: cannot follow the secret in Consul", "err", err)
	} else {
		from := "consul " + pf.SecretKey
		s.secretWatch = fleet.NewSecret(client, cfg.Consul.Address, pf.SecretKey, func(v string) { s.fill.setSecret(v, from) }, s.log)
		s.secretWatch.Start()
	}
	if ah, _ := splitHostPort(s.AdminAddr()); isLoopback(ah) && !isLoopback(reg.Address) {
		s.log.Warn("peer fill: the admin listener is on loopback, so peers on other hosts cannot ask this instance for stored copies; "+
			"set admin to an address they reach (with admin_token), and consul.peer_fill.address if needed", "admin", s.AdminAddr())
	}
}

// isLoopback reports whether host is a loopback address or localhost.
func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsLoopback()
}

// reloadFleetLocked applies the fleet part of cfg, old being the config it
// replaces. A registration under a new service ID or through another
// Consul replaces the old one, which is deregistered; one that changes in
// place (tags, meta, check timing) is registered again.
func (s *Server) reloadFleetLocked(old, cfg *Config) error {
	var next fleet.Registration
	if cfg.Consul != nil && cfg.Consul.Register != nil {
		next = s.registration(cfg)
	}
	if r := s.registrar; r != nil {
		switch {
		case next.ID == "" || !reflect.DeepEqual(consulWatching(old), consulWatching(cfg)) || next.ID != r.ID():
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if err := r.Leave(ctx); err != nil {
				s.log.Warn("config reload", "err", err)
			}
			cancel()
			s.registrar = nil
			s.peers.Stop()
			s.peers = nil
			s.setFillLocked(cfg, fleet.Registration{})
		case !reflect.DeepEqual(old.Consul.Register, cfg.Consul.Register) || old.AdminToken != cfg.AdminToken ||
			!reflect.DeepEqual(old.Consul.PeerFill, cfg.Consul.PeerFill):
			r.Update(next)
			s.setFillLocked(cfg, next)
			return nil
		default:
			return nil
		}
	}
	return s.startFleetLocked(cfg)
}

// registration returns the Consul registration of the instance for cfg:
// its listeners (after binding, so that port 0 is the port chosen), the
// check on its admin /readyz with the admin token, and its meta.
func (s *Server) registration(cfg *Config) fleet.Registration {
	rc := cfg.Consul.Register
	host, port := splitHostPort(s.Addr())
	advertised := rc.Address
	if advertised == "" && !unspecified(host) {
		advertised = host
	}
	meta := map[string]string{fleet.MetaVersion: fleet.Version(), fleet.MetaInstance: s.instance}
	for k, v := range rc.Meta {
		meta[k] = v
	}
	reg := fleet.Registration{
		ID: rc.ID, Name: rc.Name, Address: advertised, Port: port,
		Tags: rc.Tags, Meta: meta,
		CheckInterval: rc.CheckInterval, CheckTimeout: rc.CheckTimeout, DeregisterAfter: rc.DeregisterAfter,
	}
	if reg.ID == "" {
		reg.ID = rc.Name + "-" + s.instance
	}
	if s.tls != nil {
		th, tp := splitHostPort(s.TLSAddr())
		meta[fleet.MetaHTTPSPort] = strconv.Itoa(tp)
		switch {
		case rc.Address != "":
			th = rc.Address
		case unspecified(th):
			th = advertised
		}
		if th != "" {
			reg.Tagged = map[string]api.ServiceAddress{fleet.TaggedHTTPS: {Address: th, Port: tp}}
		}
	}
	// The check goes to the admin listener from the agent, which runs
	// beside the instance: an unspecified admin host is reached on
	// loopback. An IP address in the URL passes the admin Host check.
	ah, ap := splitHostPort(s.AdminAddr())
	if unspecified(ah) {
		ah = "127.0.0.1"
	}
	reg.CheckURL = "http://" + net.JoinHostPort(ah, strconv.Itoa(ap)) + "/readyz"
	if cfg.Consul.PeerFill.on(true) {
		meta[fleet.MetaPeerFill] = peerFillAddr(&cfg.Consul.PeerFill, s.AdminAddr(), advertised)
	}
	if cfg.AdminToken != "" {
		reg.CheckHeader = map[string][]string{"Authorization": {"Bearer " + cfg.AdminToken}}
	}
	return reg
}

// peerFillAddr returns where peers reach the admin listener at admin for
// peer fill: peer_fill.address, else the admin listener's host, else,
// when it listens on every address, the host advertised for listen. An
// empty host (":port") stands for the address the instance is registered
// at.
func peerFillAddr(pf *PeerFillConfig, admin, advertised string) string {
	ah, ap := splitHostPort(admin)
	host := pf.Address
	switch {
	case host != "":
	case !unspecified(ah):
		host = ah
	default:
		host = advertised
	}
	return net.JoinHostPort(host, strconv.Itoa(ap))
}

// splitHostPort splits a listener address.
func splitHostPort(addr string) (string, int) {
	host, p, _ := net.SplitHostPort(addr)
	port, _ := strconv.Atoi(p)
	return host, port
}

// unspecified reports whether host names no particular address: empty,
// 0.0.0.0 or ::.
func unspecified(host string) bool {
	if host == "" {
		return true
	}
	a, err := netip.ParseAddr(host)
	return err == nil && a.IsUnspecified()
}

// Leave takes the instance out of the fleet before it stops: it
// deregisters it from Consul, so that whatever routes by Consul stops
// sending to it, and keeps serving for consul.register.drain_delay, or
// until ctx ends, while /readyz answers 503. Shutdown then drains as
// usual. Without consul.register it returns at once.
func (s *Server) Leave(ctx context.Context) error {
	s.mu.Lock()
	r := s.registrar
	var delay time.Duration
	if s.cfg.Consul != nil && s.cfg.Consul.Register != nil {
		delay = s.cfg.Consul.Register.Drain()
	}
	s.mu.Unlock()
	if r == nil {
		return nil
	}
	now := time.Now()
	s.leaving.Store(&LeavingStatus{Since: now, StopAccepting: now.Add(delay)})
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err := r.Leave(dctx)
	cancel()
	if err != nil {
		s.log.Error("leaving the fleet", "err", err)
	}
	s.log.Info("deregistered from Consul; serving until the drain delay ends", "drain_delay", delay)
	t := time.NewTimer(time.Until(now.Add(delay)))
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
	return err
}

// stopFleet deregisters the instance if Leave did not, and stops the
// fleet's background work.
func (s *Server) stopFleet() {
	s.mu.Lock()
	r, p, w := s.registrar, s.peers, s.secretWatch
	s.secretWatch = nil
	s.mu.Unlock()
	if p != nil {
		p.Stop()
	}
	if w != nil {
		w.Stop()
	}
	if r != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		if err := r.Leave(ctx); err != nil {
			s.log.Error("leaving the fleet", "err", err)
		}
		cancel()
	}
}

// leavingReason says why /readyz fails while the instance leaves, or "".
func (s *Server) leavingReason(now time.Time) string {
	l := s.leaving.Load()
	if l == nil {
		return ""
	}
	return fmt.Sprintf("leaving: deregistered from Consul at %s; stops accepting in %s",
		l.Since.Format(time.RFC3339Nano), max(l.StopAccepting.Sub(now), 0).Round(time.Millisecond))
}

// fleetStatus returns the fleet part of /status; nil without the consul
// block.
func (s *Server) fleetStatus() *FleetStatus {
	s.mu.Lock()
	r, peers := s.registrar, s.peers
	haveConsul := s.cfg.Consul != nil
	s.mu.Unlock()
	if !haveConsul {
		return nil
	}
	st := &FleetStatus{Instance: s.instance, Version: fleet.Version(), Leaving: s.leaving.Load()}
	if peers != nil {
		ps := peers.Status()
		st.Peers = &ps
	}
	if r != nil {
		rs := r.Status()
		st.Registration = &rs
	}
	if p := s.purges.Load(); p != nil {
		ps := p.Status()
		st.Purge = &ps
	}
	st.Config = s.configKeyStatus()
	st.PeerFill = s.fill.status()
	return st
}

// Peers returns the other instances of the fleet that Consul lists under
// consul.register.name, ready or not, by service ID; nil without
// consul.register. The caller must not change the list.
func (s *Server) Peers() []fleet.Peer {
	s.mu.Lock()
	p := s.peers
	s.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.List()
}
