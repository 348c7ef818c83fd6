package balancer

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// A small Chrome DevTools Protocol client for the status page tests: it
// starts Debian's headless Chromium, opens tabs, evaluates JavaScript in
// them and records the requests they make.

// statusBrowser is a headless Chromium driven over its DevTools websocket.
type statusBrowser struct {
	cmd    *exec.Cmd
	stderr *lockedBuffer
	conn   *websocket.Conn

	wmu sync.Mutex // serializes writes to conn

	mu       sync.Mutex
	nextID   int64
	pending  map[int64]chan cdpAnswer
	requests map[string][]cdpRequest // by session
	closed   error
}

type cdpAnswer struct {
	Result json.RawMessage `json:"result"`
	Error  *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// cdpRequest is a request a tab sent, from Network.requestWillBeSent.
type cdpRequest struct {
	URL     string            `json:"url"`
	Method  string            `json:"method"`
	Headers map[string]string `json:"headers"`
}

// chromiumBinary returns Debian's Chromium (make chromium installs it). A
// test without it is skipped, except under CI=true, where it fails.
func chromiumBinary(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("chromium is not installed; `make chromium` installs it (Debian package chromium)")
	}
	t.Skip("chromium is not installed; `make chromium` installs it (Debian package chromium)")
	return ""
}

// startStatusBrowser starts headless Chromium with a profile of its own and
// connects to it; the test's cleanup stops it.
func startStatusBrowser(t *testing.T) *statusBrowser {
	t.Helper()
	bin := chromiumBinary(t)
	profile := t.TempDir()
	b := &statusBrowser{stderr: &lockedBuffer{}, pending: make(map[int64]chan cdpAnswer), requests: make(map[string][]cdpRequest)}
	b.cmd = exec.Command(bin,
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
		"--no-first-run", "--no-default-browser-check", "--disable-extensions",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir="+profile, "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
		"about:blank")
	b.cmd.Stdout, b.cmd.Stderr = b.stderr, b.stderr
	if err := b.cmd.Start(); err != nil {
		t.Fatalf("cannot start %s: %v", bin, err)
	}
	exited := make(chan struct{})
	go func() { b.cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		if b.conn != nil {
			b.conn.Close()
		}
		b.cmd.Process.Kill()
		<-exited
	})

	// Chromium writes the port and path of its DevTools websocket to
	// DevToolsActivePort in the profile once it listens.
	var wsURL string
	deadline := time.Now().Add(60 * time.Second)
	for wsURL == "" {
		if data, err := os.ReadFile(filepath.Join(profile, "DevToolsActivePort")); err == nil {
			if port, path, ok := strings.Cut(strings.TrimSpace(string(data)), "\n"); ok {
				wsURL = "ws://127.0.0.1:" + port + path
				break
			}
		}
		select {
		case <-exited:
			t.Fatalf("chromium exited before it listened:\n%s", b.output())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("chromium did not listen for DevTools within 60s:\n%s", b.output())
		}
	}
	conn, _, err := websocket.DefaultDialer.Dial(wsURL, nil)
	if err != nil {
		t.Fatalf("cannot connect to chromium at %s: %v", wsURL, err)
	}
	conn.SetReadLimit(64 << 20)
	b.conn = conn
	go b.readLoop()
	return b
}

func (b *statusBrowser) output() string { return b.stderr.String() }

// readLoop hands answers to their callers and records the requests tabs
// make.
func (b *statusBrowser) readLoop() {
	for {
		var msg struct {
			ID        int64           `json:"id"`
			Method    string          `json:"method"`
			Params    json.RawMessage `json:"params"`
			SessionID string          `json:"sessionId"`
			cdpAnswer
		}
		if err := b.conn.ReadJSON(&msg); err != nil {
			b.mu.Lock()
			b.closed = err
			for id, ch := range b.pending {
				close(ch)
				delete(b.pending, id)
			}
			b.mu.Unlock()
			return
		}
		if msg.ID != 0 {
			b.mu.Lock()
			ch := b.pending[msg.ID]
			delete(b.pending, msg.ID)
			b.mu.Unlock()
			if ch != nil {
				ch <- msg.cdpAnswer
			}
			continue
		}
		if msg.Method == "Network.requestWillBeSent" {
			var p struct {
				Request cdpRequest `json:"request"`
			}
			if json.Unmarshal(msg.Params, &p) == nil {
				b.mu.Lock()
				b.requests[msg.SessionID] = append(b.requests[msg.SessionID], p.Request)
				b.mu.Unlock()
			}
		}
	}
}

