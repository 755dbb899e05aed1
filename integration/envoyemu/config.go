package envoyemu

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"strconv"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	corsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/cors/v3"
	credinjv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/credential_injector/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// Filter names as Envoy registers them; typed_per_filter_config is keyed by them.
const (
	filterCORS     = "envoy.filters.http.cors"
	filterExtAuthz = "envoy.filters.http.ext_authz"
	filterExtProc  = "envoy.filters.http.ext_proc"
	filterRouter   = "envoy.filters.http.router"
	filterHCM      = "envoy.filters.network.http_connection_manager"
)

// defaultBufferLimit is per_connection_buffer_limit_bytes when unset (1 MiB;
// api/envoy/config/listener/v3/listener.proto).
const defaultBufferLimit = 1 << 20

// config is one immutable view of everything received over ADS.
type config struct {
	listeners map[string]*listenerCfg
	routes    map[string]*routeCfg
	clusters  map[string]*clusterCfg
	endpoints map[string][]hostPort    // EDS, by cluster_name of the ClusterLoadAssignment
	secrets   map[string]*tlsv3.Secret // SDS over ADS, by name
}

func newConfig() *config {
	return &config{listeners: map[string]*listenerCfg{}, routes: map[string]*routeCfg{},
		clusters: map[string]*clusterCfg{}, endpoints: map[string][]hostPort{}, secrets: map[string]*tlsv3.Secret{}}
}

type hostPort struct {
	host string
	port uint32
}

type listenerCfg struct {
	name        string
	declared    string  // configured address:port
	tls         *tlsCfg // DownstreamTlsContext; nil: plaintext
	routeName   string  // RDS
	inline      *routeCfg
	filters     []*filterCfg
	bufferLimit uint64
	normalize   bool
	merge       bool
	// escapedSlashes is path_with_escaped_slashes_action, the default resolved (hcm.go).
	escapedSlashes hcmv3.HttpConnectionManager_PathWithEscapedSlashesAction
	useRemote      bool               // use_remote_address
	internal       *internalAddresses // internal_address_config; nil: unset
	// underscores is common_http_protocol_options.headers_with_underscores_action.
	underscores corev3.HttpProtocolOptions_HeadersWithUnderscoresAction
	tracing     *tracingCfg // nil: requests are not traced (tracing.go)
}

type filterCfg struct {
	name     string
	disabled bool // HttpFilter.disabled: off unless a route enables it
	authz    *extauthzv3.ExtAuthz
	proc     *extprocfilterv3.ExternalProcessor
	cors     bool
	inject   *injectorCfg // credential_injector with the generic credential (credinj.go)
	router   bool
}

// secretNames are the SDS secrets the listener waits for: its TLS context's and its
// credential injectors' (generic/config.cc: the injector's secret provider is an init
// target of the listener, as a TLS context's is), those of disabled filters too (a
// disabled filter is still configured).
func (l *listenerCfg) secretNames() []string {
	names := l.tls.secretNames()
	for _, f := range l.filters {
		if f.inject != nil {
			names = append(names, f.inject.secret)
		}
	}
	return names
}

type routeCfg struct {
	name   string
	vhosts []*vhostCfg
	// internalOnly are internal_only_headers, removed from external requests (hcm.go).
	internalOnly []string
}

type vhostCfg struct {
	v         *routev3.VirtualHost
	routes    []*routeEntry
	perFilter map[string]proto.Message
}

type routeEntry struct {
	r         *routev3.Route
	vh        *vhostCfg
	perFilter map[string]proto.Message // route over virtual host (most specific wins)
	own       map[string]proto.Message // the route's own typed_per_filter_config
}

// extProcLevels are the ExtProcPerRoute configs of a filter, least specific first: the
// virtual host's, then the route's (source/common/http/utility.cc
// traversePerFilterConfigGeneric, as ext_proc.cc mergePerRouteConfig walks them).
func (r *routeEntry) extProcLevels(filter string) []*extprocfilterv3.ExtProcPerRoute {
	if r == nil {
		return nil
	}
	var out []*extprocfilterv3.ExtProcPerRoute
	for _, m := range []map[string]proto.Message{r.vh.perFilter, r.own} {
		if pr, ok := m[filter].(*extprocfilterv3.ExtProcPerRoute); ok {
			out = append(out, pr)
		}
	}
	return out
}

