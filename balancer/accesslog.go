package balancer

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/edgelb/edgelb/health"
)

// The access log: one line per request, from either engine, written
// without ever making a request wait. Each producer (an event loop, or a
// connection of the fasthttp path) formats its line into a shard of its
// own: a buffer behind a mutex that only it and the writer take, so that
// in practice nobody waits for it. A writer goroutine swaps each shard's
// buffer for an empty one and writes it out every flush_interval, or
// sooner when a shard is half full. When the writer falls behind (a slow
// disk, a pipe nobody reads) and a line does not fit in its shard, the
// line is dropped and counted, never waited for.

// AccessLogConfig is access_log.
type AccessLogConfig struct {
	// Path is the file the lines are appended to, created if need be;
	// "-" is the standard output. Required.
	Path string `yaml:"path"`
	// Format is "json" (one object per line) or "combined" (the NCSA
	// combined format with edgelb's fields after it). DefaultAccessLogFormat
	// is used if not set.
	Format string `yaml:"format"`
	// Sample is the share of the answers with status 1xx to 3xx that are
	// logged, from 0 to 1; every other answer is always logged: 4xx and
	// 5xx, stored copies, errors edgelb generated, and requests that tried
	// more than one backend. 1 if not set.
	Sample *float64 `yaml:"sample"`
	// BufferSize is each shard's buffer in bytes: what a producer may
	// hold while the writer is busy, before its lines are dropped.
	// DefaultAccessLogBufferSize is used if not set.
	BufferSize int `yaml:"buffer_size"`
	// FlushInterval is how often the shards are written out.
	// DefaultAccessLogFlushInterval is used if not set.
	FlushInterval time.Duration `yaml:"flush_interval"`
}

// Access log defaults and bounds.
const (
	DefaultAccessLogFormat        = "json"
	DefaultAccessLogBufferSize    = 256 << 10
	DefaultAccessLogFlushInterval = 100 * time.Millisecond
	minAccessLogBufferSize        = 4 << 10
	maxAccessLogBufferSize        = 64 << 20
	maxAccessLogFlushInterval     = 10 * time.Second
)

func (c *AccessLogConfig) applyDefaults() {
	if c == nil {
		return
	}
	setDefault(&c.Format, DefaultAccessLogFormat)
	setDefault(&c.BufferSize, DefaultAccessLogBufferSize)
	setDefault(&c.FlushInterval, DefaultAccessLogFlushInterval)
	if c.Sample == nil {
		one := 1.0
		c.Sample = &one
	}
}

// validate checks c after applyDefaults; the file is opened only when the
// server starts or reloads, but its directory must exist.
func (c *AccessLogConfig) validate(path string) []error {
	if c == nil {
		return nil
	}
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	switch {
	case c.Path == "":
		bad(".path", "missing: a file name, or - for the standard output")
	case c.Path != "-":
		dir := filepath.Dir(c.Path)
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			bad(".path", "%q: directory %q does not exist", c.Path, dir)
		} else if fi, err := os.Stat(c.Path); err == nil && fi.IsDir() {
			bad(".path", "%q is a directory", c.Path)
		}
	}
	if c.Format != "json" && c.Format != "combined" {
		bad(".format", "must be json or combined (got %q)", c.Format)
	}
	if s := *c.Sample; !(s >= 0 && s <= 1) {
		bad(".sample", "must be from 0 to 1, the share of 1xx-3xx answers logged (got %v)", s)
	}
	if c.BufferSize < minAccessLogBufferSize || c.BufferSize > maxAccessLogBufferSize {
		bad(".buffer_size", "must be from %d to %d bytes (got %d)", minAccessLogBufferSize, maxAccessLogBufferSize, c.BufferSize)
	}
	if c.FlushInterval <= 0 || c.FlushInterval > maxAccessLogFlushInterval {
		bad(".flush_interval", "must be more than 0 and at most %v (got %v)", maxAccessLogFlushInterval, c.FlushInterval)
	}
	return errs
}

