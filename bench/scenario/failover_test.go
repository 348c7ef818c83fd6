package scenario

import (
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

func TestAnswerLogFailover(t *testing.T) {
	l := newAnswerLog()
	start := time.Unix(1000, 0)
	ms := func(n int) time.Time { return start.Add(time.Duration(n) * time.Millisecond) }
	answer := func(end int, origin string, status int) {
		resp := fasthttp.AcquireResponse()
		defer fasthttp.ReleaseResponse(resp)
		resp.SetStatusCode(status)
		if origin != "" {
			resp.Header.Set("X-Origin", origin)
		}
		l.observe(ms(end-5), ms(end), resp, nil)
	}
	answer(100, "o1", 200)
	answer(900, "o2", 200)
	// The kill at 1000: an answer from a primary still under way, one
	// error, then the backup.
	answer(1001, "o1", 200)
	l.observe(ms(1000), ms(1030), nil, fasthttp.ErrConnectionClosed)
	answer(1004, "backup", 200)
	answer(1040, "backup", 200)
	answer(1500, "backup", 200)
	// The restart at 2000.
	answer(2010, "backup", 200)
	answer(2050, "o3", 200)
	answer(2080, "backup", 200)
	answer(2600, "o1", 200)
	answer(2700, "o2", 503)

	f := l.failover(start, ms(3000), ms(1000), ms(1002), ms(2000), "backup")
	check := func(name string, got, want float64) {
		t.Helper()
		if got != want {
			t.Errorf("%s: %v, want %v", name, got, want)
		}
	}
	check("kill", f.KillMS, 2)
	check("first backup", f.FirstBackupMS, 4)
	check("every answer from the backup", f.AllBackupMS, 30)
	check("outage errors", float64(f.OutageErrors), 1)
	check("slowest in the outage", f.OutageMaxMS, 30)
	check("first primary", f.FirstPrimaryMS, 50)
	check("every answer from primaries", f.AllPrimaryMS, 80)
	check("primaries' share of the last second", f.LastSecondPrimaryPercent, 40)
	if f.Before["o1"] != 1 || f.Before["o2"] != 1 || f.Outage["backup"] != 3 || f.Outage[""] != 1 || f.Outage["o1"] != 1 || f.After["backup"] != 2 {
		t.Errorf("counts: before %v, outage %v, after %v", f.Before, f.Outage, f.After)
	}
	if len(f.BySecond) != 3 || f.BySecond[1]["backup"] != 3 || f.BySecond[2]["o3"] != 1 {
		t.Errorf("by second: %v", f.BySecond)
	}

	// The backup never answered, the primaries never came back.
	l = newAnswerLog()
	answer(1500, "", 502)
	f = l.failover(start, ms(3000), ms(1000), ms(1000), time.Time{}, "backup")
	if f.FirstBackupMS != -1 || f.FirstPrimaryMS != -1 || f.AllPrimaryMS != -1 || f.OutageErrors != 1 {
		t.Errorf("nothing answered: %+v", f)
	}
}
