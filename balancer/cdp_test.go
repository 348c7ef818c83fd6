package balancer

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// A headless Chromium driven through the Chrome DevTools Protocol (CDP):
// JSON messages over the WebSocket Chromium serves with
// --remote-debugging-port. The few commands the browser tests need (the
// HTTPS and WebSocket test, the status page's) do not warrant a client
// library.

// chromiumBinaries returns the path of Chromium and, when withCertutil,
// of NSS's certutil, which makes the database of CAs Chromium trusts.
// Without them the test is skipped, or fails when $CI is set, so that CI
// never skips it silently; `make chromium` installs both.
func chromiumBinaries(t *testing.T, withCertutil bool) (chromium, certutil string) {
	t.Helper()
	missing := func(what string) {
		t.Helper()
		msg := what + " is not installed: run `make chromium`"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	// Debian's package installs chromium, Ubuntu's chromium-browser.
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			chromium = p
			break
		}
	}
	if chromium == "" {
		missing("chromium (Debian package chromium)")
	}
	if withCertutil {
		p, err := exec.LookPath("certutil")
		if err != nil {
			missing("certutil (Debian package libnss3-tools)")
		}
		certutil = p
	}
	return chromium, certutil
}

// browserTimeout bounds each wait on Chromium: starting, a command's
// answer, a condition on a page. Generous, as a noisy machine can take
// seconds to start a browser.
const browserTimeout = 60 * time.Second

// cdpMessage is a CDP message: a command (ID, Method, Params), its answer
// (ID, Result or Error) or an event (Method, Params). SessionID names the
// page a message is for, empty for the browser itself.
type cdpMessage struct {
	ID        int64           `json:"id,omitempty"`
	SessionID string          `json:"sessionId,omitempty"`
	Method    string          `json:"method,omitempty"`
	Params    json.RawMessage `json:"params,omitempty"`
	Result    json.RawMessage `json:"result,omitempty"`
	Error     *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error,omitempty"`
}

// browser is a headless Chromium of one test, with a home and a profile
// of its own, and the connection to its DevTools endpoint.
type browser struct {
	t      *testing.T
	cmd    *exec.Cmd
	exited chan struct{}
	log    string // Chromium's stdout and stderr
	ws     *websocket.Conn
	wmu    sync.Mutex    // one writer at a time on ws
	read   chan struct{} // closed when readLoop returns

	mu      sync.Mutex
	nextID  int64
	calls   map[int64]chan cdpMessage
	got     []cdpMessage // events, in order
	readErr error        // why the connection ended; calls fail once it is set
}

// browserOptions is how a test's Chromium resolves names and which CA it
// trusts. The zero value is a browser for plain pages on loopback.
type browserOptions struct {
	// CA is a CA certificate, in PEM, that the browser trusts as one
	// installed on the machine; none besides its root store when nil.
	CA []byte
	// HostRules is Chromium's --host-resolver-rules ("MAP name 127.0.0.1,
	// ..."); the system's resolver when empty.
	HostRules string
}

