package envoyemu

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"path/filepath"
	"slices"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"
)

// transportTLS is the only transport socket emulated (api/envoy/extensions/
// transport_sockets/tls/v3/tls.proto).
const transportTLS = "envoy.transport_sockets.tls"

// tlsCfg is a DownstreamTlsContext or UpstreamTlsContext, reduced to what the emulator
// serves: one certificate (inline files or an SDS secret over ADS), one validation
// context (inline, or default_validation_context merged with an SDS one), ALPN, SNI and
// require_client_certificate.
type tlsCfg struct {
	upstream bool
	// certSecret names the SDS secret with the certificate; cert is an inline one.
	certSecret string
	cert       *tlsv3.TlsCertificate
	// validationSecret names the SDS validation context; validation is the inline or
	// default (combined) one.
	validationSecret string
	validation       *tlsv3.CertificateValidationContext
	requireClient    bool
	alpn             []string
	sni              string
	// spire names the secrets served by the SPIRE agent's SDS (sds_spire.go), not ADS.
	spire []string
}

// secretNames are the SDS secrets the context needs.
func (t *tlsCfg) secretNames() []string {
	var out []string
	if t == nil {
		return nil
	}
	for _, n := range []string{t.certSecret, t.validationSecret} {
		if n != "" {
			out = append(out, n)
		}
	}
	return out
}

// parseTransportSocket accepts envoy.transport_sockets.tls with a Downstream (listener)
// or Upstream (cluster) TLS context; SDS secrets come over ADS (mcpgate's certDir mode)
// or from the SPIRE agent's SDS API (sds_spire.go).
func parseTransportSocket(ts *corev3.TransportSocket, upstream bool) (*tlsCfg, error) {
	if ts == nil {
		return nil, nil
	}
	if ts.GetName() != transportTLS {
		return nil, fmt.Errorf("transport socket %q is not emulated", ts.GetName())
	}
	m, err := ts.GetTypedConfig().UnmarshalNew()
	if err != nil {
		return nil, fmt.Errorf("transport socket: %w", err)
	}
	var common *tlsv3.CommonTlsContext
	out := &tlsCfg{upstream: upstream}
	switch c := m.(type) {
	case *tlsv3.DownstreamTlsContext:
		if upstream {
			return nil, errors.New("a cluster needs an UpstreamTlsContext")
		}
		common = c.GetCommonTlsContext()
		out.requireClient = c.GetRequireClientCertificate().GetValue()
	case *tlsv3.UpstreamTlsContext:
		if !upstream {
			return nil, errors.New("a listener needs a DownstreamTlsContext")
		}
		common = c.GetCommonTlsContext()
		out.sni = c.GetSni()
	default:
		return nil, fmt.Errorf("transport socket config %T is not emulated", m)
	}
	out.alpn = common.GetAlpnProtocols()
	certs, sds := common.GetTlsCertificates(), common.GetTlsCertificateSdsSecretConfigs()
	if len(certs)+len(sds) > 1 {
		return nil, errors.New("only one TLS certificate is emulated")
	}
	if len(certs) == 1 {
		out.cert = certs[0]
	}
	if len(sds) == 1 {
		if err := out.source(sds[0]); err != nil {
			return nil, err
		}
		out.certSecret = sds[0].GetName()
	}
	if !upstream && out.cert == nil && out.certSecret == "" {
		// A server needs a certificate (source/common/tls/context_config_impl.cc
		// ServerContextConfigImpl: "No TLS certificates found for server context").
		return nil, errors.New("no TLS certificates found for server context")
	}
	switch v := common.GetValidationContextType().(type) {
	case nil:
	case *tlsv3.CommonTlsContext_ValidationContext:
		out.validation = v.ValidationContext
	case *tlsv3.CommonTlsContext_CombinedValidationContext:
		if err := out.source(v.CombinedValidationContext.GetValidationContextSdsSecretConfig()); err != nil {
			return nil, err
		}
		out.validation = v.CombinedValidationContext.GetDefaultValidationContext()
		out.validationSecret = v.CombinedValidationContext.GetValidationContextSdsSecretConfig().GetName()
	case *tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig:
		if err := out.source(v.ValidationContextSdsSecretConfig); err != nil {
			return nil, err
		}
		out.validationSecret = v.ValidationContextSdsSecretConfig.GetName()
	default:
		return nil, fmt.Errorf("validation context %T is not emulated", v)
	}
	if err := checkValidation(out.validation); err != nil {
		return nil, err
	}
	return out, nil
}

