package balancer

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/h1"
)

// Upgrades (RFC 9110 section 7.8): a request with Connection: upgrade and
// an Upgrade header goes upstream with both, on a backend connection of its
// own, through the tries, retries and accounting of any request
// (Pool.serve). When a backend answers 101 Switching Protocols to a
// protocol the client offered, the client gets the 101 and the two
// connections are relayed byte for byte (tunnel.go); any other answer goes
// to the client like any response.

var (
	strUpgrade       = []byte("Upgrade")
	strUpgradeValue  = []byte("Upgrade")
	strH2C           = []byte("h2c")
	strHTTP2Settings = "HTTP2-Settings"
	strWebSocket     = []byte("websocket")
)

// errUpgradeMismatch is a 101 switching to a protocol the client did not
// offer: the backend broke the exchange.
var errUpgradeMismatch = errors.New("edgelb: backend switched to a protocol the client did not ask for")

// Results of upgrade requests, counted in edgelb_tunnels_total{result}.
const (
	// upgradeOpened: a backend switched protocols; a tunnel opened.
	upgradeOpened = iota
	// upgradeDeclined: a backend answered something else, which the
	// client got.
	upgradeDeclined
	// upgradeFailed: no backend answered; the client got edgelb's error.
	upgradeFailed
	// upgradeOverloaded: websocket.max_tunnels were open (or edgelb was
	// shutting down); the client got 503 overloaded.
	upgradeOverloaded

	numUpgradeResults
)

var upgradeResultNames = [numUpgradeResults]string{
	upgradeOpened:     "opened",
	upgradeDeclined:   "declined",
	upgradeFailed:     "failed",
	upgradeOverloaded: "overloaded",
}

// upgrade is an upgrade request on its way to the backends: what the
// client offered and, once a backend switched protocols, its connection.
type upgrade struct {
	// protos is the client's Upgrade value.
	protos  []byte
	tunnels *tunnelSet

	// Set by the try that a backend answered with 101.
	b    *Backend
	conn net.Conn
	br   *bufio.Reader
}

// upgradeOf returns the protocol switch that req asks for on route r, or
// nil when the request goes upstream as a plain one, without Upgrade: the
// route does not tunnel; the request is HTTP/1.0, whose Upgrade RFC 9110
// says to ignore; its Connection lacks "upgrade" or says "close"; it has
// more than one Upgrade header or a body, where servers disagree on which
// bytes are the body and which the new protocol; or it offers h2c, which
// edgelb never tunnels (as Envoy): HTTP2-Settings goes too.
func (s *Server) upgradeOf(req *fasthttp.Request, r *route) *upgrade {
	h := &req.Header
	var protos []byte
	n, conn := 0, false
	for k, v := range h.All() {
		switch {
		case bytes.EqualFold(k, strUpgrade):
			protos = v
			n++
		case bytes.EqualFold(k, strConnection):
			conn = conn || h1.HasToken(v, strUpgradeLower)
		}
	}
	if h1.HasToken(protos, strH2C) {
		h.Del(strHTTP2Settings)
		return nil
	}
	cl := h.ContentLength()
	if !r.upgrade || !h.IsHTTP11() || !conn || h.ConnectionClose() || n != 1 || len(bytes.TrimSpace(protos)) == 0 ||
		cl > 0 || cl == -1 || len(req.Body()) > 0 {
		return nil
	}
	return &upgrade{protos: bytes.Clone(protos), tunnels: s.tunnels}
}

// prepare completes the upstream request that prepareRequest made, which
// dropped the hop-by-hop Connection and Upgrade: they go up for this hop.
func (u *upgrade) prepare(req *fasthttp.Request) {
	req.Header.SetBytesKV(strConnection, strUpgradeValue)
	req.Header.SetBytesKV(strUpgrade, u.protos)
}

