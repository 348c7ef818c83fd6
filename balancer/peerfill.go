package balancer

// Peer fill: an instance that would answer with a stored copy but has
// none asks the other instances of its fleet for theirs, stores the first
// one it gets and serves it.
//
// Peers answer on their admin listener, never on the client-facing one:
// the stored copies of every host are internal data, the admin port is
// the one operators keep off the internet, and the client listener keeps
// all its paths for routing with no new case on its hot path. An instance
// advertises where peers reach it in its Consul registration (meta
// peer_fill). A peer answers from its own stale store only: never from a
// backend, and never by asking its own peers, so a fill is one hop.
//
// The fill is made on the fasthttp path. The event loop serves thousands
// of connections on one thread and must not wait on the network, so when
// its store has no copy and a fill may find one, it hands the connection
// over with the request's attempt marked settled (no try left): the
// fasthttp path goes straight to the answer, fills there and counts
// nothing twice. That connection then stays with the fasthttp server, as
// every hand-over does; it happens only while origins fail and the local
// store misses.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/fleet"
	"github.com/edgelb/edgelb/balancer/stale"
	"github.com/edgelb/edgelb/internal/panics"
)

const (
	// peerCopyPath is the admin API endpoint that answers peers with a
	// stored copy.
	peerCopyPath = "/fleet/stale-copy"

	// HeaderPeerFill marks a request one instance sends another for a
	// stored copy; its value is the asking instance's ID. A request that
	// carries it never makes an instance ask its own peers.
	HeaderPeerFill = "Edgelb-Peer-Fill"

	// headerPeerElapsed, on a copy, is how long ago the peer stored it,
	// in nanoseconds.
	headerPeerElapsed = "Edgelb-Peer-Elapsed"

	// peerCopyType is the media type of a copy: an entry in the stale
	// store's own format.
	peerCopyType = "application/vnd.edgelb.stale-entry"

	// maxPeerHead bounds the request head a peer sends.
	maxPeerHead = 64 << 10
)

// fillResult is how one fill ended.
type fillResult uint8

const (
	fillHit     fillResult = iota // a peer's copy was stored and served
	fillMiss                      // every peer asked answered that it has none
	fillTimeout                   // the timeout came before any copy
	fillError                     // a peer could not be asked, or sent what could not be stored
	fillRefused                   // a peer refused the request (wrong secret, or peer fill off there)
	numFillResults
)

var fillResultNames = [numFillResults]string{"hit", "miss", "timeout", "error", "refused"}

// worse returns the result a fill with no copy reports of a and b: the
// one that most needs looking into.
func worse(a, b fillResult) fillResult { return max(a, b) }

// What an instance answered its peers.
const (
	copyHit = iota
	copyMiss
	copyRefused
	numCopyResults
)

var copyResultNames = [numCopyResults]string{"hit", "miss", "refused"}

// Peer fill metrics, process-wide.
var (
	peerFillsTotal = func() (c [numFillResults]*metrics.Counter) {
		for i, n := range fillResultNames {
			c[i] = metrics.NewCounter(`edgelb_peer_fills_total{result="` + n + `"}`)
		}
		return c
	}()
	peerCopiesTotal = func() (c [numCopyResults]*metrics.Counter) {
		for i, n := range copyResultNames {
			c[i] = metrics.NewCounter(`edgelb_peer_fill_requests_total{result="` + n + `"}`)
		}
		return c
	}()
)

// peerFill asks peers for stored copies and answers theirs. It lives as
// long as its Server; the state it runs on is swapped as the config and
// the fleet change. Methods are safe for concurrent use.
type peerFill struct {
	store  *stale.Store
	log    *slog.Logger
	state  atomic.Pointer[fillState]
	secret atomic.Pointer[fillSecret]
	client *http.Client

	// This instance's counts, for /status.
	fills  [numFillResults]atomic.Uint64
	copies [numCopyResults]atomic.Uint64
}

// fillState is what peer fill runs on: nil when it is off.
type fillState struct {
	cfg   PeerFillConfig
	peers *fleet.Peers
	// instance is this instance's ID, sent as HeaderPeerFill;
	// advertised is where it answers peers.
	instance   string
	advertised string
}