// source checks where an SDS secret comes from: ADS, or the SPIRE agent's SDS API.
func (t *tlsCfg) source(s *tlsv3.SdsSecretConfig) error {
	spire, err := checkSecretSource(s)
	if spire {
		t.spire = append(t.spire, s.GetName())
	}
	return err
}

func checkValidation(v *tlsv3.CertificateValidationContext) error {
	if v == nil {
		return nil
	}
	// The deprecated match_subject_alt_names is read only to refuse it (NACK), never honoured.
	//lint:ignore SA1019 reading the deprecated field to refuse configs that use it
	oldSANs := len(v.GetMatchSubjectAltNames())
	if len(v.GetVerifyCertificateSpki())+len(v.GetVerifyCertificateHash()) > 0 || v.GetCrl() != nil ||
		oldSANs > 0 {
		return errors.New("only trusted_ca, system_root_certs, the SPIFFE validator and match_typed_subject_alt_names are emulated")
	}
	if _, err := spiffeConfig(v); err != nil {
		return err
	}
	if v.GetTrustChainVerification() != tlsv3.CertificateValidationContext_VERIFY_TRUST_CHAIN {
		return errors.New("trust_chain_verification ACCEPT_UNTRUSTED is not emulated")
	}
	for _, m := range v.GetMatchTypedSubjectAltNames() {
		switch m.GetSanType() {
		case tlsv3.SubjectAltNameMatcher_URI, tlsv3.SubjectAltNameMatcher_DNS:
		default:
			return fmt.Errorf("SAN type %s is not emulated", m.GetSanType())
		}
		if m.GetMatcher().GetSafeRegex() != nil {
			return errors.New("regex SAN matchers are not emulated")
		}
	}
	return nil
}

// parseSecret checks an SDS secret as Envoy does on receipt and returns what the
// emulator keeps of it: its data sources must be readable and TLS ones hold PEM
// (source/common/secret/sds_api.cc onConfigUpdate resolves the files; an unreadable one
// rejects the update). A generic secret is read once, here, as its consumers read it on
// each update (source/common/secret/secret_provider_impl.cc
// ThreadLocalGenericSecretProvider::update, Config::DataSource::read with allow_empty:
// an unset or empty source is the empty value); the copy returned holds that value
// inline, so that a request reads what was delivered, not what a file holds later. Its
// secrets map (the multi-value form) is kept as received and never read: the credential
// injector uses secret only.
func (e *Emulator) parseSecret(s *tlsv3.Secret) (*tlsv3.Secret, error) {
	switch t := s.GetType().(type) {
	case *tlsv3.Secret_TlsCertificate:
		if _, err := e.loadCertificate(t.TlsCertificate); err != nil {
			return nil, err
		}
		return s, nil
	case *tlsv3.Secret_ValidationContext:
		if err := checkValidation(t.ValidationContext); err != nil {
			return nil, err
		}
		if _, _, err := e.loadRoots(t.ValidationContext); err != nil {
			return nil, err
		}
		if sc, _ := spiffeConfig(t.ValidationContext); sc != nil {
			if _, err := e.loadSPIFFE(sc); err != nil {
				return nil, err
			}
		}
		return s, nil
	case *tlsv3.Secret_GenericSecret:
		var value []byte
		if src := t.GenericSecret.GetSecret(); src.GetSpecifier() != nil {
			var err error
			if value, err = e.readSource(src); err != nil {
				return nil, fmt.Errorf("generic_secret: %w", err)
			}
		}
		r := proto.Clone(s).(*tlsv3.Secret)
		r.GetGenericSecret().Secret = &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: value}}
		return r, nil
	default:
		return nil, fmt.Errorf("secret type %T is not emulated", s.GetType())
	}
}

