package scenario

import (
	"fmt"
	"runtime"
	"strings"
	"sync"
	"time"
)

// MachineStalls measures what the machine itself takes from a process: on
// each CPU listed (a taskset list such as "0" or "1-3"; "" for every CPU) a
// thread pinned there that never blocks reads the clock for d, and the
// longest time it went without running is that CPU's stall. On a virtual
// machine the hypervisor deschedules a virtual CPU now and then; with
// interrupts and other processes this is a floor under any worst latency
// measured on the machine, whichever proxy answers.
func MachineStalls(cpus string, d time.Duration) (map[int]time.Duration, error) {
	list := cpuList(cpus)
	stalls := make(map[int]time.Duration, len(list))
	var mu sync.Mutex
	var wg sync.WaitGroup
	var firstErr error
	for _, cpu := range list {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// The pinned thread ends with this goroutine: it is never
			// unlocked, so its affinity cannot leak to other goroutines.
			runtime.LockOSThread()
			if err := pinThread(cpu); err != nil {
				mu.Lock()
				firstErr = cmpErr(firstErr, fmt.Errorf("cannot pin a thread to CPU %d: %w", cpu, err))
				mu.Unlock()
				return
			}
			worst := time.Duration(0)
			start := time.Now()
			last := start
			for last.Sub(start) < d {
				now := time.Now()
				worst = max(worst, now.Sub(last))
				last = now
			}
			mu.Lock()
			stalls[cpu] = worst
			mu.Unlock()
		}()
	}
	wg.Wait()
	return stalls, firstErr
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
	return fmt.Sprintf("machine stalls: a busy thread pinned to each CPU for %v after the load went without running for up to %s "+
		"(the virtual machine's own pauses: a floor under any worst latency here)", d, strings.Join(parts, ", "))
}