// fillSecret is the fleet's secret: auth is the Authorization header of
// requests to peers, hash the SHA-256 of the secret, which their requests
// are compared with in constant time; from says where it comes from.
type fillSecret struct {
	auth string
	hash [sha256.Size]byte
	from string
}

// setSecret makes v, from where from says, the fleet's secret; an empty v
// leaves none, and peer fill waits for one.
func (f *peerFill) setSecret(v, from string) {
	if v == "" {
		f.secret.Store(nil)
		return
	}
	f.secret.Store(&fillSecret{auth: "Bearer " + v, hash: sha256.Sum256([]byte(v)), from: from})
}

func newPeerFill(store *stale.Store, log *slog.Logger) *peerFill {
	return &peerFill{store: store, log: log, client: &http.Client{Transport: &http.Transport{
		// Peers are reached directly, never through HTTP_PROXY.
		Proxy:               nil,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     30 * time.Second,
		DisableCompression:  true,
	}}}
}

// set makes peer fill run as cfg says, with peers, or turns it off when
// cfg has it off or peers is nil.
func (f *peerFill) set(cfg *Config, peers *fleet.Peers, instance, advertised string) {
	if cfg.Consul == nil || peers == nil || !cfg.Consul.PeerFill.on(cfg.Consul.Register != nil) {
		f.state.Store(nil)
		return
	}
	pf := cfg.Consul.PeerFill
	f.state.Store(&fillState{cfg: pf, peers: peers, instance: instance, advertised: advertised})
}

// wanted reports whether a fill may find a copy: peer fill is on and a
// ready peer answers peers. The event loop asks it before handing a
// request over for a fill.
func (f *peerFill) wanted() bool {
	st := f.state.Load()
	if st == nil || f.secret.Load() == nil {
		return false
	}
	for _, p := range st.peers.List() {
		if p.Ready && p.PeerFill != "" {
			return true
		}
	}
	return false
}

// pick returns the peers a fill asks: up to max_peers of the ready ones
// that answer peers, from a random one on, so that fills spread.
func (st *fillState) pick() []string {
	list := st.peers.List()
	if len(list) == 0 {
		return nil
	}
	var addrs []string
	start := rand.IntN(len(list))
	for i := range list {
		p := &list[(start+i)%len(list)]
		if p.Ready && p.PeerFill != "" {
			addrs = append(addrs, p.PeerFill)
			if len(addrs) == st.cfg.MaxPeers {
				break
			}
		}
	}
	return addrs
}

// peerAnswer is what one peer answered.
type peerAnswer struct {
	result  fillResult
	val     []byte
	elapsed time.Duration
	why     string
}

// fill asks peers, in parallel and within the timeout, for their stored
// copy of the answer to req and stores the first one; it reports whether
// it stored one. scheme is the client's. A request that a peer sent (it
// carries HeaderPeerFill) is never filled: a fill is one hop.
func (f *peerFill) fill(scheme []byte, req *fasthttp.Request) bool {
	st, sec := f.state.Load(), f.secret.Load()
	if st == nil || sec == nil || len(req.Header.Peek(HeaderPeerFill)) > 0 {
		return false
	}
	addrs := st.pick()
	if len(addrs) == 0 {
		return false
	}
	head := append([]byte(nil), req.Header.Header()...)
	ctx, cancel := context.WithTimeout(context.Background(), st.cfg.Timeout)
	defer cancel()
	answers := make(chan peerAnswer, len(addrs))
	sch := string(scheme)
	for _, addr := range addrs {
		go func() {
			a := peerAnswer{result: fillError, why: "panic"}
			defer func() { answers <- a }()
			panics.Balancer.Run(func() { a = f.ask(ctx, st, sec, addr, sch, head) }, f.log, "panic asking a peer for a stored copy", "peer", addr)
		}()
	}
	result := fillMiss
	for range addrs {
		a := <-answers
		if a.result == fillHit {
			err := f.store.Import(time.Now(), scheme, req, a.val, a.elapsed)
			if err == nil {
				f.count(fillHit)
				return true
			}
			a.result, a.why = fillError, err.Error()
		}
		if a.result == fillRefused || a.result == fillError {
			f.log.Warn("peer fill", "result", fillResultNames[a.result], "why", a.why, "uri", string(req.Header.RequestURI()))
		}
		result = worse(result, a.result)
	}
	f.count(result)
	return false
}

