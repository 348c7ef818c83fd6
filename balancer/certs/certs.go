// Package certs holds the certificates edgelb serves over TLS and chooses
// one for each handshake by the name the client asks for (SNI).
//
// A Set is built once from loaded key pairs and never changes; a Store
// holds the Set in use and swaps it on reload, so that handshakes in
// progress keep the certificate they chose and new ones get the new Set.
package certs

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
)

// Source gives the certificate for a TLS handshake. Its method has the
// signature of tls.Config.GetCertificate, which an ACME manager such as
// certmagic.Config provides too, so that certificates from files and
// from ACME are interchangeable behind it.
//
// Implementations must be safe for concurrent use.
type Source interface {
	GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error)
}

// ErrNoCertificate is returned by a Store that holds no Set yet.
var ErrNoCertificate = errors.New("certs: no certificate loaded")

// Pair names a PEM certificate chain file (leaf first) and the PEM file of
// its private key.
type Pair struct {
	Cert string
	Key  string
}

// Load reads and parses the key pair p and checks that the key belongs to
// the certificate. Its errors name the file at fault: the certificate's,
// the key's, or both when they do not match.
func Load(p Pair) (*tls.Certificate, error) {
	certPEM, err := os.ReadFile(p.Cert)
	if err != nil {
		return nil, fmt.Errorf("cannot read certificate %q: %w", p.Cert, err)
	}
	keyPEM, err := os.ReadFile(p.Key)
	if err != nil {
		return nil, fmt.Errorf("cannot read key %q: %w", p.Key, err)
	}
	// Parse the leaf first, so that a file that is no certificate is
	// named as such rather than as a mismatch.
	leaf, err := firstCertificate(certPEM)
	if err != nil {
		return nil, fmt.Errorf("certificate %q: %w", p.Cert, err)
	}
	if b, _ := pem.Decode(keyPEM); b == nil || !strings.Contains(b.Type, "PRIVATE KEY") {
		return nil, fmt.Errorf("key %q holds no PEM private key", p.Key)
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		if strings.Contains(err.Error(), "does not match") {
			return nil, fmt.Errorf("key %q does not belong to certificate %q (%v)", p.Key, p.Cert, err)
		}
		return nil, fmt.Errorf("key %q: %w", p.Key, err)
	}
	c.Leaf = leaf
	return &c, nil
}

// firstCertificate parses the first CERTIFICATE block of a PEM file.
func firstCertificate(data []byte) (*x509.Certificate, error) {
	for len(data) > 0 {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		if b.Type == "CERTIFICATE" {
			c, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				return nil, fmt.Errorf("cannot parse: %w", err)
			}
			return c, nil
		}
		if strings.Contains(b.Type, "PRIVATE KEY") {
			return nil, errors.New("holds a private key, not a certificate (are cert and key swapped?)")
		}
	}
	return nil, errors.New("holds no PEM certificate")
}

// Names returns the DNS names a certificate can be chosen for: the DNS
// names of its subjectAltName, in lower case without a trailing dot. The
// Common Name is ignored, as browsers ignore it.
func Names(c *tls.Certificate) []string {
	if c.Leaf == nil {
		return nil
	}
	names := make([]string, 0, len(c.Leaf.DNSNames))
	for _, n := range c.Leaf.DNSNames {
		if n = normalize(n); n != "" {
			names = append(names, n)
		}
	}
	return names
}

// normalize puts a name in the form the Set's maps use.
func normalize(n string) string {
	n = strings.TrimSuffix(n, ".")
	for i := 0; i < len(n); i++ {
		if c := n[i]; c >= 'A' && c <= 'Z' {
			return strings.ToLower(n)
		}
	}
	return n
}

// Set is an immutable set of certificates indexed by name. A handshake gets
// the certificate of the exact name the client asked for, else that of
// the wildcard one label up (*.example.com for a.example.com, never for
// a.b.example.com or example.com), else the default: the first
// certificate. Between certificates of one name (an RSA and an ECDSA one,
// say) it takes the first the client supports.
//
// A Set is safe for concurrent use.
type Set struct {
	exact map[string][]*tls.Certificate
	// wildcard is keyed by the parent domain: *.example.com under
	// example.com.
	wildcard map[string][]*tls.Certificate
	def      *tls.Certificate
	all      []*tls.Certificate
}

// NewSet indexes certs, the first being the default. It needs at least
// one.
func NewSet(certs []*tls.Certificate) (*Set, error) {
	if len(certs) == 0 {
		return nil, errors.New("certs: a set needs at least one certificate")
	}
	s := &Set{
		exact:    make(map[string][]*tls.Certificate),
		wildcard: make(map[string][]*tls.Certificate),
		def:      certs[0],
		all:      certs,
	}
	for _, c := range certs {
		for _, n := range Names(c) {
			if parent, ok := strings.CutPrefix(n, "*."); ok {
				s.wildcard[parent] = appendOnce(s.wildcard[parent], c)
				continue
			}
			s.exact[n] = appendOnce(s.exact[n], c)
		}
	}
	return s, nil
}

func appendOnce(cs []*tls.Certificate, c *tls.Certificate) []*tls.Certificate {
	for _, x := range cs {
		if x == c {
			return cs
		}
	}
	return append(cs, c)
}

// Certificates returns the certificates of the set, the default first.
// The slice must not be changed.
func (s *Set) Certificates() []*tls.Certificate { return s.all }

// Choose returns the certificate for a handshake whose client asked for
// hello.ServerName (empty without SNI): Match's, else the default. It
// never returns nil.
func (s *Set) Choose(hello *tls.ClientHelloInfo) *tls.Certificate {
	if c := s.Match(hello); c != nil {
		return c
	}
	return s.def
}

// Match returns the certificate of the exact name hello.ServerName, else
// of the wildcard one label up, or nil when none holds the name or the
// client sent none.
func (s *Set) Match(hello *tls.ClientHelloInfo) *tls.Certificate {
	name := hello.ServerName
	if name == "" {
		return nil
	}
	name = normalize(name)
	if cs, ok := s.exact[name]; ok {
		return pick(cs, hello)
	}
	if i := strings.IndexByte(name, '.'); i > 0 {
		if cs, ok := s.wildcard[name[i+1:]]; ok {
			return pick(cs, hello)
		}
	}
	return nil
}

// Default returns the certificate of handshakes that no name chooses: the
// first.
func (s *Set) Default() *tls.Certificate { return s.def }

// pick returns the first of cs that the client supports, or the first.
func pick(cs []*tls.Certificate, hello *tls.ClientHelloInfo) *tls.Certificate {
	if len(cs) == 1 {
		// Fast path: one certificate for the name.
		return cs[0]
	}
	for _, c := range cs {
		if hello.SupportsCertificate(c) == nil {
			return c
		}
	}
	return cs[0]
}

// Store is a Source whose Set can be replaced while it serves. The zero
// value holds no Set. It is safe for concurrent use.
type Store struct {
	set atomic.Pointer[Set]
}

// Set makes s the Set that new handshakes choose from.
func (st *Store) Set(s *Set) { st.set.Store(s) }

// Load returns the Set in use, or nil.
func (st *Store) Load() *Set { return st.set.Load() }

// GetCertificate implements Source.
func (st *Store) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	s := st.set.Load()
	if s == nil {
		return nil, ErrNoCertificate
	}
	return s.Choose(hello), nil
}