type clusterCfg struct {
	name        string
	endpoints   []hostPort
	eds         string  // EDS service name, when the cluster type is EDS
	h2          bool    // explicit HTTP/2 upstream (gRPC clusters)
	auto        bool    // auto_config: HTTP/1.1 or h2 by ALPN (needs TLS)
	tls         *tlsCfg // UpstreamTlsContext; nil: plaintext
	unsupported string  // why requests to it fail
}

// with returns a copy of c with one discovery response applied, or the reason to NACK.
// State-of-the-world: LDS and CDS responses carry every resource; RDS and EDS ones every
// subscribed resource (xDS protocol, "Resource types and state of the world").
func (e *Emulator) with(c *config, typeURL string, resp *discoveryv3.DiscoveryResponse) (*config, error) {
	n := &config{listeners: c.listeners, routes: c.routes, clusters: c.clusters, endpoints: c.endpoints, secrets: c.secrets}
	var errs []error
	switch typeURL {
	case resource.ListenerType:
		n.listeners = map[string]*listenerCfg{}
		for _, a := range resp.GetResources() {
			var l listenerv3.Listener
			if err := a.UnmarshalTo(&l); err != nil {
				errs = append(errs, err)
				continue
			}
			lc, err := parseListener(&l)
			if err == nil {
				err = e.checkSpire(lc.tls)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("listener %q: %w", l.GetName(), err))
				continue
			}
			n.listeners[l.GetName()] = lc
		}
	case resource.RouteType:
		n.routes = maps.Clone(c.routes)
		for _, a := range resp.GetResources() {
			var rc routev3.RouteConfiguration
			if err := a.UnmarshalTo(&rc); err != nil {
				errs = append(errs, err)
				continue
			}
			r, err := parseRoutes(&rc)
			if err != nil {
				errs = append(errs, fmt.Errorf("route configuration %q: %w", rc.GetName(), err))
				continue
			}
			n.routes[rc.GetName()] = r
		}
	case resource.ClusterType:
		n.clusters = e.staticClusters()
		for _, a := range resp.GetResources() {
			var cl clusterv3.Cluster
			if err := a.UnmarshalTo(&cl); err != nil {
				errs = append(errs, err)
				continue
			}
			if e.isStatic(cl.GetName()) {
				errs = append(errs, fmt.Errorf("cluster %q: a static cluster of the bootstrap cannot be updated by CDS", cl.GetName()))
				continue
			}
			cc, err := parseCluster(&cl)
			if err == nil {
				err = e.checkSpire(cc.tls)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("cluster %q: %w", cl.GetName(), err))
				continue
			}
			n.clusters[cl.GetName()] = cc
		}
	case resource.EndpointType:
		n.endpoints = maps.Clone(c.endpoints)
		for _, a := range resp.GetResources() {
			var cla endpointv3.ClusterLoadAssignment
			if err := a.UnmarshalTo(&cla); err != nil {
				errs = append(errs, err)
				continue
			}
			eps, err := parseAssignment(&cla)
			if err != nil {
				errs = append(errs, fmt.Errorf("endpoints %q: %w", cla.GetClusterName(), err))
				continue
			}
			n.endpoints[cla.GetClusterName()] = eps
		}
	case resource.SecretType:
		// SDS over ADS: the subscribed secrets, each checked on receipt
		// (source/common/secret/sds_api.cc onConfigUpdate).
		n.secrets = maps.Clone(c.secrets)
		for _, a := range resp.GetResources() {
			var s tlsv3.Secret
			if err := a.UnmarshalTo(&s); err != nil {
				errs = append(errs, err)
				continue
			}
			rs, err := e.parseSecret(&s)
			if err != nil {
				errs = append(errs, fmt.Errorf("secret %q: %w", s.GetName(), err))
				continue
			}
			n.secrets[s.GetName()] = rs
		}
	default:
		// Envoy NACKs a type it did not subscribe to.
		errs = append(errs, fmt.Errorf("unexpected type %s", typeURL))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return n, nil
}

// routeNames are the RDS names the listeners need, sorted.
func (c *config) routeNames() []string {
	var names []string
	for _, l := range c.listeners {
		if l.routeName != "" && !slices.Contains(names, l.routeName) {
			names = append(names, l.routeName)
		}
	}
	slices.Sort(names)
	return names
}

