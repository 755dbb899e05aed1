// Package xds is mcpgate's xDS control plane: it translates the policy snapshot into the
// Envoy resources of each node (Translate, a pure function), keeps them in
// go-control-plane's snapshot cache keyed by node.cluster (the App ID or gateway name),
// and serves them over ADS, re-translating on every policy change.
package xds

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sort"
	"strconv"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/mcpgate/mcpgate/envoy"
	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/policy"
)

// ErrUnknownNode is returned by Translate for a node.cluster that names no App (with a
// sidecar) and no Gateway.
var ErrUnknownNode = errors.New("node cluster names no App with a sidecar and no Gateway")

// Resource names. Listener and route configuration names are per node; cluster names are
// prefixed by what they reach.
const (
	ListenerInbound  = "inbound"
	ListenerOutbound = "outbound"
	RouteInbound     = "inbound"
	RouteOutbound    = "outbound"
	// ListenerGatewayInbound is a sidecar's listener for the Gateways that route to its
	// app (spec.sidecar.gatewayPort), and its route configuration.
	ListenerGatewayInbound = "gateway_inbound"
	// ClusterAuthz reaches mcpgate's ext_authz and ext_proc gRPC server (mesh.authz.address).
	ClusterAuthz = "mcpgate"
	// ClusterOTLP reaches the OTLP collector of Mesh.spec.tracing.
	ClusterOTLP = "mcpgate_otlp"
)

// ClusterApp is the cluster of an app's own process (app.address): the upstream of its
// sidecar's listeners, and of gateway routes when the Mesh has mtls: disabled.
func ClusterApp(id string) string { return "app|" + id }

// ClusterSidecar is the cluster of another app's sidecar inbound listener (mTLS).
func ClusterSidecar(id string) string { return "sidecar|" + id }

// ClusterSidecarGateway is the cluster of an app's sidecar gateway_inbound listener, on
// which a Gateway reaches the app over mTLS.
func ClusterSidecarGateway(id string) string { return "sidecar-gateway|" + id }

// ClusterEndpoint is the cluster of an HTTPEndpoint.
func ClusterEndpoint(name string) string { return "endpoint|" + name }

// ListenerGateway names a gateway's listener and route configuration.
func ListenerGateway(name string) string { return "gateway|" + name }

// FilterCredentials is the outbound listener's credential_injector filter of an
// HTTPEndpoint with client credentials.
func FilterCredentials(endpoint string) string { return "mcpgate.credentials." + endpoint }

// SecretToken is the SDS secret holding that endpoint's current access token.
func SecretToken(endpoint string) string { return "outbound-token|" + endpoint }

// authzMaxRequests is the circuit breaker of the mcpgate cluster. Every in-flight request
// holds an ext_proc stream to mcpgate, so Envoy's default of 1024 would turn load into
// 503s (the filters fail closed) long before mcpgate is busy.
const authzMaxRequests = 1 << 16

// Resources are the Envoy resources of one node.
type Resources struct {
	Listeners []*listenerv3.Listener
	Routes    []*routev3.RouteConfiguration
	Clusters  []*clusterv3.Cluster
	Endpoints []*endpointv3.ClusterLoadAssignment
	Secrets   []*tlsv3.Secret
}

// Translate maps the policy snapshot to the resources of the node whose node.cluster is
// node: an App ID (its sidecar) or a Gateway name. It does no I/O, reports every problem
// it finds (errors.Join), and validates every resource (ValidateAll) before returning.
func Translate(snap *policy.Snapshot, node string) (Resources, error) {
	return TranslateWith(snap, node, nil)
}

// Tokens give the current access token of an HTTPEndpoint with client credentials, ""
// while there is none. mcpgate's credential sources implement it
// (extauthz/credentials.Sources): a token is there once a call has used it through
// ext_authz, renewed by mcpgate from then on.
type Tokens interface {
	Token(ep *policy.HTTPEndpoint) string
}

// injectGate is what the Server adds to the Tokens it translates with: whether every
// sidecar of the node already holds the endpoint's token. Until then the token is in the
// secret but the routes keep asking ext_authz: a route that turns the injector on may
// reach Envoy before the secret does (ADS orders neither, and go-control-plane's ordered
// mode sends routes first), and the injector answers a call in between with a 401.
type injectGate interface {
	injectable(endpoint string) bool
}

// TranslateWith is Translate with the outbound tokens sidecars inject themselves: the
// route of an endpoint whose token tokens has uses Envoy's credential_injector with it
// (an SDS secret), the others ask ext_authz. nil tokens: every such route asks ext_authz.
func TranslateWith(snap *policy.Snapshot, node string, tokens Tokens) (Resources, error) {
	if snap == nil || snap.Mesh == nil {
		return Resources{}, errors.New("no policy snapshot")
	}
	t := &translator{snap: snap, node: node, tokens: tokens, clusters: map[string]*clusterv3.Cluster{}}
	if app := snap.Apps[node]; app != nil && app.Sidecar != nil {
		t.sidecar(app)
	} else if gw := snap.Gateways[node]; gw != nil {
		t.gateway(gw)
	} else {
		return Resources{}, fmt.Errorf("%w: %q", ErrUnknownNode, node)
	}
	r := t.resources()
	t.errs = append(t.errs, r.Validate())
	if err := errors.Join(t.errs...); err != nil {
		return Resources{}, fmt.Errorf("translate %q: %w", node, err)
	}
	return r, nil
}