// call sends a command, to a tab's session or to the browser (session
// ""), and returns its result.
func (b *statusBrowser) call(session, method string, params any, result any) error {
	if params == nil {
		params = struct{}{}
	}
	ch := make(chan cdpAnswer, 1)
	b.mu.Lock()
	if b.closed != nil {
		b.mu.Unlock()
		return fmt.Errorf("%s: connection to chromium lost: %w", method, b.closed)
	}
	b.nextID++
	id := b.nextID
	b.pending[id] = ch
	b.mu.Unlock()
	msg := map[string]any{"id": id, "method": method, "params": params}
	if session != "" {
		msg["sessionId"] = session
	}
	b.wmu.Lock()
	err := b.conn.WriteJSON(msg)
	b.wmu.Unlock()
	if err != nil {
		return fmt.Errorf("%s: %w", method, err)
	}
	select {
	case a, ok := <-ch:
		if !ok {
			return fmt.Errorf("%s: connection to chromium lost", method)
		}
		if a.Error != nil {
			return fmt.Errorf("%s: %s (%d)", method, a.Error.Message, a.Error.Code)
		}
		if result != nil {
			return json.Unmarshal(a.Result, result)
		}
		return nil
	case <-time.After(30 * time.Second):
		return fmt.Errorf("%s: no answer from chromium within 30s", method)
	}
}

// statusTab is one tab of a statusBrowser.
type statusTab struct {
	b       *statusBrowser
	session string
}

// open opens a new tab on url, recording the requests it makes.
func (b *statusBrowser) open(t *testing.T, url string) *statusTab {
	t.Helper()
	var target struct {
		TargetID string `json:"targetId"`
	}
	if err := b.call("", "Target.createTarget", map[string]any{"url": "about:blank"}, &target); err != nil {
		t.Fatal(err)
	}
	var attached struct {
		SessionID string `json:"sessionId"`
	}
	if err := b.call("", "Target.attachToTarget", map[string]any{"targetId": target.TargetID, "flatten": true}, &attached); err != nil {
		t.Fatal(err)
	}
	tab := &statusTab{b: b, session: attached.SessionID}
	if err := b.call(tab.session, "Network.enable", nil, nil); err != nil {
		t.Fatal(err)
	}
	tab.navigate(t, url)
	return tab
}

// navigate loads url in the tab.
func (tab *statusTab) navigate(t *testing.T, url string) {
	t.Helper()
	var nav struct {
		ErrorText string `json:"errorText"`
	}
	if err := tab.b.call(tab.session, "Page.navigate", map[string]any{"url": url}, &nav); err != nil {
		t.Fatal(err)
	}
	if nav.ErrorText != "" {
		t.Fatalf("navigating to %s: %s", url, nav.ErrorText)
	}
}

// eval evaluates a JavaScript expression in the tab and stores its value,
// as JSON, in result.
func (tab *statusTab) eval(expr string, result any) error {
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
	if err := tab.b.call(tab.session, "Runtime.evaluate", map[string]any{
		"expression": expr, "returnByValue": true, "awaitPromise": true,
	}, &r); err != nil {
		return err
	}
	if e := r.ExceptionDetails; e != nil {
		return fmt.Errorf("%s: %s %s", expr, e.Text, e.Exception.Description)
	}
	if result == nil || len(r.Result.Value) == 0 {
		return nil
	}
	return json.Unmarshal(r.Result.Value, result)
}

// mustEval is eval that fails the test on an error.
func (tab *statusTab) mustEval(t *testing.T, expr string, result any) {
	t.Helper()
	if err := tab.eval(expr, result); err != nil {
		t.Fatal(err)
	}
}

// waitFor polls a JavaScript expression until it is true, failing the
// test after timeout with what describe (an expression) says then.
func (tab *statusTab) waitFor(t *testing.T, what, expr, describe string, timeout time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var lastErr error
	for {
		var ok bool
		lastErr = tab.eval("!!("+expr+")", &ok)
		if lastErr == nil && ok {
			return
		}
		select {
		case <-ctx.Done():
			var now string
			if err := tab.eval(describe, &now); err != nil {
				now = err.Error()
			}
			t.Fatalf("%s: not within %s (last error: %v); the page shows: %s", what, timeout, lastErr, now)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// requests returns the requests the tab has made so far.
func (tab *statusTab) requests() []cdpRequest {
	tab.b.mu.Lock()
	defer tab.b.mu.Unlock()
	return append([]cdpRequest(nil), tab.b.requests[tab.session]...)
}

// lockedBuffer is Chromium's output, written by exec's copying goroutine
// and read by a failing test.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