// edsNames are the EDS names the clusters need, sorted.
func (c *config) edsNames() []string {
	var names []string
	for _, cl := range c.clusters {
		if cl.eds != "" && !slices.Contains(names, cl.eds) {
			names = append(names, cl.eds)
		}
	}
	slices.Sort(names)
	return names
}

// secretNames are the SDS names the listeners and clusters need, sorted.
func (c *config) secretNames() []string {
	var names []string
	for _, l := range c.listeners {
		names = append(names, l.secretNames()...)
	}
	for _, cl := range c.clusters {
		names = append(names, cl.tls.secretNames()...)
	}
	// Those from the SPIRE agent are not ADS subscriptions (sds_spire.go).
	spire := c.spireSecretNames()
	names = slices.DeleteFunc(names, func(n string) bool { return slices.Contains(spire, n) })
	slices.Sort(names)
	return slices.Compact(names)
}

// warm reports what a listener still waits for (its routes, its secrets, its clusters'
// endpoints and secrets).
func (c *config) warm() error {
	for _, l := range c.listeners {
		if l.routeName != "" && c.routes[l.routeName] == nil {
			return fmt.Errorf("listener %s waits for route configuration %s", l.name, l.routeName)
		}
		if !c.received(l.secretNames()) {
			return fmt.Errorf("listener %s waits for secrets %v", l.name, l.secretNames())
		}
	}
	for _, cl := range c.clusters {
		if cl.eds != "" && c.endpoints[cl.eds] == nil {
			return fmt.Errorf("cluster %s waits for endpoints", cl.name)
		}
		if !c.secretsReady(cl.tls) {
			return fmt.Errorf("cluster %s waits for secrets %v", cl.name, cl.tls.secretNames())
		}
	}
	return nil
}

func socketAddress(a *corev3.Address) (hostPort, error) {
	sa := a.GetSocketAddress()
	if sa == nil {
		return hostPort{}, fmt.Errorf("only socket addresses are emulated, got %v", a)
	}
	return hostPort{host: sa.GetAddress(), port: sa.GetPortValue()}, nil
}

