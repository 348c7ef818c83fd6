// Command edgelb is an edge HTTP load balancer.
//
//	edgelb -config FILE          run
//	edgelb -config FILE -check   validate the config and exit
//	edgelb -version              print the version and exit
//
// SIGHUP reloads the config; SIGUSR1 reopens the access log (after
// logrotate renamed it); SIGTERM and SIGINT deregister the instance from
// Consul (with consul.register), keep serving for its drain_delay, then
// drain in-flight requests and exit.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/edgelb/edgelb/balancer"
	"github.com/edgelb/edgelb/internal/version"
)

func main() {
	os.Exit(run())
}

func run() int {
	configPath := flag.String("config", "", "path to the YAML config file (required)")
	check := flag.Bool("check", false, "validate the config and exit: 0 if valid, 1 with every problem listed")
	logLevel := flag.String("log-level", "info", "log level: debug, info, warn or error")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println(version.String())
		return 0
	}
	if *configPath == "" {
		fmt.Fprintln(os.Stderr, "edgelb: -config FILE is required")
		flag.Usage()
		return 2
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "edgelb: invalid -log-level %q: %v\n", *logLevel, err)
		return 2
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	cfg, err := balancer.LoadConfig(*configPath)
	if err != nil {
		fmt.Fprintf(os.Stderr, "edgelb: %v\n", err)
		return 1
	}
	if *check {
		fmt.Printf("edgelb: config %s is valid\n", *configPath)
		return 0
	}

	srv := balancer.NewServer(cfg, logger)
	if err := srv.Start(); err != nil {
		logger.Error("cannot start", "err", err)
		return 1
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGTERM, syscall.SIGINT)
	for sig := range sigs {
		if sig == syscall.SIGUSR1 {
			if err := srv.ReopenAccessLog(); err != nil {
				logger.Error("access log not reopened; writing on to the open file", "err", err)
			}
			continue
		}
		if sig == syscall.SIGHUP {
			next, err := srv.ReloadFile(*configPath)
			if err != nil {
				logger.Error("config reload failed; keeping the running config", "err", err)
				continue
			}
			cfg = next
			continue
		}
		// Out of the fleet first (deregistered from Consul), serving on
		// for the drain delay; a second signal ends that delay early.
		leaveCtx, stopLeaving := context.WithCancel(context.Background())
		go func() {
			select {
			case <-sigs:
				logger.Info("second signal: draining now")
				stopLeaving()
			case <-leaveCtx.Done():
			}
		}()
		srv.Leave(leaveCtx)
		stopLeaving()
		logger.Info("draining", "signal", sig.String(), "timeout", cfg.Server.DrainTimeout)
		ctx, cancel := context.WithTimeout(context.Background(), cfg.Server.DrainTimeout)
		err := srv.Shutdown(ctx)
		cancel()
		if err != nil {
			logger.Error("shutdown", "err", err)
			return 1
		}
		logger.Info("stopped")
		return 0
	}
	return 0
}