// Validate runs ValidateAll on every resource.
func (r Resources) Validate() error {
	var errs []error
	for _, m := range r.all() {
		errs = append(errs, envoy.Validate(m))
	}
	return errors.Join(errs...)
}

type translator struct {
	snap      *policy.Snapshot
	node      string
	tokens    Tokens
	errs      []error
	listeners []*listenerv3.Listener
	routes    []*routev3.RouteConfiguration
	clusters  map[string]*clusterv3.Cluster
	endpoints []*endpointv3.ClusterLoadAssignment
	secrets   []*tlsv3.Secret
}

func (t *translator) errf(format string, args ...any) {
	t.errs = append(t.errs, fmt.Errorf(format, args...))
}

func (t *translator) resources() Resources {
	r := Resources{Listeners: t.listeners, Routes: t.routes, Endpoints: t.endpoints, Secrets: t.secrets}
	for _, c := range t.clusters {
		r.Clusters = append(r.Clusters, c)
	}
	sort.Slice(r.Clusters, func(i, j int) bool { return r.Clusters[i].Name < r.Clusters[j].Name })
	sort.Slice(r.Endpoints, func(i, j int) bool { return r.Endpoints[i].ClusterName < r.Endpoints[j].ClusterName })
	return r
}

// addCluster adds a cluster (once) and its EDS assignment, if any.
func (t *translator) addCluster(o envoy.ClusterOptions) {
	if _, ok := t.clusters[o.Name]; ok {
		return
	}
	c, cla, err := envoy.Cluster(o)
	if err != nil {
		t.errf("cluster %s: %w", o.Name, err)
		return
	}
	t.clusters[o.Name] = c
	if cla != nil {
		t.endpoints = append(t.endpoints, cla)
	}
}

// tracing makes hcm trace with Envoy's OpenTelemetry tracer when the Mesh asks for
// traces (spec.tracing), to the same collector mcpgate exports to, through the
// mcpgate_otlp cluster; the service name is the node's (App ID or Gateway name).
func (t *translator) tracing(hcm *hcmv3.HttpConnectionManager) {
	tr := t.snap.Mesh.Tracing
	if tr == nil {
		return
	}
	host, port, err := splitHostPort(tr.Address, 0)
	if err != nil {
		t.errf("mesh tracing.otlp.address: %w", err)
		return
	}
	o := envoy.ClusterOptions{Name: ClusterOTLP, Host: host, Port: port, Protocol: envoy.HTTP2}
	if tr.Secure {
		if o.TransportSocket, err = envoy.UpstreamPublicTLSHTTP2(host); err != nil {
			t.errf("tracing cluster: %w", err)
			return
		}
	}
	t.addCluster(o)
	if err := envoy.SetTracing(hcm, envoy.TracingOptions{Cluster: ClusterOTLP, ServiceName: t.node + "-envoy", Percent: tr.SamplingRate * 100}); err != nil {
		t.errf("tracing: %w", err)
	}
}

// authzCluster reaches mcpgate. When the Mesh names mcpgate's SPIFFE ID (authz.spiffeId),
// the Envoy presents its own SVID (selfID: the App's, or the Gateway's) and accepts only
// mcpgate's: mcpgate serve --spiffe-socket refuses anything else.
func (t *translator) authzCluster(selfID string) {
	host, port, err := splitHostPort(t.snap.Mesh.AuthzAddress, 0)
	if err != nil {
		t.errf("mesh authz.address: %w", err)
		return
	}
	o := envoy.ClusterOptions{Name: ClusterAuthz, Host: host, Port: port, Protocol: envoy.HTTP2, MaxRequests: authzMaxRequests}
	if id := t.snap.Mesh.AuthzSpiffeID; id != "" {
		own, ok := t.meshTLSFor(selfID)
		if !ok {
			t.errf("mesh authz.spiffeId needs mesh mTLS")
			return
		}
		if o.TransportSocket, err = envoy.UpstreamMTLS(own, id); err != nil {
			t.errf("mcpgate cluster: %w", err)
			return
		}
	}
	t.addCluster(o)
}

func (t *translator) appCluster(app *policy.App) {
	host, port, err := splitHostPort(app.Address, 0)
	if err != nil {
		t.errf("app %s address: %w", app.ID, err)
		return
	}
	o := envoy.ClusterOptions{Name: ClusterApp(app.ID), Host: host, Port: port, Protocol: envoy.HTTP1}
	if app.MCP != nil {
		o.MaxRequests = app.MCP.Resiliency.MaxRequests
	}
	if isGRPC(app) {
		// gRPC needs HTTP/2 end to end: to the app process in cleartext (h2c, prior
		// knowledge), as gRPC servers listen without TLS behind a sidecar.
		o.Protocol = envoy.HTTP2
	}
	t.addCluster(o)
}

// isGRPC reports whether app serves gRPC MCP (mcp.transport grpc).
func isGRPC(app *policy.App) bool {
	return app.MCP != nil && app.MCP.Transport == policy.TransportGRPC
}

// meshTLS returns the secrets of app's identity, or ok=false when mTLS is disabled. With
// certDir the secrets are served over ADS as file references; with SPIRE they come from
// the agent, named as SPIRE names them.
func (t *translator) meshTLS(app *policy.App) (envoy.MeshTLS, bool) {
	return t.meshTLSFor(app.SpiffeID)
}

