package balancer

import (
	"bytes"
	"net/netip"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/balancer/h1"
)

// Forwarding headers: a backend learns the client's address, the scheme
// and the host the client asked for from X-Forwarded-For, -Proto, -Host and
// Forwarded (RFC 7239). edgelb owns them. From a peer that is not in
// server.trusted_proxies every copy the client sent, and every look-alike
// spelt with '_', is removed and edgelb writes exactly one of each; from a
// trusted peer (a CDN or L7 balancer in front) the values it sent are kept
// and extended with this hop.

var (
	strHeadXFF = []byte("X-Forwarded-For: ")
	strHeadXFP = []byte("\r\nX-Forwarded-Proto: ")
	strHeadXFH = []byte("\r\nX-Forwarded-Host: ")
	strHeadFwd = []byte("\r\nForwarded: ")
	strFor     = []byte("for=")
	strFwdHost = []byte(";host=\"")
	strFwdPrt  = []byte("\";proto=")
)

// trustedPeer reports whether ip is in server.trusted_proxies.
func (s *Server) trustedPeer(ip netip.Addr) bool {
	ps := s.trusted.Load()
	if ps == nil || !ip.IsValid() {
		return false
	}
	ip = ip.Unmap()
	for _, p := range *ps {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// appendForwarding appends the forwarding header lines of a request,
// without the final CRLF: ip is the peer's address as text, host the Host
// as received and proto the listener's scheme. When trusted, the client's
// values xff, xfp, xfh and fwd (nil when absent) are kept and extended.
func appendForwarding(dst, ip, host, proto []byte, trusted bool, xff, xfp, xfh, fwd []byte) []byte {
	if !trusted {
		xff, xfp, xfh, fwd = nil, nil, nil, nil
	}
	dst = append(dst, strHeadXFF...)
	dst = appendXFF(dst, xff, ip)
	dst = append(dst, strHeadXFP...)
	dst = append(dst, orElse(xfp, proto)...)
	dst = append(dst, strHeadXFH...)
	dst = append(dst, orElse(xfh, host)...)
	dst = append(dst, strHeadFwd...)
	return appendForwarded(dst, fwd, ip, host, proto)
}

// appendXFF appends an X-Forwarded-For value: the chain a trusted peer
// sent, if any, then ip.
func appendXFF(dst, chain, ip []byte) []byte {
	if len(chain) > 0 {
		dst = append(dst, chain...)
		dst = append(dst, strCommaSpace...)
	}
	return append(dst, ip...)
}

// appendForwarded appends a Forwarded value (RFC 7239): the elements a
// trusted peer sent, if any, then this hop's for=IP;host="HOST";proto=P,
// an IPv6 address quoted and bracketed. host is a Host that h1.HostKey
// accepted, so it needs no escaping inside the quotes.
func appendForwarded(dst, chain, ip, host, proto []byte) []byte {
	if len(chain) > 0 {
		dst = append(dst, chain...)
		dst = append(dst, strCommaSpace...)
	}
	dst = append(dst, strFor...)
	if bytes.IndexByte(ip, ':') >= 0 {
		dst = append(dst, '"', '[')
		dst = append(dst, ip...)
		dst = append(dst, ']', '"')
	} else {
		dst = append(dst, ip...)
	}
	dst = append(dst, strFwdHost...)
	dst = append(dst, host...)
	dst = append(dst, strFwdPrt...)
	return append(dst, proto...)
}

func orElse(v, def []byte) []byte {
	if len(v) > 0 {
		return v
	}
	return def
}

// setForwarding writes the forwarding headers of a request on the
// fasthttp path. When flags say the client sent some, they are removed
// first, their values kept for a trusted peer.
func setForwarding(ctx *fasthttp.RequestCtx, h *fasthttp.RequestHeader, flags int, trusted bool) {
	var ipb [64]byte
	ip := appendRemoteIP(ipb[:0], ctx)
	proto := scheme(ctx)
	var vb [512]byte
	vals := vb[:0]
	var span [4][2]int // a trusted peer's xff, xfp, xfh, fwd in vals
	if flags&sawRewrite != 0 {
		if trusted {
			vals, span = collectForwarding(vals, h)
		}
		removeForwarding(h, trusted)
	}
	kept := func(i int) []byte { return vals[span[i][0]:span[i][1]] }
	var out [512]byte
	h.SetCanonical(strXForwardedFor, appendXFF(out[:0], kept(0), ip))
	h.SetCanonical(strXForwardedProto, orElse(kept(1), proto))
	host := h.Host()
	h.SetCanonical(strXForwardedHost, orElse(kept(2), host))
	h.SetCanonical(strForwarded, appendForwarded(out[:0], kept(3), ip, host, proto))
}

// collectForwarding appends to dst the values of the client's forwarding
// headers and says where each lies in it: each kind's copies joined by
// ", ", but only the first X-Forwarded-Proto and -Host.
func collectForwarding(dst []byte, h *fasthttp.RequestHeader) (_ []byte, span [4][2]int) {
	for i, kind := range [4]h1.HeaderKind{h1.KindXForwardedFor, h1.KindXForwardedProto, h1.KindXForwardedHost, h1.KindForwarded} {
		start := len(dst)
		for k, v := range h.All() {
			if h1.KindOf(k) != kind {
				continue
			}
			if len(dst) > start {
				if kind == h1.KindXForwardedProto || kind == h1.KindXForwardedHost {
					break
				}
				dst = append(dst, strCommaSpace...)
			}
			dst = append(dst, v...)
		}
		span[i] = [2]int{start, len(dst)}
	}
	return dst, span
}

// removeForwarding deletes every forwarding header and look-alike, and,
// unless the peer is trusted, the rest of the X-Forwarded-* family.
func removeForwarding(h *fasthttp.RequestHeader, trusted bool) {
	for range maxHeaderDeletes {
		var del []byte
		for k := range h.All() {
			switch h1.RequestKindOf(k) {
			case h1.KindXForwardedFor, h1.KindXForwardedProto, h1.KindXForwardedHost, h1.KindForwarded, h1.KindForwardedLookalike:
				del = k
			case h1.KindForwardedOther:
				if !trusted {
					del = k
				}
			}
			if del != nil {
				break
			}
		}
		if del == nil {
			return
		}
		h.DelBytes(del)
	}
}
