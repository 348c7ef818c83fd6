package stale

import (
	"errors"
	"testing"
)

func TestKey(t *testing.T) {
	f := func(scheme, host, uri, want string) {
		t.Helper()
		req := newReq("GET", host, uri)
		if got := string(appendKey(nil, []byte(scheme), req)); got != "k"+want {
			t.Errorf("%s %s %s: key %q, want %q", scheme, host, uri, got, "k"+want)
		}
	}
	f("http", "Shop.Example", "/P?q=A", "http://shop.example/P?q=A")
	f("HTTPS", "a:8443", "/", "https://a:8443/")
	f("", "a", "/x", "http://a/x")
	f("http", "a", "/x%20y?b=1&a=2", "http://a/x%20y?b=1&a=2")
	f("http", "a", "http://a/abs?x", "http://a/abs?x")
	f("http", "a", "http://a?x", "http://a/?x")
}

func TestPurgeKeyMatchesRequestKey(t *testing.T) {
	f := func(url, scheme, host, uri string) {
		t.Helper()
		got, err := appendPurgeKey(nil, url)
		if err != nil {
			t.Fatalf("%s: %v", url, err)
		}
		want := appendKey(nil, []byte(scheme), newReq("GET", host, uri))
		if string(got) != string(want) {
			t.Errorf("purge %s: key %q, request key %q", url, got, want)
		}
	}
	f("http://shop.example/p?id=1", "http", "shop.example", "/p?id=1")
	f("HTTP://Shop.Example/P", "http", "shop.example", "/P")
	f("https://a:8443/x%2Fy", "https", "a:8443", "/x%2Fy")
	f("http://a", "http", "a", "/")
	f("http://a?q", "http", "a", "/?q")
	f("http://a/p#frag", "http", "a", "/p")
	f("http://user:pw@a/p", "http", "a", "/p")

	bad := func(url string) {
		t.Helper()
		if _, err := appendPurgeKey(nil, url); !errors.Is(err, ErrPurgeURL) {
			t.Errorf("%q: err %v, want ErrPurgeURL", url, err)
		}
	}
	bad("/relative")
	bad("shop.example/p")
	bad("http:///p")
	bad("://a/p")
	bad("1http://a/p")
}

func TestVaryNames(t *testing.T) {
	f := func(want string, wantStar bool, lines ...string) {
		t.Helper()
		var names []byte
		var star bool
		for _, l := range lines {
			names = appendVaryNames(names, []byte(l), &star)
		}
		if string(names) != want || star != wantStar {
			t.Errorf("%q: names %q star %v, want %q %v", lines, names, star, want, wantStar)
		}
	}
	f("accept-encoding", false, "Accept-Encoding")
	f("accept,accept-language", false, " Accept ,\tAccept-Language ,")
	f("accept,x-a", false, "Accept", "X-A")
	f("accept,*", true, "Accept, *")
	f("", false, "")
}