// meshTLSFor is meshTLS for an identity: an App's SPIFFE ID, or a Gateway's
// (spiffe://<td>/ns/<ns>/<gateway-name>, the identity xDS checks it by).
func (t *translator) meshTLSFor(selfID string) (envoy.MeshTLS, bool) {
	mesh := t.snap.Mesh
	if mesh.MTLS == policy.MTLSDisabled {
		return envoy.MeshTLS{}, false
	}
	bundle := "spiffe://" + mesh.TrustDomain
	src := envoy.SpireSDS()
	if mesh.SDS.SpireAgentSocket == "" {
		src = envoy.ADSConfigSource()
		if len(t.secrets) == 0 {
			t.secrets = append(t.secrets,
				envoy.FileCertSecret(selfID, mesh.SDS.CertDir),
				envoy.FileBundleSecret(bundle, mesh.SDS.CertDir))
		}
	}
	return envoy.MeshTLS{Cert: envoy.SecretRef(selfID, src), Bundle: envoy.SecretRef(bundle, src)}, true
}

// sidecar builds the resources of an app's sidecar: the inbound listener when it serves
// MCP, and the outbound listener (Dapr-style service invocation) for every app.
func (t *translator) sidecar(app *policy.App) {
	if app.MCP != nil {
		t.inbound(app)
		t.gatewayInbound(app)
	}
	t.outbound(app)
}

func (t *translator) inbound(app *policy.App) {
	t.authzCluster(app.SpiffeID)
	t.appCluster(app)
	ext := map[string]string{contract.ContextAppID: app.ID}
	routes := t.prmRoutes(app)
	if isGRPC(app) {
		routes = append(routes, t.grpcRoutes(app, ClusterApp(app.ID), ext)...)
	} else {
		routes = append(routes, t.mcpRoutes(app, ClusterApp(app.ID), app.MCP.Path, ext)...)
	}
	routes = append(routes, t.notFound())
	t.routes = append(t.routes, envoy.RouteConfiguration(RouteInbound,
		envoy.VirtualHost(RouteInbound, []string{"*"}, routes)))

	var ts *corev3.TransportSocket
	if m, ok := t.meshTLS(app); ok {
		var err error
		strict := t.snap.Mesh.MTLS == policy.MTLSStrict
		if ts, err = envoy.DownstreamMTLS(m, t.snap.Mesh.TrustDomain, strict); err != nil {
			t.errf("inbound tls: %w", err)
		}
	}
	t.policyListener(envoy.ListenerOptions{
		Name: ListenerInbound, Address: "0.0.0.0", Port: uint32(app.Sidecar.InboundPort),
		Direction: corev3.TrafficDirection_INBOUND,
	}, envoy.HCMOptions{StatPrefix: ListenerInbound, RouteConfig: RouteInbound}, ts)
}

// policyListener adds a listener whose filter chain enforces policy: cors, ext_authz,
// ext_proc, router (envoy.HTTPFilters).
func (t *translator) policyListener(lo envoy.ListenerOptions, ho envoy.HCMOptions, ts *corev3.TransportSocket) {
	var err error
	if ho.Filters, err = envoy.HTTPFilters(ClusterAuthz); err != nil {
		t.errf("listener %s: %w", lo.Name, err)
		return
	}
	t.listener(lo, ho, ts)
}

// listener adds a listener with one HTTP filter chain of ho.Filters.
func (t *translator) listener(lo envoy.ListenerOptions, ho envoy.HCMOptions, ts *corev3.TransportSocket) {
	hcm := envoy.HTTPConnectionManager(ho)
	t.tracing(hcm)
	fc, err := envoy.HTTPFilterChain(lo.Name, hcm, ts)
	if err != nil {
		t.errf("listener %s: %w", lo.Name, err)
		return
	}
	lo.Chains = []*listenerv3.FilterChain{fc}
	t.listeners = append(t.listeners, envoy.Listener(lo))
}

// mcpRoutes are the routes of an app's MCP endpoint at path (rewritten to the app's
// mcp.path when they differ): the GET event stream and everything else (POST, DELETE).
func (t *translator) mcpRoutes(app *policy.App, cluster, path string, ext map[string]string) []*routev3.Route {
	m := app.MCP
	var routes []*routev3.Route
	authz, err := envoy.ExtAuthzContext(ext)
	if err != nil {
		t.errf("app %s: %w", app.ID, err)
		return nil
	}
	per := map[string]*anypb.Any{envoy.FilterExtAuthz: authz}
	if c := m.CORS; c != nil {
		// Only apps with spec.mcp.cors get a CorsPolicy; on every other route the CORS
		// filter does nothing, so a preflight goes to ext_authz and is refused.
		cors, err := envoy.CORSPolicy(envoy.CORSOptions{
			Origins: c.AllowOrigins, AnyOrigin: c.AnyOrigin, Methods: c.AllowMethods, Headers: c.AllowHeaders,
			ExposeHeaders: c.ExposeHeaders, MaxAge: c.MaxAge, AllowCredentials: c.AllowCredentials,
		})
		if err != nil {
			t.errf("app %s: cors: %w", app.ID, err)
			return nil
		}
		per[envoy.FilterCORS] = cors
	}
	rewrite := ""
	if path != m.Path {
		rewrite = m.Path
	}
	res := m.Resiliency
	// GET opens the server's event stream, which lives as long as the session: no
	// response timeout (the idle timeout still applies). GET is idempotent, so retries
	// may cover resets too.
	routes = append(routes, envoy.Forward(app.ID+"/mcp-stream", envoy.WithHeader(envoy.ExactPath(path), ":method", "GET"), envoy.ForwardOptions{
		Cluster: cluster, Timeout: 0, PrefixRewrite: rewrite,
		Retries: res.Retries, RetryOn: envoy.RetryOnIdempotent, PerFilter: per,
	}))
	// POST carries JSON-RPC messages; a tools/call must not run twice, so retries are
	// only for requests that never reached the app. resiliency.timeout bounds the whole
	// response (an SSE response included); unset, it is disabled rather than Envoy's 15s.
	routes = append(routes, envoy.Forward(app.ID+"/mcp", envoy.ExactPath(path), envoy.ForwardOptions{
		Cluster: cluster, Timeout: res.Timeout, PrefixRewrite: rewrite,
		Retries: res.Retries, RetryOn: envoy.RetryOnUnsent, PerFilter: per,
		BodyLimit: uint64(maxBody(m)),
	}))
	return routes
}

