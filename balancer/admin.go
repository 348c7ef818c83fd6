package balancer

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"strings"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/edgelb/edgelb/discovery"
	"github.com/edgelb/edgelb/health"
)

// adminServer serves the admin API: /metrics, /status, /healthz, /readyz.
type adminServer struct {
	s   *Server
	ln  net.Listener
	srv *http.Server
	mux *http.ServeMux
}

func newAdminServer(s *Server) *adminServer {
	a := &adminServer{s: s, mux: http.NewServeMux()}
	a.mux.HandleFunc("GET /metrics", a.metrics)
	a.mux.HandleFunc("GET /status", a.status)
	a.mux.HandleFunc("GET /healthz", a.healthz)
	a.mux.HandleFunc("GET /readyz", a.readyz)
	a.mux.HandleFunc("POST /cache/purge", a.purge)
	a.mux.HandleFunc("/debug/pprof/", pprof.Index)
	a.mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	a.mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	a.srv = &http.Server{Handler: a.mux, ReadHeaderTimeout: 5 * time.Second}
	return a
}

func (a *adminServer) start(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	a.ln = ln
	a.s.goSafe("admin", func() {
		if err := a.srv.Serve(ln); err != nil && err != http.ErrServerClosed {
			a.s.log.Error("admin server stopped", "err", err)
		}
	})
	return nil
}

func (a *adminServer) addr() string { return a.ln.Addr().String() }

func (a *adminServer) close() { a.srv.Close() }

func (a *adminServer) metrics(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	metrics.WritePrometheus(w, true)
}

func (a *adminServer) healthz(w http.ResponseWriter, _ *http.Request) {
	w.Write([]byte("ok\n"))
}

func (a *adminServer) readyz(w http.ResponseWriter, _ *http.Request) {
	if ok, why := a.s.Ready(); !ok {
		http.Error(w, "not ready: "+why, http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintln(w, "ready")
	now := time.Now()
	for _, st := range a.s.DiscoveryStatus() {
		fmt.Fprintf(w, "%s %s: %s\n", st.Source, st.Service, describeFreshness(st, now))
	}
}

// describeFreshness words a discovery status for /readyz.
func describeFreshness(st discovery.Status, now time.Time) string {
	var b strings.Builder
	switch {
	case st.FromDisk:
		b.WriteString("stale, loaded from state_dir")
	case st.Stale:
		b.WriteString("stale")
	default:
		b.WriteString("fresh")
	}
	if !st.LastUpdate.IsZero() {
		fmt.Fprintf(&b, ", last update %s ago", now.Sub(st.LastUpdate).Round(time.Millisecond))
	}
	if st.LastError != "" {
		fmt.Fprintf(&b, ", last error %s ago: %s", now.Sub(st.LastErrorAt).Round(time.Millisecond), st.LastError)
	}
	return b.String()
}

func (a *adminServer) purge(w http.ResponseWriter, r *http.Request) {
	u := r.URL.Query().Get("url")
	if u == "" {
		a.s.store.PurgeAll()
		a.s.log.Info("stale store purged")
		fmt.Fprintln(w, "purged all")
		return
	}
	if err := a.s.store.Purge(u); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	a.s.log.Info("stale store purged", "url", u)
	fmt.Fprintln(w, "purged", u)
}

func (a *adminServer) status(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(a.s.Status())
}

// Ready reports whether routes are loaded and the server accepts requests,
// and if not, why. Accepting connections failed for want of file
// descriptors or memory within the last few seconds is not ready.
func (s *Server) Ready() (bool, string) {
	if !s.ready.Load() {
		return false, "starting or shutting down"
	}
	if why := s.acceptTrouble.describe(time.Now()); why != "" {
		return false, why
	}
	rt := s.routes.Load()
	if len(rt.any) == 0 && len(rt.byHost) == 0 {
		return false, "no routes loaded"
	}
	return true, ""
}

// Status is the JSON document of GET /status.
type Status struct {
	Ready     bool                      `json:"ready"`
	Services  map[string]*ServiceStatus `json:"services"`
	Routes    []RouteStatus             `json:"routes"`
	Conflicts []string                  `json:"conflicts,omitempty"`
	Discovery []discovery.Status        `json:"discovery,omitempty"`
}

// ServiceStatus is one service in /status.
type ServiceStatus struct {
	Source    string          `json:"source"`
	UpdatedAt time.Time       `json:"updated_at,omitzero"`
	Backends  []BackendStatus `json:"backends"`
	Available int             `json:"available"`
	// Panic is set while too few backends are available and every one
	// that is not draining or failing to answer gets traffic.
	Panic      bool      `json:"panic"`
	PanicSince time.Time `json:"panic_since,omitzero"`
}

// BackendStatus is one backend in /status.
type BackendStatus struct {
	health.TargetStatus
	Weight uint32 `json:"weight"`
	// SlowStart is the share of its traffic, in percent, that slow start
	// gives a returning backend; absent when it is not held back.
	SlowStart int `json:"slow_start_percent,omitempty"`
}

// RouteStatus is one route in /status.
type RouteStatus struct {
	Host    string `json:"host"`
	Path    string `json:"path"`
	Service string `json:"service"`
}

// Status returns what GET /status shows.
func (s *Server) Status() *Status {
	now := time.Now()
	st := &Status{Services: make(map[string]*ServiceStatus)}
	st.Ready, _ = s.Ready()
	for _, p := range s.poolsSorted() {
		ss := &ServiceStatus{Backends: []BackendStatus{}}
		if set := p.source.Load(); set != nil {
			ss.Source = set.Source
			ss.UpdatedAt = set.UpdatedAt
		}
		ss.Panic, ss.PanicSince = p.ej.Panic(), p.ej.PanicSince()
		for _, b := range p.set.Load().list {
			bs := BackendStatus{TargetStatus: b.target.Status(now), Weight: b.weight}
			if bs.State == health.StateHealthy.String() {
				ss.Available++
				if pct := p.slowStartPercent(b, now.UnixNano()); pct < 100 {
					bs.SlowStart = pct
				}
			}
			ss.Backends = append(ss.Backends, bs)
		}
		p.mu.Lock()
		for _, d := range p.draining {
			bs := BackendStatus{TargetStatus: d.b.target.Status(now), Weight: d.b.weight}
			bs.State = health.StateDraining.String()
			bs.Reason = "removed from discovery; finishing in-flight requests"
			bs.Since = d.since
			ss.Backends = append(ss.Backends, bs)
		}
		p.mu.Unlock()
		st.Services[p.name] = ss
	}
	rt := s.routes.Load()
	for _, r := range rt.any {
		st.Routes = append(st.Routes, RouteStatus{Host: r.host, Path: r.path, Service: r.service})
	}
	for _, h := range sortedNames(rt.byHost) {
		for _, r := range rt.byHost[h] {
			if r.host != "*" {
				st.Routes = append(st.Routes, RouteStatus{Host: r.host, Path: r.path, Service: r.service})
			}
		}
	}
	s.mu.Lock()
	st.Conflicts = append([]string(nil), s.conflicts...)
	s.mu.Unlock()
	st.Discovery = s.DiscoveryStatus()
	return st
}