// startBrowser starts Chromium as opts says and connects to it. It stops
// when the test ends.
func startBrowser(t *testing.T, opts browserOptions) *browser {
	t.Helper()
	chromium, certutil := chromiumBinaries(t, opts.CA != nil)
	dir := t.TempDir()
	// A home of its own, so that nothing of the user's (NSS database,
	// config, cache) changes what the test sees.
	home := filepath.Join(dir, "home")
	if err := os.MkdirAll(home, 0o700); err != nil {
		t.Fatal(err)
	}
	if opts.CA != nil {
		trustCA(t, certutil, home, opts.CA)
	}
	profile := filepath.Join(dir, "profile")
	b := &browser{t: t, exited: make(chan struct{}), read: make(chan struct{}), log: filepath.Join(dir, "chromium.log"),
		calls: make(map[int64]chan cdpMessage)}
	logFile, err := os.Create(b.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	args := []string{
		"--headless",
		"--no-sandbox",            // its sandbox cannot run as root, as tests in containers do
		"--disable-dev-shm-usage", // containers' /dev/shm is often too small for it
		"--disable-gpu",
		"--user-data-dir=" + profile,
		// A free port on loopback, written to the profile's DevToolsActivePort.
		"--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
		"--no-first-run", "--no-default-browser-check", "--password-store=basic",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-extensions", "--disable-default-apps",
	}
	if opts.HostRules != "" {
		args = append(args, "--host-resolver-rules="+opts.HostRules)
	}
	b.cmd = exec.Command(chromium, append(args, "about:blank")...)
	b.cmd.Env = append(os.Environ(), "HOME="+home, "XDG_CONFIG_HOME="+filepath.Join(home, ".config"),
		"XDG_CACHE_HOME="+filepath.Join(home, ".cache"))
	b.cmd.Stdout, b.cmd.Stderr = logFile, logFile
	// A process group of its own, so that its helper processes (renderer,
	// network service...) are stopped with it.
	b.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := b.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", chromium, err)
	}
	go func() {
		b.cmd.Wait()
		close(b.exited)
	}()
	t.Cleanup(b.stop)

	url := b.devToolsURL(filepath.Join(profile, "DevToolsActivePort"))
	d := websocket.Dialer{HandshakeTimeout: browserTimeout}
	ws, _, err := d.Dial(url, nil)
	if err != nil {
		b.fatalf("connect to DevTools at %s: %v", url, err)
	}
	ws.SetReadLimit(64 << 20)
	b.ws = ws
	go b.readLoop()
	return b
}