// readSource reads a DataSource; file names are resolved under Options.FileRoot, so
// that nodes sharing one host each have their own /certs.
func (e *Emulator) readSource(d *corev3.DataSource) ([]byte, error) {
	switch s := d.GetSpecifier().(type) {
	case *corev3.DataSource_Filename:
		p := s.Filename
		if e.opts.FileRoot != "" {
			p = filepath.Join(e.opts.FileRoot, filepath.FromSlash(p))
		}
		return os.ReadFile(p)
	case *corev3.DataSource_InlineBytes:
		return s.InlineBytes, nil
	case *corev3.DataSource_InlineString:
		return []byte(s.InlineString), nil
	}
	return nil, fmt.Errorf("data source %T is not emulated", d.GetSpecifier())
}

func (e *Emulator) loadCertificate(c *tlsv3.TlsCertificate) (tls.Certificate, error) {
	chain, err := e.readSource(c.GetCertificateChain())
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("certificate_chain: %w", err)
	}
	key, err := e.readSource(c.GetPrivateKey())
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("private_key: %w", err)
	}
	cert, err := tls.X509KeyPair(chain, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return cert, nil
}

// loadRoots returns the trusted CAs of a validation context, or system=true for
// system_root_certs; nil, false means no trust anchors (no chain verification).
func (e *Emulator) loadRoots(v *tlsv3.CertificateValidationContext) (*x509.CertPool, bool, error) {
	if v.GetSystemRootCerts() != nil {
		return nil, true, nil
	}
	if v.GetTrustedCa() == nil {
		return nil, false, nil
	}
	b, err := e.readSource(v.GetTrustedCa())
	if err != nil {
		return nil, false, fmt.Errorf("trusted_ca: %w", err)
	}
	pool := x509.NewCertPool()
	n := 0
	for len(b) > 0 {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, false, fmt.Errorf("trusted_ca: %w", err)
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		// source/common/tls/cert_validator/default_validator.cc initializeSslContexts:
		// "Failed to load trusted CA certificates".
		return nil, false, errors.New("failed to load trusted CA certificates")
	}
	return pool, false, nil
}

// material is what one handshake uses, resolved from the current configuration. Files
// are read again at every handshake: Envoy reloads them when watched_directory changes
// (api/envoy/extensions/transport_sockets/tls/v3/secret.proto), so rotated SVIDs apply
// to new connections.
type material struct {
	cert       *tls.Certificate
	roots      *x509.CertPool
	system     bool
	spiffe     map[string]*x509.CertPool           // SPIFFE validator bundles by trust domain
	validation *tlsv3.CertificateValidationContext // merged; nil: none
}

func (e *Emulator) material(c *config, t *tlsCfg) (*material, error) {
	m := &material{}
	cert := t.cert
	if t.certSecret != "" {
		s := c.secrets[t.certSecret]
		if s.GetTlsCertificate() == nil {
			return nil, fmt.Errorf("secret %q not received", t.certSecret)
		}
		cert = s.GetTlsCertificate()
	}
	if cert != nil {
		tc, err := e.loadCertificate(cert)
		if err != nil {
			return nil, err
		}
		m.cert = &tc
	}
	v := t.validation
	if t.validationSecret != "" {
		s := c.secrets[t.validationSecret]
		if s.GetValidationContext() == nil {
			return nil, fmt.Errorf("secret %q not received", t.validationSecret)
		}
		// Combined validation context: the SDS context is merged into the default one
		// (source/common/tls/context_config_impl.cc getCombinedValidationContextConfig,
		// MergeFrom).
		if v != nil {
			merged := proto.Clone(v).(*tlsv3.CertificateValidationContext)
			proto.Merge(merged, s.GetValidationContext())
			v = merged
		} else {
			v = s.GetValidationContext()
		}
	}
	if v != nil {
		var err error
		if m.roots, m.system, err = e.loadRoots(v); err != nil {
			return nil, err
		}
		sc, err := spiffeConfig(v)
		if err != nil {
			return nil, err
		}
		if sc != nil {
			if m.spiffe, err = e.loadSPIFFE(sc); err != nil {
				return nil, err
			}
		}
		m.validation = v
	}
	return m, nil
}

