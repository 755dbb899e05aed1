package envoy

import (
	"errors"
	"path"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// SpireAgentCluster is the bootstrap cluster reaching the SPIRE agent's SDS API over its
// Unix socket. It must be static (in the bootstrap): certificates are needed before any
// dynamic cluster can be trusted.
const SpireAgentCluster = "spire_agent"

// Files a certDir holds, named as spiffe-helper writes them.
const (
	CertDirCert   = "svid.pem"
	CertDirKey    = "svid_key.pem"
	CertDirBundle = "svid_bundle.pem"
)

// ALPN offered by mTLS listeners and clusters: HTTP/2 multiplexes many long-lived SSE
// streams over one connection; HTTP/1.1 stays possible for plain clients.
var alpn = []string{"h2", "http/1.1"}

// SpireSDS is the config source for secrets served by the SPIRE agent (Envoy SDS over gRPC
// on SpireAgentCluster). SPIRE names the SVID secret by its SPIFFE ID and the bundle by
// the trust domain's ID ("spiffe://example.org").
func SpireSDS() *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ResourceApiVersion: corev3.ApiVersion_V3,
		ConfigSourceSpecifier: &corev3.ConfigSource_ApiConfigSource{ApiConfigSource: &corev3.ApiConfigSource{
			ApiType:             corev3.ApiConfigSource_GRPC,
			TransportApiVersion: corev3.ApiVersion_V3,
			GrpcServices: []*corev3.GrpcService{{
				TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: SpireAgentCluster}},
			}},
		}},
	}
}

// SecretRef names an SDS secret and where to get it.
func SecretRef(name string, src *corev3.ConfigSource) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: src}
}

// FileCertSecret is an SDS secret holding the certificate and key files of a certDir.
// Envoy reloads them when the directory changes (watched_directory), so rotated
// certificates are picked up without a new snapshot.
func FileCertSecret(name, dir string) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: fileSource(path.Join(dir, CertDirCert)),
		PrivateKey:       fileSource(path.Join(dir, CertDirKey)),
		WatchedDirectory: &corev3.WatchedDirectory{Path: dir},
	}}}
}

// FileBundleSecret is an SDS secret holding a certDir's trust bundle.
func FileBundleSecret(name, dir string) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		TrustedCa:        fileSource(path.Join(dir, CertDirBundle)),
		WatchedDirectory: &corev3.WatchedDirectory{Path: dir},
	}}}
}

func fileSource(p string) *corev3.DataSource {
	return &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: p}}
}

// MeshTLS names the secrets of a mesh identity: this Envoy's SVID and the trust bundle.
type MeshTLS struct {
	Cert   *tlsv3.SdsSecretConfig
	Bundle *tlsv3.SdsSecretConfig
}

// DownstreamMTLS is the transport socket of a sidecar's inbound listener. Peers must
// present an SVID of the trust domain (URI SAN prefix spiffe://<td>/) when requireClient
// is set (mtls: strict); with it unset (permissive) a certificate is verified if shown
// and ext_authz falls back to the bearer token's identity otherwise.
func DownstreamMTLS(m MeshTLS, trustDomain string, requireClient bool) (*corev3.TransportSocket, error) {
	return transportSocket(&tlsv3.DownstreamTlsContext{
		CommonTlsContext: &tlsv3.CommonTlsContext{
			AlpnProtocols:                  alpn,
			TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{m.Cert},
			ValidationContextType: combined(m.Bundle, &matcherv3.StringMatcher{
				MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "spiffe://" + trustDomain + "/"},
			}),
		},
		RequireClientCertificate: wrapperspb.Bool(requireClient),
	})
}

// DownstreamMTLSFrom is the transport socket of a sidecar listener that only the named
// peers may reach: a client certificate is required, and its URI SAN must be exactly one
// of peerIDs (a sidecar's gateway_inbound listener, reached by Gateways only).
func DownstreamMTLSFrom(m MeshTLS, peerIDs []string) (*corev3.TransportSocket, error) {
	if len(peerIDs) == 0 {
		return nil, errors.New("no peer may connect")
	}
	var sans []*tlsv3.SubjectAltNameMatcher
	for _, id := range peerIDs {
		sans = append(sans, &tlsv3.SubjectAltNameMatcher{
			SanType: tlsv3.SubjectAltNameMatcher_URI,
			Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id}},
		})
	}
	return transportSocket(&tlsv3.DownstreamTlsContext{
		CommonTlsContext: &tlsv3.CommonTlsContext{
			AlpnProtocols:                  alpn,
			TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{m.Cert},
			ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
				DefaultValidationContext:         &tlsv3.CertificateValidationContext{MatchTypedSubjectAltNames: sans},
				ValidationContextSdsSecretConfig: m.Bundle,
			}},
		},
		RequireClientCertificate: wrapperspb.Bool(true),
	})
}

