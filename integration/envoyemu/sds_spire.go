package envoyemu

// SDS from a SPIRE agent: secrets whose sds_config is an api_config_source (GRPC) on
// the bootstrap's static cluster to the agent's Unix socket, as `mcpgate bootstrap`
// tells Envoy (cluster "spire_agent", pipe: the agent socket). Options.SDSSocket is that
// cluster's pipe address, taken from Options.Bootstrap when one is given.
//
// Envoy opens one SDS subscription per secret name on that config source
// (source/common/secret/sds_api.cc, one gRPC stream each for a non-ADS source) and
// applies every response to new handshakes. SPIRE's agent answers a request for a
// SPIFFE ID with the caller's SVID of that ID, and a request for "spiffe://<td>" with
// the bundle (spire pkg/agent/endpoints/sdsv3/handler.go buildResponse); to an Envoy
// that does not say it is older than 1.18 it sends the bundle as a SPIFFE certificate
// validator (envoy.tls.cert_validator.spiffe), emulated here too.

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
)

// SpireCluster is the static bootstrap cluster that reaches the SPIRE agent's SDS API
// (mcpgate's envoy.SpireAgentCluster); Options.SDSSocket is its pipe address.
const SpireCluster = "spire_agent"

// spiffeValidator is the name of Envoy's SPIFFE certificate validator extension
// (source/extensions/transport_sockets/tls/cert_validator/spiffe).
const spiffeValidator = "envoy.tls.cert_validator.spiffe"

// checkSecretSource accepts an SDS secret over ADS (spire=false) or over gRPC on the
// SPIRE agent's static cluster (spire=true).
func checkSecretSource(s *tlsv3.SdsSecretConfig) (spire bool, err error) {
	if s.GetName() == "" {
		return false, errors.New("SDS secret config without a name")
	}
	src := s.GetSdsConfig()
	if src.GetAds() != nil {
		return false, nil
	}
	api := src.GetApiConfigSource()
	if api != nil && api.GetApiType() == corev3.ApiConfigSource_GRPC && len(api.GetGrpcServices()) == 1 &&
		api.GetGrpcServices()[0].GetEnvoyGrpc().GetClusterName() == SpireCluster {
		return true, nil
	}
	return false, fmt.Errorf("SDS secret %q: only sds_config.ads or a GRPC api_config_source on cluster %s is emulated", s.GetName(), SpireCluster)
}

// checkSpire refuses a TLS context that needs the SPIRE agent when the emulator has no
// SDSSocket (Envoy: "Unknown gRPC client cluster" without the bootstrap cluster).
func (e *Emulator) checkSpire(t *tlsCfg) error {
	if t == nil || len(t.spire) == 0 || e.opts.SDSSocket != "" {
		return nil
	}
	return fmt.Errorf("SDS secrets %v need cluster %s (Options.SDSSocket)", t.spire, SpireCluster)
}

// spireSecretNames are the secret names the listeners and clusters need from the SPIRE
// agent, sorted.
func (c *config) spireSecretNames() []string {
	var names []string
	for _, l := range c.listeners {
		if l.tls != nil {
			names = append(names, l.tls.spire...)
		}
	}
	for _, cl := range c.clusters {
		if cl.tls != nil {
			names = append(names, cl.tls.spire...)
		}
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// withSecret returns a copy of c with one secret set.
func (c *config) withSecret(s *tlsv3.Secret) *config {
	n := *c
	n.secrets = make(map[string]*tlsv3.Secret, len(c.secrets)+1)
	for k, v := range c.secrets {
		n.secrets[k] = v
	}
	n.secrets[s.GetName()] = s
	return &n
}

// syncSDS starts one SDS stream per SPIRE secret name the configuration needs and stops
// those no longer needed. Called from the ADS loop after every change.
func (e *Emulator) syncSDS(ctx context.Context, c *config) {
	need := c.spireSecretNames()
	e.sdsMu.Lock()
	defer e.sdsMu.Unlock()
	for name, stop := range e.sdsStreams {
		if !slices.Contains(need, name) {
			stop()
			delete(e.sdsStreams, name)
		}
	}
	if len(need) == 0 || e.opts.SDSSocket == "" || ctx.Err() != nil {
		return
	}
	if e.sdsConn == nil {
		conn, err := grpc.NewClient("unix://"+e.opts.SDSSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			e.opts.Logf("envoyemu: sds %s: %v", e.opts.SDSSocket, err)
			return
		}
		e.sdsConn = conn
	}
	for _, name := range need {
		if e.sdsStreams[name] != nil {
			continue
		}
		sctx, cancel := context.WithCancel(ctx)
		e.sdsStreams[name] = cancel
		e.sdsWG.Add(1)
		go func() {
			defer e.sdsWG.Done()
			e.runSDS(sctx, e.sdsConn, name)
		}()
	}
}

// runSDS keeps one secret's SDS stream open, reconnecting with a bounded backoff (the
// agent refuses a name the workload has no entry for yet, or not at all).
func (e *Emulator) runSDS(ctx context.Context, conn *grpc.ClientConn, name string) {
	version := ""
	e.retry(ctx, fmt.Sprintf("sds %q", name), func() error { return e.sdsStream(ctx, conn, name, &version) })
}

func (e *Emulator) sdsStream(ctx context.Context, conn *grpc.ClientConn, name string, version *string) error {
	s, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		return err
	}
	node := &corev3.Node{Id: e.opts.NodeID, Cluster: e.opts.NodeCluster, UserAgentName: "envoyemu"}
	req := &discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resource.SecretType, ResourceNames: []string{name}, VersionInfo: *version}
	if err := s.Send(req); err != nil {
		return err
	}
	for {
		resp, err := s.Recv()
		if err != nil {
			return err
		}
		ack := &discoveryv3.DiscoveryRequest{TypeUrl: resource.SecretType, ResourceNames: []string{name}, ResponseNonce: resp.GetNonce()}
		sec, applyErr := e.sdsSecret(name, resp)
		if applyErr != nil {
			e.opts.Logf("envoyemu: sds NACK %q version %s: %v", name, resp.GetVersionInfo(), applyErr)
			ack.VersionInfo = *version
			ack.ErrorDetail = &status.Status{Code: int32(codes.InvalidArgument), Message: applyErr.Error()}
			e.mu.Lock()
			e.nacks = append(e.nacks, applyErr.Error())
			if len(e.nacks) > maxNACKs {
				e.nacks = e.nacks[len(e.nacks)-maxNACKs:]
			}
			e.mu.Unlock()
		} else {
			e.cfgMu.Lock()
			next := e.cfg.Load().withSecret(sec)
			e.cfg.Store(next)
			e.cfgMu.Unlock()
			e.syncListeners(next)
			*version = resp.GetVersionInfo()
			ack.VersionInfo = *version
			e.opts.Logf("envoyemu: sds ACK %q version %s", name, *version)
		}
		if err := s.Send(ack); err != nil {
			return err
		}
		e.notify()
	}
}