// grpcRoutes are the routes of an app serving gRPC MCP: every method of
// mcpgate.mcp.v1.McpService (contract.GRPCServicePrefix), to the app over HTTP/2, with
// ext_authz on every call (the same context_extensions as Streamable HTTP routes) and
// ext_proc streaming the request messages (envoy.ExtProcGRPC).
//
// Session and CallToolStream are long-lived streams, so the route has no response
// timeout; resiliency.timeout, if set, bounds silence on the stream instead (the route's
// idle_timeout, in place of the listener's stream_idle_timeout). Retries are only for
// calls that never reached the app (connect-failure, refused-stream,
// reset-before-request), as for a tools/call POST: the request stream is replayed from
// Envoy's buffer of messages ext_proc already allowed, and a long stream outgrows that
// buffer and is simply not retried. An UNAVAILABLE status from the app itself is not
// retried: the call may have run (the gRPC status code doc: "it is not always safe to
// retry non-idempotent operations"), and Envoy's own UNAVAILABLE for a failed
// connection is connect-failure. No request_body_buffer_limit either: STREAMED bodies
// are not buffered whole, and ext_proc bounds each message (limits.maxRequestBytes).
func (t *translator) grpcRoutes(app *policy.App, cluster string, ext map[string]string) []*routev3.Route {
	authz, err := envoy.ExtAuthzContext(ext)
	if err != nil {
		t.errf("app %s: %w", app.ID, err)
		return nil
	}
	proc, err := envoy.ExtProcGRPC()
	if err != nil {
		t.errf("app %s: %w", app.ID, err)
		return nil
	}
	res := app.MCP.Resiliency
	return []*routev3.Route{envoy.Forward(app.ID+"/grpc", envoy.GRPCPrefix(contract.GRPCServicePrefix), envoy.ForwardOptions{
		Cluster: cluster, Timeout: 0, IdleTimeout: res.Timeout,
		Retries: res.Retries, RetryOn: envoy.RetryOnUnsent,
		PerFilter: map[string]*anypb.Any{envoy.FilterExtAuthz: authz, envoy.FilterExtProc: proc},
	})}
}

func maxBody(m *policy.MCP) int64 {
	if m.Limits.MaxRequestBytes > 0 {
		return m.Limits.MaxRequestBytes
	}
	return policy.DefaultMaxRequestBytes
}

// prmDocument is the RFC 9728 §2 protected resource metadata.
type prmDocument struct {
	Resource               string   `json:"resource"`
	AuthorizationServers   []string `json:"authorization_servers,omitempty"`
	ScopesSupported        []string `json:"scopes_supported,omitempty"`
	BearerMethodsSupported []string `json:"bearer_methods_supported"`
}

// prmRoutes answer the RFC 9728 metadata document from Envoy itself, at the path derived
// from mcp.resource (§3.1) and at the root well-known path that older MCP clients ask
// for. It is public, so ext_authz and ext_proc are off on these routes.
func (t *translator) prmRoutes(app *policy.App) []*routev3.Route {
	m := app.MCP
	if m.MetadataURL == "" {
		return nil
	}
	u, err := url.Parse(m.MetadataURL)
	if err != nil {
		t.errf("app %s: metadata URL %q: %w", app.ID, m.MetadataURL, err)
		return nil
	}
	doc := prmDocument{Resource: m.Resource, ScopesSupported: m.Authentication.Scopes, BearerMethodsSupported: []string{"header"}}
	for _, is := range m.Authentication.Issuers {
		doc.AuthorizationServers = append(doc.AuthorizationServers, is.Issuer)
	}
	body, err := json.Marshal(doc)
	if err != nil {
		t.errf("app %s: %w", app.ID, err)
		return nil
	}
	per := t.publicRoute()
	const root = "/.well-known/oauth-protected-resource"
	paths := []string{u.EscapedPath()}
	if paths[0] != root {
		paths = append(paths, root)
	}
	var routes []*routev3.Route
	for i, p := range paths {
		name := app.ID + "/prm"
		if i > 0 {
			name += "-root"
		}
		r := envoy.DirectResponse(name, envoy.ExactPath(p), 200, "application/json", string(body), per)
		if c := m.CORS; c != nil {
			// Browser clients discover the authorization server from this document.
			r.ResponseHeadersToAdd = append(r.ResponseHeadersToAdd, envoy.PublicCORSHeaders(c.AllowHeaders, c.MaxAge)...)
		}
		routes = append(routes, r)
	}
	return routes
}

