package balancer

import (
	"testing"
	"time"
)

func TestParseConfigHTTP2(t *testing.T) {
	const svc = "services:\n  web: {static: [127.0.0.1:1]}\n"
	cfg, err := ParseConfig([]byte(svc))
	if err != nil {
		t.Fatal(err)
	}
	want := HTTP2Config{
		MaxConcurrentStreams: 100, MaxFrameSize: 16384, InitialWindowSize: 256 << 10, ConnectionWindowSize: 1 << 20,
		MaxHeaderListSize: DefaultMaxHeaderBytes, IdleTimeout: DefaultIdleTimeout, MaxResetsPerSecond: 200,
		MaxControlFramesPerSecond: 1000,
	}
	if got := cfg.Server.HTTP2; got != want || cfg.Server.H2C {
		t.Errorf("defaults: h2c %v, http2 %+v, want %+v", cfg.Server.H2C, got, want)
	}
	// max_header_list_size and idle_timeout follow the server's.
	cfg, err = ParseConfig([]byte("server:\n  max_header_bytes: 4096\n  idle_timeout: 5s\n  h2c: true\n  http2: {max_concurrent_streams: 250, max_frame_size: 32768}\n" + svc))
	if err != nil {
		t.Fatal(err)
	}
	if h := cfg.Server.HTTP2; h.MaxHeaderListSize != 4096 || h.IdleTimeout != 5*time.Second || h.MaxConcurrentStreams != 250 ||
		h.MaxFrameSize != 32768 || !cfg.Server.H2C {
		t.Errorf("set: %+v", h)
	}

	f := func(server string, wants ...string) {
		t.Helper()
		configRefused(t, "server:\n"+server+svc, wants...)
	}
	f("  http2: {max_concurrent_streams: -1, max_frame_size: 1024, initial_window_size: 100, connection_window_size: 4294967296}\n",
		"server.http2.max_concurrent_streams: must be from 1 to 10000 (got -1)",
		"server.http2.max_frame_size: must be from 16384 to 16777215 (got 1024)",
		"server.http2.initial_window_size: must be from 65535 to 2147483647 (got 100)",
		"server.http2.connection_window_size: must be from 65535 to 2147483647 (got 4294967296)")
	f("  http2: {max_header_list_size: 100, idle_timeout: -1s, max_resets_per_second: -5, max_control_frames_per_second: -1}\n",
		"server.http2.max_header_list_size: must be from 1024 to 16777216 (got 100)",
		"server.http2.idle_timeout: must not be negative (got -1s)",
		"server.http2.max_resets_per_second: must be at least 1 (got -5)",
		"server.http2.max_control_frames_per_second: must be at least 1 (got -1)")
	f("  http2: {max_streams: 5}\n", "server.http2.max_streams: unknown key (known keys: connection_window_size, disabled, idle_timeout, initial_window_size")
	f("  http2: {idle_timeout: 30}\n", "server.http2.idle_timeout: duration 30 needs a unit")
	f("  h2c: true\n  http2: {disabled: true}\n", "server.h2c: needs HTTP/2, which server.http2.disabled turns off")
	f("  h2c: yes please\n", "server.h2c: cannot unmarshal")
}
