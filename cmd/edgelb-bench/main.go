// Command edgelb-bench runs edgelb's load scenarios with real processes (a
// Consul dev agent, demo origins, edgelb, and in comparison mode nginx and
// HAProxy), injects each scenario's failure at a known time, and writes
// what clients saw as JSON and as an HTML report with charts over time.
//
//	edgelb-bench -scenario all -peers -duration 20s -out bench/out
//	edgelb-bench -scenario kill,hang -rate 2000 -duration 30s
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/edgelb/edgelb/bench/loadgen"
	"github.com/edgelb/edgelb/bench/report"
	"github.com/edgelb/edgelb/bench/scenario"
)

func main() {
	scenario.StallProbeMain()
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "edgelb-bench: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	exe, _ := os.Executable()
	exeDir := filepath.Dir(exe)
	var o scenario.Options
	names := flag.String("scenario", "all", "scenarios to run, comma-separated: "+strings.Join(scenario.Names, ", ")+", or all")
	flag.BoolVar(&o.Peers, "peers", false, "also run "+strings.Join(scenario.Compared, " and ")+" through nginx and HAProxy, and report ratios")
	flag.DurationVar(&o.Duration, "duration", scenario.DefaultDuration, "load of each run (after a 1s warm-up)")
	flag.Float64Var(&o.Rate, "rate", 0, "requests per second (0: closed loop, as fast as answers come back)")
	flag.IntVar(&o.Concurrency, "c", 32, "connections")
	flag.DurationVar(&o.Timeout, "timeout", 2*time.Second, "per-request timeout")
	out := flag.String("out", "bench/out", "directory for report.json, report.html and the processes' logs (work/)")
	flag.StringVar(&o.Bin, "bin", exeDir, "directory holding the edgelb and demo-origin binaries (make build)")
	flag.StringVar(&o.Consul, "consul", "", "consul binary (default: $EDGELB_CONSUL, consul beside this binary, then PATH)")
	pin := flag.Bool("pin", true, "with taskset and 2+ CPUs: proxies on CPU 0 with one worker, everything else on the other CPUs")
	install := flag.Bool("install-peers", true, "with -peers, install nginx and HAProxy from Debian packages when missing")
	var h report.HTMLOptions
	flag.StringVar(&h.EchartsJS, "echarts-js", "", "local echarts.min.js to inline, so that the report opens offline (default: loaded from -assets-host)")
	flag.StringVar(&h.AssetsHost, "assets-host", "", "where the report loads echarts.min.js from (default: go-echarts' assets host)")
	quiet := flag.Bool("quiet", false, "no progress bar")
	flag.Parse()

	list, err := scenarioList(*names)
	if err != nil {
		return err
	}
	for _, b := range []string{"edgelb", "demo-origin"} {
		if _, err := os.Stat(filepath.Join(o.Bin, b)); err != nil {
			return fmt.Errorf("no %s in %s: run `make build` (or pass -bin)", b, o.Bin)
		}
	}
	if o.Consul == "" {
		o.Consul = scenario.ConsulBinary(exeDir)
	}
	peers := map[string]string{}
	if o.Peers {
		if *install {
			if err := scenario.InstallPeers(); err != nil {
				fmt.Fprintf(os.Stderr, "edgelb-bench: cannot install peers: %v\n", err)
			}
		}
		if missing := scenario.MissingPeers(); len(missing) > 0 {
			return fmt.Errorf("-peers: %s not installed (run `make peers`)", strings.Join(missing, ", "))
		}
		for _, p := range []string{scenario.Nginx, scenario.HAProxy} {
			peers[p] = scenario.PeerVersion(p)
		}
	}
	pinned := *pin && runtime.NumCPU() >= 2 && hasTaskset()
	if pinned {
		o.ProxyCPUs = "0"
		o.OtherCPUs = fmt.Sprintf("1-%d", runtime.NumCPU()-1)
		// The load tool runs here: keep it off the proxy's CPU.
		if err := exec.Command("taskset", "-a", "-p", "-c", o.OtherCPUs, fmt.Sprint(os.Getpid())).Run(); err != nil {
			return fmt.Errorf("cannot pin edgelb-bench to CPUs %s: %w", o.OtherCPUs, err)
		}
	}
	o.Dir = filepath.Join(*out, "work")
	os.RemoveAll(o.Dir)
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return err
	}
	if o.Dir, err = filepath.Abs(o.Dir); err != nil {
		return err
	}

	runs := 0
	for _, n := range list {
		runs += len(scenario.Proxies(n, o.Peers))
	}
	var bar *progressbar.ProgressBar
	interactive := !*quiet && term.IsTerminal(int(os.Stderr.Fd()))
	if interactive {
		bar = progressbar.NewOptions(runs*int(o.Duration/time.Second),
			progressbar.OptionSetWriter(os.Stderr), progressbar.OptionShowCount(),
			progressbar.OptionSetWidth(30), progressbar.OptionClearOnFinish())
	}
	o.OnSecond = func(name, proxy string, s loadgen.Second) {
		if bar != nil {
			bar.Describe(fmt.Sprintf("%-11s %-7s %7.0f rps  p99 %7.2fms  errors %d", name, proxy, s.RPS, s.Latency.P99, s.Errors))
			bar.Add(1)
		}
	}
	o.Logf = func(format string, args ...any) {
		if bar != nil {
			bar.Clear()
		}
		fmt.Fprintf(os.Stderr, format+"\n", args...)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	rep := scenario.Run(ctx, o, list)
	if bar != nil {
		bar.Finish()
	}
	rep.Host = report.Host{CPUs: runtime.NumCPU(), GoVersion: runtime.Version(), Pinned: pinned, ProxyCPUs: o.ProxyCPUs, Peers: peers}
	if !pinned {
		rep.Host.ProxyCPUs = ""
	}
	jsonPath, htmlPath, err := rep.WriteFiles(*out, h)
	if err != nil {
		return err
	}
	fmt.Print(summary(rep))
	fmt.Printf("\nwrote %s and %s (logs in %s)\n", jsonPath, htmlPath, o.Dir)
	if failed := failures(rep); failed > 0 {
		return fmt.Errorf("%d run(s) failed: see the report", failed)
	}
	return ctx.Err()
}