// verify checks a peer's chain as Envoy's default certificate validator does: the chain
// against the trusted CAs (no key-usage constraint, as BoringSSL's default purpose), then
// match_typed_subject_alt_names — the certificate passes if any SAN of a matcher's type
// matches that matcher (source/common/tls/cert_validator/default_validator.cc
// DefaultCertValidator::doVerifyCertChain, verifyCertificate, matchSubjectAltName).
func (m *material) verify(raw [][]byte) error {
	if len(raw) == 0 {
		return nil // no certificate: require_client_certificate decides
	}
	certs := make([]*x509.Certificate, 0, len(raw))
	for _, r := range raw {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return fmt.Errorf("peer certificate: %w", err)
		}
		certs = append(certs, c)
	}
	if m.spiffe != nil {
		// A custom validator replaces the default one's chain check
		// (source/common/tls/cert_validator/factory.cc).
		if err := verifySPIFFE(m.spiffe, certs); err != nil {
			return err
		}
	} else if m.roots != nil || m.system {
		opts := x509.VerifyOptions{Roots: m.roots, Intermediates: x509.NewCertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}
		for _, c := range certs[1:] {
			opts.Intermediates.AddCert(c)
		}
		if _, err := certs[0].Verify(opts); err != nil {
			return &verifyError{reason: "CERTIFICATE_VERIFY_FAILED", err: err}
		}
	}
	matchers := m.validation.GetMatchTypedSubjectAltNames()
	if len(matchers) == 0 {
		return nil
	}
	leaf := certs[0]
	for _, sm := range matchers {
		var sans []string
		switch sm.GetSanType() {
		case tlsv3.SubjectAltNameMatcher_URI:
			for _, u := range leaf.URIs {
				sans = append(sans, u.String())
			}
		case tlsv3.SubjectAltNameMatcher_DNS:
			sans = leaf.DNSNames
		}
		if slices.ContainsFunc(sans, func(s string) bool { return stringMatches(sm.GetMatcher(), s) }) {
			return nil
		}
	}
	return &verifyError{reason: "ssl.fail_verify_san", err: errors.New("no subject alternative name matched")}
}

// verifyError is a failed peer verification; Envoy fails the handshake and counts it
// under the named stat (ssl.fail_verify_error or ssl.fail_verify_san).
type verifyError struct {
	reason string
	err    error
}

func (v *verifyError) Error() string { return "TLS_error: " + v.reason + ": " + v.err.Error() }
func (v *verifyError) Unwrap() error { return v.err }

// serverTLS is a listener's TLS configuration, resolved per handshake from the current
// configuration (Envoy's SDS updates apply to new connections). Client certificates are
// requested only with a validation context; require_client_certificate makes one
// mandatory, otherwise one shown is still verified (api/envoy/extensions/
// transport_sockets/tls/v3/tls.proto DownstreamTlsContext.require_client_certificate;
// source/common/tls/server_context_impl.cc: SSL_VERIFY_PEER, with
// SSL_VERIFY_FAIL_IF_NO_PEER_CERT when required).
func (e *Emulator) serverTLS(listener string) *tls.Config {
	return &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		c := e.cfg.Load()
		l := c.listeners[listener]
		if l == nil || l.tls == nil {
			return nil, fmt.Errorf("listener %s has no TLS context", listener)
		}
		m, err := e.material(c, l.tls)
		if err != nil {
			e.opts.Logf("envoyemu: listener %s: TLS: %v", listener, err)
			return nil, err
		}
		cfg := &tls.Config{
			MinVersion:   tls.VersionTLS12, // tls_minimum_protocol_version default for servers
			Certificates: []tls.Certificate{*m.cert},
			NextProtos:   l.tls.alpn,
		}
		if m.validation != nil {
			cfg.ClientAuth = tls.RequestClientCert
			if l.tls.requireClient {
				cfg.ClientAuth = tls.RequireAnyClientCert
			}
			cfg.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
				if err := m.verify(raw); err != nil {
					e.opts.Logf("envoyemu: listener %s: client certificate refused: %v", listener, err)
					return err
				}
				return nil
			}
		}
		return cfg, nil
	}}
}

