// Package localca is a certificate authority for local use: the demo's
// HTTPS listener and tests. Its CA lives only in the files it is written
// to; clients trust it by being given ca.pem (curl --cacert ca.pem).
package localca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// CA is a self-signed certificate authority that issues server
// certificates.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
	// PEM is the CA certificate in PEM, what clients are given to trust.
	PEM []byte
}

// New returns a new CA (ECDSA P-256) named name, valid for ten years.
func New(name string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// Load reads a CA that WriteCA wrote.
func Load(certFile, keyFile string) (*CA, error) {
	c, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	signer, ok := c.PrivateKey.(crypto.Signer)
	if !ok || c.Leaf == nil || !c.Leaf.IsCA {
		return nil, fmt.Errorf("%s is not a CA certificate with a signing key", certFile)
	}
	pemData, err := os.ReadFile(certFile)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: c.Leaf, Key: signer, PEM: pemData}, nil
}

// Pool returns a certificate pool holding the CA, for clients.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// Options tune an issued certificate; the zero value issues an ECDSA
// certificate valid from an hour ago for a year.
type Options struct {
	// RSA issues an RSA 2048 key instead of ECDSA P-256.
	RSA bool
	// NotBefore and NotAfter override the validity period.
	NotBefore, NotAfter time.Time
	// CommonName is the subject's CN; the first name if empty.
	CommonName string
}

// Issue returns a server certificate for names (DNS names, wildcards such
// as *.example.com, or IP addresses), PEM-encoded with its chain (leaf,
// then the CA), and its PEM private key.
func (ca *CA) Issue(names []string, o Options) (certPEM, keyPEM []byte, err error) {
	var key crypto.Signer
	if o.RSA {
		key, err = rsa.GenerateKey(rand.Reader, 2048)
	} else {
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(1, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if !o.NotBefore.IsZero() {
		tmpl.NotBefore = o.NotBefore
	}
	if !o.NotAfter.IsZero() {
		tmpl.NotAfter = o.NotAfter
	}
	if o.RSA {
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	tmpl.Subject.CommonName = o.CommonName
	if tmpl.Subject.CommonName == "" && len(names) > 0 {
		tmpl.Subject.CommonName = names[0]
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	certPEM = append(certPEM, ca.PEM...)
	return certPEM, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}

// IssueFiles issues a certificate for names and writes it to certFile and
// its key to keyFile (mode 0600).
func (ca *CA) IssueFiles(certFile, keyFile string, names []string, o Options) error {
	certPEM, keyPEM, err := ca.Issue(names, o)
	if err != nil {
		return err
	}
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		return err
	}
	return os.WriteFile(keyFile, keyPEM, 0o600)
}

// WriteCA writes the CA's certificate and key (mode 0600).
func (ca *CA) WriteCA(certFile, keyFile string) error {
	keyDER, err := x509.MarshalPKCS8PrivateKey(ca.Key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(certFile, ca.PEM, 0o644); err != nil {
		return err
	}
	return os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600)
}

// Files are the files of a local CA and one server certificate in a
// directory, as Ensure writes them.
type Files struct {
	CA, CAKey, Cert, Key string
}

// DirFiles returns the file names Ensure uses in dir.
func DirFiles(dir string) Files {
	return Files{
		CA:    filepath.Join(dir, "ca.pem"),
		CAKey: filepath.Join(dir, "ca-key.pem"),
		Cert:  filepath.Join(dir, "cert.pem"),
		Key:   filepath.Join(dir, "key.pem"),
	}
}

// Ensure makes sure dir holds a CA and a server certificate for names that
// it issued, creating what is missing; an existing server certificate that
// expires within a week is issued again. It returns the files and whether
// anything was created.
func Ensure(dir string, names []string) (f Files, created bool, err error) {
	f = DirFiles(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return f, false, err
	}
	ca, err := Load(f.CA, f.CAKey)
	if errors.Is(err, os.ErrNotExist) {
		if ca, err = New("edgelb local CA"); err != nil {
			return f, false, err
		}
		if err := ca.WriteCA(f.CA, f.CAKey); err != nil {
			return f, false, err
		}
		created = true
	} else if err != nil {
		return f, false, fmt.Errorf("local CA in %s: %w (remove the directory to make a new one)", dir, err)
	}
	if !created && usable(f, ca, names) {
		return f, false, nil
	}
	return f, true, ca.IssueFiles(f.Cert, f.Key, names, Options{})
}

// usable reports whether the server certificate in f was issued by ca for
// every one of names and is valid for more than a week.
func usable(f Files, ca *CA, names []string) bool {
	c, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil || c.Leaf == nil || time.Until(c.Leaf.NotAfter) < 7*24*time.Hour || c.Leaf.CheckSignatureFrom(ca.Cert) != nil {
		return false
	}
	for _, n := range names {
		if c.Leaf.VerifyHostname(n) != nil {
			return false
		}
	}
	return true
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic("BUG: crypto/rand failed: " + err.Error())
	}
	return n
}