func (f *peerFill) count(r fillResult) {
	peerFillsTotal[r].Inc()
	f.fills[r].Add(1)
}

// ask asks the peer at addr for its stored copy of the answer to the
// request whose head is head.
func (f *peerFill) ask(ctx context.Context, st *fillState, sec *fillSecret, addr, scheme string, head []byte) peerAnswer {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+peerCopyPath+"?scheme="+scheme, bytes.NewReader(head))
	if err != nil {
		return peerAnswer{result: fillError, why: err.Error()}
	}
	req.Header.Set("Authorization", sec.auth)
	req.Header.Set(HeaderPeerFill, st.instance)
	req.Header.Set("Content-Type", "message/http")
	resp, err := f.client.Do(req)
	if err != nil {
		return f.failed(ctx, addr, err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound:
		io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
		return peerAnswer{result: fillMiss}
	case http.StatusUnauthorized, http.StatusForbidden:
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return peerAnswer{result: fillRefused, why: addr + ": " + resp.Status + ": " + string(bytes.TrimSpace(msg))}
	default:
		return peerAnswer{result: fillError, why: addr + ": " + resp.Status}
	}
	elapsed, err := strconv.ParseInt(resp.Header.Get(headerPeerElapsed), 10, 64)
	if err != nil || elapsed < 0 || resp.Header.Get("Content-Type") != peerCopyType {
		return peerAnswer{result: fillError, why: addr + ": not a stored copy (Content-Type " + resp.Header.Get("Content-Type") + ")"}
	}
	limit := f.store.MaxCopyBytes()
	val, err := io.ReadAll(io.LimitReader(resp.Body, int64(limit)+1))
	switch {
	case err != nil:
		return f.failed(ctx, addr, err)
	case len(val) > limit:
		return peerAnswer{result: fillError, why: addr + ": copy over " + strconv.Itoa(limit) + " bytes"}
	}
	return peerAnswer{result: fillHit, val: val, elapsed: time.Duration(elapsed)}
}

// failed words a request to a peer that got no answer.
func (f *peerFill) failed(ctx context.Context, addr string, err error) peerAnswer {
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return peerAnswer{result: fillTimeout}
	case ctx.Err() != nil:
		// Cancelled: another peer's copy was stored.
		return peerAnswer{result: fillMiss}
	}
	return peerAnswer{result: fillError, why: addr + ": " + err.Error()}
}

