package discovery

import (
	"fmt"
	"strings"
	"testing"
)

func TestParseRouteTag(t *testing.T) {
	f := func(tag, want string) {
		t.Helper()
		r, err := ParseRouteTag(tag)
		got := r.Host + " " + r.Path
		if err != nil {
			got = "error: " + err.Error()
		}
		if !strings.HasPrefix(got, want) {
			t.Errorf("%q: got %q, want %q", tag, got, want)
		}
	}
	f("edge.route=*/", "* /")
	f("edge.route=*", "* /")
	f("edge.route=Shop.Example.com/cart/", "shop.example.com /cart")
	f("edge.route=*/api/v1", "* /api/v1")
	f("edge.route=localhost:8080/x", "localhost:8080 /x")
	f("edge.route=", `error: tag "edge.route=": empty route`)
	f("edge.route=/api", `error: tag "edge.route=/api": missing host; use edge.route=*/api`)
	f("edge.route=a b/x", `error: tag "edge.route=a b/x": route must not contain spaces`)
	f("edge.route=*/a b", `error: tag "edge.route=*/a b": route must not contain spaces`)
	f("edge.route=*/a?b=1", `error: tag "edge.route=*/a?b=1": route must not contain spaces, ?`)
	f("edge.route=*/a//b", `error: tag "edge.route=*/a//b": path "/a//b" is not normalized`)
	f("edge.route=*/a/../b", `error: tag "edge.route=*/a/../b": path "/a/../b" is not normalized`)
	f("edge.route=h$st/", `error: tag "edge.route=h$st/": invalid host`)
	f("other", `error: tag "other" is not an edge.route=`)
}

func TestRoutesFromTags(t *testing.T) {
	f := func(tags []string, want string) {
		t.Helper()
		routes, bad := routesFromTags(tags)
		if got := fmt.Sprint(routes, len(bad)); got != want {
			t.Errorf("%q: got %s, want %s", tags, got, want)
		}
	}
	f(nil, "[] 0")
	f([]string{"v1", "primary"}, "[] 0")
	f([]string{"edge.route=b/", "edge.route=*/z", "edge.route=B/", "edge.route=*/a/"}, "[{* /a} {* /z} {b /}] 0")
	f([]string{"edge.route=", "edge.route=*/ok", "edge.route=/nohost"}, "[{* /ok}] 2")
}
