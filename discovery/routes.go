package discovery

import (
	"fmt"
	"sort"
	"strings"
)

// RouteTag is the prefix of the Consul tags that route a service with no
// config: edge.route=HOST/PATH, HOST a host name or "*", PATH "/" if
// omitted.
const RouteTag = "edge.route="

// ParseRouteTag parses an edge.route=HOST/PATH tag. The host is lowered and
// a trailing slash of the path dropped, so that equal routes compare equal.
func ParseRouteTag(tag string) (Route, error) {
	v, ok := strings.CutPrefix(tag, RouteTag)
	if !ok {
		return Route{}, fmt.Errorf("tag %q is not an %sHOST/PATH tag", tag, RouteTag)
	}
	host, path, _ := strings.Cut(v, "/")
	path = "/" + path
	switch {
	case v == "":
		return Route{}, fmt.Errorf("tag %q: empty route; want %sHOST/PATH (HOST may be *)", tag, RouteTag)
	case host == "":
		return Route{}, fmt.Errorf("tag %q: missing host; use %s*%s to match any host", tag, RouteTag, path)
	case strings.ContainsAny(v, " \t\r\n?#\\"):
		return Route{}, fmt.Errorf("tag %q: route must not contain spaces, ?, # or \\", tag)
	case host != "*" && !validHost(host):
		return Route{}, fmt.Errorf("tag %q: invalid host %q", tag, host)
	case strings.Contains(path, "//") || strings.Contains(path, "/./") || strings.Contains(path, "/../") ||
		strings.HasSuffix(path, "/.") || strings.HasSuffix(path, "/.."):
		return Route{}, fmt.Errorf("tag %q: path %q is not normalized", tag, path)
	}
	if len(path) > 1 {
		path = strings.TrimSuffix(path, "/")
	}
	return Route{Host: strings.ToLower(host), Path: path}, nil
}

// validHost reports whether h looks like a host name, an IPv4 address or
// either of them with a port.
func validHost(h string) bool {
	for _, c := range h {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == ':' || c == '_') {
			return false
		}
	}
	return h != ""
}

// routesFromTags returns the valid routes among tags, deduplicated and
// sorted, and the malformed route tags in words. Tags without the
// edge.route= prefix are not routes and are ignored.
func routesFromTags(tags []string) (routes []Route, bad []string) {
	seen := make(map[Route]bool)
	for _, tag := range tags {
		if !strings.HasPrefix(tag, RouteTag) {
			continue
		}
		r, err := ParseRouteTag(tag)
		if err != nil {
			bad = append(bad, err.Error())
			continue
		}
		if !seen[r] {
			seen[r] = true
			routes = append(routes, r)
		}
	}
	sortRoutes(routes)
	return routes, bad
}

func sortRoutes(rs []Route) {
	sort.Slice(rs, func(i, j int) bool {
		a, b := rs[i], rs[j]
		return a.Host < b.Host || (a.Host == b.Host && a.Path < b.Path)
	})
}
