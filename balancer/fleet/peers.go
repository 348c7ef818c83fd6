package fleet

import (
	"context"
	"log/slog"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/hashicorp/consul/api"
)

// Peer is another instance of the fleet, as Consul's health API lists it.
type Peer struct {
	// ID is its Consul service ID, Instance its stable instance ID.
	ID       string `json:"id"`
	Instance string `json:"instance,omitempty"`
	Node     string `json:"node"`
	// Addr is its client-facing address (listen); HTTPS its TLS
	// listener's, if it has one.
	Addr  string `json:"addr"`
	HTTPS string `json:"https,omitempty"`
	// PeerFill is where it answers requests for stored copies (its
	// admin listener); empty when it does not.
	PeerFill string `json:"peer_fill,omitempty"`
	Version  string `json:"version,omitempty"`
	// Status is the worst of its checks (passing, warning, critical) and
	// of its node's; Ready is set when it is passing. Why says, for a peer
	// that is not, what its failing checks said.
	Status string `json:"status"`
	Ready  bool   `json:"ready"`
	Why    string `json:"why,omitempty"`
}

// PeersStatus is the peer list in /status.
type PeersStatus struct {
	Service string `json:"service"`
	// Peers are the other instances registered under Service, ready or
	// not, by ID.
	Peers       []Peer    `json:"peers"`
	Ready       int       `json:"ready"`
	UpdatedAt   time.Time `json:"updated_at,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
}

// Peer list metrics: the peers of every Peers of the process, by
// readiness.
var (
	peerSets         sync.Map // *Peers -> struct{}
	_                = metrics.NewGauge(`edgelb_fleet_peers{state="ready"}`, func() float64 { return countPeers(true) })
	_                = metrics.NewGauge(`edgelb_fleet_peers{state="not_ready"}`, func() float64 { return countPeers(false) })
	peersWatchErrors = metrics.NewCounter(`edgelb_fleet_peers_watch_errors_total`)
)

func countPeers(ready bool) float64 {
	n := 0
	peerSets.Range(func(k, _ any) bool {
		for _, p := range k.(*Peers).List() {
			if p.Ready == ready {
				n++
			}
		}
		return true
	})
	return float64(n)
}

// Peers follows the other instances of the fleet in Consul's health API,
// ready or not.
//
// Methods are safe for concurrent use.
type Peers struct {
	client *api.Client
	addr   string
	name   string // the fleet's service name
	self   string // this instance's service ID
	log    *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	mu sync.Mutex
	st PeersStatus
}

// NewPeers returns the peer list of the instance self of service name,
// through client (Consul at addr). Start starts it.
func NewPeers(client *api.Client, addr, name, self string, log *slog.Logger) *Peers {
	if log == nil {
		log = slog.Default()
	}
	p := &Peers{client: client, addr: addr, name: name, self: self, log: log.With("component", "fleet", "peers_of", name),
		done: make(chan struct{}), st: PeersStatus{Service: name, Peers: []Peer{}}}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	return p
}

// Start follows the peers in the background.
func (p *Peers) Start() {
	peerSets.Store(p, struct{}{})
	go func() {
		defer close(p.done)
		runAgain(p.ctx, p.log, "panic in the peer list; starting it again", "peers", p.run)
	}()
}

func (p *Peers) run() {
	follow(p.ctx, func(q *api.QueryOptions) (uint64, error) {
		entries, meta, err := p.client.Health().Service(p.name, "", false, q)
		if err != nil {
			return 0, err
		}
		p.set(entries)
		return meta.LastIndex, nil
	}, func(err error, failures int) {
		peersWatchErrors.Inc()
		msg := describe(p.addr, err)
		p.mu.Lock()
		p.st.LastError, p.st.LastErrorAt = msg, time.Now()
		p.mu.Unlock()
		if failures == 1 || failures%30 == 0 {
			p.log.Warn("peer list watch failing; keeping the last list", "err", msg, "failures", failures)
		}
	})
}

// set replaces the list with the instances of an answer, less this one.
func (p *Peers) set(entries []*api.ServiceEntry) {
	peers := make([]Peer, 0, len(entries))
	ready := 0
	for _, e := range entries {
		if e.Service == nil || e.Service.ID == p.self {
			continue
		}
		host := e.Service.Address
		if host == "" && e.Node != nil {
			host = e.Node.Address
		}
		pr := Peer{ID: e.Service.ID, Instance: e.Service.Meta[MetaInstance], Version: e.Service.Meta[MetaVersion],
			Addr: net.JoinHostPort(host, strconv.Itoa(e.Service.Port)), Status: e.Checks.AggregatedStatus()}
		if e.Node != nil {
			pr.Node = e.Node.Node
		}
		if h, ok := e.Service.TaggedAddresses[TaggedHTTPS]; ok && h.Port > 0 {
			pr.HTTPS = net.JoinHostPort(h.Address, strconv.Itoa(h.Port))
		} else if port := e.Service.Meta[MetaHTTPSPort]; port != "" {
			pr.HTTPS = net.JoinHostPort(host, port)
		}
		if pf := e.Service.Meta[MetaPeerFill]; pf != "" {
			if h, port, err := net.SplitHostPort(pf); err == nil && port != "" {
				if h == "" {
					h = host
				}
				pr.PeerFill = net.JoinHostPort(h, port)
			}
		}
		pr.Ready = pr.Status == api.HealthPassing
		if pr.Ready {
			ready++
		} else {
			var why []string
			for _, c := range e.Checks {
				if c.Status != api.HealthPassing {
					out := strings.TrimSpace(c.Output)
					if len(out) > 200 {
						out = out[:200] + "..."
					}
					why = append(why, c.Name+": "+c.Status+" "+out)
				}
			}
			pr.Why = strings.Join(why, "; ")
		}
		peers = append(peers, pr)
	}
	sort.Slice(peers, func(i, j int) bool { return peers[i].ID < peers[j].ID })
	p.mu.Lock()
	p.st.Peers, p.st.Ready, p.st.UpdatedAt = peers, ready, time.Now()
	p.st.LastError = ""
	p.mu.Unlock()
}

// List returns the peers, by ID; the caller must not change it.
func (p *Peers) List() []Peer {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.st.Peers
}

// Status returns the peer list for /status.
func (p *Peers) Status() PeersStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.st
}

// Stop ends the watch.
func (p *Peers) Stop() {
	peerSets.Delete(p)
	p.cancel()
	<-p.done
}
