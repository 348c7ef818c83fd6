package scenario

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// MachineStalls measures what the machine itself takes from a process: on
// each CPU listed (a taskset list such as "0" or "1-3"; "" for every CPU) a
// process pinned there, with one thread that never blocks, reads the clock
// for d, and the longest time it went without running is that CPU's stall.
// On a virtual machine the hypervisor deschedules a virtual CPU now and
// then; with interrupts and other processes this is a floor under any
// worst latency measured on the machine, whichever proxy answers.
//
// The probes are this executable run again (see StallProbeMain), so that
// nothing of the calling process (its other threads, its garbage
// collector) competes with them.
func MachineStalls(cpus string, d time.Duration) (map[int]time.Duration, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	if _, err := exec.LookPath("taskset"); err != nil {
		return nil, fmt.Errorf("no taskset to pin the probes: %w", err)
	}
	list := cpuList(cpus)
	cmds := make([]*exec.Cmd, len(list))
	outs := make([]strings.Builder, len(list))
	for i, cpu := range list {
		c := exec.Command("taskset", "-c", strconv.Itoa(cpu), exe)
		c.Env = append(os.Environ(), stallProbeEnv+"="+d.String(), "GOMAXPROCS=1")
		c.Stdout = &outs[i]
		c.SysProcAttr = childAttr()
		if err := c.Start(); err != nil {
			return nil, fmt.Errorf("cannot start the stall probe on CPU %d: %w", cpu, err)
		}
		cmds[i] = c
	}
	stalls := make(map[int]time.Duration, len(list))
	var firstErr error
	for i, c := range cmds {
		err := c.Wait()
		ns, perr := strconv.ParseInt(strings.TrimSpace(outs[i].String()), 10, 64)
		switch {
		case err != nil:
			firstErr = cmpErr(firstErr, fmt.Errorf("stall probe on CPU %d: %w", list[i], err))
		case perr != nil:
			firstErr = cmpErr(firstErr, fmt.Errorf("stall probe on CPU %d printed %q", list[i], outs[i].String()))
		default:
			stalls[list[i]] = time.Duration(ns)
		}
	}
	return stalls, firstErr
}

// stallProbeEnv, set to a duration, makes StallProbeMain probe.
const stallProbeEnv = "EDGELB_STALL_PROBE"

// StallProbeMain is the probe of MachineStalls: a program that can be
// started as one (edgelb-bench, the tests of this package) calls it first
// thing. With EDGELB_STALL_PROBE set to a duration it reads the clock in a
// loop for that long, prints the longest gap between two reads in
// nanoseconds and exits; otherwise it returns at once.
func StallProbeMain() {
	v := os.Getenv(stallProbeEnv)
	if v == "" {
		return
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s=%q: %v\n", stallProbeEnv, v, err)
		os.Exit(2)
	}
	worst := time.Duration(0)
	start := time.Now()
	last := start
	for last.Sub(start) < d {
		now := time.Now()
		worst = max(worst, now.Sub(last))
		last = now
	}
	fmt.Println(int64(worst))
	os.Exit(0)
}

func cmpErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// cpuList expands a taskset list ("0", "1-3", "0,2"); "" is every CPU.
func cpuList(list string) []int {
	if list == "" {
		list = fmt.Sprintf("0-%d", runtime.NumCPU()-1)
	}
	var cpus []int
	for _, part := range strings.Split(list, ",") {
		var lo, hi int
		switch c, _ := fmt.Sscanf(part, "%d-%d", &lo, &hi); {
		case c == 2 && hi >= lo:
			for i := lo; i <= hi; i++ {
				cpus = append(cpus, i)
			}
		case c >= 1:
			cpus = append(cpus, lo)
		}
	}
	return cpus
}

// stallNote describes MachineStalls' figures in one line.
func stallNote(stalls map[int]time.Duration, d time.Duration) string {
	var parts []string
	for cpu := 0; cpu < runtime.NumCPU(); cpu++ {
		if s, ok := stalls[cpu]; ok {
			parts = append(parts, fmt.Sprintf("CPU %d %.2fms", cpu, float64(s)/1e6))
		}
	}
	return fmt.Sprintf("machine stalls: a busy process pinned to each CPU for %v before the run went without running for up to %s "+
		"(the virtual machine's own pauses: a floor under any worst latency here)", d, strings.Join(parts, ", "))
}