// Access log series.
var (
	accessLogLines       = metrics.NewCounter(`edgelb_access_log_lines_total`)
	accessLogDropped     = metrics.NewCounter(`edgelb_access_log_dropped_total`)
	accessLogWriteErrors = metrics.NewCounter(`edgelb_access_log_write_errors_total`)
)

// alogSettings is the access log's config at run time, swapped whole on
// reload; nil while the access log is off.
type alogSettings struct {
	json bool
	// sample is the threshold under which a random uint64 keeps a 1xx-3xx
	// line; all is set when every line is kept.
	sample uint64
	all    bool
	size   int
	flush  time.Duration
	path   string
}

func newAlogSettings(c *AccessLogConfig) *alogSettings {
	s := &alogSettings{json: c.Format == "json", size: c.BufferSize, flush: c.FlushInterval, path: c.Path}
	switch f := *c.Sample; {
	case f >= 1:
		s.all = true
	default:
		s.sample = uint64(f * math.MaxUint64)
	}
	return s
}

// keep reports whether a line is logged: always when forced, else as
// sampled.
func (s *alogSettings) keep(forced bool) bool {
	return forced || s.all || (s.sample > 0 && rand.Uint64() < s.sample)
}

// alogShard is one producer's buffer; see above. The padding keeps shards
// on cache lines of their own.
type alogShard struct {
	mu sync.Mutex
	// buf holds the lines not written yet; its capacity is the shard's
	// size.
	buf []byte
	// line is the scratch a line is formatted into.
	line  []byte
	clock logClock
	_     [64]byte
}

// accessLog is a server's access log: the shards and their writer.
type accessLog struct {
	log *slog.Logger
	set atomic.Pointer[alogSettings]
	// shards: one per event loop first, then fastShards for the fasthttp
	// path, picked by connection.
	shards     []*alogShard
	loopShards int
	fastShards int

	// kick wakes the writer early; cmds carries file changes to it.
	kick     chan struct{}
	cmds     chan alogCmd
	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{}
	// started is set once the writer runs.
	started atomic.Bool

	// fmu guards file, which only the writer changes; Shutdown may close
	// it under a writer stuck on it.
	fmu  sync.Mutex
	file *os.File
	// spare is the writer's empty buffer, swapped into a shard at each
	// flush.
	spare []byte
	// lastErrLog holds back repeated write error messages.
	lastErrLog time.Time
}

// alogCmd asks the writer to write everything out and then write to file
// (nil: reopen the current path; with off: stop writing), with settings
// set, and to reply on done.
type alogCmd struct {
	file *os.File
	set  *alogSettings
	off  bool
	done chan error
}

// newAccessLog returns the access log of a server with nloops event loops
// (0 when off) and fast shards for the fasthttp path; it writes nothing
// until start.
func newAccessLog(logger *slog.Logger, nloops, fast int) *accessLog {
	a := &accessLog{log: logger, loopShards: nloops, fastShards: max(fast, 1),
		kick: make(chan struct{}, 1), cmds: make(chan alogCmd), stop: make(chan struct{}), done: make(chan struct{})}
	for range a.loopShards + a.fastShards {
		a.shards = append(a.shards, &alogShard{})
	}
	return a
}

// openAccessLog opens the file of path for appending, or the standard
// output for "-".
func openAccessLog(path string) (*os.File, error) {
	if path == "-" {
		return os.Stdout, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("access_log.path: cannot open %q: %w", path, err)
	}
	return f, nil
}

// start opens c's file and starts the writer; c nil starts it idle.
func (a *accessLog) start(c *AccessLogConfig) error {
	if c != nil {
		f, err := openAccessLog(c.Path)
		if err != nil {
			return err
		}
		set := newAlogSettings(c)
		a.file = f
		a.set.Store(set)
		a.resize(set.size)
	}
	a.started.Store(true)
	go a.run()
	return nil
}

// resize gives the shards that hold nothing, and the writer's spare, a
// buffer of size bytes; the others get theirs at their next flush (slow
// path).
func (a *accessLog) resize(size int) {
	for _, sh := range a.shards {
		sh.mu.Lock()
		if cap(sh.buf) != size && len(sh.buf) == 0 {
			sh.buf = make([]byte, 0, size)
		}
		sh.mu.Unlock()
	}
	if cap(a.spare) != size {
		a.spare = make([]byte, 0, size)
	}
}