// UpstreamMTLS is the transport socket of a cluster to another sidecar: it presents this
// Envoy's SVID and accepts only the peer whose URI SAN is exactly peerID, so a
// certificate of another app of the same trust domain cannot stand in for the target.
func UpstreamMTLS(m MeshTLS, peerID string) (*corev3.TransportSocket, error) {
	return upstreamMTLS(m, peerID, alpn)
}

func upstreamMTLS(m MeshTLS, peerID string, protocols []string) (*corev3.TransportSocket, error) {
	return transportSocket(&tlsv3.UpstreamTlsContext{
		CommonTlsContext: &tlsv3.CommonTlsContext{
			AlpnProtocols:                  protocols,
			TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{m.Cert},
			ValidationContextType: combined(m.Bundle, &matcherv3.StringMatcher{
				MatchPattern: &matcherv3.StringMatcher_Exact{Exact: peerID},
			}),
		},
	})
}

// UpstreamMTLSHTTP2 is [UpstreamMTLS] offering only h2 in ALPN, for clusters that must
// speak HTTP/2 (gRPC to another sidecar): the peer cannot settle on http/1.1 under an
// explicit HTTP/2 codec.
func UpstreamMTLSHTTP2(m MeshTLS, peerID string) (*corev3.TransportSocket, error) {
	return upstreamMTLS(m, peerID, []string{"h2"})
}

// UpstreamPublicTLS is the transport socket of a cluster to a server on the internet
// (an HTTPEndpoint): SNI and certificate checked against the host name with the
// system's root certificates.
func UpstreamPublicTLS(host string) (*corev3.TransportSocket, error) {
	return upstreamPublicTLS(host, "http/1.1")
}

// UpstreamPublicTLSHTTP2 is UpstreamPublicTLS for a gRPC server (ALPN h2): an OTLP
// collector with isSecure.
func UpstreamPublicTLSHTTP2(host string) (*corev3.TransportSocket, error) {
	return upstreamPublicTLS(host, "h2")
}

func upstreamPublicTLS(host, alpn string) (*corev3.TransportSocket, error) {
	return transportSocket(&tlsv3.UpstreamTlsContext{
		Sni: host,
		CommonTlsContext: &tlsv3.CommonTlsContext{
			AlpnProtocols: []string{alpn},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				SystemRootCerts: &tlsv3.CertificateValidationContext_SystemRootCerts{},
				MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{{
					SanType: tlsv3.SubjectAltNameMatcher_DNS,
					Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: host}},
				}},
			}},
		},
	})
}

// DownstreamFileTLS is the transport socket of a gateway listener: a certificate and key
// from files on the Envoy's file system, no client certificate (callers authenticate
// with bearer tokens).
func DownstreamFileTLS(certFile, keyFile string) (*corev3.TransportSocket, error) {
	return transportSocket(&tlsv3.DownstreamTlsContext{
		CommonTlsContext: &tlsv3.CommonTlsContext{
			AlpnProtocols: alpn,
			TlsCertificates: []*tlsv3.TlsCertificate{{
				CertificateChain: fileSource(certFile),
				PrivateKey:       fileSource(keyFile),
			}},
		},
	})
}

func combined(bundle *tlsv3.SdsSecretConfig, san *matcherv3.StringMatcher) *tlsv3.CommonTlsContext_CombinedValidationContext {
	return &tlsv3.CommonTlsContext_CombinedValidationContext{CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
		DefaultValidationContext: &tlsv3.CertificateValidationContext{
			MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{{SanType: tlsv3.SubjectAltNameMatcher_URI, Matcher: san}},
		},
		ValidationContextSdsSecretConfig: bundle,
	}}
}

// transportSocket packs a validated TLS context (Downstream or UpstreamTlsContext).
func transportSocket(tlsContext proto.Message) (*corev3.TransportSocket, error) {
	a, err := Any(tlsContext)
	if err != nil {
		return nil, err
	}
	return &corev3.TransportSocket{Name: TransportTLS, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: a}}, nil
}
