package discovery

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"time"
)

// DNSStateFileName is the file under state_dir that keeps the last good
// addresses of every host name, so that an edgelb started while DNS fails
// still knows where the backends are.
const DNSStateFileName = "dns.json"

// dnsStateVersion changes when the file's format does; other versions are
// ignored.
const dnsStateVersion = 1

type dnsStateDoc struct {
	Version int                  `json:"version"`
	Names   map[string]dnsRecord `json:"names"`
}

// dnsRecord is the last good answer for one name.
type dnsRecord struct {
	Addrs      []netip.Addr `json:"addrs"`
	ResolvedAt time.Time    `json:"resolved_at"`
}

// loadDNSState returns the answers persisted in dir; none when dir is ""
// or holds no usable file (a damaged one is logged).
func loadDNSState(dir string, log *slog.Logger) map[string]dnsRecord {
	if dir == "" {
		return map[string]dnsRecord{}
	}
	path := filepath.Join(dir, DNSStateFileName)
	data, err := os.ReadFile(path)
	if err != nil {
		if !os.IsNotExist(err) {
			log.Error("cannot read the DNS state; starting without it", "path", path, "err", err)
		}
		return map[string]dnsRecord{}
	}
	var doc dnsStateDoc
	if err := json.Unmarshal(data, &doc); err != nil || doc.Version != dnsStateVersion {
		if err == nil {
			err = fmt.Errorf("version %d, want %d", doc.Version, dnsStateVersion)
		}
		log.Error("cannot use the DNS state; starting without it (it is rewritten on the next answer)", "path", path, "err", err)
		return map[string]dnsRecord{}
	}
	names := make(map[string]dnsRecord, len(doc.Names))
	for name, rec := range doc.Names {
		if len(rec.Addrs) > 0 {
			rec.Addrs = sortAddrs(rec.Addrs)
			names[name] = rec
		}
	}
	return names
}

// persist writes the addresses of every name to state_dir.
func (d *DNS) persist() {
	// Gathering and writing under one lock keeps an older snapshot from
	// overwriting a newer one.
	d.persistMu.Lock()
	defer d.persistMu.Unlock()
	d.mu.Lock()
	dir := d.stateDir
	names := make(map[string]dnsRecord)
	for _, s := range d.services {
		for _, w := range s.watches {
			w.mu.Lock()
			rec := dnsRecord{Addrs: w.st.addrs, ResolvedAt: w.st.resolvedAt}
			w.mu.Unlock()
			if len(rec.Addrs) > 0 && rec.ResolvedAt.After(names[w.host].ResolvedAt) {
				names[w.host] = rec
			}
		}
	}
	d.mu.Unlock()
	if dir == "" {
		return
	}
	if err := writeFileAtomic(filepath.Join(dir, DNSStateFileName), dnsStateDoc{Version: dnsStateVersion, Names: names}); err != nil {
		d.log.Error("cannot persist the DNS state", "err", err)
	}
}