// publicRoute turns ext_authz and ext_proc off: for routes Envoy answers itself with
// public content.
func (t *translator) publicRoute() map[string]*anypb.Any {
	a, err := envoy.ExtAuthzDisabled()
	if err != nil {
		t.errf("%w", err)
	}
	p, err := envoy.ExtProcDisabled()
	if err != nil {
		t.errf("%w", err)
	}
	return map[string]*anypb.Any{envoy.FilterExtAuthz: a, envoy.FilterExtProc: p}
}

// notFound answers every path no other route claims: nothing unlisted reaches the app.
func (t *translator) notFound() *routev3.Route {
	return envoy.DirectResponse("not-found", envoy.Prefix("/"), 404, "", "", t.publicRoute())
}

// outbound is Dapr's service invocation on 127.0.0.1:outboundPort: the app calls
// /v1.0/invoke/<app-id>/method/<rest>, or any path with dapr-app-id: <app-id>, and its
// sidecar forwards to the target's sidecar over mTLS (or to an HTTPEndpoint). Policy is
// enforced by the target's sidecar, so this listener runs the router only, unless an
// HTTPEndpoint has auth: then ext_authz runs on that endpoint's routes, where mcpgate
// supplies the upstream's Authorization header (see envoy.OutboundFilters). On the
// routes of an HTTPEndpoint without auth, the agent's Authorization header is removed
// unless spec.passthrough says otherwise.
//
// A target serving gRPC MCP is reached as Dapr's gRPC proxying reaches apps: the client
// dials the outbound port (HTTP/2 cleartext on loopback) with metadata dapr-app-id:
// <app-id>, and its method paths go on unchanged to the target's sidecar over HTTP/2.
// The /v1.0/invoke/ form does not apply: gRPC clients cannot put a method path under a
// prefix, and gRPC does not run over HTTP/1.1.
func (t *translator) outbound(app *policy.App) {
	if app.Sidecar.OutboundPort == 0 {
		return
	}
	own, mtls := t.meshTLS(app)
	var invoke, byHeader []*routev3.Route
	targets := map[string]bool{}
	for _, id := range sortedKeys(t.snap.Apps) {
		target := t.snap.Apps[id]
		if target.MCP == nil || target.Sidecar == nil {
			continue // only MCP apps have an inbound listener to reach
		}
		targets[id] = true
		o, ok := t.sidecarCluster(ClusterSidecar(id), target, target.Sidecar.InboundPort, own, mtls)
		if !ok {
			continue
		}
		t.addCluster(o)
		grpc := isGRPC(target)
		fo := envoy.ForwardOptions{
			Cluster: o.Name, Timeout: 0, // the target's sidecar enforces the app's timeout
			Retries: target.MCP.Resiliency.Retries, RetryOn: envoy.RetryOnUnsent,
		}
		if grpc {
			byHeader = append(byHeader, envoy.Forward("header/"+id,
				envoy.WithHeader(envoy.Prefix(contract.GRPCServicePrefix), contract.HeaderDaprAppID, id), fo))
			continue
		}
		invoke = append(invoke, t.invokeRoute(id, "/", fo))
		byHeader = append(byHeader, t.headerRoute(id, "", fo))
	}
	credentials := false
	var injectors []*hcmv3.HttpFilter
	for _, name := range sortedKeys(t.snap.Endpoints) {
		if targets[name] {
			continue // an App of the same name wins, as its routes come first
		}
		ep := t.snap.Endpoints[name]
		if ep.Auth != nil && !ep.MayUseCredentials(app.ID) {
			// Not among spec.callers: Envoy answers itself, and nothing reaches the
			// upstream (without credentials it would only be refused there).
			body := fmt.Sprintf(`{"error":"access_denied","reason":"App %s may not call HTTPEndpoint %s (spec.callers)"}`, app.ID, name)
			invoke = append(invoke, envoy.DirectResponse("invoke/"+name, envoy.Prefix("/v1.0/invoke/"+name+"/method/"), 403, "application/json", body, nil))
			byHeader = append(byHeader, envoy.DirectResponse("header/"+name, envoy.WithHeader(envoy.Prefix("/"), contract.HeaderDaprAppID, name), 403, "application/json", body, nil))
			continue
		}
		fo, ok := t.endpointCluster(ep)
		if !ok {
			continue
		}
		base := basePath(ep.BaseURL)
		// An agent's copies of the headers mcpgate vouches for never reach the upstream,
		// whichever filters run on the route (ext_authz strips them only when it runs).
		fo.HeadersToRemove = contract.SetHeaders()
		switch {
		case ep.Auth != nil:
			// mcpgate supplies the credentials: ext_authz asks it for the upstream's
			// Authorization header, naming the endpoint and this App (which mcpgate
			// checks against spec.callers and the connection's SPIFFE ID).
			authz, err := envoy.ExtAuthzContext(map[string]string{contract.ContextEndpoint: name, contract.ContextSourceAppID: app.ID})
			if err != nil {
				t.errf("endpoint %s: %w", name, err)
				continue
			}
			fo.PerFilter = map[string]*anypb.Any{envoy.FilterExtAuthz: authz}
			credentials = true
			if ep.Auth.ClientCredentials != nil {
				// The token is the same for every call: while mcpgate has one, the sidecar
				// injects it itself and no call waits for a Check (envoy/credentials.go).
				filter, secret := FilterCredentials(name), SecretToken(name)
				f, err := envoy.CredentialInjectorFilter(filter, secret)
				if err != nil {
					t.errf("endpoint %s: %w", name, err)
					continue
				}
				injectors = append(injectors, f)
				token := ""
				if t.tokens != nil {
					token = t.tokens.Token(ep)
				}
				t.secrets = append(t.secrets, envoy.TokenSecret(secret, token))
				if gate, ok := t.tokens.(injectGate); token != "" && (!ok || gate.injectable(name)) {
					on, err := envoy.CredentialInjectorEnabled()
					if err != nil {
						t.errf("endpoint %s: %w", name, err)
						continue
					}
					fo.PerFilter = map[string]*anypb.Any{filter: on} // ext_authz is turned off below
				}
			}
		case !ep.Passthrough:
			// No token passthrough: whatever the agent holds was not issued for this
			// upstream (spec.passthrough: true keeps it).
			fo.HeadersToRemove = append(fo.HeadersToRemove, "authorization")
		}
		invoke = append(invoke, t.invokeRoute(name, base, fo))
		byHeader = append(byHeader, t.headerRoute(name, base, fo))
	}
	routes := append(invoke, byHeader...)
	routes = append(routes, envoy.DirectResponse("not-found", envoy.Prefix("/"), 404, "", "", nil))
	router, err := envoy.RouterFilter()
	chain := []*hcmv3.HttpFilter{router}
	if credentials {
		// ext_authz runs only on the credential routes; every other route turns it off.
		t.authzCluster(app.SpiffeID)
		chain, err = envoy.OutboundFilters(ClusterAuthz)
		if err == nil {
			chain = append(chain[:len(chain)-1], append(injectors, chain[len(chain)-1])...) // before the router
		}
		off, offErr := envoy.ExtAuthzDisabled()
		err = errors.Join(err, offErr)
		for _, r := range routes {
			if r.TypedPerFilterConfig[envoy.FilterExtAuthz] == nil {
				if r.TypedPerFilterConfig == nil {
					r.TypedPerFilterConfig = map[string]*anypb.Any{}
				}
				r.TypedPerFilterConfig[envoy.FilterExtAuthz] = off
			}
		}
	}
	if err != nil {
		t.errf("outbound listener: %w", err)
		return
	}
	t.routes = append(t.routes, envoy.RouteConfiguration(RouteOutbound,
		envoy.VirtualHost(RouteOutbound, []string{"*"}, routes)))
	t.listener(envoy.ListenerOptions{
		// Loopback only: the outbound listener forwards with this app's identity.
		Name: ListenerOutbound, Address: "127.0.0.1", Port: uint32(app.Sidecar.OutboundPort),
		Direction: corev3.TrafficDirection_OUTBOUND,
	}, envoy.HCMOptions{StatPrefix: ListenerOutbound, RouteConfig: RouteOutbound, Filters: chain}, nil)
}