func scenarioList(arg string) ([]string, error) {
	if arg == "all" {
		return scenario.Names, nil
	}
	var list []string
	for _, n := range strings.Split(arg, ",") {
		n = strings.TrimSpace(n)
		known := false
		for _, k := range scenario.Names {
			known = known || k == n
		}
		if !known {
			return nil, fmt.Errorf("unknown scenario %q (one of %s, or all)", n, strings.Join(scenario.Names, ", "))
		}
		list = append(list, n)
	}
	return list, nil
}

func hasTaskset() bool {
	_, err := exec.LookPath("taskset")
	return err == nil
}

func failures(rep *report.Report) int {
	n := 0
	for _, s := range rep.Scenarios {
		if s.Error != "" {
			n++
		}
		for _, r := range s.Runs {
			if r.Error != "" {
				n++
			}
		}
	}
	return n
}

// summary is the report in a few lines of text.
func summary(rep *report.Report) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-12s %-8s %9s %9s %9s %9s %8s %7s %10s\n", "scenario", "proxy", "requests", "req/s", "p50 ms", "p99 ms", "errors", "stale", "cpu us/req")
	for _, s := range rep.Scenarios {
		if s.Error != "" {
			fmt.Fprintf(&b, "%-12s failed: %s\n", s.Name, s.Error)
		}
		for _, r := range s.Runs {
			if r.Result == nil {
				fmt.Fprintf(&b, "%-12s %-8s failed: %s\n", s.Name, r.Proxy, r.Error)
				continue
			}
			res := r.Result
			fmt.Fprintf(&b, "%-12s %-8s %9d %9.0f %9.2f %9.2f %8d %7d %10.1f\n", s.Name, r.Proxy, res.Requests, res.RPS, res.Latency.P50, res.Latency.P99, res.Errors, res.Stale, r.CPUPerRequestUS)
			if r.Error != "" {
				fmt.Fprintf(&b, "%-12s %-8s error: %s\n", "", "", r.Error)
			}
			for _, n := range r.Notes {
				fmt.Fprintf(&b, "%-12s %-8s %s\n", "", "", n)
			}
			if f := r.Failover; f != nil {
				fmt.Fprintf(&b, "%-12s %-8s failover: kill (%.1fms) to first %s answer %s, to every answer from it %s, %d errors in the outage (slowest %.1fms); "+
					"restart to first primary answer %s, to every answer from primaries %s; primaries %.1f%% of the last second\n",
					"", "", f.KillMS, f.Backup, msText(f.FirstBackupMS), msText(f.AllBackupMS), f.OutageErrors, f.OutageMaxMS,
					msText(f.FirstPrimaryMS), msText(f.AllPrimaryMS), f.LastSecondPrimaryPercent)
			}
		}
		for _, c := range s.Comparisons {
			fmt.Fprintf(&b, "%-12s edgelb/%-7s req/s %.2fx  cpu/req %.2fx  p99 %.2fx  errors %d vs %d\n", "", c.Peer, c.RPSRatio, c.CPUPerRequestRatio, c.P99Ratio, c.Errors, c.PeerErrors)
		}
		if p := s.Propagation; p != nil {
			fmt.Fprintf(&b, "%-12s Consul change to routing: %d registrations, %d deregistrations, p50 %.1fms, max %.1fms, %d not seen in time\n", "", len(p.RegisterMS), len(p.DeregisterMS), p.P50MS, p.MaxMS, p.Missed)
		}
	}
	return b.String()
}

// msText words a failover time: milliseconds, or never (-1).
func msText(v float64) string {
	if v < 0 {
		return "never"
	}
	return fmt.Sprintf("%.1fms", v)
}