// apply makes c the access log's config (nil turns it off), opening its
// file first when the path changes: a file that cannot be opened leaves
// the running config as it was.
func (a *accessLog) apply(c *AccessLogConfig) error {
	old := a.set.Load()
	if c == nil {
		if old == nil {
			return nil
		}
		return a.send(alogCmd{off: true})
	}
	set := newAlogSettings(c)
	if old != nil && old.path == set.path {
		a.set.Store(set)
		return nil
	}
	f, err := openAccessLog(c.Path)
	if err != nil {
		return err
	}
	return a.send(alogCmd{file: f, set: set})
}

// Reopen has the writer write out what it holds, then open the file
// anew and go on in it: after logrotate renamed it, the lines written so
// far are in the renamed file and the next ones in a new file.
func (a *accessLog) reopen() error {
	set := a.set.Load()
	if set == nil || set.path == "-" {
		return nil
	}
	f, err := openAccessLog(set.path)
	if err != nil {
		return err
	}
	return a.send(alogCmd{file: f, set: set})
}

// alogCmdWait bounds how long a command waits for a writer stuck on its
// file.
const alogCmdWait = 10 * time.Second

// send has the writer carry out cmd and returns its result.
func (a *accessLog) send(cmd alogCmd) error {
	if !a.started.Load() {
		if cmd.file != nil && cmd.file != os.Stdout {
			cmd.file.Close()
		}
		return errors.New("access log: the server has not started")
	}
	cmd.done = make(chan error, 1)
	t := time.NewTimer(alogCmdWait)
	defer t.Stop()
	select {
	case a.cmds <- cmd:
	case <-a.done:
		if cmd.file != nil && cmd.file != os.Stdout {
			cmd.file.Close()
		}
		return errors.New("access log: stopped")
	case <-t.C:
		if cmd.file != nil && cmd.file != os.Stdout {
			cmd.file.Close()
		}
		return errors.New("access log: the writer is stuck writing its file; try again later")
	}
	return <-cmd.done
}

// run is the writer.
func (a *accessLog) run() {
	defer close(a.done)
	var timer *time.Timer
	arm := func() {
		set := a.set.Load()
		switch {
		case set == nil && timer != nil:
			timer.Stop()
		case set == nil:
		case timer == nil:
			timer = time.NewTimer(set.flush)
		default:
			timer.Reset(set.flush)
		}
	}
	arm()
	for {
		var tick <-chan time.Time
		if timer != nil {
			tick = timer.C
		}
		select {
		case <-a.stop:
			a.flush()
			a.closeFile()
			return
		case cmd := <-a.cmds:
			a.flush()
			cmd.done <- a.change(cmd)
		case <-a.kick:
		case <-tick:
		}
		a.flush()
		arm()
	}
}

// change carries out a command, the shards being written out.
func (a *accessLog) change(cmd alogCmd) error {
	if cmd.off {
		// The file stays open: lines formatted by producers that read
		// the settings just before go to it, at the next flush.
		a.set.Store(nil)
		return nil
	}
	a.fmu.Lock()
	old := a.file
	a.file = cmd.file
	a.fmu.Unlock()
	if old != nil && old != os.Stdout && old != cmd.file {
		old.Close()
	}
	a.set.Store(cmd.set)
	a.resize(cmd.set.size)
	return nil
}

// flush writes out every shard. A shard whose size the config changed
// gets a buffer of the new size in place of the one written out.
func (a *accessLog) flush() {
	size := DefaultAccessLogBufferSize
	if set := a.set.Load(); set != nil {
		size = set.size
	}
	for _, sh := range a.shards {
		sh.mu.Lock()
		if len(sh.buf) == 0 {
			sh.mu.Unlock()
			continue
		}
		if cap(a.spare) != size {
			a.spare = make([]byte, 0, size)
		}
		full := sh.buf
		sh.buf = a.spare
		sh.mu.Unlock()
		a.write(full)
		a.spare = full[:0]
	}
}