// sidecarCluster is a cluster to target's sidecar on port: HTTP/2 for gRPC MCP (HTTP/2
// end to end), HTTP/1.1 in plaintext, and over mTLS whatever ALPN settles on. With mtls
// it presents own and accepts only the target's exact SPIFFE ID.
func (t *translator) sidecarCluster(name string, target *policy.App, port int, own envoy.MeshTLS, mtls bool) (envoy.ClusterOptions, bool) {
	o := envoy.ClusterOptions{
		Name: name, Protocol: envoy.HTTP1, Host: target.Sidecar.Address, Port: uint32(port),
		MaxRequests: target.MCP.Resiliency.MaxRequests, OutlierDetection: true,
	}
	grpc := isGRPC(target)
	if grpc {
		o.Protocol = envoy.HTTP2
	}
	if !mtls {
		return o, true
	}
	var err error
	if grpc {
		o.TransportSocket, err = envoy.UpstreamMTLSHTTP2(own, target.SpiffeID)
	} else {
		o.TransportSocket, err = envoy.UpstreamMTLS(own, target.SpiffeID)
		o.Protocol = envoy.HTTPAuto
	}
	if err != nil {
		t.errf("cluster %s: %w", name, err)
		return o, false
	}
	return o, true
}

// invokeRoute is /v1.0/invoke/<id>/method/<rest> → <rewrite><rest>.
func (t *translator) invokeRoute(id, rewrite string, fo envoy.ForwardOptions) *routev3.Route {
	fo.PrefixRewrite = rewrite
	return envoy.Forward("invoke/"+id, envoy.Prefix("/v1.0/invoke/"+id+"/method/"), fo)
}

// headerRoute is any path with dapr-app-id: <id>.
func (t *translator) headerRoute(id, rewrite string, fo envoy.ForwardOptions) *routev3.Route {
	if rewrite != "/" {
		fo.PrefixRewrite = rewrite
	}
	return envoy.Forward("header/"+id, envoy.WithHeader(envoy.Prefix("/"), contract.HeaderDaprAppID, id), fo)
}

