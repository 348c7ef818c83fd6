package balancer

import (
	"sort"
	"strings"

	"github.com/edgelb/edgelb/balancer/h1"
)

// route is one entry of a routeTable.
type route struct {
	host    string
	path    string
	service string
	pool    *Pool // nil while the service has no pool
	// httpsRedirect sends plain HTTP requests to HTTPS (308); the event
	// loop hands them to the fasthttp path, which answers them.
	httpsRedirect bool
	// hsts is the Strict-Transport-Security value for responses sent
	// over TLS; nil for none.
	hsts []byte
	// upgrade is set when upgrade requests are tunnelled: the route's
	// websocket key, or else its service's.
	upgrade bool
}

// routeTable maps hosts and path prefixes to pools. It is immutable once
// built and read through an atomic pointer.
type routeTable struct {
	// byHost holds, for every exact host, its own routes merged with the
	// "*" routes, longest path first (exact host first on equal paths).
	byHost map[string][]route
	// any holds the "*" routes, longest path first.
	any []route
}

func newRouteTable(routes []route) *routeTable {
	rt := &routeTable{byHost: make(map[string][]route)}
	for _, r := range routes {
		if r.host == "*" {
			rt.any = append(rt.any, r)
		}
	}
	for _, r := range routes {
		if r.host != "*" {
			// Keyed as h1.HostKey keys a request's Host; a tag route's
			// host that is not valid can never match.
			if k, ok := h1.HostKey(nil, []byte(r.host)); ok {
				r.host = string(k)
			}
			rt.byHost[r.host] = append(rt.byHost[r.host], r)
		}
	}
	for h, rs := range rt.byHost {
		rs = append(rs, rt.any...)
		sortRoutes(rs)
		rt.byHost[h] = rs
	}
	sortRoutes(rt.any)
	return rt
}

func sortRoutes(rs []route) {
	sort.SliceStable(rs, func(i, j int) bool {
		if len(rs[i].path) != len(rs[j].path) {
			return len(rs[i].path) > len(rs[j].path)
		}
		return rs[i].host != "*" && rs[j].host == "*"
	})
}

// match returns the route for host (lower-case, without port) and path,
// or nil. It allocates nothing.
func (rt *routeTable) match(host, path []byte) *route {
	rs, ok := rt.byHost[string(host)]
	if !ok {
		rs = rt.any
	}
	for i := range rs {
		if pathHasPrefix(path, rs[i].path) {
			return &rs[i]
		}
	}
	return nil
}

// pathHasPrefix reports whether path is prefix or lies below it: "/api"
// matches "/api" and "/api/x" but not "/apix".
func pathHasPrefix(path []byte, prefix string) bool {
	if len(path) < len(prefix) || string(path[:len(prefix)]) != prefix {
		return false
	}
	return len(path) == len(prefix) || prefix[len(prefix)-1] == '/' || path[len(prefix)] == '/'
}

// routeID is how routes are told apart in logs and /status.
func routeID(host, path string) string {
	return strings.ToLower(host) + path
}
