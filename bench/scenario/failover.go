package scenario

import (
	"sort"
	"sync"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/edgelb/edgelb/bench/report"
)

// answerLog records which origin answered each request of a load (the
// demo origin's X-Origin header), for the backup scenario's failover
// figures. It is safe for concurrent use.
type answerLog struct {
	mu      sync.Mutex
	answers []answer
	// names interns origin names, so that a request costs no allocation.
	names map[string]string
}

// answer is one request: when it ended, how long it took, which origin
// answered ("" when none did) and whether it succeeded (2xx or 3xx).
type answer struct {
	end    time.Time
	took   time.Duration
	origin string
	ok     bool
}

func newAnswerLog() *answerLog { return &answerLog{names: make(map[string]string)} }

// observe is a loadgen OnResponse hook.
func (l *answerLog) observe(sent, end time.Time, resp *fasthttp.Response, err error) {
	a := answer{end: end, took: end.Sub(sent)}
	var origin []byte
	if err == nil {
		a.ok = resp.StatusCode() < 400
		origin = resp.Header.Peek("X-Origin")
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(origin) > 0 {
		name, ok := l.names[string(origin)]
		if !ok {
			name = string(origin)
			l.names[name] = name
		}
		a.origin = name
	}
	l.answers = append(l.answers, a)
}

// failover sums up the load that began at start and ended at end, whose
// primaries were killed from killAt to killedAt and answered again from
// restartAt (zero if they were not), backup being the backup origin's
// name.
func (l *answerLog) failover(start, end, killAt, killedAt, restartAt time.Time, backup string) *report.Failover {
	l.mu.Lock()
	as := append([]answer(nil), l.answers...)
	l.mu.Unlock()
	sort.Slice(as, func(i, j int) bool { return as[i].end.Before(as[j].end) })
	if restartAt.IsZero() {
		restartAt = end
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	f := &report.Failover{
		Backup: backup, FirstBackupMS: -1, FirstPrimaryMS: -1, AllPrimaryMS: -1,
		Before: map[string]int64{}, Outage: map[string]int64{}, After: map[string]int64{},
		KillMS: ms(killedAt.Sub(killAt)),
	}
	seconds := int(end.Sub(start) / time.Second)
	var lastOther, lastBackup time.Time
	var lastSecond, lastSecondPrimary int64
	for _, a := range as {
		primary := a.ok && a.origin != "" && a.origin != backup
		// The last, partial second is left out, as in the load's own.
		if sec := int(a.end.Sub(start) / time.Second); sec >= 0 && sec < seconds {
			for len(f.BySecond) <= sec {
				f.BySecond = append(f.BySecond, map[string]int64{})
			}
			f.BySecond[sec][a.origin]++
		}
		if !a.end.Before(end.Add(-time.Second)) && a.end.Before(end) {
			lastSecond++
			if primary {
				lastSecondPrimary++
			}
		}
		switch {
		case a.end.Before(killAt):
			f.Before[a.origin]++
		case a.end.Before(restartAt):
			f.Outage[a.origin]++
			if !a.ok {
				f.OutageErrors++
			}
			f.OutageMaxMS = max(f.OutageMaxMS, ms(a.took))
			if a.ok && a.origin == backup {
				if f.FirstBackupMS < 0 {
					f.FirstBackupMS = ms(a.end.Sub(killAt))
				}
			} else {
				lastOther = a.end
			}
		default:
			f.After[a.origin]++
			if primary && f.FirstPrimaryMS < 0 {
				f.FirstPrimaryMS = ms(a.end.Sub(restartAt))
			}
			if a.origin == backup {
				lastBackup = a.end
			}
		}
	}
	if !lastOther.IsZero() {
		f.AllBackupMS = ms(lastOther.Sub(killAt))
	}
	if f.FirstPrimaryMS >= 0 {
		f.AllPrimaryMS = 0
		if !lastBackup.IsZero() {
			f.AllPrimaryMS = ms(lastBackup.Sub(restartAt))
		}
	}
	if lastSecond > 0 {
		f.LastSecondPrimaryPercent = float64(lastSecondPrimary) * 100 / float64(lastSecond)
	}
	return f
}
