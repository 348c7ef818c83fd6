package acme

import (
	"bufio"
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/edgelb/edgelb/discovery/consultest"
)

func TestConsulStorageKeys(t *testing.T) {
	a := consultest.Start(t)
	s := NewConsulStorage(a.Client, "test/certmagic")
	ctx := context.Background()
	put := func(key, value string) {
		t.Helper()
		if err := s.Store(ctx, key, []byte(value)); err != nil {
			t.Fatal(err)
		}
	}
	before := time.Now()
	put("certificates/ca/a.test/a.test.crt", "cert")
	put("certificates/ca/a.test/a.test.key", "key")
	put("certificates/ca/ab.test/ab.test.crt", "cert ab")
	put("acme/ca/users/ops@example.com/ops.json", "account")

	if v, err := s.Load(ctx, "certificates/ca/a.test/a.test.key"); err != nil || string(v) != "key" {
		t.Fatalf("Load: %q, %v", v, err)
	}
	if _, err := s.Load(ctx, "certificates/ca/none"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load of a missing key: %v, want fs.ErrNotExist", err)
	}
	// The keys are under the prefix in Consul's KV.
	if p, _, err := a.Client.KV().Get("test/certmagic/certificates/ca/a.test/a.test.crt", nil); err != nil || p == nil || string(p.Value) != "cert" {
		t.Fatalf("KV test/certmagic/certificates/ca/a.test/a.test.crt: %+v, %v", p, err)
	}

	f := func(key string, exists, terminal bool) {
		t.Helper()
		if got := s.Exists(ctx, key); got != exists {
			t.Fatalf("Exists(%q) = %v, want %v", key, got, exists)
		}
		ki, err := s.Stat(ctx, key)
		if !exists {
			if !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("Stat(%q): %v, want fs.ErrNotExist", key, err)
			}
			return
		}
		if err != nil || ki.IsTerminal != terminal || ki.Key != key {
			t.Fatalf("Stat(%q) = %+v, %v; want terminal %v", key, ki, err, terminal)
		}
		if terminal && (ki.Modified.Before(before.Add(-time.Second)) || ki.Modified.After(time.Now()) || ki.Size == 0) {
			t.Fatalf("Stat(%q) = %+v: modified or size wrong", key, ki)
		}
	}
	f("certificates/ca/a.test/a.test.crt", true, true)
	f("certificates/ca/a.test", true, false)
	f("certificates", true, false)
	f("certificates/ca/a", false, false)
	f("nothing", false, false)

	list := func(prefix string, recursive bool, want ...string) {
		t.Helper()
		got, err := s.List(ctx, prefix, recursive)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Fatalf("List(%q, %v) = %q, %v; want %q", prefix, recursive, got, err, want)
		}
	}
	list("certificates/ca", false, "certificates/ca/a.test", "certificates/ca/ab.test")
	list("certificates/ca/a.test", false, "certificates/ca/a.test/a.test.crt", "certificates/ca/a.test/a.test.key")
	list("certificates", true, "certificates/ca", "certificates/ca/a.test", "certificates/ca/a.test/a.test.crt",
		"certificates/ca/a.test/a.test.key", "certificates/ca/ab.test", "certificates/ca/ab.test/ab.test.crt")
	if _, err := s.List(ctx, "ocsp", false); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("List of a missing folder: %v, want fs.ErrNotExist", err)
	}

	// Delete takes a folder whole, but not its namesakes (a.test, not
	// ab.test); a missing key is no error.
	if err := s.Delete(ctx, "certificates/ca/a.test"); err != nil {
		t.Fatal(err)
	}
	f("certificates/ca/a.test/a.test.crt", false, false)
	f("certificates/ca/ab.test/ab.test.crt", true, true)
	if err := s.Delete(ctx, "certificates/ca/a.test"); err != nil {
		t.Fatalf("Delete of a missing key: %v", err)
	}
}

