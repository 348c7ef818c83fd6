package main

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/edgelb/edgelb/balancer/certs/localca"
)

// TestCheckTLS: -check loads the certificates: a key that does not belong
// to its certificate, or a missing file, fails the check naming the key
// and the file.
func TestCheckTLS(t *testing.T) {
	dir := t.TempDir()
	ca, err := localca.New("test CA")
	if err != nil {
		t.Fatal(err)
	}
	a, aKey, b, bKey := filepath.Join(dir, "a.pem"), filepath.Join(dir, "a-key.pem"), filepath.Join(dir, "b.pem"), filepath.Join(dir, "b-key.pem")
	ca.IssueFiles(a, aKey, []string{"a.example"}, localca.Options{})
	ca.IssueFiles(b, bKey, []string{"b.example"}, localca.Options{})
	f := func(certs string, wantCode int, want ...string) {
		t.Helper()
		path := filepath.Join(dir, "edgelb.yaml")
		writeConfig(t, path, "tls: {certs: ["+certs+"]}\nservices:\n  web: {static: [127.0.0.1:9001]}\nroutes: [{service: web}]\n")
		out, err := exec.Command(edgelbBin, "-config", path, "-check").CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		if code != wantCode {
			t.Errorf("exit %d, want %d; output:\n%s", code, wantCode, out)
		}
		for _, w := range want {
			if !strings.Contains(string(out), w) {
				t.Errorf("output lacks %q:\n%s", w, out)
			}
		}
	}
	f("{cert: "+a+", key: "+aKey+"}", 0, "is valid")
	f("{cert: "+a+", key: "+bKey+"}", 1, `tls.certs[0]: key "`+bKey+`" does not belong to certificate "`+a+`"`)
	f("{cert: "+a+", key: "+aKey+"}, {cert: "+filepath.Join(dir, "gone.pem")+", key: "+bKey+"}", 1,
		`tls.certs[1]: cannot read certificate "`+filepath.Join(dir, "gone.pem")+`"`)
}

// TestSIGHUPSwapsCertificate runs the edgelb binary with a TLS listener:
// after new certificate files and SIGHUP, new handshakes get the new
// certificate while a keep-alive connection opened before goes on; a
// SIGHUP with a mismatched pair is refused, logged naming the file, and
// the certificate in use stays.
func TestSIGHUPSwapsCertificate(t *testing.T) {
	origin := startOrigin(t)
	dir := t.TempDir()
	ca, err := localca.New("test CA")
	if err != nil {
		t.Fatal(err)
	}
	cert, key := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := ca.IssueFiles(cert, key, []string{"shop.example", "v1.shop.example"}, localca.Options{}); err != nil {
		t.Fatal(err)
	}
	listen, tlsListen, admin := freeAddr(t), freeAddr(t), freeAddr(t)
	path := filepath.Join(dir, "edgelb.yaml")
	yaml := func(key string) string {
		return fmt.Sprintf("listen: %s\nadmin: %s\nstate_dir: %s\ntls: {listen: %s, certs: [{cert: %s, key: %s}]}\nservices:\n  web: {static: [%s]}\nroutes: [{service: web}]\n",
			listen, admin, filepath.Join(dir, "state"), tlsListen, cert, key, origin)
	}
	writeConfig(t, path, yaml(key))
	cmd := exec.Command(edgelbBin, "-config", path)
	output := startLogged(t, dir, cmd)
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	})
	waitFor(t, "edgelb ready", func() bool { code, _ := get("http://" + admin + "/readyz"); return code == 200 })

	conf := &tls.Config{RootCAs: ca.Pool(), ServerName: "shop.example"}
	// names dials anew and returns the DNS names of the certificate served.
	names := func() string {
		c, err := tls.Dial("tcp", tlsListen, conf)
		if err != nil {
			return err.Error()
		}
		defer c.Close()
		return strings.Join(c.ConnectionState().PeerCertificates[0].DNSNames, ",")
	}
	old, err := tls.Dial("tcp", tlsListen, conf)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	old.SetDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReader(old)
	request := func(what string) {
		t.Helper()
		io.WriteString(old, "GET /keep HTTP/1.1\r\nHost: shop.example\r\n\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "origin /keep" {
			t.Fatalf("%s: %d %q", what, resp.StatusCode, body)
		}
	}
	request("before the reload")

	if err := ca.IssueFiles(cert, key, []string{"shop.example", "v2.shop.example"}, localca.Options{}); err != nil {
		t.Fatal(err)
	}
	cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the new certificate", func() bool { return names() == "shop.example,v2.shop.example" })
	request("the keep-alive connection opened before the reload")

	otherKey := filepath.Join(dir, "other-key.pem")
	ca.IssueFiles(filepath.Join(dir, "other.pem"), otherKey, []string{"other.example"}, localca.Options{})
	writeConfig(t, path, yaml(otherKey))
	cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "the refused reload in the log", func() bool { return strings.Contains(output(), "keeping the running config") })
	if log := output(); !strings.Contains(log, otherKey) || !strings.Contains(log, "tls.certs[0]") {
		t.Errorf("the log of the refused reload names neither the key nor the file:\n%s", log)
	}
	if got := names(); got != "shop.example,v2.shop.example" {
		t.Errorf("after a refused reload the certificate served is for %s", got)
	}
	request("after a refused reload")
}
