package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/gorilla/websocket"
)

// chat opens a WebSocket to url and sends each line read from in as a text
// message, printing every message that comes back; with cacert, wss://
// trusts that CA (a PEM file) besides the system's.
func chat(url, cacert string, in io.Reader, out io.Writer) error {
	d := *websocket.DefaultDialer
	d.HandshakeTimeout = 5 * time.Second
	if cacert != "" {
		pem, err := os.ReadFile(cacert)
		if err != nil {
			return err
		}
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("%s holds no PEM certificate", cacert)
		}
		d.TLSClientConfig = &tls.Config{RootCAs: pool}
	}
	c, resp, err := d.Dial(url, nil)
	if err != nil {
		if resp != nil {
			return fmt.Errorf("%v (%s, Edgelb-Error %q)", err, resp.Status, resp.Header.Get("Edgelb-Error"))
		}
		return err
	}
	defer c.Close()
	fmt.Fprintf(out, "connected to %s\n", url)
	done := make(chan error, 1)
	go func() {
		for {
			_, msg, err := c.ReadMessage()
			if err != nil {
				done <- err
				return
			}
			fmt.Fprintf(out, "< %s\n", msg)
		}
	}()
	sc := bufio.NewScanner(in)
	for sc.Scan() {
		if err := c.WriteMessage(websocket.TextMessage, []byte(strings.TrimRight(sc.Text(), "\r"))); err != nil {
			return err
		}
	}
	c.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""))
	select {
	case err := <-done:
		if websocket.IsCloseError(err, websocket.CloseNormalClosure) {
			return nil
		}
		return err
	case <-time.After(5 * time.Second):
		return nil
	}
}
