package balancer

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/valyala/fasthttp"
)

// curlBinary returns the path of curl. Without one the test fails when $CI
// is set, so that CI never skips it silently; `make curl` installs it.
func curlBinary(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("curl")
	if err != nil {
		msg := "no curl binary: run `make curl`"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return p
}

// TestTLSWithCurl: the real curl, trusting the test's CA only, talks HTTPS
// to edgelb with TLS 1.2 and 1.3, gets the certificate of the name it
// asks for, follows a redirect from plain HTTP and sees the HSTS header.
func TestTLSWithCurl(t *testing.T) {
	curl := curlBinary(t)
	o := startOrigin(t, "a", func(ctx *fasthttp.RequestCtx) {
		ctx.WriteString("proto=")
		ctx.Write(ctx.Request.Header.Peek("X-Forwarded-Proto"))
	})
	pki := newTestPKI(t)
	caFile := filepath.Join(pki.dir, "ca.pem")
	if err := os.WriteFile(caFile, pki.ca.PEM, 0o644); err != nil {
		t.Fatal(err)
	}
	cert, key := pki.issue("shop", "shop.example")
	wild, wildKey := pki.issue("wild", "*.apps.example")
	s := startEdge(t, tlsYAML("", cert, key, wild, wildKey)+"services:\n  web: {static: ["+o.addr+"]}\n"+
		"routes: [{service: web, https_redirect: true, hsts: {max_age: 1y}}]\n")
	_, tlsPort, _ := net.SplitHostPort(s.TLSAddr())
	_, plainPort, _ := net.SplitHostPort(s.Addr())
	// run returns curl's output, and what it wrote to stderr.
	runv := func(args ...string) (string, string, error) {
		t.Helper()
		cmd := exec.Command(curl, append([]string{"--silent", "--show-error", "--max-time", "20", "--cacert", caFile}, args...)...)
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		err := cmd.Run()
		return out.String(), errOut.String(), err
	}
	run := func(args ...string) (string, error) {
		t.Helper()
		out, errOut, err := runv(args...)
		if err != nil {
			return out + errOut, err
		}
		return out, nil
	}
	for _, v := range []struct{ flag, want string }{{"--tlsv1.2", "TLSv1.2"}, {"--tlsv1.3", "TLSv1.3"}} {
		args := []string{v.flag, "--http1.1", "--resolve", "shop.example:" + tlsPort + ":127.0.0.1",
			"--include", "--write-out", "\nverify=%{ssl_verify_result}", "https://shop.example:" + tlsPort + "/p"}
		if v.flag == "--tlsv1.2" {
			args = append([]string{"--tls-max", "1.2"}, args...)
		}
		out, verbose, err := runv(append([]string{"--verbose"}, args...)...)
		if err != nil {
			t.Fatalf("curl %s: %v\n%s%s", v.flag, err, out, verbose)
		}
		if !strings.Contains(verbose, "SSL connection using "+v.want+" / ") {
			t.Errorf("curl %s did not report %s:\n%s", v.flag, v.want, verbose)
		}
		if !strings.HasPrefix(out, "HTTP/1.1 200") || !strings.Contains(out, "proto=https\nverify=0") ||
			!strings.Contains(strings.ToLower(out), "strict-transport-security: max-age=31536000") {
			t.Errorf("curl %s:\n%s", v.flag, out)
		}
	}
	// The wildcard certificate for a name under it, which curl verifies.
	if out, err := run("--resolve", "x.apps.example:"+tlsPort+":127.0.0.1", "https://x.apps.example:"+tlsPort+"/w"); err != nil || out != "proto=https" {
		t.Errorf("curl to a name under the wildcard: %v\n%s", err, out)
	}
	// A name no certificate holds gets the default, which curl refuses.
	if out, err := run("--resolve", "nope.example:"+tlsPort+":127.0.0.1", "https://nope.example:"+tlsPort+"/"); err == nil {
		t.Errorf("curl accepted the default certificate for a name it lacks:\n%s", out)
	}
	// Plain HTTP is redirected, and curl follows to HTTPS.
	out, err := run("--location", "--include", "--resolve", "shop.example:"+plainPort+":127.0.0.1", "--resolve", "shop.example:"+tlsPort+":127.0.0.1",
		"http://shop.example:"+plainPort+"/r?q=1")
	if err != nil || !strings.HasPrefix(out, "HTTP/1.1 308") || !strings.Contains(out, "Location: https://shop.example:"+tlsPort+"/r?q=1") ||
		!strings.HasSuffix(out, "proto=https") {
		t.Errorf("curl --location from plain HTTP: %v\n%s", err, out)
	}
}
