package balancer

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// The status page in a real browser (headless Chromium, see
// cdp_test.go), read through its DOM.

// pageBackendState is a JavaScript expression: the state the page shows
// for a backend, or null while it shows no row for it.
func pageBackendState(addr string) string {
	return fmt.Sprintf(`(() => { const tr = document.querySelector('tr[data-backend=%q]');
		return tr ? tr.dataset.state + ' / ' + tr.querySelector('.badge.state').textContent + ' / ' + tr.querySelector('.reason').textContent : null; })()`, addr)
}

// pageShows is a JavaScript expression for what the page shows, for
// failure messages.
const pageShows = `document.getElementById('problem').textContent + ' | ' + document.getElementById('updated').textContent + ' | ' +
	[...document.querySelectorAll('tr[data-backend]')].map(tr => tr.dataset.backend + '=' + tr.dataset.state).join(', ') +
	' | login ' + (document.getElementById('login').hidden ? 'hidden' : 'shown: ' + document.getElementById('login-why').textContent)`

// reviveOrigin starts an origin again on the address of one that stopped.
func reviveOrigin(t *testing.T, o *origin, name string) {
	t.Helper()
	var ln net.Listener
	var err error
	// The port was ours a moment ago; another process may take it in
	// between, which the retries cannot help.
	for i := 0; i < 50; i++ {
		if ln, err = net.Listen("tcp", o.addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("cannot listen on %s again: %v", o.addr, err)
	}
	srv := &fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) { fmt.Fprintf(ctx, "hello from %s", name) }}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Shutdown(); ln.Close() })
}

// TestStatusPageShowsBackendLeavingAndReturning opens the status page of an
// edge under steady traffic, stops a backend's origin and starts it again,
// and reads from the page's DOM that it shows the backend out of rotation
// within seconds, with the reason and a mark on its timeline, and healthy
// again once it is back. Every request the page makes goes to the admin
// API's own origin.
func TestStatusPageShowsBackendLeavingAndReturning(t *testing.T) {
	br := startBrowser(t, browserOptions{})
	o1, o2 := startOrigin(t, "o1", nil), startOrigin(t, "o2", nil)
	s := startEdge(t, "services:\n  web:\n    static: "+staticList(o1, o2)+
		"\n    health: {active: {path: /, interval: 200ms}}\nroutes: [{service: web}]\n")
	// Traffic all along, as in production: 20 requests a second.
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		c := &fasthttp.Client{MaxIdemponentCallAttempts: 1}
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
			req.SetRequestURI("http://" + s.Addr() + "/")
			c.DoTimeout(req, resp, 5*time.Second)
			fasthttp.ReleaseRequest(req)
			fasthttp.ReleaseResponse(resp)
		}
	}()
	t.Cleanup(func() { close(stop); <-done })
	origin := "http://" + s.AdminAddr()
	tab := br.open(origin + "/")

	tab.waitFor("both backends shown healthy",
		fmt.Sprintf(`%s?.startsWith('healthy / healthy') && %s?.startsWith('healthy / healthy')`, pageBackendState(o1.addr), pageBackendState(o2.addr)),
		pageShows, 30*time.Second)
	tab.waitFor("a request rate shown",
		`(() => { const b = document.querySelector('section[data-service="web"] .kpi b'); return b && b.textContent !== '0' && b.textContent !== '–'; })()`,
		`document.querySelector('section[data-service="web"] .kpis').textContent`, 30*time.Second)

	o2.stop()
	start := time.Now()
	tab.waitFor("o2 shown out of rotation",
		fmt.Sprintf(`/^(unhealthy|ejected) \/ (unhealthy|ejected) \/ .*(refused|active check|gateway failures)/.test(%s)`, pageBackendState(o2.addr)),
		pageShows, 20*time.Second)
	t.Logf("the page showed o2 out of rotation %s after it stopped", time.Since(start).Round(100*time.Millisecond))
	tab.waitFor("o2's timeline marked",
		fmt.Sprintf(`document.querySelector('tr[data-backend=%q] svg.timeline rect.u, tr[data-backend=%q] svg.timeline rect.e') !== null`, o2.addr, o2.addr),
		pageShows, 10*time.Second)
	tab.waitFor("the change listed",
		fmt.Sprintf(`[...document.querySelectorAll('#events li')].some(li => li.textContent.includes(%q) && /→ (unhealthy|ejected)/.test(li.textContent))`, o2.addr),
		`document.getElementById('events').textContent`, 10*time.Second)
	availableKPI := `[...document.querySelectorAll('section[data-service="web"] .kpi')].find(k => k.textContent.endsWith('available')).querySelector('b').textContent`
	tab.waitFor("1 of 2 backends shown available", availableKPI+` === '1 of 2'`, availableKPI, 10*time.Second)

	reviveOrigin(t, o2, "o2")
	start = time.Now()
	tab.waitFor("o2 shown healthy again",
		fmt.Sprintf(`%s?.startsWith('healthy / healthy')`, pageBackendState(o2.addr)),
		pageShows, 20*time.Second)
	t.Logf("the page showed o2 healthy %s after it came back", time.Since(start).Round(100*time.Millisecond))
	tab.waitFor("o2's timeline healthy at its end",
		fmt.Sprintf(`(() => { const r = [...document.querySelectorAll('tr[data-backend=%q] svg.timeline rect')].pop(); return r && r.getAttribute('class') === 'h'; })()`, o2.addr),
		pageShows, 10*time.Second)

	reqs := tab.requests()
	// The page polls /status: none recorded would make the checks below vacuous.
	if !slices.ContainsFunc(reqs, func(r pageRequest) bool { return strings.Contains(r.URL, "/status") }) {
		t.Fatalf("no request for /status among the page's requests: %+v", reqs)
	}
	for _, r := range reqs {
		if !strings.HasPrefix(r.URL, origin+"/") {
			t.Errorf("the page requested %s, outside its origin %s", r.URL, origin)
		}
	}
}