// peerCopy answers a peer's request for a stored copy, from the stale
// store only. Its checks are its own: a peer's address may be a name the
// admin Host check does not know, and the secret, not the admin token,
// says it is a peer. A browser cannot send the secret, so DNS rebinding
// gains nothing here.
func (a *adminServer) peerCopy(w http.ResponseWriter, r *http.Request) {
	f := a.s.fill
	st := f.state.Load()
	refuse := func(code int, why string) {
		peerCopiesTotal[copyRefused].Inc()
		f.copies[copyRefused].Add(1)
		a.s.log.Warn("peer request refused", "remote", r.RemoteAddr, "peer", r.Header.Get(HeaderPeerFill), "status", code, "why", why)
		http.Error(w, "edgelb peer fill: "+why, code)
	}
	sec := f.secret.Load()
	switch {
	case st == nil:
		refuse(http.StatusForbidden, "peer fill is off on this instance")
		return
	case sec == nil:
		refuse(http.StatusForbidden, "this instance has no peer fill secret yet (from Consul)")
		return
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "edgelb peer fill: POST the request head", http.StatusMethodNotAllowed)
		return
	}
	token, ok := bearerToken(r)
	if !ok {
		w.Header().Set("WWW-Authenticate", `Bearer realm="edgelb peer fill"`)
		refuse(http.StatusUnauthorized, "missing secret: send Authorization: Bearer <consul.peer_fill secret>")
		return
	}
	if h := sha256.Sum256([]byte(token)); subtle.ConstantTimeCompare(h[:], sec.hash[:]) != 1 {
		w.Header().Set("WWW-Authenticate", `Bearer realm="edgelb peer fill", error="invalid_token"`)
		refuse(http.StatusUnauthorized, "wrong secret")
		return
	}
	if r.Header.Get(HeaderPeerFill) == "" {
		http.Error(w, "edgelb peer fill: not a peer request (no "+HeaderPeerFill+" header)", http.StatusBadRequest)
		return
	}
	scheme := r.URL.Query().Get("scheme")
	if scheme != "http" && scheme != "https" {
		http.Error(w, "edgelb peer fill: scheme must be http or https", http.StatusBadRequest)
		return
	}
	head, err := io.ReadAll(io.LimitReader(r.Body, maxPeerHead+1))
	if err != nil || len(head) > maxPeerHead {
		http.Error(w, "edgelb peer fill: request head unreadable or over 64 KiB", http.StatusBadRequest)
		return
	}
	req := fasthttp.AcquireRequest()
	defer fasthttp.ReleaseRequest(req)
	req.Header.DisableNormalizing()
	if err := req.Header.Read(bufio.NewReader(bytes.NewReader(head))); err != nil {
		http.Error(w, "edgelb peer fill: request head: "+err.Error(), http.StatusBadRequest)
		return
	}
	val, elapsed, ok := a.s.store.Copy(nil, time.Now(), []byte(scheme), req)
	if !ok {
		peerCopiesTotal[copyMiss].Inc()
		f.copies[copyMiss].Add(1)
		http.Error(w, "edgelb peer fill: no stored copy", http.StatusNotFound)
		return
	}
	peerCopiesTotal[copyHit].Inc()
	f.copies[copyHit].Add(1)
	w.Header().Set("Content-Type", peerCopyType)
	w.Header().Set(headerPeerElapsed, strconv.FormatInt(int64(elapsed), 10))
	w.Header().Set("Cache-Control", "no-store")
	w.Write(val)
}

// PeerFillStatus is consul.peer_fill in /status.
type PeerFillStatus struct {
	// Enabled is set while the instance asks and answers its peers.
	Enabled bool `json:"enabled"`
	// Advertised is where it answers them (its admin listener).
	Advertised string `json:"advertised,omitempty"`
	// Secret says where the fleet's secret comes from: "config", or
	// "consul KEY"; empty while the one kept in Consul is not known yet.
	Secret string `json:"secret,omitempty"`
	// Fills counts this instance's fills by result; Requests the
	// requests of peers it answered, by result.
	Fills    map[string]uint64 `json:"fills"`
	Requests map[string]uint64 `json:"requests"`
}

func (f *peerFill) status() *PeerFillStatus {
	st := &PeerFillStatus{Fills: map[string]uint64{}, Requests: map[string]uint64{}}
	if s := f.state.Load(); s != nil {
		st.Enabled, st.Advertised = true, s.advertised
		if sec := f.secret.Load(); sec != nil {
			st.Secret = sec.from
		}
	}
	for i, n := range fillResultNames {
		st.Fills[n] = f.fills[i].Load()
	}
	for i, n := range copyResultNames {
		st.Requests[n] = f.copies[i].Load()
	}
	return st
}

// peerDetail holds, for each Cache-Status detail of a stored copy, the
// one of a copy a peer gave: "peer/" and the cause.
var peerDetail = func() map[string][]byte {
	m := make(map[string][]byte)
	for _, v := range errCodeValues {
		m[string(v)] = []byte("peer/" + string(v))
	}
	for _, v := range upstreamStatusDetail {
		m[string(v)] = []byte("peer/" + string(v))
	}
	return m
}()

// fromPeer returns the Cache-Status detail of a copy a peer gave, for a
// stored copy's detail.
func fromPeer(detail []byte) []byte {
	if d, ok := peerDetail[string(detail)]; ok {
		return d
	}
	return []byte("peer")
}