// endpointCluster adds the cluster of an HTTPEndpoint and returns the route options
// reaching it (host rewritten to the endpoint's, its headers added).
func (t *translator) endpointCluster(ep *policy.HTTPEndpoint) (envoy.ForwardOptions, bool) {
	if ep.BaseURL == nil {
		t.errf("endpoint %s: no baseUrl", ep.Name)
		return envoy.ForwardOptions{}, false
	}
	def := uint32(443)
	if ep.BaseURL.Scheme == "http" {
		def = 80
	}
	host, port, err := splitHostPort(ep.BaseURL.Host, def)
	if err != nil {
		t.errf("endpoint %s: %w", ep.Name, err)
		return envoy.ForwardOptions{}, false
	}
	o := envoy.ClusterOptions{Name: ClusterEndpoint(ep.Name), Host: host, Port: port, Internet: true, Protocol: envoy.HTTP1, OutlierDetection: true}
	if ep.BaseURL.Scheme == "https" {
		if o.TransportSocket, err = envoy.UpstreamPublicTLS(host); err != nil {
			t.errf("endpoint %s: %w", ep.Name, err)
			return envoy.ForwardOptions{}, false
		}
	}
	t.addCluster(o)
	return envoy.ForwardOptions{Cluster: o.Name, Timeout: 0, HostRewrite: ep.BaseURL.Host, HeadersToAdd: ep.Headers}, true
}

// gatewayUpstream adds the cluster by which gw reaches app and returns its name: app's
// sidecar on spec.sidecar.gatewayPort, over mTLS with the gateway's SVID, accepting only
// the app's SPIFFE ID. So the app's own port stays open to its sidecar alone: whoever
// reaches it skips ext_authz and ext_proc and can name any caller in the identity
// headers. With mtls: disabled nothing can authenticate that hop, and the gateway goes
// to app.address itself (the README says the app's port must then be reachable from the
// gateway only).
func (t *translator) gatewayUpstream(gw *policy.Gateway, app *policy.App) (string, bool) {
	own, mtls := t.meshTLSFor(GatewaySpiffeID(t.snap.Mesh.TrustDomain, gw))
	if !mtls {
		t.appCluster(app)
		return ClusterApp(app.ID), true
	}
	if app.Sidecar == nil || app.Sidecar.GatewayPort == 0 {
		t.errf("gateway %s: app %s has no sidecar.gatewayPort", gw.Name, app.ID) // policy refuses this
		return "", false
	}
	o, ok := t.sidecarCluster(ClusterSidecarGateway(app.ID), app, app.Sidecar.GatewayPort, own, true)
	if ok {
		t.addCluster(o)
	}
	return o.Name, ok
}

// gatewayInbound is the listener of app's sidecar for the Gateways that route to app, on
// spec.sidecar.gatewayPort. A gateway has already run ext_authz and ext_proc with app's
// policy and set the caller headers, so this listener runs the router only. What makes
// that safe is who may connect: a client certificate is required, and only the SPIFFE IDs
// of the Gateways with a route to app are accepted, not any workload of the trust domain.
// Its routes are the app's MCP endpoint (mcp.path, or the gRPC service) to the app, with
// no response timeout and no retries (the gateway's route has both), and 404 for the
// rest. Without mTLS there is no such listener (gatewayUpstream).
func (t *translator) gatewayInbound(app *policy.App) {
	if app.Sidecar.GatewayPort == 0 {
		return
	}
	own, mtls := t.meshTLS(app)
	if !mtls {
		return
	}
	var peers []string
	for _, name := range sortedKeys(t.snap.Gateways) {
		gw := t.snap.Gateways[name]
		for _, r := range gw.Routes {
			if r.App != nil && r.App.ID == app.ID {
				peers = append(peers, GatewaySpiffeID(t.snap.Mesh.TrustDomain, gw))
				break
			}
		}
	}
	if len(peers) == 0 {
		return // no Gateway routes here: nobody may connect, so nothing listens
	}
	ts, err := envoy.DownstreamMTLSFrom(own, peers)
	if err != nil {
		t.errf("gateway_inbound tls: %w", err)
		return
	}
	m := envoy.ExactPath(app.MCP.Path)
	if isGRPC(app) {
		m = envoy.GRPCPrefix(contract.GRPCServicePrefix)
	}
	routes := []*routev3.Route{
		envoy.Forward(app.ID+"/gateway", m, envoy.ForwardOptions{Cluster: ClusterApp(app.ID), Timeout: 0}),
		envoy.DirectResponse("not-found", envoy.Prefix("/"), 404, "", "", nil),
	}
	router, err := envoy.RouterFilter()
	if err != nil {
		t.errf("gateway_inbound listener: %w", err)
		return
	}
	t.routes = append(t.routes, envoy.RouteConfiguration(ListenerGatewayInbound,
		envoy.VirtualHost(ListenerGatewayInbound, []string{"*"}, routes)))
	t.listener(envoy.ListenerOptions{
		Name: ListenerGatewayInbound, Address: "0.0.0.0", Port: uint32(app.Sidecar.GatewayPort),
		Direction: corev3.TrafficDirection_INBOUND,
	}, envoy.HCMOptions{StatPrefix: ListenerGatewayInbound, RouteConfig: ListenerGatewayInbound, Filters: []*hcmv3.HttpFilter{router}}, ts)
}