// write writes b, whole lines, to the file.
func (a *accessLog) write(b []byte) {
	a.fmu.Lock()
	f := a.file
	a.fmu.Unlock()
	lines := countLines(b)
	if f == nil {
		accessLogDropped.AddInt64(int64(lines))
		return
	}
	if _, err := f.Write(b); err != nil {
		accessLogWriteErrors.Inc()
		accessLogDropped.AddInt64(int64(lines))
		if now := time.Now(); now.Sub(a.lastErrLog) >= 10*time.Second {
			a.lastErrLog = now
			a.log.Error("access log: cannot write; lines are dropped until it can", "file", f.Name(), "err", err)
		}
		return
	}
	accessLogLines.AddInt64(int64(lines))
}

func countLines(b []byte) int { return bytes.Count(b, strNewline) }

var strNewline = []byte("\n")

func (a *accessLog) closeFile() {
	a.fmu.Lock()
	f := a.file
	a.file = nil
	a.fmu.Unlock()
	if f != nil && f != os.Stdout {
		f.Close()
	}
}

// close writes out what the shards hold and closes the file, waiting at
// most until deadline for a writer stuck on it, whose file is then closed
// under it.
func (a *accessLog) close(deadline time.Time) {
	if !a.started.Load() {
		return
	}
	a.stopOnce.Do(func() { close(a.stop) })
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-a.done:
	case <-t.C:
		a.fmu.Lock()
		f := a.file
		a.fmu.Unlock()
		if f != nil && f != os.Stdout {
			f.Close()
		}
		<-a.done
	}
}

// shard returns the shard of event loop i.
func (a *accessLog) loopShard(i int) *alogShard { return a.shards[i] }

// fastShard returns the shard of a fasthttp connection.
func (a *accessLog) fastShard(connID uint64) *alogShard {
	return a.shards[a.loopShards+int(connID%uint64(a.fastShards))]
}

// add formats e into sh and keeps the line for the writer, or drops it
// when the shard is full. Fast path: uncontended lock, no allocation once
// the shard's buffers have grown to their size.
func (a *accessLog) add(sh *alogShard, set *alogSettings, e *logEntry) {
	sh.mu.Lock()
	if set.json {
		sh.line = appendJSONLine(sh.line[:0], e, &sh.clock)
	} else {
		sh.line = appendCombinedLine(sh.line[:0], e, &sh.clock)
	}
	n := len(sh.buf)
	if n+len(sh.line) > cap(sh.buf) {
		sh.mu.Unlock()
		accessLogDropped.Inc()
		a.wake()
		return
	}
	sh.buf = append(sh.buf, sh.line...)
	m, c := len(sh.buf), cap(sh.buf)
	sh.mu.Unlock()
	if m <= c/2 {
		return
	}
	// Slow path: the shard is filling up.
	a.wake()
	if n <= c/2 || n <= c*3/4 && m > c*3/4 {
		// A busy producer may hold its P for long: an event loop under
		// load never parks. Once at the half and once at three
		// quarters, it lets the writer it woke run. That waits for
		// nothing: a writer stuck on its file is not runnable.
		runtime.Gosched()
	}
}

// wake has the writer flush now.
func (a *accessLog) wake() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// Where a request's answer came from.
type answerSource uint8

const (
	srcNone answerSource = iota
	// srcBackend: a backend's answer.
	srcBackend
	// srcStale: a stored copy.
	srcStale
	// srcError: an error edgelb generated, with Edgelb-Error.
	srcError
	// srcEdgelb: edgelb's own answer to a request it does not forward:
	// a refusal, a redirect, OPTIONS *, a panic's 500.
	srcEdgelb
)

var sourceNames = [...]string{srcNone: "none", srcBackend: "backend", srcStale: "stale", srcError: "error", srcEdgelb: "edgelb"}

// How a try ended, as the access log says it.
type tryOutcome uint8

const (
	tryOK tryOutcome = iota
	tryConnectFailed
	tryTimeout
	tryInvalidResponse
	tryOverloaded
	tryTooLarge
	// tryCanceled: ended by edgelb before its answer, uncounted (its
	// request's client left, or another engine made the try again).
	tryCanceled
	// tryHedgeLost: abandoned when another try of its request answered
	// first.
	tryHedgeLost
)

