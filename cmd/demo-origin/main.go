// Command demo-origin is a small HTTP origin for demos, tests and load
// scenarios, with faults that can be switched on at run time:
//
//	demo-origin -listen 127.0.0.1:9001 -name web-1 [-body-size 64] [-fault MODE]
//	curl -X POST 'http://127.0.0.1:9001/_fault?mode=hang'
//
// GET /ws is a WebSocket echo: a text message comes back as "NAME: message".
//
// Modes: none, hang (accept, never answer), slow (answer after delay),
// error500 (every path, /health included, answers 500), error500-app
// (500 except /health), overload (503 with Retry-After), garbage (invalid
// HTTP, then close), close (close without answering), reset (TCP RST).
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:9001", "address to listen on")
	name := flag.String("name", "origin", "name shown in the X-Origin header and bodies")
	bodySize := flag.Int("body-size", 64, "size in bytes of the body of GET /")
	fault := flag.String("fault", "none", "fault mode at start (none, hang, slow, error500, error500-app, overload, garbage, close, reset)")
	delay := flag.Duration("delay", 50*time.Millisecond, "delay of the slow mode")
	flag.Parse()

	o, err := newOrigin(*name, *bodySize)
	if err != nil {
		log.Fatalf("demo-origin: %v", err)
	}
	if err := o.setFault(*fault, *delay); err != nil {
		log.Fatalf("demo-origin: -fault: %v", err)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("demo-origin: cannot listen on %s: %v", *listen, err)
	}
	fmt.Fprintf(os.Stderr, "demo-origin %s listening on %s (fault %s)\n", *name, ln.Addr(), *fault)
	go func() {
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
		<-sigs
		o.release()
		o.srv.Shutdown()
	}()
	if err := o.serve(ln); err != nil {
		log.Fatalf("demo-origin: %v", err)
	}
}