// TestStatusPageWithToken: with admin_token set, the page asks for the
// token, says when it is wrong, and shows the status with the right one;
// given in the URL fragment, the token leaves the address and is sent, as
// a bearer token, to the admin API only. Another origin (the same admin
// API by another name) does not get it.
func TestStatusPageWithToken(t *testing.T) {
	const token = "0123456789abcdef-page-token"
	br := startBrowser(t, browserOptions{})
	o := startOrigin(t, "o", nil)
	s := startEdge(t, "admin_token: "+token+"\nservices:\n  web: {static: "+staticList(o)+"}\nroutes: [{service: web}]\n")
	origin := "http://" + s.AdminAddr()
	row := fmt.Sprintf(`%s?.startsWith('healthy')`, pageBackendState(o.addr))

	tab := br.open(origin + "/ui")
	tab.waitFor("the token asked for", `!document.getElementById('login').hidden && document.getElementById('main').hidden`, pageShows, 30*time.Second)
	tab.eval(`document.getElementById('token').value = 'wrong-0123456789abcdef'; document.getElementById('login-form').requestSubmit()`, nil)
	tab.waitFor("a wrong token refused", `document.getElementById('login-why').textContent.includes('refused the token (wrong token)')`, pageShows, 30*time.Second)
	tab.eval(fmt.Sprintf(`document.getElementById('token').value = %q; document.getElementById('login-form').requestSubmit()`, token), nil)
	tab.waitFor("the status shown with the token", row, pageShows, 30*time.Second)

	// The token in the fragment: used, then gone from the address.
	tab2 := br.open(origin + "/#token=" + token)
	tab2.waitFor("the status shown with the token from the fragment", row, pageShows, 30*time.Second)
	var href string
	tab2.eval(`location.href`, &href)
	if strings.Contains(href, token) || strings.Contains(href, "#") {
		t.Errorf("the token stays in the address: %s", href)
	}
	reqs := tab2.requests()
	// The page polls /status: none recorded would make the checks below vacuous.
	if !slices.ContainsFunc(reqs, func(r pageRequest) bool { return strings.Contains(r.URL, "/status") }) {
		t.Fatalf("no request for /status among the page's requests: %+v", reqs)
	}
	for _, r := range reqs {
		if !strings.HasPrefix(r.URL, origin+"/") {
			t.Errorf("the page requested %s, outside its origin %s", r.URL, origin)
		}
		if strings.Contains(r.URL, token) {
			t.Errorf("the token is in a request's URL: %s", r.URL)
		}
		auth := r.Headers["Authorization"]
		if strings.Contains(r.URL, "/status") && auth != "Bearer "+token {
			t.Errorf("%s sent with Authorization %q", r.URL, auth)
		}
		if !strings.Contains(r.URL, "/status") && auth != "" {
			t.Errorf("%s sent with Authorization %q: only /status needs the token", r.URL, auth)
		}
	}

	// The same admin API under another origin (localhost instead of the
	// address) is another origin to the browser: it has no token there.
	_, port, _ := net.SplitHostPort(s.AdminAddr())
	if _, err := strconv.Atoi(port); err != nil {
		t.Fatal(err)
	}
	tab2.load("http://localhost:" + port + "/")
	tab2.waitFor("the token asked for again on another origin", `!document.getElementById('login').hidden`, pageShows, 30*time.Second)
}