func parseListener(l *listenerv3.Listener) (*listenerCfg, error) {
	hp, err := socketAddress(l.GetAddress())
	if err != nil {
		return nil, err
	}
	lc := &listenerCfg{name: l.GetName(), declared: net.JoinHostPort(hp.host, strconv.Itoa(int(hp.port))),
		bufferLimit: defaultBufferLimit}
	if v := l.GetPerConnectionBufferLimitBytes(); v != nil {
		lc.bufferLimit = uint64(v.GetValue())
	}
	if len(l.GetFilterChains()) != 1 || l.GetDefaultFilterChain() != nil {
		return nil, fmt.Errorf("exactly one filter chain is emulated, got %d", len(l.GetFilterChains()))
	}
	fc := l.GetFilterChains()[0]
	if fc.GetFilterChainMatch() != nil {
		return nil, errors.New("filter_chain_match is not emulated")
	}
	// A TLS listener warms until SDS delivers its secrets, then serves TLS.
	if lc.tls, err = parseTransportSocket(fc.GetTransportSocket(), false); err != nil {
		return nil, err
	}
	if len(fc.GetFilters()) != 1 || fc.GetFilters()[0].GetName() != filterHCM {
		return nil, errors.New("only a single http_connection_manager network filter is emulated")
	}
	var hcm hcmv3.HttpConnectionManager
	if err := fc.GetFilters()[0].GetTypedConfig().UnmarshalTo(&hcm); err != nil {
		return nil, err
	}
	switch {
	case hcm.GetRds() != nil:
		lc.routeName = hcm.GetRds().GetRouteConfigName()
	case hcm.GetRouteConfig() != nil:
		if lc.inline, err = parseRoutes(hcm.GetRouteConfig()); err != nil {
			return nil, err
		}
	default:
		return nil, errors.New("scoped routes are not emulated")
	}
	lc.underscores = hcm.GetCommonHttpProtocolOptions().GetHeadersWithUnderscoresAction()
	if _, ok := corev3.HttpProtocolOptions_HeadersWithUnderscoresAction_name[int32(lc.underscores)]; !ok {
		// Envoy's config validation accepts defined values only (protocol.proto,
		// enum defined_only).
		return nil, fmt.Errorf("headers_with_underscores_action %d is not defined", lc.underscores)
	}
	if lc.tracing, err = parseTracing(hcm.GetTracing()); err != nil {
		return nil, err
	}
	if lc.tracing != nil {
		// The span's operation follows the listener's direction (ingress unless OUTBOUND).
		lc.tracing.egress = l.GetTrafficDirection() == corev3.TrafficDirection_OUTBOUND
	}
	lc.normalize = hcm.GetNormalizePath().GetValue()
	lc.merge = hcm.GetMergeSlashes()
	if lc.escapedSlashes, err = parseEscapedSlashes(hcm.GetPathWithEscapedSlashesAction()); err != nil {
		return nil, err
	}
	lc.useRemote = hcm.GetUseRemoteAddress().GetValue()
	if hcm.GetXffNumTrustedHops() > 0 || len(hcm.GetOriginalIpDetectionExtensions()) > 0 {
		return nil, errors.New("xff_num_trusted_hops and original_ip_detection_extensions are not emulated")
	}
	if lc.internal, err = parseInternalAddresses(hcm.GetInternalAddressConfig()); err != nil {
		return nil, err
	}
	for i, f := range hcm.GetHttpFilters() {
		fcfg := &filterCfg{name: f.GetName(), disabled: f.GetDisabled()}
		tc := f.GetTypedConfig()
		if tc == nil {
			return nil, fmt.Errorf("http filter %q: typed_config is required", f.GetName())
		}
		m, err := tc.UnmarshalNew()
		if err != nil {
			return nil, fmt.Errorf("http filter %q: %w", f.GetName(), err)
		}
		switch m := m.(type) {
		case *extauthzv3.ExtAuthz:
			if m.GetGrpcService().GetEnvoyGrpc().GetClusterName() == "" {
				return nil, fmt.Errorf("http filter %q: only grpc_service.envoy_grpc is emulated", f.GetName())
			}
			if m.GetWithRequestBody() != nil {
				return nil, fmt.Errorf("http filter %q: with_request_body is not emulated", f.GetName())
			}
			fcfg.authz = m
		case *extprocfilterv3.ExternalProcessor:
			if m.GetGrpcService().GetEnvoyGrpc().GetClusterName() == "" {
				return nil, fmt.Errorf("http filter %q: only grpc_service.envoy_grpc is emulated", f.GetName())
			}
			if err := checkProcessingMode(m.GetProcessingMode()); err != nil {
				return nil, fmt.Errorf("http filter %q: %w", f.GetName(), err)
			}
			fcfg.proc = m
		case *corsv3.Cors:
			// The emulator runs its encoder side last, after every other filter's
			// (stream.write), which is where Envoy runs it when it is first.
			if i != 0 {
				return nil, fmt.Errorf("http filter %q: the CORS filter is emulated only as the first filter", f.GetName())
			}
			fcfg.cors = true
		case *credinjv3.CredentialInjector:
			if fcfg.inject, err = parseCredentialInjector(m); err != nil {
				return nil, fmt.Errorf("http filter %q: %w", f.GetName(), err)
			}
		case *routerv3.Router:
			// The router must be the last filter (source/common/http/filter_chain_helper.cc).
			if i != len(hcm.GetHttpFilters())-1 {
				return nil, errors.New("the router filter must be last")
			}
			fcfg.router = true
		default:
			return nil, fmt.Errorf("http filter %q (%s) is not emulated", f.GetName(), tc.GetTypeUrl())
		}
		lc.filters = append(lc.filters, fcfg)
	}
	if len(lc.filters) == 0 || !lc.filters[len(lc.filters)-1].router {
		return nil, errors.New("the last http filter must be the router")
	}
	return lc, nil
}

// checkProcessingMode accepts the ext_proc processing modes the emulator implements:
// body modes NONE, BUFFERED and STREAMED, and no trailers sent to the processor (they
// pass through).
func checkProcessingMode(pm *extprocfilterv3.ProcessingMode) error {
	if b := pm.GetRequestBodyMode(); b != extprocfilterv3.ProcessingMode_NONE && b != extprocfilterv3.ProcessingMode_BUFFERED && b != extprocfilterv3.ProcessingMode_STREAMED {
		return fmt.Errorf("request_body_mode %s is not emulated", b)
	}
	if b := pm.GetResponseBodyMode(); b != extprocfilterv3.ProcessingMode_NONE && b != extprocfilterv3.ProcessingMode_BUFFERED && b != extprocfilterv3.ProcessingMode_STREAMED {
		return fmt.Errorf("response_body_mode %s is not emulated", b)
	}
	if pm.GetRequestTrailerMode() == extprocfilterv3.ProcessingMode_SEND || pm.GetResponseTrailerMode() == extprocfilterv3.ProcessingMode_SEND {
		return errors.New("trailers are not emulated")
	}
	return nil
}

