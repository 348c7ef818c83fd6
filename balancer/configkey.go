package balancer

import (
	"bytes"
	"fmt"
	"reflect"
	"time"

	"github.com/VictoriaMetrics/metrics"

	"github.com/edgelb/edgelb/balancer/fleet"
)

// ConfigKeyStatus is consul.config_key in /status: where the running
// services and routes come from, and why the key's value was refused if
// it was.
type ConfigKeyStatus struct {
	Key string `json:"key"`
	// Source is where the running services and routes come from:
	// "consul" (the key's value), "state_dir" (its last good value, kept
	// by an earlier run, while Consul does not answer) or "file" (the
	// file's own, until the key has a value).
	Source string `json:"source"`
	// Index is the ModifyIndex of the value running; AppliedAt when it
	// took effect.
	Index     uint64    `json:"index,omitempty"`
	AppliedAt time.Time `json:"applied_at,omitzero"`
	// Error says why the key's current value is not running, from
	// ErrorSince, the first refusal since the last value applied;
	// ErrorIndex is the refused value's index.
	Error      string    `json:"error,omitempty"`
	ErrorIndex uint64    `json:"error_index,omitempty"`
	ErrorSince time.Time `json:"error_since,omitzero"`
	// WatchError is the last failed call to Consul while the watch fails.
	WatchError   string    `json:"watch_error,omitempty"`
	WatchErrorAt time.Time `json:"watch_error_at,omitzero"`
}

// configKeyWait bounds how long a starting instance waits for Consul to
// give the key's value before it serves.
const configKeyWait = 2 * time.Second

// Values of consul.config_key applied and refused.
var (
	configKeyApplied  = metrics.NewCounter(`edgelb_config_key_updates_total{result="applied"}`)
	configKeyRejected = metrics.NewCounter(`edgelb_config_key_updates_total{result="rejected"}`)
)

// startConfigKeyLocked starts the watch of consul.config_key for the
// file's config file and returns the config to start with: file with the
// key's services and routes from Consul, or else the last good value kept
// in state_dir, or else file itself. The caller holds reloadMu.
func (s *Server) startConfigKeyLocked(file *Config) *Config {
	w := s.newKeyWatch(file)
	if w == nil {
		return file
	}
	s.keyWatch.Store(w)
	s.keyStatus.Store(&ConfigKeyStatus{Key: w.Key(), Source: "file"})
	v, err := w.First(configKeyWait)
	eff := file
	switch {
	case err == nil && v.Exists:
		e, refused := s.tryConfigKeyLocked(file, v)
		if refused == nil {
			eff = e
			break
		}
		// Refused: the last good value of an earlier run is better than
		// the file's.
		if good, ok := w.LastGood(); ok {
			if e, err := s.tryConfigKeyLocked(file, good); err == nil {
				eff = e
				s.setKeyErrorLocked(v, refused.Error())
			}
		}
	case err == nil:
		s.log.Warn("consul.config_key has no value; serving the file's services and routes", "key", w.Key())
		s.setKeyErrorLocked(v, "the key does not exist; the file's services and routes serve until it does")
	default:
		good, ok := w.LastGood()
		if ok {
			if e, err := s.tryConfigKeyLocked(file, good); err == nil {
				eff = e
				s.log.Warn("Consul did not answer; serving the services and routes of the config key kept in state_dir",
					"key", w.Key(), "index", good.Index, "saved_at", good.SavedAt)
				break
			}
		}
		s.log.Warn("Consul did not answer and state_dir keeps no value of the config key; serving the file's services and routes until it does",
			"key", w.Key(), "err", err)
		s.keyPending.Store(len(file.Routes) == 0)
	}
	w.Start()
	return eff
}

// newKeyWatch returns a watch of consul.config_key of cfg, nil without
// one.
func (s *Server) newKeyWatch(cfg *Config) *fleet.KeyWatch {
	key := configKey(cfg)
	if key == "" {
		return nil
	}
	client, err := cfg.Consul.NewClient()
	if err != nil {
		// ParseConfig checked the address and scheme.
		s.log.Error("consul.config_key", "err", err)
		return nil
	}
	var w *fleet.KeyWatch
	w = fleet.NewKeyWatch(client, cfg.Consul.Address, key, cfg.StateDir, func(v fleet.KeyValue) { s.applyConfigKey(w, v) }, s.log)
	return w
}

// tryConfigKeyLocked returns file with the services and routes of v, or
// the error that refuses them, which it records and counts. The caller
// holds reloadMu.
func (s *Server) tryConfigKeyLocked(file *Config, v fleet.KeyValue) (*Config, error) {
	eff, err := withRouting(file, v.Value)
	if err != nil {
		s.refuseKeyLocked(v, err)
		return nil, err
	}
	s.acceptKeyLocked(v)
	return eff, nil
}

// acceptKeyLocked records v as the value running.
func (s *Server) acceptKeyLocked(v fleet.KeyValue) {
	configKeyApplied.Inc()
	s.keyGood = &v
	s.keyPending.Store(false)
	src := "consul"
	if v.FromDisk {
		src = "state_dir"
	}
	s.keyStatus.Store(&ConfigKeyStatus{Key: v.Key, Source: src, Index: v.Index, AppliedAt: time.Now()})
	s.keyWatch.Load().SaveGood(v)
	s.log.Info("services and routes applied from the config key", "key", v.Key, "index", v.Index, "source", src)
}

