// Package testpki issues X.509 SVIDs for tests: a self-signed CA per trust domain and
// leaf certificates shaped as SPIRE issues them (one URI SAN, digital signature and key
// encipherment, both TLS extended key usages). It is test support, shared by the xds,
// cmd/mcpgate and integration tests, and never linked into the mcpgate binary.
package testpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/envoy"
)

// CA is a trust domain's certificate authority.
type CA struct {
	TrustDomain string
	Cert        *x509.Certificate
	Key         *ecdsa.PrivateKey
	// PEM is the CA certificate in PEM form: the trust bundle.
	PEM []byte
	// Pool holds Cert, for tls.Config RootCAs and ClientCAs.
	Pool *x509.CertPool
}

var serial atomic.Int64

// NewCA returns a CA for trustDomain (its certificate names spiffe://<trustDomain>, as
// SPIRE's does), valid from an hour ago for two hours.
func NewCA(t testing.TB, trustDomain string) *CA {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial.Add(1)), Subject: pkix.Name{CommonName: trustDomain + " test CA"},
		URIs:      []*url.URL{{Scheme: "spiffe", Host: trustDomain}},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &CA{TrustDomain: trustDomain, Cert: cert, Key: key, Pool: pool,
		PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// Option adjusts an issued certificate.
type Option func(*x509.Certificate)

// WithIP adds an IP SAN, for a server that clients verify by address (Go's own TLS
// verification, which checks the host).
func WithIP(ip string) Option {
	return func(c *x509.Certificate) { c.IPAddresses = append(c.IPAddresses, net.ParseIP(ip)) }
}

// WithDNS adds a DNS SAN, for a server that clients verify by name.
func WithDNS(name string) Option {
	return func(c *x509.Certificate) { c.DNSNames = append(c.DNSNames, name) }
}

// DER issues a certificate for the SPIFFE ID id (empty: no URI SAN; an ID outside the
// CA's trust domain forges one) and returns it and its PKCS #8 key, DER-encoded.
func (ca *CA) DER(t testing.TB, id string, opts ...Option) (certDER, keyDER []byte) {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial.Add(1)), Subject: pkix.Name{CommonName: "workload"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageKeyAgreement,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	if id != "" {
		u, err := url.Parse(id)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs, tmpl.Subject.CommonName = []*url.URL{u}, u.Path
	}
	for _, o := range opts {
		o(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return der, kb
}

// IssuePEM issues a certificate for id as DER does, PEM-encoded.
func (ca *CA) IssuePEM(t testing.TB, id string, opts ...Option) (certPEM, keyPEM []byte) {
	t.Helper()
	c, k := ca.DER(t, id, opts...)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: k})
}

// TLSCert issues a certificate for id as DER does, as a tls.Certificate.
func (ca *CA) TLSCert(t testing.TB, id string, opts ...Option) tls.Certificate {
	t.Helper()
	c, k := ca.IssuePEM(t, id, opts...)
	cert, err := tls.X509KeyPair(c, k)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// CertDir writes id's certificate, its key and the bundle under <root>/certs, named as
// spiffe-helper writes them (the mesh's sds.certDir: /certs), and returns root: one
// emulated Envoy's file system (envoyemu.Options.FileRoot).
func (ca *CA) CertDir(t testing.TB, id string) string {
	t.Helper()
	root := t.TempDir()
	dir := filepath.Join(root, "certs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	c, k := ca.IssuePEM(t, id)
	for name, b := range map[string][]byte{envoy.CertDirCert: c, envoy.CertDirKey: k, envoy.CertDirBundle: ca.PEM} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}