// gateway builds an edge listener for callers outside the mesh. The gateway runs the same
// ext_authz and ext_proc chain with the app's policy (context_extensions app_id and
// gateway), then reaches the app through its sidecar's gateway_inbound listener
// (gatewayUpstream, gatewayInbound), which does not enforce a second time: there the
// caller would be the gateway itself, and rate limits would count each call twice.
func (t *translator) gateway(gw *policy.Gateway) {
	t.authzCluster(GatewaySpiffeID(t.snap.Mesh.TrustDomain, gw))
	name := ListenerGateway(gw.Name)
	type vhost struct {
		routes []*routev3.Route
		prm    map[string]bool
	}
	var hosts []string
	vhosts := map[string]*vhost{}
	for i, r := range gw.Routes {
		host := r.Host
		if host == "" {
			host = "*"
		}
		vh := vhosts[host]
		if vh == nil {
			vh = &vhost{prm: map[string]bool{}}
			vhosts[host] = vh
			hosts = append(hosts, host)
		}
		ext := map[string]string{contract.ContextGateway: gw.Name}
		switch {
		case r.App != nil && r.App.MCP != nil:
			ext[contract.ContextAppID] = r.App.ID
			cluster, ok := t.gatewayUpstream(gw, r.App)
			if !ok {
				continue
			}
			if !vh.prm[r.App.ID] { // once per host, however many paths reach the app
				vh.prm[r.App.ID] = true
				vh.routes = append(vh.routes, t.prmRoutes(r.App)...)
			}
			if isGRPC(r.App) {
				// The service path, unprefixed (policy allows no route path and one gRPC
				// app per host), to the app over HTTP/2: the edge listener negotiates h2
				// by ALPN, or takes h2c on a plaintext port.
				vh.routes = append(vh.routes, t.grpcRoutes(r.App, cluster, ext)...)
				continue
			}
			vh.routes = append(vh.routes, t.mcpRoutes(r.App, cluster, r.Path, ext)...)
		case r.Endpoint != nil:
			// ext_authz decides on app_id; an HTTPEndpoint has no MCP policy of its own
			// yet, so mcpgate refuses these requests (fail closed) until it has one.
			ext[contract.ContextAppID] = r.Endpoint.Name
			fo, ok := t.endpointCluster(r.Endpoint)
			if !ok {
				continue
			}
			authz, err := envoy.ExtAuthzContext(ext)
			if err != nil {
				t.errf("gateway %s route %d: %w", gw.Name, i, err)
				continue
			}
			fo.PerFilter = map[string]*anypb.Any{envoy.FilterExtAuthz: authz}
			fo.PrefixRewrite = basePath(r.Endpoint.BaseURL)
			m := envoy.Prefix("/")
			if r.Path != "/" {
				m = envoy.PathSeparatedPrefix(strings.TrimSuffix(r.Path, "/"))
				fo.PrefixRewrite = strings.TrimSuffix(fo.PrefixRewrite, "/")
			}
			vh.routes = append(vh.routes, envoy.Forward(fmt.Sprintf("endpoint/%s/%d", r.Endpoint.Name, i), m, fo))
		default:
			t.errf("gateway %s route %d: neither an MCP app nor an endpoint", gw.Name, i)
		}
	}
	var vhs []*routev3.VirtualHost
	for _, h := range hosts {
		vhs = append(vhs, envoy.VirtualHost(h, []string{h}, append(vhosts[h].routes, t.notFound())))
	}
	t.routes = append(t.routes, envoy.RouteConfiguration(name, vhs...))

	var ts *corev3.TransportSocket
	if gw.TLS != nil {
		var err error
		if ts, err = envoy.DownstreamFileTLS(gw.TLS.CertFile, gw.TLS.KeyFile); err != nil {
			t.errf("gateway %s tls: %w", gw.Name, err)
		}
	}
	t.policyListener(envoy.ListenerOptions{
		Name: name, Address: "0.0.0.0", Port: uint32(gw.Port), Direction: corev3.TrafficDirection_INBOUND,
	}, envoy.HCMOptions{StatPrefix: "gateway_" + gw.Name, RouteConfig: name, Edge: true}, ts)
}

// basePath is the path of a base URL with a trailing slash, the prefix its callers'
// paths are appended to.
func basePath(u *url.URL) string {
	p := u.EscapedPath()
	if !strings.HasSuffix(p, "/") {
		p += "/"
	}
	return p
}

func splitHostPort(hp string, defPort uint32) (string, uint32, error) {
	host, ps, err := net.SplitHostPort(hp)
	if err != nil {
		if defPort == 0 {
			return "", 0, fmt.Errorf("%q is not host:port", hp)
		}
		return strings.Trim(hp, "[]"), defPort, nil
	}
	port, err := strconv.ParseUint(ps, 10, 16)
	if err != nil || port == 0 {
		return "", 0, fmt.Errorf("%q: bad port", hp)
	}
	return host, uint32(port), nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// GatewaySpiffeID is the identity of a Gateway's Envoy: spiffe://<td>/ns/<ns>/<name>.
func GatewaySpiffeID(trustDomain string, gw *policy.Gateway) string {
	return "spiffe://" + trustDomain + "/ns/" + gw.Namespace + "/" + gw.Name
}