func parsePerFilter(m map[string]*anypb.Any) (map[string]proto.Message, error) {
	out := map[string]proto.Message{}
	for name, a := range m {
		msg, err := a.UnmarshalNew()
		if err != nil {
			return nil, fmt.Errorf("typed_per_filter_config %q: %w", name, err)
		}
		switch msg := msg.(type) {
		case *extauthzv3.ExtAuthzPerRoute, *routev3.FilterConfig:
		case *corsv3.CorsPolicy:
			if err := checkCORSPolicy(msg); err != nil {
				return nil, fmt.Errorf("typed_per_filter_config %q: %w", name, err)
			}
		case *extprocfilterv3.ExtProcPerRoute:
			// ExtProcOverrides: processing_mode, failure_mode_allow and the forwarding
			// namespaces are emulated (ext_proc.cc FilterConfigPerRoute).
			o := msg.GetOverrides()
			if err := checkProcessingMode(o.GetProcessingMode()); err != nil {
				return nil, fmt.Errorf("typed_per_filter_config %q: overrides: %w", name, err)
			}
			if o.GetGrpcService() != nil || len(o.GetRequestAttributes()) > 0 || len(o.GetResponseAttributes()) > 0 ||
				len(o.GetGrpcInitialMetadata()) > 0 || o.GetProcessingRequestModifier() != nil ||
				len(o.GetMetadataOptions().GetForwardingNamespaces().GetTyped()) > 0 || o.GetMetadataOptions().GetReceivingNamespaces() != nil {
				return nil, fmt.Errorf("typed_per_filter_config %q: only overrides of processing_mode, failure_mode_allow and untyped forwarding_namespaces are emulated", name)
			}
		default:
			return nil, fmt.Errorf("typed_per_filter_config %q: %s is not emulated", name, a.GetTypeUrl())
		}
		out[name] = msg
	}
	return out, nil
}

func parseRoutes(rc *routev3.RouteConfiguration) (*routeCfg, error) {
	out := &routeCfg{name: rc.GetName()}
	for _, h := range rc.GetInternalOnlyHeaders() {
		out.internalOnly = append(out.internalOnly, strings.ToLower(h))
	}
	for _, v := range rc.GetVirtualHosts() {
		//lint:ignore SA1019 Envoy still reads the deprecated field, so a config using it must be refused
		if v.GetCors() != nil {
			return nil, fmt.Errorf("virtual host %q: cors (deprecated; typed_per_filter_config CorsPolicy is emulated) is not emulated", v.GetName())
		}
		pf, err := parsePerFilter(v.GetTypedPerFilterConfig())
		if err != nil {
			return nil, fmt.Errorf("virtual host %q: %w", v.GetName(), err)
		}
		vh := &vhostCfg{v: v, perFilter: pf}
		for _, r := range v.GetRoutes() {
			if err := checkRoute(r); err != nil {
				return nil, fmt.Errorf("route %q: %w", r.GetName(), err)
			}
			rpf, err := parsePerFilter(r.GetTypedPerFilterConfig())
			if err != nil {
				return nil, fmt.Errorf("route %q: %w", r.GetName(), err)
			}
			// Per-filter config: the most specific level wins, route over virtual host
			// (source/common/router/config_impl.cc, perFilterConfig lookup order).
			merged := maps.Clone(pf)
			maps.Copy(merged, rpf)
			vh.routes = append(vh.routes, &routeEntry{r: r, vh: vh, perFilter: merged, own: rpf})
		}
		out.vhosts = append(out.vhosts, vh)
	}
	return out, nil
}

