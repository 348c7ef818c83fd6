package main

import (
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// A real WebSocket client gets its text messages back with the origin's
// name, binary ones as they are, a pong for its ping, and a close for its
// close; a plain GET of /ws gets 426.
func TestWebSocketEcho(t *testing.T) {
	_, addr := startTestOrigin(t)
	c, _, err := websocket.DefaultDialer.Dial("ws://"+addr+"/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	big := strings.Repeat("y", 70000)
	for _, m := range []struct {
		typ       int
		send, got string
	}{{websocket.TextMessage, "hello", "t1: hello"}, {websocket.BinaryMessage, "\x00\x01", "\x00\x01"}, {websocket.TextMessage, big, "t1: " + big}} {
		if err := c.WriteMessage(m.typ, []byte(m.send)); err != nil {
			t.Fatal(err)
		}
		typ, got, err := c.ReadMessage()
		if err != nil || typ != m.typ || string(got) != m.got {
			t.Fatalf("sent %.20q, got %d %.20q %v", m.send, typ, got, err)
		}
	}
	pong := make(chan string, 1)
	c.SetPongHandler(func(s string) error { pong <- s; return nil })
	c.WriteControl(websocket.PingMessage, []byte("p"), time.Now().Add(time.Second))
	c.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""))
	if _, _, err := c.ReadMessage(); !websocket.IsCloseError(err, websocket.CloseNormalClosure) {
		t.Fatalf("after a close: %v", err)
	}
	if p := <-pong; p != "p" {
		t.Fatalf("pong %q", p)
	}
	if resp, _ := raw(t, addr, "/ws", 2*time.Second); !strings.HasPrefix(resp, "HTTP/1.1 426") {
		t.Fatalf("plain GET /ws: %.60q", resp)
	}
}
