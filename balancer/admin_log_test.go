package balancer

import (
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a strings.Builder for a logger that several goroutines use.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func TestAdminServerLogsThroughSlog(t *testing.T) {
	var logs syncBuffer
	s := startEdgeLogging(t, "services:\n  web: {static: [127.0.0.1:1]}\nroutes: [{service: web}]\n", slog.New(slog.NewTextHandler(&logs, nil)))
	// net/http logs a second WriteHeader to the server's ErrorLog. (A
	// handler's panic is edgelb's to log: TestPanicInAdminHandlerIsCounted.)
	s.admin.mux.HandleFunc("GET /test/twice", func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(200)
		w.WriteHeader(500)
	})
	if resp, err := http.Get("http://" + s.AdminAddr() + "/test/twice"); err == nil {
		resp.Body.Close()
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		out := logs.String()
		i := strings.Index(out, "http: superfluous response.WriteHeader call")
		if i >= 0 {
			line := out[strings.LastIndexByte(out[:i], '\n')+1:]
			line, _, _ = strings.Cut(line, "\n")
			if !strings.HasPrefix(line, "time=") || !strings.Contains(line, "level=ERROR") || !strings.Contains(line, "server=admin") ||
				!strings.Contains(line, "admin_log_test.go") {
				t.Fatalf("not an slog line of the admin server: %s", line)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("net/http's error was not logged through slog:\n%s", out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
