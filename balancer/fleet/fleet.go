// Package fleet makes edgelb instances that share a Consul act as one
// edge: each registers itself in Consul (Registrar), purges of the stale
// store go to every instance through a log in Consul's KV store (Purges),
// services and routes may come from one KV key (KeyWatch), and each knows
// the others from Consul's health API (Peers).
//
// Consul is the only coordination: ordering comes from its raft indexes
// (ModifyIndex, check-and-set writes), never from clocks, and every change
// reaches the instances through blocking queries. An instance that cannot
// reach Consul keeps serving alone and catches up when Consul answers again.
package fleet

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/edgelb/edgelb/discovery"
	"github.com/edgelb/edgelb/internal/panics"
)

// Pacing of the blocking-query loops.
const (
	// waitTime is how long a blocking query may wait for a change.
	waitTime = 30 * time.Second
	// minCallSpacing is the least time between two calls of one loop, so
	// that an index that never blocks cannot turn a loop into a busy one.
	minCallSpacing = 50 * time.Millisecond
	// maxBackoff caps the wait between failed calls.
	maxBackoff = 10 * time.Second
)

// follow runs a blocking-query loop until ctx ends. call makes one query
// with the options given and returns the answer's index; failed is told of
// each failed call with the number of failures in a row. After a failure,
// or an index that went backwards (a Consul restarted or rebuilt), the
// next call asks without an index, so that it answers at once.
func follow(ctx context.Context, call func(q *api.QueryOptions) (uint64, error), failed func(err error, failures int)) {
	var index uint64
	failures := 0
	var last time.Time
	for ctx.Err() == nil {
		if d := minCallSpacing - time.Since(last); d > 0 && !discovery.SleepCtx(ctx, d) {
			return
		}
		last = time.Now()
		got, err := call((&api.QueryOptions{WaitIndex: index, WaitTime: waitTime}).WithContext(ctx))
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			failures++
			index = 0
			failed(err, failures)
			if !discovery.SleepCtx(ctx, backoff(failures)) {
				return
			}
			continue
		}
		failures = 0
		if got < index || got == 0 {
			index = 0
		} else {
			index = got
		}
	}
}

// backoff returns the jittered wait after n failures in a row: about
// 0.25 s doubling up to maxBackoff.
func backoff(n int) time.Duration {
	d := min(250*time.Millisecond<<min(n-1, 6), maxBackoff)
	return d/2 + time.Duration(rand.Int64N(int64(d)))
}

// notFound reports whether err is Consul's 404.
func notFound(err error) bool {
	var se api.StatusError
	return errors.As(err, &se) && se.Code == 404
}

// describe words a Consul client error for logs and /status.
func describe(addr string, err error) string { return discovery.DescribeConsulErr(addr, err) }

// sortedKeys returns the keys of m in order.
func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// Version is the version of the running edgelb: its module version, or
// for a build from a work tree the commit it was built from.
func Version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev, dirty string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "-dirty"
			}
		}
	}
	if rev == "" {
		return "devel"
	}
	return rev[:min(12, len(rev))] + dirty
}

// InstanceIDFile is the file under state_dir that keeps an instance's ID.
const InstanceIDFile = "instance_id"

// InstanceID returns the stable ID of the instance whose state is in
// stateDir: the one kept in stateDir/instance_id, made on first use from
// the host name and random bytes. When stateDir cannot keep it, the ID is
// made from the host name and the port of listen, which stay the same
// across restarts too.
func InstanceID(stateDir, listen string) (string, error) {
	path := filepath.Join(stateDir, InstanceIDFile)
	if b, err := os.ReadFile(path); err == nil {
		if id := strings.TrimSpace(string(b)); validID(id) {
			return id, nil
		}
	}
	host := hostLabel()
	var rnd [4]byte
	crand.Read(rnd[:])
	id := host + "-" + hex.EncodeToString(rnd[:])
	if err := os.MkdirAll(stateDir, 0o755); err == nil {
		if err = writeFileAtomic(path, []byte(id+"\n")); err == nil {
			return id, nil
		}
	}
	_, port, _ := net.SplitHostPort(listen)
	return host + "-" + port, fmt.Errorf("cannot keep the instance ID in %s; using host name and listen port instead", path)
}

// hostLabel returns the host name made fit for a Consul service ID.
func hostLabel() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "edgelb"
	}
	h, _, _ = strings.Cut(h, ".")
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' {
			return r
		}
		return '-'
	}, h)
}

// validID reports whether id is fit for a Consul service ID and KV key
// names.
func validID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return false
		}
	}
	return true
}

// writeFileAtomic writes data to path through a temporary file renamed
// into place, so that a crash leaves the old content or the new one.
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// runAgain runs f until it returns, or ctx ends: a panic in it is counted
// and logged (msg, with the task's name) and f starts again after a
// backoff that grows with each panic.
func runAgain(ctx context.Context, log *slog.Logger, msg, task string, f func()) {
	for n := 1; ctx.Err() == nil; n++ {
		if panics.Fleet.Run(f, log, msg, "task", task) == nil {
			return
		}
		if !discovery.SleepCtx(ctx, backoff(n)) {
			return
		}
	}
}
