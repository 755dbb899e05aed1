package redistest

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// StartTLS starts a server that also serves TLS with the PEM certificate and key
// (clients are not asked for one), on TLSAddr; Addr stays plaintext, for the tests' own
// probes. caPEM is the bundle Redis is given (it must load one).
func StartTLS(t testing.TB, certPEM, keyPEM, caPEM []byte) *Server {
	t.Helper()
	return startServer(t, false, func(s *Server) {
		s.tlsDir = filepath.Join(s.dir, "tls")
		if err := os.Mkdir(s.tlsDir, 0o700); err != nil {
			t.Fatalf("redistest: %v", err)
		}
		for name, b := range map[string][]byte{"server.crt": certPEM, "server.key": keyPEM, "ca.crt": caPEM} {
			if err := os.WriteFile(filepath.Join(s.tlsDir, name), b, 0o600); err != nil {
				t.Fatalf("redistest: %v", err)
			}
		}
	})
}

// TLSAddr is the TLS listener's address, 127.0.0.1:port ("" without TLS).
func (s *Server) TLSAddr() string {
	if s.tlsPort == 0 {
		return ""
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.tlsPort))
}
