package balancer

import (
	"bytes"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"
)

// Route policies for HTTPS: https_redirect sends plain HTTP requests to
// the TLS listener, hsts tells browsers to come back over HTTPS only.

var (
	httpsRedirects = metrics.NewCounter(`edgelb_https_redirects_total`)

	strLocation   = []byte("Location")
	strHSTS       = []byte("Strict-Transport-Security")
	strRedirected = []byte("edgelb: this URL is served over HTTPS\n")
)

// redirectHTTPS answers a plain HTTP request on an https_redirect route
// with 308 to the same URL over HTTPS: the request's host (its routing
// key: lower case, no port), the TLS listener's port unless 443, and the
// request target as received. 308 keeps the method and body, unlike 301.
func (s *Server) redirectHTTPS(ctx *fasthttp.RequestCtx, host []byte) {
	s.fillRedirect(&ctx.Response, host, ctx.Request.Header.RequestURI(), ctx.Request.Header.ConnectionClose())
}

// fillRedirect makes resp the 308 to uri on host over HTTPS; both engines
// answer with it.
func (s *Server) fillRedirect(resp *fasthttp.Response, host, uri []byte, clientClose bool) {
	httpsRedirects.Inc()
	var lb [512]byte
	loc := append(lb[:0], strSchemeHTTPS...)
	loc = append(loc, host...)
	loc = append(loc, s.tls.port...)
	loc = append(loc, uri...)
	resp.SetStatusCode(fasthttp.StatusPermanentRedirect)
	resp.Header.SetBytesKV(strLocation, loc)
	resp.Header.SetContentTypeBytes(strTextPlain)
	resp.SetBodyRaw(strRedirected)
	if clientClose {
		resp.SetConnectionClose()
	}
}

// forwardedHTTPS reports whether the first X-Forwarded-Proto says https:
// from a trusted proxy that terminated TLS, a request is HTTPS already,
// and redirecting it would loop.
func forwardedHTTPS(h *fasthttp.RequestHeader) bool {
	for k, v := range h.All() {
		if bytes.EqualFold(k, strXForwardedProto) {
			return bytes.EqualFold(bytes.TrimSpace(v), strHTTPS)
		}
	}
	return false
}

// setHSTS sets Strict-Transport-Security to v, replacing whatever the
// backend sent under that name in any case, so that exactly one goes out.
func setHSTS(h *fasthttp.ResponseHeader, v []byte) {
	delFold(h, strHSTS)
	h.SetBytesKV(strHSTS, v)
}

// delFold deletes from a response every header called name, whatever the
// case of either, each by the name it has, as the header's normalization
// setting needs.
func delFold(h *fasthttp.ResponseHeader, name []byte) {
	for range maxHeaderDeletes {
		var del []byte
		for k := range h.All() {
			if len(k) == len(name) && bytes.EqualFold(k, name) {
				del = k
				break
			}
		}
		if del == nil {
			return
		}
		h.DelBytes(del)
	}
}