// try sends req to b on a new connection, dialled within the service's
// connect_timeout, and reads the answer into resp by deadline, its first
// byte within first_byte_timeout if set. A 101 to a
// protocol the client offered leaves the connection in u for the tunnel;
// any other answer is read whole and the connection closed. It fails as
// forwardOnce does, so that the try counts the same.
func (u *upgrade) try(b *Backend, req *fasthttp.Request, resp *fasthttp.Response, deadline time.Time, cfg *ServiceConfig) error {
	resp.Reset()
	resp.Header.SetNoDefaultContentType(true)
	resp.Header.DisableNormalizing()
	resp.SkipBody = req.Header.IsHead()
	req.URI().DisablePathNormalizing = true
	timeout := time.Until(deadline)
	if timeout <= 0 {
		return fasthttp.ErrTimeout
	}
	conn, err := fasthttp.DialTimeout(b.addr, min(cfg.ConnectTimeout, timeout))
	if err != nil {
		return err
	}
	if err := conn.SetDeadline(deadline); err != nil {
		conn.Close()
		return err
	}
	bw := bufio.NewWriter(conn)
	err = req.Write(bw)
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		conn.Close()
		return timeoutErr(err)
	}
	br := bufio.NewReaderSize(conn, DefaultMaxHeaderBytes)
	err = awaitFirstByte(conn, br, cfg.FirstByteTimeout, deadline)
	if err == nil {
		err = resp.ReadLimitBody(br, cfg.MaxResponseBody)
	}
	if err != nil {
		conn.Close()
		if err == io.EOF {
			return fasthttp.ErrConnectionClosed
		}
		return timeoutErr(err)
	}
	if resp.StatusCode() != fasthttp.StatusSwitchingProtocols {
		conn.Close()
		return nil
	}
	if !offered(u.protos, peekFold(&resp.Header, strUpgrade)) {
		conn.Close()
		return errUpgradeMismatch
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		conn.Close()
		return err
	}
	u.b, u.conn, u.br = b, conn, br
	return nil
}

// offered reports whether every protocol a 101 switches to is one the
// client offered; a 101 without Upgrade switches to nothing known.
func offered(protos, switched []byte) bool {
	if len(bytes.TrimSpace(switched)) == 0 {
		return false
	}
	for len(switched) > 0 {
		var tok []byte
		tok, switched, _ = bytes.Cut(switched, strComma)
		if tok = bytes.TrimSpace(tok); len(tok) > 0 && !h1.HasToken(protos, tok) {
			return false
		}
	}
	return true
}

// takeTunnelSlot counts an upgrade request against the service's
// websocket.max_tunnels; it fails when they are taken or edgelb is
// shutting down.
func (p *Pool) takeTunnelSlot(u *upgrade) bool {
	if u.tunnels.draining.Load() {
		return false
	}
	if p.m.tunnelSlots.Add(1) > int64(p.cfg.WebSocket.MaxTunnels) {
		p.m.tunnelSlots.Add(-1)
		return false
	}
	return true
}

// endUpgrade counts an upgrade request that opened no tunnel and gives its
// slot back.
func (p *Pool) endUpgrade(result int) {
	p.m.tunnelSlots.Add(-1)
	p.m.tunnelResults[result].Inc()
}

// openTunnel answers an upgrade request that a backend switched: the 101
// goes to the client, as the backend sent it but for its hop-by-hop
// headers, and the connections are relayed from then on (see tunnel). Bytes
// the client sent after its request are read only then, so none reaches
// the backend before the 101 reaches the client. rl is the request's
// record, whose ID the 101 and the tunnel's log lines carry.
func (p *Pool) openTunnel(ctx *fasthttp.RequestCtx, u *upgrade, rl *reqLog) {
	h := &ctx.Response.Header
	protos := bytes.Clone(peekFold(h, strUpgrade))
	removeHopHeaders(h)
	h.SetBytesKV(strConnection, strUpgradeValue)
	h.SetBytesKV(strUpgrade, protos)
	if rl.ids != nil {
		setResponseID(h, rl.ids, rl.id.bytes())
	}
	t := newTunnel(p, u, h.AppendBytes(nil), bytes.EqualFold(bytes.TrimSpace(protos), strWebSocket), rl.id.String())
	p.m.tunnelResults[upgradeOpened].Inc()
	// The tunnel writes the 101 itself: fasthttp would skip the hijack
	// handler, and leave the backend connection open, on some answers.
	ctx.HijackSetNoResponse(true)
	ctx.Hijack(t.run)
}