var tryOutcomeNames = [...]string{tryOK: "ok", tryConnectFailed: "connect_failed", tryTimeout: "timeout",
	tryInvalidResponse: "invalid_response", tryOverloaded: "overloaded", tryTooLarge: "response_too_large",
	tryCanceled: "canceled", tryHedgeLost: "hedge_lost"}

// tryRecord is one try of a request, for the access log.
type tryRecord struct {
	b *Backend
	// start is when the try began, after the request's start; lat how
	// long it took (ns).
	start, lat int64
	status     int16
	outcome    tryOutcome
}

// reqLog is what the access log and the log lines about a request need
// beyond its head: its ID, its tries and where its answer came from. A
// request carries it (the event loop's client connection, the fasthttp
// path's stack, an attempt handed from one to the other), so that nothing
// is allocated for it.
type reqLog struct {
	// start is when the request began (unix nano).
	start int64
	id    reqID
	tries [maxTries]tryRecord
	n     uint8
	// hedges counts the hedges sent.
	hedges uint8
	source answerSource
	// code is the Edgelb-Error sent, errNone when none.
	code errCode
	// reason says why edgelb answered itself a request it did not
	// forward (source edgelb): a refusal's reason, https_redirect,
	// panic...
	reason string
	// ids is the request-ID header; nil when IDs are off.
	ids *requestIDs
	// service is the name of the service that served the request.
	service string
	// bytesIn is the size of the request as received, head and body.
	bytesIn int64
	// http10 is set for an HTTP/1.0 request, which goes upstream as
	// HTTP/1.1.
	http10 bool
}

// answered returns the backend whose answer went to the client, if one
// did.
func (rl *reqLog) answered() *Backend {
	if rl.source != srcBackend || rl.n == 0 {
		return nil
	}
	for i := int(rl.n) - 1; i >= 0; i-- {
		if t := &rl.tries[i]; t.status > 0 {
			return t.b
		}
	}
	return nil
}

// sourceName says where the answer came from: backend (a primary), backup
// (a backend of the service's backup set), stale, error or edgelb.
func (rl *reqLog) sourceName() string {
	if b := rl.answered(); b != nil && b.backup {
		return "backup"
	}
	return sourceNames[rl.source]
}

// datacenter is the Consul datacenter of the backend that answered; ""
// when none did or it is not from Consul.
func (rl *reqLog) datacenter() string {
	if b := rl.answered(); b != nil {
		return b.dc
	}
	return ""
}

// begin starts the record of a request that began at now (unix nano),
// with ids its request-ID header.
func (rl *reqLog) begin(now int64, ids *requestIDs) {
	rl.start, rl.n, rl.hedges, rl.source, rl.code, rl.reason, rl.bytesIn = now, 0, 0, srcNone, errNone, "", 0
	rl.ids, rl.service, rl.http10, rl.id.n = ids, "", false, 0
}

// addTry records a try on b that ended at end (unix nano) after lat.
func (rl *reqLog) addTry(b *Backend, end int64, lat time.Duration, o tryOutcome, status int) {
	if rl == nil || int(rl.n) == len(rl.tries) {
		return
	}
	rl.tries[rl.n] = tryRecord{b: b, start: end - int64(lat) - rl.start, lat: int64(lat), status: int16(status), outcome: o}
	rl.n++
}

// tryOutcomeOf is how the access log names a try counted by endTry.
func tryOutcomeOf(o health.Outcome, status int, code errCode) tryOutcome {
	if status > 0 {
		if o == health.OutcomeOverloaded {
			return tryOverloaded
		}
		return tryOK
	}
	switch code {
	case errConnectFailed:
		return tryConnectFailed
	case errTimeout:
		return tryTimeout
	case errOverloaded:
		return tryOverloaded
	case errResponseTooLarge:
		return tryTooLarge
	}
	return tryInvalidResponse
}