// refuseKeyLocked records and counts the refusal of v.
func (s *Server) refuseKeyLocked(v fleet.KeyValue, err error) {
	configKeyRejected.Inc()
	s.log.Error("config key value refused; keeping the running services and routes", "key", v.Key, "index", v.Index, "err", err)
	s.setKeyErrorLocked(v, err.Error())
}

// setKeyErrorLocked says in the status why v is not running.
func (s *Server) setKeyErrorLocked(v fleet.KeyValue, msg string) {
	st := *s.keyStatus.Load()
	if st.Error == "" {
		st.ErrorSince = time.Now()
	}
	st.Error, st.ErrorIndex = msg, v.Index
	s.keyStatus.Store(&st)
}

// applyConfigKey applies a new value of the key that w watches, as a
// reload: a value that is not valid, or that the reload refuses, is
// logged, counted and reported in /status, and the running config stays.
// A key that no longer exists keeps the running config too.
func (s *Server) applyConfigKey(w *fleet.KeyWatch, v fleet.KeyValue) {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	if s.keyWatch.Load() != w {
		return // replaced by a reload
	}
	switch {
	case !v.Exists && s.keyGood == nil:
		s.keyPending.Store(false)
		s.setKeyErrorLocked(v, "the key does not exist; the file's services and routes serve until it does")
		return
	case !v.Exists:
		configKeyRejected.Inc()
		s.log.Error("config key deleted; keeping the services and routes it last gave", "key", v.Key, "index", s.keyGood.Index)
		s.setKeyErrorLocked(v, fmt.Sprintf("the key no longer exists; keeping the services and routes of index %d", s.keyGood.Index))
		return
	case s.keyGood != nil && bytes.Equal(v.Value, s.keyGood.Value):
		// The running value again (written anew, or put back after a
		// refused one): nothing to reload.
		st := *s.keyStatus.Load()
		st.Error, st.ErrorIndex, st.ErrorSince, st.Index, st.Source = "", 0, time.Time{}, v.Index, "consul"
		s.keyStatus.Store(&st)
		good := v
		s.keyGood = &good
		w.SaveGood(v)
		return
	}
	eff, err := withRouting(s.fileCfg, v.Value)
	if err == nil {
		err = s.reloadLocked(eff)
	} else {
		reloadErrors.Inc()
	}
	if err != nil {
		s.refuseKeyLocked(v, err)
		return
	}
	s.acceptKeyLocked(v)
}

// withConfigKeyLocked returns cfg, a config from the file, with the
// services and routes of the key's running value when cfg watches the
// same key. The caller holds reloadMu.
func (s *Server) withConfigKeyLocked(cfg *Config) (*Config, error) {
	key := configKey(cfg)
	if key == "" || s.keyGood == nil || s.keyGood.Key != key {
		return cfg, nil
	}
	eff, err := withRouting(cfg, s.keyGood.Value)
	if err != nil {
		reloadErrors.Inc()
		return nil, fmt.Errorf("the services and routes of Consul key %s (index %d) do not fit this config:\n%w", key, s.keyGood.Index, err)
	}
	return eff, nil
}

// switchConfigKeyLocked follows the config key of cfg, a config from the
// file just applied: a new key, or the same key in another Consul, gets a
// new watch, whose first answer applies as any change does. It returns
// the watch replaced, for the caller to stop once it released reloadMu.
func (s *Server) switchConfigKeyLocked(cfg *Config) *fleet.KeyWatch {
	old := s.keyWatch.Load()
	oldCfg := s.fileCfg
	key := configKey(cfg)
	if old != nil && old.Key() == key && reflect.DeepEqual(consulWatching(oldCfg), consulWatching(cfg)) && oldCfg.StateDir == cfg.StateDir {
		return nil
	}
	s.keyWatch.Store(nil)
	if key == "" || s.keyGood == nil || s.keyGood.Key != key {
		s.keyGood = nil
	}
	s.keyStatus.Store(nil)
	s.keyPending.Store(false)
	if w := s.newKeyWatch(cfg); w != nil {
		s.keyWatch.Store(w)
		src := "file"
		var index uint64
		if s.keyGood != nil {
			src, index = "consul", s.keyGood.Index
		}
		s.keyStatus.Store(&ConfigKeyStatus{Key: key, Source: src, Index: index})
		w.Start()
	}
	return old
}

// stopConfigKey stops the watch of the config key.
func (s *Server) stopConfigKey() {
	if w := s.keyWatch.Swap(nil); w != nil {
		w.Stop()
	}
}

// configKeyStatus returns the config key in /status; nil without one.
func (s *Server) configKeyStatus() *ConfigKeyStatus {
	st := s.keyStatus.Load()
	if st == nil {
		return nil
	}
	c := *st
	if w := s.keyWatch.Load(); w != nil {
		c.WatchError, c.WatchErrorAt = w.Err()
	}
	return &c
}
