package main

import (
	"bufio"
	"bytes"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"io"
	"net"

	"github.com/valyala/fasthttp"
)

// A WebSocket echo at /ws (RFC 6455), so that the demo shows tunnels
// through edgelb: each text message comes back as "NAME: message", NAME
// being the origin's, so that a client sees which backend it reached;
// binary messages come back as they are; pings get pongs, and a close is
// answered with a close.

// wsGUID is the key suffix of the opening handshake.
const wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

// maxWSFrame bounds a frame's payload.
const maxWSFrame = 1 << 20

// handleWS answers a WebSocket opening handshake and echoes on the
// connection; anything else gets 426.
func (o *origin) handleWS(ctx *fasthttp.RequestCtx) {
	key := ctx.Request.Header.Peek("Sec-WebSocket-Key")
	if !bytes.EqualFold(ctx.Request.Header.Peek("Upgrade"), []byte("websocket")) || len(key) == 0 {
		ctx.Response.Header.Set("Upgrade", "websocket")
		ctx.Error("demo-origin: /ws is a WebSocket echo\n", fasthttp.StatusUpgradeRequired)
		return
	}
	sum := sha1.Sum(append(append([]byte(nil), key...), wsGUID...))
	ctx.SetStatusCode(fasthttp.StatusSwitchingProtocols)
	ctx.Response.Header.Set("Upgrade", "websocket")
	ctx.Response.Header.Set("Connection", "Upgrade")
	ctx.Response.Header.Set("Sec-WebSocket-Accept", base64.StdEncoding.EncodeToString(sum[:]))
	// The server keeps hijacked connections (KeepHijackedConns): close it.
	ctx.Hijack(func(c net.Conn) {
		defer c.Close()
		o.echoWS(c)
	})
}

// echoWS echoes the frames a client sends on c until it closes.
func (o *origin) echoWS(c net.Conn) {
	br := bufio.NewReader(c)
	var hdr [14]byte
	for {
		if _, err := io.ReadFull(br, hdr[:2]); err != nil {
			return
		}
		fin, op, masked := hdr[0]&0x80 != 0, hdr[0]&0x0f, hdr[1]&0x80 != 0
		n := uint64(hdr[1] & 0x7f)
		switch n {
		case 126:
			if _, err := io.ReadFull(br, hdr[2:4]); err != nil {
				return
			}
			n = uint64(binary.BigEndian.Uint16(hdr[2:4]))
		case 127:
			if _, err := io.ReadFull(br, hdr[2:10]); err != nil {
				return
			}
			n = binary.BigEndian.Uint64(hdr[2:10])
		}
		if !masked || n > maxWSFrame {
			// A client's frames are masked (RFC 6455 5.1).
			writeWS(c, true, 0x8, []byte{0x03, 0xea}) // 1002 protocol error
			return
		}
		var mask [4]byte
		if _, err := io.ReadFull(br, mask[:]); err != nil {
			return
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(br, payload); err != nil {
			return
		}
		for i := range payload {
			payload[i] ^= mask[i%4]
		}
		switch op {
		case 0x8: // close
			writeWS(c, true, 0x8, payload[:min(len(payload), 2)])
			return
		case 0x9: // ping
			writeWS(c, true, 0xa, payload)
		case 0xa: // pong
		case 0x1:
			// The first frame of a text message, whole or not.
			writeWS(c, fin, op, append([]byte(o.name+": "), payload...))
		default:
			writeWS(c, fin, op, payload)
		}
	}
}

// writeWS writes one unmasked frame, as a server does.
func writeWS(c net.Conn, fin bool, op byte, payload []byte) error {
	b := make([]byte, 0, 10+len(payload))
	first := op
	if fin {
		first |= 0x80
	}
	b = append(b, first)
	switch n := len(payload); {
	case n < 126:
		b = append(b, byte(n))
	case n <= 0xffff:
		b = append(b, 126)
		b = binary.BigEndian.AppendUint16(b, uint16(n))
	default:
		b = append(b, 127)
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	}
	_, err := c.Write(append(b, payload...))
	return err
}