// logEntry is one line of the access log, as either engine sees its
// request: it points into the request's buffers and lives on the stack.
type logEntry struct {
	rl      *reqLog
	client  netip.AddrPort
	method  []byte
	host    []byte
	uri     []byte
	proto   []byte
	tls     bool
	status  int
	out     int
	end     int64 // unix nano
	service string
	// cacheStatus is a stored copy's Cache-Status.
	cacheStatus []byte
	// referer and ua are read for the combined format only.
	referer, ua []byte
}

// forced reports whether e is logged whatever the sampling.
func (e *logEntry) forced() bool {
	rl := e.rl
	return e.status >= 400 || rl.source == srcStale || rl.source == srcError || rl.n > 1 || rl.hedges > 0
}

// logClock formats a second once for all the lines that fall in it.
type logClock struct {
	sec      int64
	iso, clf []byte
}

func (c *logClock) at(ns int64) {
	sec := ns / int64(time.Second)
	if sec == c.sec && c.iso != nil {
		return
	}
	c.sec = sec
	t := time.Unix(sec, 0).UTC()
	if c.iso == nil {
		c.iso, c.clf = make([]byte, 0, 32), make([]byte, 0, 32)
	}
	c.iso = t.AppendFormat(c.iso[:0], "2006-01-02T15:04:05")
	c.clf = t.AppendFormat(c.clf[:0], "02/Jan/2006:15:04:05 +0000")
}

// appendJSONLine appends e as a JSON object and a newline.
func appendJSONLine(dst []byte, e *logEntry, c *logClock) []byte {
	rl := e.rl
	c.at(rl.start)
	dst = append(dst, `{"time":"`...)
	dst = append(dst, c.iso...)
	dst = append(dst, '.')
	dst = appendPadded(dst, (rl.start%int64(time.Second))/int64(time.Millisecond), 3)
	dst = append(dst, `Z","request_id":`...)
	dst = appendJSONString(dst, rl.id.bytes())
	dst = append(dst, `,"client":"`...)
	if e.client.IsValid() {
		dst = e.client.AppendTo(dst)
	}
	dst = append(dst, `","method":`...)
	dst = appendJSONString(dst, e.method)
	dst = append(dst, `,"host":`...)
	dst = appendJSONString(dst, e.host)
	dst = append(dst, `,"uri":`...)
	dst = appendJSONString(dst, e.uri)
	dst = append(dst, `,"proto":`...)
	dst = appendJSONString(dst, e.proto)
	dst = append(dst, `,"tls":`...)
	dst = appendBool(dst, e.tls)
	dst = append(dst, `,"status":`...)
	dst = appendInt(dst, int64(e.status))
	dst = append(dst, `,"bytes_in":`...)
	dst = appendInt(dst, rl.bytesIn)
	dst = append(dst, `,"bytes_out":`...)
	dst = appendInt(dst, int64(e.out))
	dst = append(dst, `,"duration_ms":`...)
	dst = appendMillis(dst, e.end-rl.start)
	dst = append(dst, `,"service":`...)
	dst = appendJSONStringS(dst, e.service)
	dst = append(dst, `,"source":"`...)
	dst = append(dst, rl.sourceName()...)
	dst = append(dst, '"')
	if dc := rl.datacenter(); dc != "" {
		dst = append(dst, `,"datacenter":`...)
		dst = appendJSONStringS(dst, dc)
	}
	if rl.code != errNone {
		dst = append(dst, `,"edgelb_error":"`...)
		dst = append(dst, errCodeNames[rl.code]...)
		dst = append(dst, '"')
	}
	if rl.reason != "" {
		dst = append(dst, `,"reason":"`...)
		dst = append(dst, rl.reason...)
		dst = append(dst, '"')
	}
	if len(e.cacheStatus) > 0 {
		dst = append(dst, `,"cache_status":`...)
		dst = appendJSONString(dst, e.cacheStatus)
	}
	dst = append(dst, `,"retries":`...)
	dst = appendInt(dst, int64(rl.retries()))
	dst = append(dst, `,"hedges":`...)
	dst = appendInt(dst, int64(rl.hedges))
	dst = append(dst, `,"tries":[`...)
	var order [maxTries]uint8
	for i, k := range rl.sorted(&order) {
		t := &rl.tries[k]
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = append(dst, `{"backend":`...)
		dst = appendJSONStringS(dst, t.b.addr)
		dst = append(dst, `,"outcome":"`...)
		dst = append(dst, tryOutcomeNames[t.outcome]...)
		dst = append(dst, `","status":`...)
		dst = appendInt(dst, int64(t.status))
		dst = append(dst, `,"start_ms":`...)
		dst = appendMillis(dst, t.start)
		dst = append(dst, `,"duration_ms":`...)
		dst = appendMillis(dst, t.lat)
		dst = append(dst, '}')
	}
	return append(dst, "]}\n"...)
}

