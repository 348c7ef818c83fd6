package balancer

import (
	"encoding/base64"
	"encoding/pem"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
)

// browserPage is what the origins serve at /: it opens a WebSocket back
// to where it came from, sends "ping N" on the Nth once it opens, writes
// what happens into #log, and opens another 100 ms after one closes, as
// web applications reconnect.
const browserPage = `<!doctype html>
<meta charset="utf-8">
<title>edgelb</title>
<pre id="log"></pre>
<script>
let n = 0;
function note(s) { document.getElementById('log').textContent += s + '\n'; }
function connect() {
  const id = ++n;
  let opened = false;
  const ws = new WebSocket('wss://' + location.host + '/echo');
  ws.onopen = () => { opened = true; note(id + ' open'); ws.send('ping ' + id); };
  ws.onmessage = e => note(id + ' echo ' + e.data);
  // A socket that never opened is one whose handshake failed: a 502 would show here.
  ws.onclose = e => { note(id + (opened ? ' closed ' : ' failed ') + e.code); setTimeout(connect, 100); };
}
connect();
</script>
`

// browserLog returns the lines the page wrote into #log.
func browserLog(p *tab) []string {
	text := p.str(`document.getElementById('log').textContent`)
	if text == "" {
		return nil
	}
	return strings.Split(strings.TrimSuffix(text, "\n"), "\n")
}

