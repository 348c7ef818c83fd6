package balancer

import (
	"fmt"
	"time"
)

// HTTP2Config is server.http2: HTTP/2 on the TLS listener, where clients
// choose it by ALPN ("h2"), and, with server.h2c, on the plain listener
// for clients that speak it from their first byte (prior knowledge). Every
// stream is served as an HTTP/1.1 request would be; these are the limits
// of the connection it comes on. They take effect at start: a reload keeps
// the values edgelb started with.
type HTTP2Config struct {
	// Disabled takes HTTP/2 out of ALPN: TLS clients get HTTP/1.1.
	Disabled bool `yaml:"disabled"`

	// MaxConcurrentStreams is how many streams a client may have open on
	// one connection (SETTINGS_MAX_CONCURRENT_STREAMS), and so how many
	// of its requests edgelb serves at once. DefaultHTTP2MaxStreams is
	// used if not set.
	MaxConcurrentStreams int `yaml:"max_concurrent_streams"`

	// MaxFrameSize is the largest frame payload a client may send
	// (SETTINGS_MAX_FRAME_SIZE), from 16384 to 16777215; it sizes a
	// connection's read buffer. DefaultHTTP2MaxFrameSize is used if not
	// set.
	MaxFrameSize int `yaml:"max_frame_size"`

	// InitialWindowSize is how many bytes of a request body a client may
	// send on one stream before edgelb has read them
	// (SETTINGS_INITIAL_WINDOW_SIZE). DefaultHTTP2StreamWindow is used if
	// not set.
	InitialWindowSize int `yaml:"initial_window_size"`

	// ConnectionWindowSize is the same for all the streams of a
	// connection together. DefaultHTTP2ConnWindow is used if not set.
	ConnectionWindowSize int `yaml:"connection_window_size"`

	// MaxHeaderListSize bounds a request's header list
	// (SETTINGS_MAX_HEADER_LIST_SIZE, with HTTP/2's 32 bytes per field
	// for ten fields on top, so that a head that fits server.max_header_bytes
	// over HTTP/1.1 fits here too); a larger one gets 431.
	// server.max_header_bytes is used if not set.
	MaxHeaderListSize int `yaml:"max_header_list_size"`

	// IdleTimeout closes, with GOAWAY, a connection that has had no open
	// stream for this long. server.idle_timeout is used if not set.
	IdleTimeout time.Duration `yaml:"idle_timeout"`

	// MaxResetsPerSecond bounds the streams of a connection that end
	// before their answer is sent, reset by the client or for its errors:
	// a burst of this many, then this many a second. A connection over it
	// is closed with GOAWAY ENHANCE_YOUR_CALM (the rapid reset attack,
	// CVE-2023-44487). DefaultHTTP2MaxResets is used if not set.
	MaxResetsPerSecond int `yaml:"max_resets_per_second"`

	// MaxControlFramesPerSecond bounds the frames a client sends that
	// carry no request: SETTINGS, PING, PRIORITY, PRIORITY_UPDATE,
	// RST_STREAM, frames of unknown types, and empty DATA, HEADERS and
	// CONTINUATION frames that end nothing. A burst of this many, then
	// this many a second; a connection over it is closed with GOAWAY
	// ENHANCE_YOUR_CALM. DefaultHTTP2MaxControlFrames is used if not set.
	MaxControlFramesPerSecond int `yaml:"max_control_frames_per_second"`
}

// Defaults and bounds of HTTP2Config.
const (
	DefaultHTTP2MaxStreams       = 100
	DefaultHTTP2MaxFrameSize     = 16 << 10
	DefaultHTTP2StreamWindow     = 256 << 10
	DefaultHTTP2ConnWindow       = 1 << 20
	DefaultHTTP2MaxResets        = 200
	DefaultHTTP2MaxControlFrames = 1000

	maxHTTP2Streams   = 10000
	minHTTP2FrameSize = 16 << 10
	maxHTTP2FrameSize = 1<<24 - 1
	minHTTP2Window    = 65535
	maxHTTP2Window    = 1<<31 - 1
	// maxHTTP2HeaderList bounds max_header_list_size: every stream may
	// hold that much.
	maxHTTP2HeaderList = 16 << 20
)

// applyDefaults fills in every unset field of h that has a default; s is
// the server config, whose max_header_bytes and idle_timeout are already
// set.
func (h *HTTP2Config) applyDefaults(s *ServerConfig) {
	setDefault(&h.MaxConcurrentStreams, DefaultHTTP2MaxStreams)
	setDefault(&h.MaxFrameSize, DefaultHTTP2MaxFrameSize)
	setDefault(&h.InitialWindowSize, DefaultHTTP2StreamWindow)
	setDefault(&h.ConnectionWindowSize, DefaultHTTP2ConnWindow)
	setDefault(&h.MaxHeaderListSize, s.MaxHeaderBytes)
	setDefault(&h.IdleTimeout, s.IdleTimeout)
	setDefault(&h.MaxResetsPerSecond, DefaultHTTP2MaxResets)
	setDefault(&h.MaxControlFramesPerSecond, DefaultHTTP2MaxControlFrames)
}

// validate checks h after applyDefaults; it returns every problem, each
// key under path.
func (h *HTTP2Config) validate(path string) []error {
	var errs []error
	bad := func(k, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: "+format, append([]any{path + k}, args...)...))
	}
	inRange := func(k string, v, lo, hi int) {
		if v < lo || v > hi {
			bad(k, "must be from %d to %d (got %d)", lo, hi, v)
		}
	}
	inRange(".max_concurrent_streams", h.MaxConcurrentStreams, 1, maxHTTP2Streams)
	inRange(".max_frame_size", h.MaxFrameSize, minHTTP2FrameSize, maxHTTP2FrameSize)
	inRange(".initial_window_size", h.InitialWindowSize, minHTTP2Window, maxHTTP2Window)
	inRange(".connection_window_size", h.ConnectionWindowSize, minHTTP2Window, maxHTTP2Window)
	inRange(".max_header_list_size", h.MaxHeaderListSize, 1024, maxHTTP2HeaderList)
	if h.IdleTimeout < 0 {
		bad(".idle_timeout", "must not be negative (got %v)", h.IdleTimeout)
	}
	if h.MaxResetsPerSecond < 1 {
		bad(".max_resets_per_second", "must be at least 1 (got %d)", h.MaxResetsPerSecond)
	}
	if h.MaxControlFramesPerSecond < 1 {
		bad(".max_control_frames_per_second", "must be at least 1 (got %d)", h.MaxControlFramesPerSecond)
	}
	return errs
}