// trustCA makes the NSS database of home trust caPEM. Chromium on Linux
// trusts the CAs of $HOME/.pki/nssdb besides its root store, and verifies
// certificates from them fully, names included;
// --ignore-certificate-errors-spki-list would instead accept the listed
// keys for any name.
func trustCA(t *testing.T, certutil, home string, caPEM []byte) {
	t.Helper()
	dir := filepath.Join(home, ".pki", "nssdb")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(home, "ca.pem")
	if err := os.WriteFile(caFile, caPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	nssdb := "sql:" + dir
	for _, args := range [][]string{
		{"-N", "-d", nssdb, "--empty-password"},
		{"-A", "-d", nssdb, "-n", "edgelb test CA", "-t", "C,,", "-i", caFile},
	} {
		if out, err := exec.Command(certutil, args...).CombinedOutput(); err != nil {
			t.Fatalf("certutil %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// devToolsURL waits for Chromium to write the port and path of its
// DevTools WebSocket to file and returns its URL.
func (b *browser) devToolsURL(file string) string {
	deadline := time.Now().Add(browserTimeout)
	for {
		// The file may be read while Chromium writes it: a whole one
		// has a port line and a path line.
		if data, err := os.ReadFile(file); err == nil {
			lines := strings.Split(strings.TrimSpace(string(data)), "\n")
			if len(lines) == 2 && strings.HasPrefix(lines[1], "/devtools/browser/") {
				return "ws://127.0.0.1:" + lines[0] + lines[1]
			}
		}
		select {
		case <-b.exited:
			b.fatalf("chromium exited before it served DevTools: %v", b.cmd.ProcessState)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			b.fatalf("chromium did not serve DevTools within %v", browserTimeout)
		}
	}
}

// fatalf ends the test with Chromium's own output, which says why it
// failed.
func (b *browser) fatalf(format string, args ...any) {
	b.t.Helper()
	out, _ := os.ReadFile(b.log)
	b.t.Fatalf("%s\nchromium's output:\n%s", fmt.Sprintf(format, args...), out)
}

// stop closes the browser, and kills what is left of its process group.
func (b *browser) stop() {
	if b.ws != nil {
		b.call("", "Browser.close", nil, nil)
	}
	select {
	case <-b.exited:
	case <-time.After(10 * time.Second):
		b.t.Logf("chromium did not exit on Browser.close: killing it")
	}
	syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-b.exited:
	case <-time.After(10 * time.Second):
		b.t.Errorf("chromium (pid %d) still running after SIGKILL", b.cmd.Process.Pid)
	}
	if b.ws != nil {
		b.ws.Close()
		<-b.read
	}
}

// readLoop dispatches what Chromium sends: answers to their calls, events
// to the list that events reads.
func (b *browser) readLoop() {
	defer close(b.read)
	for {
		_, data, err := b.ws.ReadMessage()
		if err != nil {
			b.mu.Lock()
			b.readErr = err
			for id, ch := range b.calls {
				close(ch)
				delete(b.calls, id)
			}
			b.mu.Unlock()
			return
		}
		var m cdpMessage
		if err := json.Unmarshal(data, &m); err != nil {
			b.t.Errorf("CDP message that is not JSON: %v\n%s", err, data)
			continue
		}
		b.mu.Lock()
		if m.ID != 0 {
			if ch, ok := b.calls[m.ID]; ok {
				ch <- m
				delete(b.calls, m.ID)
			}
		} else {
			b.got = append(b.got, m)
		}
		b.mu.Unlock()
	}
}

// call sends a command to session (the browser when empty) and decodes
// its result into result, when not nil.
func (b *browser) call(session, method string, params, result any) error {
	var raw json.RawMessage
	if params != nil {
		var err error
		if raw, err = json.Marshal(params); err != nil {
			return err
		}
	}
	ch := make(chan cdpMessage, 1)
	b.mu.Lock()
	if b.readErr != nil {
		b.mu.Unlock()
		return fmt.Errorf("%s: the DevTools connection is closed: %w", method, b.readErr)
	}
	b.nextID++
	id := b.nextID
	b.calls[id] = ch
	b.mu.Unlock()

	b.wmu.Lock()
	b.ws.SetWriteDeadline(time.Now().Add(browserTimeout))
	err := b.ws.WriteJSON(cdpMessage{ID: id, SessionID: session, Method: method, Params: raw})
	b.wmu.Unlock()
	if err != nil {
		return fmt.Errorf("%s: %w", method, err)
	}
	select {
	case m, ok := <-ch:
		switch {
		case !ok:
			return fmt.Errorf("%s: the DevTools connection closed before the answer", method)
		case m.Error != nil:
			return fmt.Errorf("%s: %s (%d)", method, m.Error.Message, m.Error.Code)
		case result != nil:
			return json.Unmarshal(m.Result, result)
		}
		return nil
	case <-time.After(browserTimeout):
		b.mu.Lock()
		delete(b.calls, id)
		b.mu.Unlock()
		return fmt.Errorf("%s: no answer within %v", method, browserTimeout)
	}
}

// events returns the params of the events named method that session got
// so far, in order.
func (b *browser) events(session, method string) []json.RawMessage {
	b.mu.Lock()
	defer b.mu.Unlock()
	var ps []json.RawMessage
	for _, m := range b.got {
		if m.SessionID == session && m.Method == method {
			ps = append(ps, m.Params)
		}
	}
	return ps
}

// tab is a page (a target) of the browser, attached as a session.
type tab struct {
	b       *browser
	session string
}

// newTab opens a blank page with the Page, Network and Security domains
// on, so that their events are recorded from its first navigation.
func (b *browser) newTab() *tab {
	b.t.Helper()
	var target struct {
		TargetID string `json:"targetId"`
	}
	if err := b.call("", "Target.createTarget", map[string]any{"url": "about:blank"}, &target); err != nil {
		b.fatalf("%v", err)
	}
	var attached struct {
		SessionID string `json:"sessionId"`
	}
	if err := b.call("", "Target.attachToTarget", map[string]any{"targetId": target.TargetID, "flatten": true}, &attached); err != nil {
		b.fatalf("%v", err)
	}
	p := &tab{b: b, session: attached.SessionID}
	for _, domain := range []string{"Page", "Network", "Security"} {
		if err := b.call(p.session, domain+".enable", nil, nil); err != nil {
			b.fatalf("%v", err)
		}
	}
	return p
}

// open opens a new tab on url; the test fails if it does not load.
func (b *browser) open(url string) *tab {
	b.t.Helper()
	p := b.newTab()
	p.load(url)
	return p
}

// navigate loads url and returns the network error that kept it from
// loading ("net::ERR_..."), or "" once its document came.
func (p *tab) navigate(url string) string {
	p.b.t.Helper()
	var r struct {
		ErrorText string `json:"errorText"`
	}
	if err := p.b.call(p.session, "Page.navigate", map[string]any{"url": url}, &r); err != nil {
		p.b.fatalf("%v", err)
	}
	return r.ErrorText
}

// load is navigate that fails the test when url does not load.
func (p *tab) load(url string) {
	p.b.t.Helper()
	if e := p.navigate(url); e != "" {
		p.b.fatalf("loading %s: %s", url, e)
	}
}

// eval evaluates a JavaScript expression in the page, waiting for it if
// it is a promise, and decodes its value into v unless v is nil.
func (p *tab) eval(expr string, v any) {
	p.b.t.Helper()
	if err := p.tryEval(expr, v); err != nil {
		p.b.fatalf("%v", err)
	}
}

// tryEval is eval that returns its error, for polling a page that may
// still be navigating (its JavaScript context then goes away).
func (p *tab) tryEval(expr string, v any) error {
	var r struct {
		Result struct {
			Value json.RawMessage `json:"value"`
		} `json:"result"`
		ExceptionDetails *struct {
			Text      string `json:"text"`
			Exception struct {
				Description string `json:"description"`
			} `json:"exception"`
		} `json:"exceptionDetails"`
	}
	if err := p.b.call(p.session, "Runtime.evaluate", map[string]any{
		"expression": expr, "returnByValue": true, "awaitPromise": true,
	}, &r); err != nil {
		return err
	}
	if e := r.ExceptionDetails; e != nil {
		return fmt.Errorf("%s: %s %s", expr, e.Text, e.Exception.Description)
	}
	if v == nil {
		return nil
	}
	if err := json.Unmarshal(r.Result.Value, v); err != nil {
		return fmt.Errorf("%s: %v (%s)", expr, err, r.Result.Value)
	}
	return nil
}

// str evaluates a JavaScript expression whose value is a string.
func (p *tab) str(expr string) string {
	p.b.t.Helper()
	var s string
	p.eval(expr, &s)
	return s
}

// waitFor polls a JavaScript expression until it is true, and fails the
// test after timeout with what, the last error and what the expression
// describe says then.
func (p *tab) waitFor(what, expr, describe string, timeout time.Duration) {
	p.b.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var ok bool
		err := p.tryEval("!!("+expr+")", &ok)
		if err == nil && ok {
			return
		}
		if time.Now().After(deadline) {
			var now string
			if derr := p.tryEval(describe, &now); derr != nil {
				now = derr.Error()
			}
			p.b.t.Fatalf("%s: not within %s (last error: %v); the page shows: %s", what, timeout, err, now)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// tabEvents returns the params of the events named method the page got
// so far, decoded into a new T each.
func tabEvents[T any](p *tab, method string) []T {
	p.b.t.Helper()
	var out []T
	for _, raw := range p.b.events(p.session, method) {
		var v T
		if err := json.Unmarshal(raw, &v); err != nil {
			p.b.t.Fatalf("%s: %v\n%s", method, err, raw)
		}
		out = append(out, v)
	}
	return out
}

// pageRequest is a request a page sent, from Network.requestWillBeSent.
type pageRequest struct {
	URL     string            `json:"url"`
	Method  string            `json:"method"`
	Headers map[string]string `json:"headers"`
}

// requests returns the requests the page has sent so far, in order.
func (p *tab) requests() []pageRequest {
	p.b.t.Helper()
	var out []pageRequest
	for _, e := range tabEvents[struct {
		Request pageRequest `json:"request"`
	}](p, "Network.requestWillBeSent") {
		out = append(out, e.Request)
	}
	return out
}
