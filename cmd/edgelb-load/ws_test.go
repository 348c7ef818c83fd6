package main

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/gorilla/websocket"
)

// The -ws client sends each input line and prints each message back.
func TestChat(t *testing.T) {
	up := websocket.Upgrader{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer c.Close()
		for {
			typ, msg, err := c.ReadMessage()
			if err != nil {
				return
			}
			c.WriteMessage(typ, append([]byte("echo: "), msg...))
		}
	}))
	defer srv.Close()
	var out bytes.Buffer
	if err := chat("ws"+strings.TrimPrefix(srv.URL, "http"), "", strings.NewReader("one\ntwo\n"), &out); err != nil {
		t.Fatal(err)
	}
	if got := out.String(); !strings.Contains(got, "< echo: one\n< echo: two\n") {
		t.Fatalf("output:\n%s", got)
	}
}
