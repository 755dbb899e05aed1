package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// errAllowListRequired is returned when --spiffe-socket is set without
// --allowed-client-ids: an mTLS listener that any workload of the trust domain may reach
// would let every sidecar ask for every other sidecar's configuration, so there is no
// implicit "whole trust domain" default (fail closed).
var errAllowListRequired = errors.New("--spiffe-socket requires --allowed-client-ids: list the Envoy SPIFFE IDs (or trust domains, spiffe://example.org) that may connect")

// clientAllowList is the set of peers mcpgate's gRPC listeners accept under mTLS: exact
// SPIFFE IDs, and whole trust domains written as an ID without a path.
type clientAllowList struct {
	ids     map[spiffeid.ID]struct{}
	domains map[spiffeid.TrustDomain]struct{}
}

// parseAllowedClientIDs parses --allowed-client-ids: comma-separated SPIFFE IDs, where
// "spiffe://example.org" (no path) admits any ID of that trust domain. Every malformed
// entry is reported, not only the first.
func parseAllowedClientIDs(list string) (*clientAllowList, error) {
	a := &clientAllowList{ids: map[spiffeid.ID]struct{}{}, domains: map[spiffeid.TrustDomain]struct{}{}}
	var errs []error
	for entry := range strings.SplitSeq(list, ",") {
		entry = strings.TrimSpace(entry)
		if entry == "" {
			continue
		}
		id, err := spiffeid.FromString(entry)
		if err != nil {
			errs = append(errs, fmt.Errorf("--allowed-client-ids: %q: %w", entry, err))
			continue
		}
		if id.Path() == "" {
			a.domains[id.TrustDomain()] = struct{}{}
		} else {
			a.ids[id] = struct{}{}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if len(a.ids)+len(a.domains) == 0 {
		return nil, errAllowListRequired
	}
	return a, nil
}

// match is a spiffeid.Matcher; its error is what the TLS handshake fails with.
func (a *clientAllowList) match(id spiffeid.ID) error {
	if _, ok := a.ids[id]; ok {
		return nil
	}
	if _, ok := a.domains[id.TrustDomain()]; ok {
		return nil
	}
	return fmt.Errorf("client %q is not in --allowed-client-ids", id)
}

// authorizer adapts the allow-list for tlsconfig; the chain itself has already been
// verified against the peer trust domain's bundle by then.
func (a *clientAllowList) authorizer() tlsconfig.Authorizer {
	return tlsconfig.AdaptMatcher(a.match)
}

// serverCredentials are the transport credentials of mcpgate's gRPC listeners under
// SPIFFE mTLS: mcpgate presents the SVID from svid, requires a client certificate, verifies
// it against bundle (the peer's trust domain must be in it, so a certificate of an unknown
// trust domain fails the chain check) and then admits only allowed IDs. Both sources are
// read on every handshake, so rotated SVIDs and bundles apply without a restart.
func serverCredentials(svid x509svid.Source, bundle x509bundle.Source, allowed *clientAllowList) credentials.TransportCredentials {
	return credentials.NewTLS(tlsconfig.MTLSServerConfig(svid, bundle, allowed.authorizer()))
}

// workloadAPIAddr accepts a bare socket path as a convenience; the Workload API client
// wants a URI (unix:///path or tcp://ip:port).
func workloadAPIAddr(socket string) (string, error) {
	addr := socket
	if strings.HasPrefix(addr, "/") {
		addr = "unix://" + addr
	}
	if err := workloadapi.ValidateAddress(addr); err != nil {
		return "", fmt.Errorf("--spiffe-socket %q: %w", socket, err)
	}
	return addr, nil
}

// transportSecurity is the checked form of the --spiffe-socket and --allowed-client-ids
// flags; the zero value is plaintext.
type transportSecurity struct {
	workloadAPI string // URI; empty: plaintext
	allowed     *clientAllowList
}

// parseTransportSecurity validates the TLS flags before anything is started, so a
// misconfiguration fails serve at startup and never falls back to plaintext.
func parseTransportSecurity(f *serveFlags) (transportSecurity, error) {
	if f.spiffeSocket == "" {
		if f.allowedClientIDs != "" {
			return transportSecurity{}, errors.New("--allowed-client-ids needs --spiffe-socket: without it the listeners are plaintext and cannot check client identities")
		}
		return transportSecurity{}, nil
	}
	addr, addrErr := workloadAPIAddr(f.spiffeSocket)
	var allowed *clientAllowList
	var allowErr error
	if strings.TrimSpace(f.allowedClientIDs) == "" {
		allowErr = errAllowListRequired
	} else {
		allowed, allowErr = parseAllowedClientIDs(f.allowedClientIDs)
	}
	if err := errors.Join(addrErr, allowErr); err != nil {
		return transportSecurity{}, err
	}
	return transportSecurity{workloadAPI: addr, allowed: allowed}, nil
}

// grpcServerOptions returns the server options carrying the listeners' credentials (none
// for plaintext) and a func releasing the Workload API source. With SPIFFE mTLS it blocks
// until the Workload API has delivered a first SVID and bundle, or ctx ends: serving
// without them would fail every handshake.
func (ts transportSecurity) grpcServerOptions(ctx context.Context, log *zap.Logger) ([]grpc.ServerOption, func(), error) {
	if ts.workloadAPI == "" {
		return nil, func() {}, nil
	}
	log.Info("waiting for an X.509 SVID from the Workload API", zap.String("socket", ts.workloadAPI))
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(
		workloadapi.WithAddr(ts.workloadAPI),
		workloadapi.WithLogger(log.Named("workloadapi").Sugar()),
	))
	if err != nil {
		return nil, nil, fmt.Errorf("--spiffe-socket %s: %w", ts.workloadAPI, err)
	}
	svid, err := src.GetX509SVID()
	if err != nil {
		_ = src.Close()
		return nil, nil, fmt.Errorf("--spiffe-socket %s: %w", ts.workloadAPI, err)
	}
	log.Info("grpc listeners use SPIFFE mTLS", zap.String("spiffe_id", svid.ID.String()),
		zap.Strings("allowed_client_ids", ts.allowed.strings()))
	closeSrc := func() {
		if err := src.Close(); err != nil {
			log.Warn("closing the Workload API source", zap.Error(err))
		}
	}
	return []grpc.ServerOption{grpc.Creds(serverCredentials(src, src, ts.allowed))}, closeSrc, nil
}

func (a *clientAllowList) strings() []string {
	out := make([]string, 0, len(a.ids)+len(a.domains))
	for td := range a.domains {
		out = append(out, td.IDString())
	}
	for id := range a.ids {
		out = append(out, id.String())
	}
	slices.Sort(out)
	return out
}

// isLoopbackAddr reports whether host:port names only loopback: "localhost" or a
// loopback IP (127.0.0.0/8, ::1, ::ffff:127.x). An empty host (":9001") listens on every
// interface, and any other host name may resolve beyond loopback: both are not loopback,
// nor is an address that does not parse.
func isLoopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