// TestBrowserHTTPSAndWebSocket: a real Chromium, trusting the test's CA
// the way a user's browser trusts an installed one, loads a page through
// edgelb's TLS listener by name, and the page's WebSocket (wss://) echoes
// through edgelb's tunnel; when the tunnel's backend is killed, the page
// sees its socket close, reconnects and echoes through the other backend,
// and no handshake ever gets an error. A name the certificate does not
// hold, and a certificate from a CA Chromium does not trust, are refused:
// the browser verifies certificates, it does not ignore their errors.
//
// It runs once: TLS connections are served by the fasthttp server whatever
// server.event_loop says (the event loops serve plain HTTP only).
func TestBrowserHTTPSAndWebSocket(t *testing.T) {
	chromiumBinaries(t, true)
	pki := newTestPKI(t)
	cert, key := pki.issue("shop", "shop.example")
	untrusted := newTestPKI(t)
	rogue, rogueKey := untrusted.issue("rogue", "rogue.example")
	page := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		io.WriteString(w, browserPage)
	})
	origins := map[string]*wsOrigin{"a": startWSOriginWithPage(t, "a", page), "b": startWSOriginWithPage(t, "b", page)}
	s := startEdge(t, tlsYAML("", cert, key, rogue, rogueKey)+
		"services:\n  web: {static: ["+origins["a"].addr+", "+origins["b"].addr+"]}\nroutes: [{service: web}]\n")
	_, port, _ := net.SplitHostPort(s.TLSAddr())
	const tls13 = `edgelb_tls_handshakes_total{version="1.3",resumed="false"}`
	const rejected = `edgelb_tls_handshake_errors_total{reason="cert_rejected"}`
	// The TLS series are the process's: count what this test adds.
	tls13Before, rejectedBefore := metricValue(t, s, tls13), metricValue(t, s, rejected)

	// Every name the test uses is edgelb on loopback; any other fails to
	// resolve, so that the browser's background requests go nowhere.
	b := startBrowser(t, browserOptions{
		CA:        pki.ca.PEM,
		HostRules: "MAP shop.example 127.0.0.1, MAP other.example 127.0.0.1, MAP rogue.example 127.0.0.1, MAP * ~NOTFOUND",
	})
	site := "https://shop.example:" + port
	p := b.open(site + "/")
	waitFor(t, "the page loaded", func() bool {
		var state string
		return p.tryEval(`document.readyState + ' ' + location.href`, &state) == nil && state == "complete "+site+"/"
	})
	waitFor(t, "the page's first echo", func() bool { return len(browserLog(p)) >= 2 })

	// The page came over HTTPS, with the certificate for its name, which
	// Chromium verified against the CA it trusts.
	if got := p.str(`location.protocol + '//' + location.host + ' ' + window.isSecureContext`); got != site+" true" {
		t.Errorf("the page's location and isSecureContext: %q", got)
	}
	type securityDetails struct {
		Protocol    string   `json:"protocol"`
		SubjectName string   `json:"subjectName"`
		SANList     []string `json:"sanList"`
		Issuer      string   `json:"issuer"`
	}
	type response struct {
		Type     string `json:"type"`
		Response struct {
			URL             string           `json:"url"`
			Status          int              `json:"status"`
			SecurityState   string           `json:"securityState"`
			SecurityDetails *securityDetails `json:"securityDetails"`
		} `json:"response"`
	}
	// Events come from the browser's process, the page's DOM from its
	// renderer's: wait for them rather than assume an order.
	var doc *response
	waitFor(t, "Network.responseReceived for the document", func() bool {
		for _, r := range tabEvents[response](p, "Network.responseReceived") {
			if r.Type == "Document" {
				doc = &r
			}
		}
		return doc != nil
	})
	if r := doc.Response; r.URL != site+"/" || r.Status != 200 || r.SecurityState != "secure" || r.SecurityDetails == nil ||
		r.SecurityDetails.Protocol != "TLS 1.3" || r.SecurityDetails.SubjectName != "shop.example" ||
		!slices.Equal(r.SecurityDetails.SANList, []string{"shop.example"}) || r.SecurityDetails.Issuer != "edgelb test CA" {
		t.Errorf("the document's response: %+v %+v", r, r.SecurityDetails)
	}
	// The certificate Chromium shows for the page is the one edgelb was
	// given, byte for byte.
	type visibleState struct {
		State struct {
			SecurityState string `json:"securityState"`
			Cert          *struct {
				Protocol    string   `json:"protocol"`
				Certificate []string `json:"certificate"`
			} `json:"certificateSecurityState"`
		} `json:"visibleSecurityState"`
	}
	var states []visibleState
	waitFor(t, "Security.visibleSecurityStateChanged with a certificate", func() bool {
		states = tabEvents[visibleState](p, "Security.visibleSecurityStateChanged")
		return len(states) > 0 && states[len(states)-1].State.Cert != nil
	})
	certPEM, err := os.ReadFile(cert)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := pem.Decode(certPEM)
	if st := states[len(states)-1].State; st.SecurityState != "secure" || st.Cert == nil || st.Cert.Protocol != "TLS 1.3" ||
		len(st.Cert.Certificate) == 0 || st.Cert.Certificate[0] != base64.StdEncoding.EncodeToString(leaf.Bytes) {
		t.Errorf("the page's security state: %+v %+v", st, st.Cert)
	}
	if n := metricValue(t, s, tls13) - tls13Before; n < 1 {
		t.Errorf("TLS 1.3 handshakes counted: %d", n)
	}

	// The page's WebSocket echoed through a tunnel of edgelb's, which its
	// backend saw come over HTTPS from the page's origin.
	log := browserLog(p)
	first := strings.TrimSuffix(strings.TrimPrefix(log[len(log)-1], "1 echo "), ": ping 1")
	if len(log) != 2 || log[0] != "1 open" || origins[first] == nil {
		t.Fatalf("the page's log: %q", log)
	}
	second := map[string]string{"a": "b", "b": "a"}[first]
	if h := origins[first].lastHead(); h.Get("X-Forwarded-Proto") != "https" || h.Get("Origin") != site {
		t.Errorf("the WebSocket handshake the backend got: %v", h)
	}
	tunnels := func(name string) int64 {
		for _, bs := range statusOfEdge(t, s).Services["web"].Backends {
			if bs.Addr == origins[name].addr {
				return bs.Tunnels
			}
		}
		t.Fatalf("backend %s is not in /status", name)
		return 0
	}
	if st := statusOfEdge(t, s).Services["web"]; st.Tunnels != 1 || tunnels(first) != 1 || tunnels(second) != 0 {
		t.Errorf("/status with the page open: %+v", st)
	}
	if n := metricValue(t, s, `edgelb_tunnels_open{service="web"}`); n != 1 {
		t.Errorf("edgelb_tunnels_open: %d", n)
	}
	if n := metricValue(t, s, `edgelb_tunnels_total{service="web",result="opened"}`); n != 1 {
		t.Errorf("tunnels opened: %d", n)
	}

	// Its backend dies: the page sees its socket close without a close
	// frame (1006), opens another, which edgelb sends to the other
	// backend, and echoes again. No handshake failed on the way.
	origins[first].kill()
	waitFor(t, "the page's echo after the kill", func() bool {
		log := browserLog(p)
		return strings.Contains(log[len(log)-1], " echo ") && !strings.HasPrefix(log[len(log)-1], "1 ")
	})
	want := []string{"1 open", "1 echo " + first + ": ping 1", "1 closed 1006", "2 open", "2 echo " + second + ": ping 2"}
	if log := browserLog(p); !slices.Equal(log, want) {
		t.Errorf("the page's log:\n%s\nwant:\n%s", strings.Join(log, "\n"), strings.Join(want, "\n"))
	}
	type wsHandshake struct {
		Response struct {
			Status int `json:"status"`
		} `json:"response"`
	}
	var answers []wsHandshake
	waitFor(t, "the answers to two WebSocket handshakes", func() bool {
		answers = tabEvents[wsHandshake](p, "Network.webSocketHandshakeResponseReceived")
		return len(answers) >= 2
	})
	if created := b.events(p.session, "Network.webSocketCreated"); len(created) != 2 || len(answers) != 2 ||
		answers[0].Response.Status != 101 || answers[1].Response.Status != 101 {
		t.Errorf("WebSockets created: %d; their handshakes' answers: %+v", len(created), answers)
	}
	// The first tunnel is counted closed by its backend; /status moves
	// with the counts, a moment after.
	waitFor(t, "the first tunnel closed", func() bool {
		return metricValue(t, s, `edgelb_tunnels_closed_total{service="web",reason="backend"}`) == 1 &&
			metricValue(t, s, `edgelb_tunnels_open{service="web"}`) == 1 &&
			statusOfEdge(t, s).Services["web"].Tunnels == 1 && tunnels(first) == 0 && tunnels(second) == 1
	})
	if n := metricValue(t, s, `edgelb_tunnels_total{service="web",result="opened"}`); n != 2 {
		t.Errorf("tunnels opened: %d", n)
	}
	if n := metricValue(t, s, `edgelb_tunnels_total{service="web",result="failed"}`); n != 0 {
		t.Errorf("upgrades answered with edgelb's error: %d", n)
	}

	// A name the certificate does not hold gets the default certificate,
	// and one from a CA Chromium does not trust its own: Chromium refuses
	// both, and edgelb counts the handshakes it ended.
	other := b.newTab()
	for host, want := range map[string]string{"other.example": "net::ERR_CERT_COMMON_NAME_INVALID", "rogue.example": "net::ERR_CERT_AUTHORITY_INVALID"} {
		if e := other.navigate("https://" + host + ":" + port + "/"); e != want {
			t.Errorf("loading https://%s:%s/: %q, want %q", host, port, e, want)
		}
	}
	// Chromium may try a handshake again before it gives up: at least
	// one each.
	waitFor(t, "the refused certificates counted", func() bool { return metricValue(t, s, rejected)-rejectedBefore >= 2 })
}