// TestConsulStorageLock: a lock held by one storage keeps another waiting
// until it is released; a wait ends with its context.
func TestConsulStorageLock(t *testing.T) {
	a := consultest.Start(t)
	s1 := NewConsulStorage(a.Client, "")
	s2 := NewConsulStorage(a.Client, "")
	ctx := context.Background()
	if err := s1.Lock(ctx, "issue_cert_a.test"); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	err := s2.Lock(short, "issue_cert_a.test")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second Lock while held: %v, want the context's deadline", err)
	}
	// Another name is free.
	if err := s2.Lock(ctx, "issue_cert_b.test"); err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() { got <- s2.Lock(ctx, "issue_cert_a.test") }()
	select {
	case err := <-got:
		t.Fatalf("Lock returned while held elsewhere: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	if err := s1.Unlock(ctx, "issue_cert_a.test"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Lock not taken after Unlock")
	}
	for _, n := range []string{"issue_cert_a.test", "issue_cert_b.test"} {
		if err := s2.Unlock(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	if err := s2.Unlock(ctx, "issue_cert_a.test"); err == nil {
		t.Fatal("Unlock of a lock not held succeeded")
	}
	// Released locks leave no key and no session behind.
	if keys, _, _ := a.Client.KV().Keys(DefaultConsulPrefix+"locks/", "", nil); len(keys) != 0 {
		t.Fatalf("lock keys left: %v", keys)
	}
	waitSessions(t, a.Client, 0)
}

// waitSessions waits until Consul has n sessions.
func waitSessions(t *testing.T, c *api.Client, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ss, _, err := c.Session().List(nil)
		if err == nil && len(ss) == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions (%v), want %d", len(ss), err, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// lockHolderEnv makes the test binary a process that takes a lock and
// waits to be killed (TestConsulStorageLockHolderProcess).
const lockHolderEnv = "EDGELB_TEST_LOCK_HOLDER_CONSUL"

// TestConsulStorageLockReleasedWhenHolderDies kills a process holding a
// lock: its session expires and the lock is taken by another, within
// Consul's TTL grace (twice lockSessionTTL).
func TestConsulStorageLockReleasedWhenHolderDies(t *testing.T) {
	a := consultest.Start(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestConsulStorageLockHolderProcess$")
	cmd.Env = append(os.Environ(), lockHolderEnv+"="+a.Addr())
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	locked := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.TrimSpace(sc.Text()) == "locked" {
				locked <- true
				return
			}
		}
		locked <- false
	}()
	select {
	case ok := <-locked:
		if !ok {
			t.Fatal("the holder process ended without taking the lock")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the holder process did not take the lock")
	}

	s := NewConsulStorage(a.Client, "")
	short, cancel := context.WithTimeout(context.Background(), time.Second)
	err = s.Lock(short, "issue_cert_dead.test")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock while the holder lives: %v, want the context's deadline", err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	killed := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.Lock(ctx, "issue_cert_dead.test"); err != nil {
		t.Fatalf("lock of a dead holder not released: %v", err)
	}
	t.Logf("lock taken %v after its holder was killed", time.Since(killed).Round(100*time.Millisecond))
	if err := s.Unlock(ctx, "issue_cert_dead.test"); err != nil {
		t.Fatal(err)
	}
}

// TestConsulStorageLockHolderProcess is the holder process of
// TestConsulStorageLockReleasedWhenHolderDies; it does nothing in a
// test run of its own.
func TestConsulStorageLockHolderProcess(t *testing.T) {
	addr := os.Getenv(lockHolderEnv)
	if addr == "" {
		return
	}
	c, err := api.NewClient(&api.Config{Address: addr})
	if err != nil {
		t.Fatal(err)
	}
	if err := NewConsulStorage(c, "").Lock(context.Background(), "issue_cert_dead.test"); err != nil {
		t.Fatal(err)
	}
	os.Stdout.WriteString("locked\n")
	time.Sleep(time.Hour)
}
