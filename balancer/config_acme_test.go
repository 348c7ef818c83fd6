package balancer

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/edgelb/edgelb/balancer/acme"
)

func TestACMEConfigErrors(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	const svc = "services: {web: {static: [127.0.0.1:1]}}\n"
	f := func(acmeBlock string, wants ...string) {
		t.Helper()
		configRefused(t, svc+"tls:\n  acme: "+acmeBlock+"\n", wants...)
	}
	f("{domains: [a.example.com]}", "tls.acme.email: missing: the CA's account needs a contact address")
	f("{email: ops, domains: [a.example.com]}", `tls.acme.email: "ops" is not an email address`)
	f("{email: ops@example.com}", "tls.acme.domains: missing: list the names to get certificates for")
	f("{email: ops@example.com, domains: []}", "tls.acme.domains: missing")
	f("{email: ops@example.com, domains: [a.example.com, '*.example.com', 10.0.0.1, 'https://b.example.com/', localhost, a.Example.com, 'bad_name.com']}",
		`tls.acme.domains[1]: "*.example.com": wildcard certificates need the dns-01 challenge`,
		`tls.acme.domains[2]: "10.0.0.1": certificates for IP addresses are not supported`,
		`tls.acme.domains[3]: "https://b.example.com/": want a host name such as example.com, without scheme, port or path`,
		`tls.acme.domains[4]: "localhost" is not a fully qualified domain name`,
		`tls.acme.domains[5]: "a.example.com" is listed already (domains[0])`,
		`tls.acme.domains[6]: "bad_name.com" is not a valid domain name`)
	f("{email: ops@example.com, domains: [a.example.com], ca: 'http://acme.example.com/dir'}",
		`tls.acme.ca: must be the https:// URL of an ACME directory, such as `+acme.DefaultCA+` (got "http://acme.example.com/dir")`)
	f("{email: ops@example.com, domains: [a.example.com], ca: 'acme-staging'}", `tls.acme.ca: must be the https:// URL of an ACME directory`)
	f("{email: ops@example.com, domains: [a.example.com], ca_root: "+filepath.Join(dir, "missing.pem")+"}", `tls.acme.ca_root: cannot read "`+filepath.Join(dir, "missing.pem"))
	f("{email: ops@example.com, domains: [a.example.com], ca_root: "+notPEM+"}", `tls.acme.ca_root: "`+notPEM+`" holds no PEM certificate`)
	f("{email: ops@example.com, domains: [a.example.com], challenges: []}", "tls.acme.challenges: must list at least one of http-01, tls-alpn-01")
	f("{email: ops@example.com, domains: [a.example.com], challenges: [http-01, dns-01]}", `tls.acme.challenges[1]: unknown challenge type "dns-01"`)
	f("{email: ops@example.com, domains: [a.example.com], storage: consul}", "tls.acme.storage: consul needs the top-level consul block (or use storage: dir)")
	f("{email: ops@example.com, domains: [a.example.com], storage: s3}", `tls.acme.storage: must be consul or dir (got "s3")`)
	f("{email: ops@example.com, domains: [a.example.com], renewal_window: 1.5}", "tls.acme.renewal_window: must be between 0 and 1")
	f("{email: ops@example.com, domains: [a.example.com], renew_before: 30d}", "tls.acme.renew_before: unknown key")
	// Every problem at once, each with its key.
	f("{ca: x, storage: s3}", "tls.acme.email: missing", "tls.acme.domains: missing", "tls.acme.ca: must be", "tls.acme.storage: must be")
	// Neither files nor ACME.
	_, err := ParseConfig([]byte(svc + "tls: {listen: 127.0.0.1:8443}\n"))
	if err == nil || !strings.Contains(err.Error(), "tls.certs: missing: tls.listen needs at least one certificate ({cert: FILE, key: FILE}) or tls.acme") {
		t.Fatalf("tls without certs or acme: %v", err)
	}
}

func TestACMEConfigDefaults(t *testing.T) {
	f := func(yaml, storage, storageDir string) {
		t.Helper()
		cfg, err := ParseConfig([]byte("state_dir: /var/lib/edgelb\nservices: {web: {static: [127.0.0.1:1]}}\n" + yaml +
			"tls:\n  acme: {email: ops@example.com, domains: [A.Example.COM.]}\n"))
		if err != nil {
			t.Fatal(err)
		}
		a := cfg.TLS.ACME
		if a.Storage != storage || a.StorageDir != storageDir || a.CA != acme.DefaultCA || a.ConsulPrefix != acme.DefaultConsulPrefix ||
			strings.Join(a.Challenges, ",") != "http-01,tls-alpn-01" || a.RenewalWindow != acme.DefaultRenewalWindow ||
			a.Domains[0] != "a.example.com" || cfg.TLS.Listen != DefaultTLSListen {
			t.Fatalf("defaults: %+v", a)
		}
	}
	f("", "dir", "/var/lib/edgelb/certmagic")
	f("consul: {address: 127.0.0.1:8500}\n", "consul", "/var/lib/edgelb/certmagic")
}
