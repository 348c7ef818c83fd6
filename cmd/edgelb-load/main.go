// Command edgelb-load drives HTTP load at a running edgelb (or any HTTP
// server) and reports throughput, latency percentiles and errors by
// status, Edgelb-Error code and transport failure, per second and overall.
//
//	edgelb-load -url http://127.0.0.1:8080/ -c 32 -d 10s
//	edgelb-load -url http://127.0.0.1:8080/ -rate 5000 -d 30s -json out.json
//
// With -ws it is a WebSocket client instead: each line of standard input
// goes as a text message, and every message that comes back is printed.
//
//	echo hello | edgelb-load -ws ws://127.0.0.1:8080/ws
//	edgelb-load -ws wss://127.0.0.1:8443/ws -cacert .demo/tls/ca.pem
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/edgelb/edgelb/bench/loadgen"
)

type headers []string

func (h *headers) String() string     { return strings.Join(*h, ", ") }
func (h *headers) Set(v string) error { *h = append(*h, v); return nil }

func main() {
	var o loadgen.Options
	var hs headers
	var bodySize int
	flag.StringVar(&o.URL, "url", "http://127.0.0.1:8080/", "target URL")
	flag.StringVar(&o.Method, "method", "GET", "HTTP method")
	flag.StringVar(&o.Host, "host", "", "Host header (default: from -url)")
	flag.Var(&hs, "H", `request header "Name: value" (repeatable)`)
	flag.IntVar(&bodySize, "body-size", 0, "request body size in bytes")
	flag.IntVar(&o.Concurrency, "c", 32, "connections and workers")
	flag.Float64Var(&o.Rate, "rate", 0, "requests per second (0: as fast as responses come back)")
	flag.DurationVar(&o.Duration, "d", 10*time.Second, "duration")
	flag.Int64Var(&o.Requests, "n", 0, "stop after this many requests (0: no limit)")
	flag.DurationVar(&o.Timeout, "timeout", 2*time.Second, "per-request timeout")
	jsonOut := flag.String("json", "", "write the result as JSON to this file")
	quiet := flag.Bool("quiet", false, "no progress bar or per-second lines")
	perSecond := flag.Bool("per-second", false, "print a line for every second")
	ws := flag.String("ws", "", "be a WebSocket client of this ws:// or wss:// URL: send each line of standard input, print what comes back")
	cacert := flag.String("cacert", "", "with -ws and wss://, also trust this CA (PEM)")
	flag.Parse()
	if *ws != "" {
		if err := chat(*ws, *cacert, os.Stdin, os.Stdout); err != nil {
			fmt.Fprintf(os.Stderr, "edgelb-load: %v\n", err)
			os.Exit(1)
		}
		return
	}
	o.Headers = hs
	if bodySize > 0 {
		o.Body = []byte(strings.Repeat("b", bodySize))
	}

	var bar *progressbar.ProgressBar
	if !*quiet && !*perSecond && term.IsTerminal(int(os.Stderr.Fd())) && o.Duration > 0 {
		bar = progressbar.NewOptions64(int64(o.Duration/time.Second),
			progressbar.OptionSetWriter(os.Stderr), progressbar.OptionSetDescription("load"),
			progressbar.OptionShowCount(), progressbar.OptionClearOnFinish())
	}
	o.OnSecond = func(s loadgen.Second) {
		if bar != nil {
			bar.Add(1)
			bar.Describe(fmt.Sprintf("%6.0f rps  p99 %.2fms  errors %d", s.RPS, s.Latency.P99, s.Errors))
		}
		if *perSecond && !*quiet {
			fmt.Printf("t=%3ds rps %7.0f  p50 %7.3fms  p99 %7.3fms  errors %d  stale %d\n", s.T, s.RPS, s.Latency.P50, s.Latency.P99, s.Errors, s.Stale)
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := loadgen.Run(ctx, o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "edgelb-load: %v\n", err)
		os.Exit(2)
	}
	if bar != nil {
		bar.Finish()
	}
	fmt.Print(res.Format())
	if *jsonOut != "" {
		data, _ := json.MarshalIndent(res, "", "  ")
		if err := os.WriteFile(*jsonOut, data, 0o644); err != nil {
			fmt.Fprintf(os.Stderr, "edgelb-load: %v\n", err)
			os.Exit(1)
		}
	}
}