// sdsSecret picks and checks the requested secret of a response.
func (e *Emulator) sdsSecret(name string, resp *discoveryv3.DiscoveryResponse) (*tlsv3.Secret, error) {
	for _, a := range resp.GetResources() {
		var s tlsv3.Secret
		if err := a.UnmarshalTo(&s); err != nil {
			return nil, err
		}
		if s.GetName() != name {
			continue
		}
		rs, err := e.parseSecret(&s)
		if err != nil {
			return nil, fmt.Errorf("secret %q: %w", name, err)
		}
		return rs, nil
	}
	return nil, fmt.Errorf("response without secret %q", name)
}

// spiffeConfig returns the SPIFFE validator's configuration of v, nil if v has no
// custom validator, or an error for any other validator.
func spiffeConfig(v *tlsv3.CertificateValidationContext) (*tlsv3.SPIFFECertValidatorConfig, error) {
	cv := v.GetCustomValidatorConfig()
	if cv == nil {
		return nil, nil
	}
	if cv.GetName() != spiffeValidator {
		return nil, fmt.Errorf("custom validator %q is not emulated", cv.GetName())
	}
	var sc tlsv3.SPIFFECertValidatorConfig
	if err := cv.GetTypedConfig().UnmarshalTo(&sc); err != nil {
		return nil, fmt.Errorf("custom validator %s: %w", spiffeValidator, err)
	}
	if sc.GetTrustBundles() != nil {
		return nil, errors.New("SPIFFE validator trust_bundles is not emulated")
	}
	if len(sc.GetTrustDomains()) == 0 {
		return nil, errors.New("SPIFFE validator without trust domains")
	}
	return &sc, nil
}

// loadSPIFFE loads the SPIFFE validator's trust bundles by trust domain name
// (spiffe_validator.cc SPIFFEValidator constructor: each bundle must hold a CA).
func (e *Emulator) loadSPIFFE(sc *tlsv3.SPIFFECertValidatorConfig) (map[string]*x509.CertPool, error) {
	out := map[string]*x509.CertPool{}
	for _, td := range sc.GetTrustDomains() {
		pool, _, err := e.loadRoots(&tlsv3.CertificateValidationContext{TrustedCa: td.GetTrustBundle()})
		if err != nil {
			return nil, fmt.Errorf("trust domain %s: %w", td.GetName(), err)
		}
		out[td.GetName()] = pool
	}
	return out, nil
}

// verifySPIFFE verifies a chain as Envoy's SPIFFE validator does: the leaf's trust
// domain (from its spiffe:// URI SAN) selects the bundle, the chain must verify against
// it, and the leaf must not be a CA nor carry keyCertSign/cRLSign
// (spiffe_validator.cc doVerifyCertChain, getTrustBundleStore, certificatePrecheck).
func verifySPIFFE(bundles map[string]*x509.CertPool, certs []*x509.Certificate) error {
	leaf := certs[0]
	td := ""
	for _, u := range leaf.URIs {
		if strings.EqualFold(u.Scheme, "spiffe") {
			td = u.Host
			break
		}
	}
	pool := bundles[td]
	if pool == nil {
		return &verifyError{reason: "CERTIFICATE_VERIFY_FAILED", err: fmt.Errorf("no trust bundle for trust domain %q", td)}
	}
	opts := x509.VerifyOptions{Roots: pool, Intermediates: x509.NewCertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}
	for _, c := range certs[1:] {
		opts.Intermediates.AddCert(c)
	}
	if _, err := leaf.Verify(opts); err != nil {
		return &verifyError{reason: "CERTIFICATE_VERIFY_FAILED", err: err}
	}
	if leaf.IsCA || leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
		return &verifyError{reason: "CERTIFICATE_VERIFY_FAILED", err: errors.New("leaf certificate is a CA or may sign certificates")}
	}
	return nil
}