// appendCombinedLine appends e in the NCSA combined format, followed by
// edgelb's fields as key=value, and a newline.
func appendCombinedLine(dst []byte, e *logEntry, c *logClock) []byte {
	rl := e.rl
	c.at(rl.start)
	if e.client.IsValid() {
		dst = e.client.Addr().AppendTo(dst)
	} else {
		dst = append(dst, '-')
	}
	dst = append(dst, " - - ["...)
	dst = append(dst, c.clf...)
	dst = append(dst, `] "`...)
	dst = appendQuoted(dst, e.method)
	dst = append(dst, ' ')
	dst = appendQuoted(dst, e.uri)
	dst = append(dst, ' ')
	dst = appendQuoted(dst, e.proto)
	dst = append(dst, `" `...)
	dst = appendInt(dst, int64(e.status))
	dst = append(dst, ' ')
	dst = appendInt(dst, int64(e.out))
	dst = append(dst, ` "`...)
	dst = appendQuotedOrDash(dst, e.referer)
	dst = append(dst, `" "`...)
	dst = appendQuotedOrDash(dst, e.ua)
	dst = append(dst, `" request_id=`...)
	dst = appendQuoted(dst, rl.id.bytes())
	dst = append(dst, " host="...)
	dst = appendQuotedOrDash(dst, e.host)
	dst = append(dst, " duration_ms="...)
	dst = appendMillis(dst, e.end-rl.start)
	dst = append(dst, " service="...)
	if e.service == "" {
		dst = append(dst, '-')
	} else {
		dst = append(dst, e.service...)
	}
	dst = append(dst, " source="...)
	dst = append(dst, rl.sourceName()...)
	if dc := rl.datacenter(); dc != "" {
		dst = append(dst, " datacenter="...)
		dst = append(dst, dc...)
	}
	dst = append(dst, " edgelb_error="...)
	if rl.code != errNone {
		dst = append(dst, errCodeNames[rl.code]...)
	} else {
		dst = append(dst, '-')
	}
	if rl.reason != "" {
		dst = append(dst, " reason="...)
		dst = append(dst, rl.reason...)
	}
	if len(e.cacheStatus) > 0 {
		dst = append(dst, ` cache_status="`...)
		dst = appendQuoted(dst, e.cacheStatus)
		dst = append(dst, '"')
	}
	dst = append(dst, " retries="...)
	dst = appendInt(dst, int64(rl.retries()))
	dst = append(dst, " hedges="...)
	dst = appendInt(dst, int64(rl.hedges))
	dst = append(dst, ` tries="`...)
	var order [maxTries]uint8
	for i, k := range rl.sorted(&order) {
		t := &rl.tries[k]
		if i > 0 {
			dst = append(dst, ", "...)
		}
		dst = append(dst, t.b.addr...)
		dst = append(dst, ' ')
		dst = append(dst, tryOutcomeNames[t.outcome]...)
		dst = append(dst, ' ')
		if t.status > 0 {
			dst = appendInt(dst, int64(t.status))
		} else {
			dst = append(dst, '-')
		}
		dst = append(dst, ' ')
		dst = appendMillis(dst, t.lat)
		dst = append(dst, "ms"...)
	}
	return append(dst, "\"\n"...)
}

// retries counts the tries after the first that were not hedges.
func (rl *reqLog) retries() int { return max(int(rl.n)-1-int(rl.hedges), 0) }

