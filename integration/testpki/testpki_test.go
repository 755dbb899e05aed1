package testpki

import (
	"crypto/x509"
	"testing"
)

// TestIssuedSVIDs: a leaf chains to its CA's pool for both TLS uses and names exactly its
// SPIFFE ID; one without an ID has no URI SAN; another CA's leaf does not chain.
func TestIssuedSVIDs(t *testing.T) {
	ca := NewCA(t, "example.org")
	cert := ca.TLSCert(t, "spiffe://example.org/ns/default/app", WithIP("127.0.0.1"))
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Pool, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Fatalf("usage %v: %v", usage, err)
		}
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://example.org/ns/default/app" || len(leaf.IPAddresses) != 1 {
		t.Fatalf("SANs: %v %v", leaf.URIs, leaf.IPAddresses)
	}
	der, _ := ca.DER(t, "")
	if anon, err := x509.ParseCertificate(der); err != nil || len(anon.URIs) != 0 {
		t.Fatalf("certificate without an ID: %v (%v)", anon, err)
	}
	other := NewCA(t, "example.org")
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: other.Pool}); err == nil {
		t.Fatal("a leaf chained to another CA")
	}
}