// clientTLS is a cluster's upstream TLS configuration: the node's certificate when the
// server asks for one, the server's chain and SANs checked by verify, SNI only when sni
// is set (source/common/tls/client_context_impl.cc). Resolved per handshake.
func (e *Emulator) clientTLS(cluster string) *tls.Config {
	get := func() (*material, *tlsCfg, error) {
		c := e.cfg.Load()
		cl := c.clusters[cluster]
		if cl == nil || cl.tls == nil {
			return nil, nil, fmt.Errorf("cluster %s has no TLS context", cluster)
		}
		m, err := e.material(c, cl.tls)
		return m, cl.tls, err
	}
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// Verification is verify's, with Envoy's rules; Go's own would check the host
		// name, which Envoy does not do without a SAN matcher or auto_san_validation.
		InsecureSkipVerify: true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			m, _, err := get()
			if err != nil {
				return nil, err
			}
			if m.cert == nil {
				return &tls.Certificate{}, nil
			}
			return m.cert, nil
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			m, _, err := get()
			if err != nil {
				return err
			}
			if len(raw) == 0 {
				return errors.New("server presented no certificate")
			}
			return m.verify(raw)
		},
	}
	if _, t, err := get(); err == nil {
		cfg.ServerName = t.sni
	}
	return cfg
}

// principal is what Envoy reports for a certificate in ext_authz's AttributeContext.Peer:
// the first URI SAN, else the subject (source/extensions/filters/common/ext_authz/
// check_request_utils.cc setAttrContextPeer, via Ssl::ConnectionInfo
// uriSanPeerCertificate / subjectPeerCertificate).
func principal(c *x509.Certificate) string {
	if c == nil {
		return ""
	}
	if len(c.URIs) > 0 {
		return c.URIs[0].String()
	}
	return c.Subject.String()
}

// localPrincipal is the destination principal: the listener's own certificate's first
// URI SAN, else its subject (check_request_utils.cc, uriSanLocalCertificate).
func (e *Emulator) localPrincipal(c *config, l *listenerCfg) string {
	if l == nil || l.tls == nil {
		return ""
	}
	m, err := e.material(c, l.tls)
	if err != nil || m.cert == nil || len(m.cert.Certificate) == 0 {
		return ""
	}
	leaf, err := x509.ParseCertificate(m.cert.Certificate[0])
	if err != nil {
		return ""
	}
	return principal(leaf)
}

// secretsReady reports whether every SDS secret of t has been received (a listener or
// cluster warms until then: source/common/secret/sds_api.h init target).
func (c *config) secretsReady(t *tlsCfg) bool { return c.received(t.secretNames()) }

// received reports whether every named SDS secret has been received.
func (c *config) received(names []string) bool {
	for _, n := range names {
		if c.secrets[n] == nil {
			return false
		}
	}
	return true
}

// isTLSFailure reports whether a round-trip error is a TLS handshake failure (Envoy
// counts it as a connect failure with a transport failure reason).
func isTLSFailure(err error) bool {
	var ve *verifyError
	var ae tls.AlertError
	var rh tls.RecordHeaderError
	var cv *tls.CertificateVerificationError
	var op *net.OpError
	return errors.As(err, &ve) || errors.As(err, &ae) || errors.As(err, &rh) || errors.As(err, &cv) ||
		(errors.As(err, &op) && op.Op == "remote error")
}

// logWriter sends the HTTP server's own errors (TLS handshake failures) to Logf.
type logWriter func(format string, args ...any)

func (w logWriter) Write(p []byte) (int, error) {
	w("envoyemu: %s", p)
	return len(p), nil
}

func newLogger(logf func(string, ...any)) *log.Logger { return log.New(logWriter(logf), "", 0) }