func checkRoute(r *routev3.Route) error {
	m := r.GetMatch()
	switch m.GetPathSpecifier().(type) {
	case *routev3.RouteMatch_Prefix, *routev3.RouteMatch_Path, *routev3.RouteMatch_PathSeparatedPrefix:
	default:
		return fmt.Errorf("path specifier %T is not emulated", m.GetPathSpecifier())
	}
	if len(m.GetQueryParameters()) > 0 || m.GetGrpc() != nil || m.GetRuntimeFraction() != nil || m.GetTlsContext() != nil {
		return errors.New("only path and header matches are emulated")
	}
	for _, h := range m.GetHeaders() {
		switch h.GetHeaderMatchSpecifier().(type) {
		case *routev3.HeaderMatcher_StringMatch, *routev3.HeaderMatcher_PresentMatch, nil:
		default:
			return fmt.Errorf("header matcher %T is not emulated", h.GetHeaderMatchSpecifier())
		}
		if sm := h.GetStringMatch(); sm != nil && sm.GetSafeRegex() != nil {
			return errors.New("regex header matches are not emulated")
		}
	}
	switch a := r.GetAction().(type) {
	case *routev3.Route_Route:
		if a.Route.GetCluster() == "" {
			return errors.New("only single-cluster routes are emulated")
		}
		if a.Route.GetRegexRewrite() != nil || a.Route.GetPathRewritePolicy() != nil {
			return errors.New("only prefix_rewrite is emulated")
		}
		//lint:ignore SA1019 Envoy still reads the deprecated field, so a config using it must be refused
		if a.Route.GetCors() != nil {
			return errors.New("route cors (deprecated; typed_per_filter_config CorsPolicy is emulated) is not emulated")
		}
	case *routev3.Route_DirectResponse:
		if b := a.DirectResponse.GetBody(); b != nil && b.GetFilename() != "" {
			return errors.New("direct_response bodies from files are not emulated")
		}
	default:
		return fmt.Errorf("route action %T is not emulated", r.GetAction())
	}
	return nil
}

func parseCluster(cl *clusterv3.Cluster) (*clusterCfg, error) {
	cc := &clusterCfg{name: cl.GetName()}
	switch cl.GetType() {
	case clusterv3.Cluster_STATIC, clusterv3.Cluster_STRICT_DNS, clusterv3.Cluster_LOGICAL_DNS:
		eps, err := parseAssignment(cl.GetLoadAssignment())
		if err != nil {
			return nil, err
		}
		cc.endpoints = eps
	case clusterv3.Cluster_EDS:
		cc.eds = cl.GetEdsClusterConfig().GetServiceName()
		if cc.eds == "" {
			cc.eds = cl.GetName()
		}
	default:
		return nil, fmt.Errorf("cluster type %s is not emulated", cl.GetType())
	}
	if a := cl.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]; a != nil {
		var po httpv3.HttpProtocolOptions
		if err := a.UnmarshalTo(&po); err != nil {
			return nil, err
		}
		cc.h2 = po.GetExplicitHttpConfig().GetHttp2ProtocolOptions() != nil
		cc.auto = po.GetAutoConfig() != nil
		if po.GetUseDownstreamProtocolConfig() != nil {
			return nil, errors.New("use_downstream_protocol_config is not emulated")
		}
	} else {
		// The deprecated Cluster.http2_protocol_options, still honoured without
		// typed_extension_protocol_options (source/common/upstream/upstream_impl.cc
		// createOptions: legacy options are translated to explicit HTTP/2).
		//lint:ignore SA1019 Envoy still honours the deprecated field, so must we
		cc.h2 = cl.GetHttp2ProtocolOptions() != nil
	}
	var err error
	if cc.tls, err = parseTransportSocket(cl.GetTransportSocket(), true); err != nil {
		return nil, err
	}
	if cc.auto && cc.tls == nil {
		// auto_config selects the protocol by ALPN, so it needs TLS
		// (api/envoy/extensions/upstreams/http/v3/http_protocol_options.proto).
		return nil, errors.New("auto_config needs a TLS transport socket")
	}
	return cc, nil
}

func parseAssignment(cla *endpointv3.ClusterLoadAssignment) ([]hostPort, error) {
	var out []hostPort
	for _, le := range cla.GetEndpoints() {
		for _, lb := range le.GetLbEndpoints() {
			hp, err := socketAddress(lb.GetEndpoint().GetAddress())
			if err != nil {
				return nil, err
			}
			out = append(out, hp)
		}
	}
	return out, nil
}