// sorted returns the indexes of rl's tries in the order they began.
func (rl *reqLog) sorted(order *[maxTries]uint8) []uint8 {
	o := order[:rl.n]
	for i := range o {
		o[i] = uint8(i)
		for j := i; j > 0 && rl.tries[o[j]].start < rl.tries[o[j-1]].start; j-- {
			o[j], o[j-1] = o[j-1], o[j]
		}
	}
	return o
}

func appendInt(dst []byte, n int64) []byte {
	if n < 0 {
		dst = append(dst, '-')
		n = -n
	}
	var b [20]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
		if n == 0 {
			break
		}
	}
	return append(dst, b[i:]...)
}

// appendPadded appends n, at least width digits.
func appendPadded(dst []byte, n int64, width int) []byte {
	for d, w := int64(10), 1; w < width; d, w = d*10, w+1 {
		if n < d {
			dst = append(dst, '0')
		}
	}
	return appendInt(dst, n)
}

// appendMillis appends ns in milliseconds with three decimals.
func appendMillis(dst []byte, ns int64) []byte {
	if ns < 0 {
		ns = 0
	}
	us := (ns + 500) / 1000
	dst = appendInt(dst, us/1000)
	dst = append(dst, '.')
	return appendPadded(dst, us%1000, 3)
}

func appendBool(dst []byte, b bool) []byte {
	if b {
		return append(dst, "true"...)
	}
	return append(dst, "false"...)
}

// appendJSONString appends s as a JSON string. Bytes that are not valid
// UTF-8 come out as \u00XX, so that the line stays valid JSON.
func appendJSONString(dst, s []byte) []byte {
	dst = append(dst, '"')
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c >= 0x20 && c < 0x80 && c != '"' && c != '\\':
			dst = append(dst, c)
			i++
			continue
		case c == '"' || c == '\\':
			dst = append(dst, '\\', c)
			i++
			continue
		case c < 0x20:
			dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&15])
			i++
			continue
		}
		if n := validRune(s[i:]); n > 0 {
			dst = append(dst, s[i:i+n]...)
			i += n
			continue
		}
		dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&15])
		i++
	}
	return append(dst, '"')
}

func appendJSONStringS(dst []byte, s string) []byte {
	dst = append(dst, '"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c >= 0x80 || c == '"' || c == '\\' {
			// Backend addresses and service names are plain; anything
			// else goes the long way.
			return appendJSONString(dst[:len(dst)-1], []byte(s))
		}
	}
	dst = append(dst, s...)
	return append(dst, '"')
}

// validRune returns the length of the valid multi-byte UTF-8 sequence at
// the start of s, or 0.
func validRune(s []byte) int {
	c := s[0]
	var n int
	var min rune
	switch {
	case c&0xe0 == 0xc0:
		n, min = 2, 0x80
	case c&0xf0 == 0xe0:
		n, min = 3, 0x800
	case c&0xf8 == 0xf0:
		n, min = 4, 0x10000
	default:
		return 0
	}
	if len(s) < n {
		return 0
	}
	r := rune(c) & (0x7f >> n)
	for _, b := range s[1:n] {
		if b&0xc0 != 0x80 {
			return 0
		}
		r = r<<6 | rune(b&0x3f)
	}
	if r < min || r > 0x10ffff || r >= 0xd800 && r <= 0xdfff {
		return 0
	}
	return n
}

// appendQuoted appends s for a double-quoted field of the combined
// format, as nginx escapes it: '"', '\' and bytes outside printable ASCII
// as \xHH.
func appendQuoted(dst, s []byte) []byte {
	for _, c := range s {
		if c < 0x20 || c >= 0x7f || c == '"' || c == '\\' {
			dst = append(dst, '\\', 'x', hexDigits[c>>4], hexDigits[c&15])
			continue
		}
		dst = append(dst, c)
	}
	return dst
}

func appendQuotedOrDash(dst, s []byte) []byte {
	if len(s) == 0 {
		return append(dst, '-')
	}
	return appendQuoted(dst, s)
}

// idName is the request-ID header's name in lower case, for the event
// loop's scanners; nil when IDs are off.
func (rl *reqLog) idName() []byte {
	if rl.ids == nil {
		return nil
	}
	return rl.ids.lower
}
