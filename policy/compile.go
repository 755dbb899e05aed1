package policy

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// errf reports a problem at a path of a document; the message starts with the path so
// that the user sees which field is wrong even without opening the file.
func (l *loader) errf(d *document, p, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if p != "" {
		msg = p + ": " + msg
	}
	l.probs.add(d.file, d.at(p), "%s", msg)
}

// compile validates every document and builds the snapshot. It collects every problem
// instead of stopping at the first, so one `mcpgate validate` run shows them all.
func (l *loader) compile() *Snapshot {
	s := &Snapshot{
		Apps:      map[string]*App{},
		Endpoints: map[string]*HTTPEndpoint{},
		Gateways:  map[string]*Gateway{},
	}
	byKind := map[string][]*document{}
	seen := map[string]*document{}
	// Apps and HTTPEndpoints share one name space: both are targets of service
	// invocation (/v1.0/invoke/<name>/... and dapr-app-id: <name>).
	invocable := map[string]*document{}
	for _, d := range l.docs {
		if d.meta.Namespace == "" {
			d.meta.Namespace = DefaultNamespace
		}
		l.checkMetadata(d)
		key := d.kind + "/" + d.meta.Namespace + "/" + d.meta.Name
		if first := seen[key]; first != nil {
			l.errf(d, "metadata.name", "duplicate %s %q in namespace %q (first at %s:%d)", d.kind, d.meta.Name, d.meta.Namespace, first.file, first.line)
			continue
		}
		seen[key] = d
		if d.kind == KindApp || d.kind == KindHTTPEndpoint || d.kind == KindGateway {
			// App IDs are unique across namespaces: the route a caller names carries no
			// namespace, and the SPIFFE ID ties each App ID to exactly one namespace.
			// Gateways share the space: a Gateway's SPIFFE ID has an App's form, and an
			// Envoy's node.cluster names either, so a Gateway named like an App would
			// accept that App's certificate as its own (past the policy, at the sidecars'
			// gateway_inbound listeners) and be served the App's configuration.
			if first := invocable[d.meta.Name]; first != nil {
				l.errf(d, "metadata.name", "name %q is already used by %s at %s:%d (App, HTTPEndpoint and Gateway names are unique across namespaces)", d.meta.Name, first.kind, first.file, first.line)
				continue
			}
			invocable[d.meta.Name] = d
		}
		byKind[d.kind] = append(byKind[d.kind], d)
	}

	switch meshes := byKind[KindMesh]; len(meshes) {
	case 0:
		if len(l.docs) > 0 || len(l.probs.list) == 0 {
			l.probs.add(displayDir(l.prefix), 0, "no Mesh document: exactly one is required")
		}
	case 1:
		s.Mesh = l.compileMesh(meshes[0])
	default:
		for _, d := range meshes[1:] {
			l.errf(d, "kind", "a second Mesh document (first at %s:%d): exactly one is required", meshes[0].file, meshes[0].line)
		}
		s.Mesh = l.compileMesh(meshes[0])
	}
	if s.Mesh == nil {
		s.Mesh = &Mesh{Issuers: map[string]*Issuer{}}
	}
	for _, d := range byKind[KindApp] {
		if app := l.compileApp(d, s.Mesh); app != nil {
			s.Apps[app.ID] = app
		}
	}
	for _, d := range byKind[KindHTTPEndpoint] {
		if ep := l.compileEndpoint(d, s); ep != nil {
			s.Endpoints[ep.Name] = ep
		}
	}
	for _, d := range byKind[KindGateway] {
		if gw := l.compileGateway(d, s); gw != nil {
			s.Gateways[gw.Name] = gw
		}
	}
	return s
}

// IsDNSLabel reports whether s is an RFC 1123 label: lowercase letters, digits and '-',
// not starting or ending with '-', at most 63 characters. App IDs, namespaces and issuer
// names are labels. A byte loop, not a regexp: ext_authz calls it on every request.
func IsDNSLabel(s string) bool {
	if len(s) == 0 || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

func (l *loader) checkMetadata(d *document) {
	switch {
	case d.meta.Name == "":
		l.errf(d, "metadata.name", "is required")
	case !IsDNSLabel(d.meta.Name):
		l.errf(d, "metadata.name", "%q is not a DNS label (lowercase letters, digits and '-', at most 63)", d.meta.Name)
	}
	if !IsDNSLabel(d.meta.Namespace) {
		l.errf(d, "metadata.namespace", "%q is not a DNS label", d.meta.Namespace)
	}
}

func (l *loader) compileMesh(d *document) *Mesh {
	spec := d.spec.(*MeshSpec)
	m := &Mesh{
		Name:          d.meta.Name,
		TrustDomain:   spec.TrustDomain,
		MTLS:          spec.MTLS,
		AuthzAddress:  spec.Authz.Address,
		AuthzSpiffeID: spec.Authz.SpiffeID,
		SDS:           spec.SDS,
		Issuers:       map[string]*Issuer{},
	}
	if spec.TrustDomain == "" {
		l.errf(d, "spec.trustDomain", "is required")
	} else if _, err := spiffeid.TrustDomainFromString(spec.TrustDomain); err != nil || strings.Contains(spec.TrustDomain, "://") {
		l.errf(d, "spec.trustDomain", "%q is not a SPIFFE trust domain name (lowercase letters, digits, '.', '-', '_')", spec.TrustDomain)
	}
	switch m.MTLS {
	case "":
		m.MTLS = MTLSStrict
	case MTLSStrict, MTLSPermissive, MTLSDisabled:
	default:
		l.errf(d, "spec.mtls", "must be strict, permissive or disabled, got %q", spec.MTLS)
	}
	if spec.Authz.Address == "" {
		l.errf(d, "spec.authz.address", "is required (host:port where Envoy reaches mcpgate)")
	} else if err := checkHostPort(spec.Authz.Address); err != nil {
		l.errf(d, "spec.authz.address", "%v", err)
	}
	if id := spec.Authz.SpiffeID; id != "" {
		sid, err := spiffeid.FromString(id)
		switch {
		case err != nil:
			l.errf(d, "spec.authz.spiffeId", "%q is not a SPIFFE ID", id)
		case sid.TrustDomain().Name() != spec.TrustDomain:
			l.errf(d, "spec.authz.spiffeId", "%q is not in trust domain %q", id, spec.TrustDomain)
		case m.MTLS == MTLSDisabled:
			l.errf(d, "spec.authz.spiffeId", "needs mtls strict or permissive: Envoys present their SVIDs to mcpgate")
		}
	}
	switch {
	case spec.SDS.SpireAgentSocket != "" && spec.SDS.CertDir != "":
		l.errf(d, "spec.sds", "set spireAgentSocket or certDir, not both")
	case spec.SDS.SpireAgentSocket == "" && spec.SDS.CertDir == "" && m.MTLS != MTLSDisabled:
		l.errf(d, "spec.sds", "spireAgentSocket or certDir is required unless mtls is disabled")
	case spec.SDS.SpireAgentSocket != "" && !strings.HasPrefix(spec.SDS.SpireAgentSocket, "/"):
		l.errf(d, "spec.sds.spireAgentSocket", "must be an absolute path, got %q", spec.SDS.SpireAgentSocket)
	}
	for i, is := range spec.Issuers {
		p := fmt.Sprintf("spec.issuers[%d]", i)
		iss := &Issuer{
			Name:       is.Name,
			Issuer:     is.Issuer,
			JWKSURI:    is.JWKSURI,
			Audiences:  is.Audiences,
			AppIDClaim: is.AppIDClaim,
			Leeway:     DefaultLeeway,
		}
		switch {
		case is.Name == "":
			l.errf(d, p+".name", "is required")
		case !IsDNSLabel(is.Name):
			l.errf(d, p+".name", "%q is not a DNS label", is.Name)
		case m.Issuers[is.Name] != nil:
			l.errf(d, p+".name", "duplicate issuer %q", is.Name)
		}
		if is.Issuer == "" {
			l.errf(d, p+".issuer", "is required (the exact iss of its tokens)")
		} else if err := checkSecureURL(is.Issuer); err != nil {
			l.errf(d, p+".issuer", "%v", err)
		}
		if is.JWKSURI != "" {
			if err := checkSecureURL(is.JWKSURI); err != nil {
				l.errf(d, p+".jwksUri", "%v", err)
			}
		}
		if len(is.Audiences) == 0 {
			l.errf(d, p+".audiences", "at least one audience is required: tokens minted for other services must not be accepted")
		}
		for j, a := range is.Audiences {
			if strings.TrimSpace(a) == "" {
				l.errf(d, fmt.Sprintf("%s.audiences[%d]", p, j), "is empty")
			}
		}
		if is.AppIDClaim != "" && strings.ContainsAny(is.AppIDClaim, " \t\r\n") {
			l.errf(d, p+".appIdClaim", "%q is not a claim name", is.AppIDClaim)
		}
		if is.Leeway != "" {
			lw, err := time.ParseDuration(string(is.Leeway))
			switch {
			case err != nil:
				l.errf(d, p+".leeway", "%q is not a duration (e.g. 30s)", is.Leeway)
			case lw < 0 || lw > MaxLeeway:
				l.errf(d, p+".leeway", "must be between 0s and %s", MaxLeeway)
			default:
				iss.Leeway = lw
			}
		}
		if is.Name != "" && m.Issuers[is.Name] == nil {
			m.Issuers[is.Name] = iss
		}
	}
	m.RateLimits = l.compileRateLimits(d, spec.RateLimits)
	m.Tracing = l.compileTracing(d, spec.Tracing)
	return m
}

func (l *loader) compileTracing(d *document, spec *TracingSpec) *Tracing {
	const p = "spec.tracing"
	if spec == nil {
		return nil
	}
	tr := &Tracing{Address: spec.OTLP.Address, Secure: spec.OTLP.IsSecure}
	if spec.SamplingRate == "" {
		l.errf(d, p+".samplingRate", `is required: "0" to "1" (e.g. "0.1" keeps one trace in ten)`)
	} else if r, err := strconv.ParseFloat(spec.SamplingRate, 64); err != nil || r < 0 || r > 1 || r != r {
		l.errf(d, p+".samplingRate", `%q is not a fraction from "0" to "1"`, spec.SamplingRate)
	} else {
		tr.SamplingRate = r
	}
	if spec.OTLP.Address == "" {
		l.errf(d, p+".otlp.address", "is required (host:port of an OTLP/gRPC collector)")
	} else if err := checkHostPort(spec.OTLP.Address); err != nil {
		l.errf(d, p+".otlp.address", "%v", err)
	}
	return tr
}

// maxKeyPrefix bounds rateLimits.redis.keyPrefix: keys stay short.
const maxKeyPrefix = 64

func (l *loader) compileRateLimits(d *document, spec RateLimitsSpec) *RateLimitStore {
	const p = "spec.rateLimits"
	if spec.Redis == nil {
		if spec.FailureMode != "" || spec.Timeout != "" {
			l.errf(d, p+".redis", "is required with failureMode and timeout (without Redis, limits are counted in each replica)")
		}
		return nil
	}
	r := spec.Redis
	st := &RateLimitStore{Address: r.Address, Cluster: r.Cluster, DB: r.DB, PasswordFile: r.PasswordFile,
		TLS: r.TLS.Enabled, CAFile: r.TLS.CAFile, ServerName: r.TLS.ServerName,
		FailureMode: FailureMode(spec.FailureMode), Timeout: DefaultRateLimitTimeout}
	switch {
	case r.Sentinel != nil:
		st.Sentinel = l.compileSentinel(d, p+".redis", r)
	case r.Address == "":
		l.errf(d, p+".redis.address", "is required (host:port or unix:///path/to.sock), or sentinel")
	case strings.HasPrefix(r.Address, "unix://"):
		if !strings.HasPrefix(strings.TrimPrefix(r.Address, "unix://"), "/") {
			l.errf(d, p+".redis.address", "%q: a unix socket needs an absolute path (unix:///run/redis.sock)", r.Address)
		}
		if r.TLS.Enabled {
			l.errf(d, p+".redis.tls", "does not apply to a unix socket")
		}
		if r.Cluster {
			l.errf(d, p+".redis.cluster", "needs a host:port address: cluster nodes are reached on TCP, not a unix socket")
		}
	case strings.Contains(r.Address, "://"):
		l.errf(d, p+".redis.address", "%q: write host:port or unix:///path (TLS is redis.tls, not a rediss:// URL)", r.Address)
	default:
		if err := checkHostPort(r.Address); err != nil {
			l.errf(d, p+".redis.address", "%v", err)
		}
	}
	if len(r.KeyPrefix) > maxKeyPrefix || strings.ContainsAny(r.KeyPrefix, "{}") || strings.IndexFunc(r.KeyPrefix, func(c rune) bool { return c <= ' ' || c > '~' }) >= 0 {
		// No braces: the app's {hash tag} must be a key's first, or a cluster would put
		// every app in the prefix's one slot.
		l.errf(d, p+".redis.keyPrefix", "%q: at most %d printable ASCII characters, no spaces or braces", r.KeyPrefix, maxKeyPrefix)
	}
	st.KeyPrefix = r.KeyPrefix
	if r.Cluster && r.DB != 0 {
		l.errf(d, p+".redis.db", "must be 0 with cluster: true (a Redis Cluster has only database 0), got %d", r.DB)
	} else if r.DB < 0 || r.DB > 15 {
		// 16 databases is Redis's default; a larger number needs a server configured for it.
		l.errf(d, p+".redis.db", "must be between 0 and 15, got %d", r.DB)
	}
	if r.PasswordFile != "" && !strings.HasPrefix(r.PasswordFile, "/") {
		l.errf(d, p+".redis.passwordFile", "must be an absolute path, got %q", r.PasswordFile)
	}
	if r.TLS.CAFile != "" && !strings.HasPrefix(r.TLS.CAFile, "/") {
		l.errf(d, p+".redis.tls.caFile", "must be an absolute path, got %q", r.TLS.CAFile)
	}
	switch st.FailureMode {
	case "":
		st.FailureMode = FailLocal
	case FailLocal, FailDeny, FailAllow:
	default:
		l.errf(d, p+".failureMode", "must be local, deny or allow, got %q", spec.FailureMode)
	}
	if spec.Timeout != "" {
		t, err := time.ParseDuration(string(spec.Timeout))
		if err != nil || t <= 0 || t > MaxRateLimitTimeout {
			l.errf(d, p+".timeout", "%q is not a duration between 1ms and %s (e.g. 50ms)", spec.Timeout, MaxRateLimitTimeout)
		} else {
			st.Timeout = t
		}
	}
	return st
}

// compileSentinel checks redis.sentinel, which replaces redis.address.
func (l *loader) compileSentinel(d *document, p string, r *RedisSpec) *SentinelStore {
	s := r.Sentinel
	if r.Address != "" {
		l.errf(d, p+".address", "must be empty with sentinel: the sentinels name the primary")
	}
	if r.Cluster {
		l.errf(d, p+".cluster", "does not go with sentinel: a Redis Cluster fails over by itself")
	}
	if s.MasterName == "" {
		l.errf(d, p+".sentinel.masterName", "is required (the name in `sentinel monitor <name> ...`)")
	}
	if len(s.Addresses) == 0 {
		l.errf(d, p+".sentinel.addresses", "is required: one or more sentinels, host:port")
	}
	for i, a := range s.Addresses {
		if err := checkHostPort(a); err != nil {
			l.errf(d, fmt.Sprintf("%s.sentinel.addresses[%d]", p, i), "%v", err)
		}
	}
	if s.PasswordFile != "" && !strings.HasPrefix(s.PasswordFile, "/") {
		l.errf(d, p+".sentinel.passwordFile", "must be an absolute path, got %q", s.PasswordFile)
	}
	return &SentinelStore{MasterName: s.MasterName, Addrs: slices.Clone(s.Addresses), PasswordFile: s.PasswordFile}
}

func (l *loader) compileApp(d *document, mesh *Mesh) *App {
	spec := d.spec.(*AppSpec)
	app := &App{
		ID:        d.meta.Name,
		Namespace: d.meta.Namespace,
		SpiffeID:  "spiffe://" + mesh.TrustDomain + "/ns/" + d.meta.Namespace + "/" + d.meta.Name,
		Address:   spec.Address,
		Sidecar:   spec.Sidecar,
		Source:    fmt.Sprintf("%s:%d", d.file, d.line),
	}
	if spec.Address != "" {
		if err := checkHostPort(spec.Address); err != nil {
			l.errf(d, "spec.address", "%v", err)
		}
	} else if spec.MCP != nil {
		l.errf(d, "spec.address", "is required for an app that serves MCP (host:port of the app process)")
	}
	if sc := spec.Sidecar; sc != nil {
		if sc.Address == "" {
			l.errf(d, "spec.sidecar.address", "is required")
		} else if err := checkHost(sc.Address); err != nil {
			l.errf(d, "spec.sidecar.address", "%v", err)
		}
		for _, f := range []struct {
			path string
			port int
		}{{"spec.sidecar.inboundPort", sc.InboundPort}, {"spec.sidecar.outboundPort", sc.OutboundPort}} {
			if f.port < 1 || f.port > 65535 {
				l.errf(d, f.path, "must be a port between 1 and 65535, got %d", f.port)
			}
		}
		if sc.InboundPort == sc.OutboundPort && sc.InboundPort != 0 {
			l.errf(d, "spec.sidecar.outboundPort", "must differ from inboundPort")
		}
		switch gp := sc.GatewayPort; {
		case gp == 0:
		case gp < 1 || gp > 65535:
			l.errf(d, "spec.sidecar.gatewayPort", "must be a port between 1 and 65535, got %d", gp)
		case gp == sc.InboundPort || gp == sc.OutboundPort:
			l.errf(d, "spec.sidecar.gatewayPort", "must differ from inboundPort and outboundPort")
		case spec.MCP == nil:
			l.errf(d, "spec.sidecar.gatewayPort", "is only for an app that serves MCP (Gateways route to MCP apps)")
		}
	} else if spec.MCP != nil {
		l.errf(d, "spec.sidecar", "is required for an app that serves MCP (its Envoy sidecar)")
	}
	if spec.MCP != nil {
		app.MCP = l.compileMCP(d, spec.MCP, mesh)
	}
	return app
}

func (l *loader) compileMCP(d *document, spec *MCPSpec, mesh *Mesh) *MCP {
	m := &MCP{Transport: spec.Transport, Path: spec.Path, Resource: spec.Resource}
	const p = "spec.mcp"
	switch m.Transport {
	case "":
		m.Transport = TransportStreamableHTTP
	case TransportStreamableHTTP, TransportGRPC:
	default:
		l.errf(d, p+".transport", "must be %s or %s, got %q", TransportStreamableHTTP, TransportGRPC, spec.Transport)
	}
	switch {
	case m.Transport == TransportGRPC:
		// gRPC clients cannot put a method under another path: the routes are the
		// service's own. The RFC 9728 document still lives at the path derived from
		// resource, which does not depend on this one.
		if m.Path != "" {
			l.errf(d, p+".path", "must not be set with transport grpc: the service path %s is fixed", grpcServicePath)
		}
		m.Path = grpcServicePath
	case m.Path == "":
		m.Path = "/mcp"
	case !strings.HasPrefix(m.Path, "/") || strings.ContainsAny(m.Path, "?# \t"):
		l.errf(d, p+".path", "must be a path starting with \"/\" without query or fragment, got %q", m.Path)
	}

	// Authentication.
	auth := spec.Authentication
	m.Authentication.Required = auth.Required
	for i, name := range auth.Issuers {
		iss := mesh.Issuers[name]
		if iss == nil {
			l.errf(d, fmt.Sprintf("%s.authentication.issuers[%d]", p, i), "issuer %q is not defined in the Mesh", name)
			continue
		}
		m.Authentication.Issuers = append(m.Authentication.Issuers, iss)
	}
	if auth.Required && len(auth.Issuers) == 0 {
		l.errf(d, p+".authentication.issuers", "at least one issuer is required when authentication is required")
	}
	if len(auth.Scopes) > 0 && len(auth.Issuers) == 0 {
		l.errf(d, p+".authentication.scopes", "scopes need an issuer to come from")
	}
	for i, sc := range auth.Scopes {
		if !isScopeToken(sc) {
			l.errf(d, fmt.Sprintf("%s.authentication.scopes[%d]", p, i), "%q is not an OAuth scope (RFC 6749 §3.3: no spaces, quotes or backslashes)", sc)
		}
	}
	m.Authentication.Scopes = auth.Scopes

	// The resource id and the RFC 9728 metadata URL derived from it.
	if m.Resource == "" {
		if len(auth.Issuers) > 0 {
			l.errf(d, p+".resource", "is required when authentication has issuers: clients find the authorization server through it (RFC 9728)")
		}
	} else if u, err := parseSecureURL(m.Resource); err != nil {
		l.errf(d, p+".resource", "%v", err)
	} else if u.RawQuery != "" || u.Fragment != "" || u.ForceQuery {
		l.errf(d, p+".resource", "must not have a query or fragment (RFC 9728 §1.2)")
	} else {
		m.MetadataURL = MetadataURL(u)
	}
	m.Authentication.Audiences = l.appAudiences(d, p, auth.Audiences, m.Resource, m.Authentication.Issuers)

	m.AccessControl = l.compileAccess(d, spec.AccessControl, mesh)
	m.Tools = l.compileTools(d, spec.Tools)
	m.Responses = l.compileResponses(d, spec.Responses)
	m.Limits = l.compileLimits(d, spec.Limits)
	m.Resiliency = l.compileResiliency(d, spec.Resiliency)
	if spec.CORS != nil {
		if m.Transport == TransportGRPC {
			// Browsers do not speak gRPC over HTTP/2 trailers; a preflight would never
			// match the gRPC routes (they require a gRPC content-type).
			l.errf(d, p+".cors", "is only for transport %s: browsers cannot call gRPC MCP", TransportStreamableHTTP)
		}
		m.CORS = l.compileCORS(d, spec.CORS)
	}
	return m
}

// compileCORS validates spec.mcp.cors and applies the defaults. Origins are compared
// byte for byte with the Origin header (Envoy's exact matchers), so each must be
// written as browsers serialize it (RFC 6454 §6.2): lowercase scheme and host, no
// default port, no path.
func (l *loader) compileCORS(d *document, spec *CORSSpec) *CORS {
	const p = "spec.mcp.cors"
	c := &CORS{AllowCredentials: spec.AllowCredentials, MaxAge: DefaultCORSMaxAge}
	if len(spec.AllowOrigins) == 0 {
		l.errf(d, p+".allowOrigins", "at least one origin is required (an exact origin such as https://app.example.com, or \"*\")")
	}
	seen := map[string]bool{}
	for i, o := range spec.AllowOrigins {
		at := fmt.Sprintf("%s.allowOrigins[%d]", p, i)
		if seen[o] {
			l.errf(d, at, "duplicate origin %q", o)
			continue
		}
		seen[o] = true
		if o == "*" {
			c.AnyOrigin = true
			continue
		}
		if err := checkOrigin(o); err != nil {
			l.errf(d, at, "%v", err)
			continue
		}
		c.AllowOrigins = append(c.AllowOrigins, o)
	}
	if c.AnyOrigin {
		if len(spec.AllowOrigins) > 1 {
			l.errf(d, p+".allowOrigins", "\"*\" allows every origin: it must be the only entry")
		}
		if spec.AllowCredentials {
			// Browsers refuse credentials with a wildcard origin (Fetch standard, CORS
			// check), and Envoy would echo any Origin back, granting every site the
			// user's cookies: refused rather than made to work.
			l.errf(d, p+".allowCredentials", "must not be true with allowOrigins \"*\": list the origins that may send credentials")
		}
		c.AllowOrigins = nil
	}
	c.AllowMethods = l.corsTokens(d, p+".allowMethods", spec.AllowMethods, DefaultCORSMethods)
	c.AllowHeaders = l.corsTokens(d, p+".allowHeaders", spec.AllowHeaders, DefaultCORSHeaders)
	c.ExposeHeaders = l.corsTokens(d, p+".exposeHeaders", spec.ExposeHeaders, DefaultCORSExposeHeaders)
	if spec.MaxAge != "" {
		t, err := time.ParseDuration(string(spec.MaxAge))
		switch {
		case err != nil || t < time.Second:
			l.errf(d, p+".maxAge", "%q is not a duration of at least 1s (e.g. 10m)", spec.MaxAge)
		case t%time.Second != 0:
			l.errf(d, p+".maxAge", "%q is not a whole number of seconds (Access-Control-Max-Age counts seconds)", spec.MaxAge)
		default:
			c.MaxAge = t
		}
	}
	return c
}

// corsTokens checks a list of methods or header names (RFC 9110 tokens), or returns def
// when the list is left out. "*" is refused: Envoy and browsers give it different
// meanings (with credentials, browsers read it as a header named "*").
func (l *loader) corsTokens(d *document, p string, list, def []string) []string {
	if len(list) == 0 {
		return slices.Clone(def)
	}
	for i, v := range list {
		switch {
		case v == "*":
			l.errf(d, fmt.Sprintf("%s[%d]", p, i), "\"*\" is not allowed: list the names")
		case !IsToken(v):
			l.errf(d, fmt.Sprintf("%s[%d]", p, i), "%q is not an HTTP token (RFC 9110 §5.6.2)", v)
		}
	}
	return slices.Clone(list)
}

// checkOrigin accepts an origin as a browser serializes it in the Origin header:
// scheme "://" host [":" port], lowercase, without the scheme's default port.
func checkOrigin(o string) error {
	u, err := url.Parse(o)
	switch {
	case o == "null":
		// Sandboxed frames, file: pages and redirects all send "null": allowing it
		// allows anyone who can make a browser send it.
		return errors.New(`"null" is not allowed: every opaque origin sends it`)
	case err != nil || u.Scheme == "" || u.Host == "" || u.Opaque != "":
		return fmt.Errorf("%q is not an origin: want scheme://host[:port], e.g. https://app.example.com", o)
	case u.User != nil || u.Path != "" || u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || strings.Contains(o, "#"):
		return fmt.Errorf("%q is not an origin: no user, path (not even \"/\"), query or fragment", o)
	case strings.ToLower(o) != o:
		return fmt.Errorf("%q must be lowercase, as browsers send it", o)
	}
	if port := u.Port(); port != "" {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("%q has an invalid port", o)
		}
		if u.Scheme == "https" && port == "443" || u.Scheme == "http" && port == "80" {
			return fmt.Errorf("%q names the default port: browsers omit it, so it would never match", o)
		}
	}
	if u.Hostname() == "" {
		return fmt.Errorf("%q has no host", o)
	}
	return nil
}

// appAudiences compiles an app's audiences: the listed ones, or its resource. Each must
// be one its issuers accept too, or no token could pass both checks.
// mcp is the path of the app's mcp block.
func (l *loader) appAudiences(d *document, mcp string, listed []string, resource string, issuers []*Issuer) []string {
	p := mcp + ".authentication.audiences"
	if len(issuers) == 0 {
		if len(listed) > 0 {
			l.errf(d, p, "audiences need an issuer to come from")
		}
		return nil
	}
	auds, at := listed, func(i int) string { return fmt.Sprintf("%s[%d]", p, i) }
	if len(listed) == 0 {
		if resource == "" {
			return nil // reported as a missing resource
		}
		auds, at = []string{resource}, func(int) string { return mcp + ".resource" }
	}
	for i, a := range auds {
		if strings.TrimSpace(a) == "" {
			l.errf(d, at(i), "is empty")
			continue
		}
		var names []string
		ok := false
		for _, is := range issuers {
			names = append(names, is.Name)
			ok = ok || slices.Contains(is.Audiences, a)
		}
		if !ok {
			how := "list it in an issuer's audiences"
			if len(listed) == 0 {
				how = "list it in an issuer's audiences, or set authentication.audiences to the aud your tokens carry"
			}
			l.errf(d, at(i), "audience %q is not among the audiences of issuers %s, so no token could pass both: %s", a, strings.Join(names, ", "), how)
		}
	}
	return auds
}

// MetadataURL derives the RFC 9728 §3.1 protected resource metadata URL: the well-known
// suffix goes between the host and the resource's path.
func MetadataURL(resource *url.URL) string {
	p := strings.TrimSuffix(resource.EscapedPath(), "/")
	return resource.Scheme + "://" + resource.Host + "/.well-known/oauth-protected-resource" + p
}

func checkAction(a Action, def Action) (Action, bool) {
	switch a {
	case "":
		return def, true
	case Allow, Deny:
		return a, true
	default:
		return a, false
	}
}

var httpVerbs = map[string]bool{
	"GET": true, "HEAD": true, "POST": true, "PUT": true, "DELETE": true,
	"PATCH": true, "OPTIONS": true, "CONNECT": true, "TRACE": true,
}

func (l *loader) compileAccess(d *document, spec AccessControlSpec, mesh *Mesh) AccessControl {
	const p = "spec.mcp.accessControl"
	ac := AccessControl{TrustDomain: spec.TrustDomain, policies: map[string]*accessPolicy{}}
	var ok bool
	if ac.DefaultAction, ok = checkAction(spec.DefaultAction, Deny); !ok {
		l.errf(d, p+".defaultAction", "must be allow or deny, got %q", spec.DefaultAction)
	}
	if ac.TrustDomain == "" {
		ac.TrustDomain = mesh.TrustDomain
	}
	for i, ps := range spec.Policies {
		pp := fmt.Sprintf("%s.policies[%d]", p, i)
		if !IsDNSLabel(ps.AppID) {
			l.errf(d, pp+".appId", "%q is not an App ID (a DNS label)", ps.AppID)
		}
		ns := ps.Namespace
		if ns == "" {
			ns = DefaultNamespace
		} else if !IsDNSLabel(ns) {
			l.errf(d, pp+".namespace", "%q is not a DNS label", ns)
		}
		td := ps.TrustDomain
		if td == "" {
			td = ac.TrustDomain
		}
		pol := &accessPolicy{appID: ps.AppID}
		switch ps.DefaultAction {
		case Allow, Deny:
			pol.defaultAction = ps.DefaultAction
		case "":
			// No silent default: an omitted action in an allow list is too easy to misread.
			l.errf(d, pp+".defaultAction", "is required (allow or deny)")
		default:
			l.errf(d, pp+".defaultAction", "must be allow or deny, got %q", ps.DefaultAction)
		}
		for j, os := range ps.Operations {
			op := fmt.Sprintf("%s.operations[%d]", pp, j)
			o, err := compileOperation(os.Name)
			if err != nil {
				l.errf(d, op+".name", "%q: %v", os.Name, err)
			}
			if len(os.HTTPVerb) == 0 {
				l.errf(d, op+".httpVerb", "list the HTTP verbs (or \"*\")")
			}
			for k, v := range os.HTTPVerb {
				switch {
				case v == "*":
					o.verbs = nil
				case httpVerbs[strings.ToUpper(v)]:
					if o.verbs == nil && !slices.Contains(os.HTTPVerb[:k], "*") {
						o.verbs = map[string]bool{}
					}
					if o.verbs != nil {
						o.verbs[strings.ToUpper(v)] = true
					}
				default:
					l.errf(d, fmt.Sprintf("%s.httpVerb[%d]", op, k), "%q is not an HTTP verb", v)
				}
			}
			if slices.Contains(os.HTTPVerb, "*") {
				o.verbs = nil
			}
			if o.action, ok = checkAction(os.Action, ""); !ok || o.action == "" {
				l.errf(d, op+".action", "must be allow or deny, got %q", os.Action)
			}
			pol.ops = append(pol.ops, o)
		}
		pol.defaultReason = fmt.Sprintf("access policy for %q: defaultAction %s", ps.AppID, pol.defaultAction)
		for k := range pol.ops {
			o := &pol.ops[k]
			o.reason = fmt.Sprintf("access policy for %q: operation %s %s", ps.AppID, o.name, o.action)
		}
		key := policyKey(td, ns, ps.AppID)
		if ac.policies[key] != nil {
			l.errf(d, pp+".appId", "a second policy for %q in namespace %q", ps.AppID, ns)
			continue
		}
		ac.policies[key] = pol
	}
	return ac
}

// reservedJSONRPCCodes are the codes JSON-RPC 2.0 §5.1 gives a fixed meaning; a policy
// denial must not masquerade as one of them.
var reservedJSONRPCCodes = map[int]bool{-32700: true, -32600: true, -32601: true, -32602: true, -32603: true}

func (l *loader) compileTools(d *document, spec ToolsSpec) Tools {
	const p = "spec.mcp.tools"
	t := Tools{ErrorCode: spec.ErrorCode}
	var ok bool
	if t.DefaultAction, ok = checkAction(spec.DefaultAction, Deny); !ok {
		l.errf(d, p+".defaultAction", "must be allow or deny, got %q", spec.DefaultAction)
	}
	switch {
	case t.ErrorCode == 0:
		t.ErrorCode = DefaultDenyErrorCode
	case reservedJSONRPCCodes[t.ErrorCode]:
		l.errf(d, p+".errorCode", "%d is reserved by JSON-RPC 2.0", t.ErrorCode)
	}
	names := map[string]bool{}
	for i, rs := range spec.Rules {
		rp := fmt.Sprintf("%s.rules[%d]", p, i)
		r := &Rule{Name: rs.Name, Scopes: rs.Scopes}
		if r.Name == "" {
			r.Name = fmt.Sprintf("rules[%d]", i)
		} else if names[r.Name] {
			l.errf(d, rp+".name", "duplicate rule name %q", r.Name)
		}
		names[r.Name] = true
		for j, c := range rs.Callers {
			switch {
			case c == "*":
				r.AnyCaller = true
			case IsDNSLabel(c):
				r.Callers = append(r.Callers, c)
			default:
				l.errf(d, fmt.Sprintf("%s.callers[%d]", rp, j), "%q is not an App ID or \"*\"", c)
			}
		}
		if len(rs.Callers) == 0 {
			r.AnyCaller = true
		}
		for j, sc := range rs.Scopes {
			if !isScopeToken(sc) {
				l.errf(d, fmt.Sprintf("%s.scopes[%d]", rp, j), "%q is not an OAuth scope", sc)
			}
		}
		r.Subjects = l.globs(d, rp+".subjects", rs.Subjects)
		r.Methods = l.globs(d, rp+".methods", rs.Methods)
		r.Tools = l.globs(d, rp+".tools", rs.Tools)
		r.Prompts = l.globs(d, rp+".prompts", rs.Prompts)
		r.Resources = l.globs(d, rp+".resources", rs.Resources)
		if r.Action, ok = checkAction(rs.Action, ""); !ok || r.Action == "" {
			l.errf(d, rp+".action", "must be allow or deny, got %q", rs.Action)
		}
		t.Rules = append(t.Rules, r)
	}
	if spec.Rego != "" {
		t.Rego = l.compileRego(d, p+".rego", spec.Rego)
	}
	t.Pinning = l.compilePinning(d, p+".pinning", spec.Pinning)
	return t
}

func (l *loader) globs(d *document, p string, patterns []string) []Glob {
	out := make([]Glob, 0, len(patterns))
	for i, s := range patterns {
		g, err := CompileGlob(s)
		if err != nil {
			l.errf(d, fmt.Sprintf("%s[%d]", p, i), "%v", err)
			continue
		}
		out = append(out, g)
	}
	return out
}

func (l *loader) compileResponses(d *document, spec ResponsesSpec) Responses {
	r := Responses{FilterToolsList: spec.FilterToolsList}
	for i, rs := range spec.Redact {
		rp := fmt.Sprintf("spec.mcp.responses.redact[%d]", i)
		red := Redaction{Tools: l.globs(d, rp+".tools", rs.Tools)}
		if len(rs.Tools) == 0 {
			l.errf(d, rp+".tools", "name the tools whose results are redacted")
		}
		if len(rs.Pointers) == 0 {
			l.errf(d, rp+".pointers", "name the JSON pointers to remove")
		}
		for j, ptr := range rs.Pointers {
			pt, err := ParsePointer(ptr)
			if err != nil {
				l.errf(d, fmt.Sprintf("%s.pointers[%d]", rp, j), "%v", err)
				continue
			}
			red.Pointers = append(red.Pointers, pt)
		}
		r.Redact = append(r.Redact, red)
	}
	return r
}

// ParsePointer parses an RFC 6901 JSON pointer. The empty pointer (the whole document) is
// refused: redacting a whole result is a deny, and should be written as one.
func ParsePointer(s string) (Pointer, error) {
	if !strings.HasPrefix(s, "/") {
		return Pointer{}, fmt.Errorf("%q is not a JSON pointer (RFC 6901: starts with \"/\")", s)
	}
	parts := strings.Split(s[1:], "/")
	for i, tok := range parts {
		for j := 0; j < len(tok); j++ {
			if tok[j] == '~' && (j+1 >= len(tok) || (tok[j+1] != '0' && tok[j+1] != '1')) {
				return Pointer{}, fmt.Errorf("%q is not a JSON pointer: \"~\" must be followed by 0 or 1", s)
			}
		}
		parts[i] = strings.ReplaceAll(strings.ReplaceAll(tok, "~1", "/"), "~0", "~")
	}
	return Pointer{Raw: s, Tokens: parts}, nil
}

func (l *loader) compileLimits(d *document, spec LimitsSpec) Limits {
	const p = "spec.mcp.limits"
	lim := Limits{MaxRequestBytes: spec.MaxRequestBytes, ResponseHeaders: spec.ResponseHeaders}
	switch {
	case lim.MaxRequestBytes == 0:
		lim.MaxRequestBytes = DefaultMaxRequestBytes
	case lim.MaxRequestBytes < 0 || lim.MaxRequestBytes > MaxMaxRequestBytes:
		l.errf(d, p+".maxRequestBytes", "must be between 1 and %d", MaxMaxRequestBytes)
	}
	lim.SubjectClaim, lim.TenantClaim = DefaultSubjectClaim, DefaultTenantClaim
	if r, ok := l.compileRate(d, p+".perCaller", spec.PerCaller, false, false); ok {
		lim.PerCaller = &r
	}
	if r, ok := l.compileRate(d, p+".perSubject", spec.PerSubject, false, true); ok {
		lim.PerSubject = &r
		if spec.PerSubject.Claim != "" {
			lim.SubjectClaim = spec.PerSubject.Claim
		}
	}
	if r, ok := l.compileRate(d, p+".perTenant", spec.PerTenant, false, true); ok {
		lim.PerTenant = &r
		if spec.PerTenant.Claim != "" {
			lim.TenantClaim = spec.PerTenant.Claim
		}
	}
	for tool, rs := range spec.PerTool {
		tp := p + ".perTool." + tool
		g, err := CompileGlob(tool)
		if err != nil {
			l.errf(d, tp, "%v", err)
			continue
		}
		per := LimitScope(rs.Per)
		switch per {
		case PerApp, PerCaller, PerSubject, PerTenant:
		case "app":
			per = PerApp
		default:
			l.errf(d, tp+".per", "must be app, caller, subject or tenant, got %q", rs.Per)
			continue
		}
		r, ok := l.compileRate(d, tp, rs, true, per == PerSubject || per == PerTenant)
		if !ok {
			continue
		}
		tr := ToolRate{Tool: g, Rate: r, Per: per, Claim: rs.Claim}
		if tr.Claim == "" {
			switch per {
			case PerSubject:
				tr.Claim = lim.SubjectClaim
			case PerTenant:
				tr.Claim = lim.TenantClaim
			}
		}
		lim.PerTool = append(lim.PerTool, tr)
	}
	// Map order is random; a stable order keeps snapshots and their renderings stable.
	sortToolRates(lim.PerTool)
	return lim
}

// compileRate checks one rate: "N/s", or the mapping {rate, burst, per, claim} with per
// and claim only where they apply. ok is false when the rate is absent or wrong.
func (l *loader) compileRate(d *document, p string, rs RateSpec, perOK, claimOK bool) (RateLimit, bool) {
	if rs.isZero() {
		return RateLimit{}, false
	}
	ok := true
	if rs.Per != "" && !perOK {
		l.errf(d, p+".per", "only applies to perTool limits")
		ok = false
	}
	if rs.Claim != "" {
		switch {
		case !claimOK:
			l.errf(d, p+".claim", "only applies to perSubject, perTenant, and perTool limits per subject or tenant")
			ok = false
		case strings.ContainsAny(rs.Claim, " \t\r\n") || len(rs.Claim) > 128:
			l.errf(d, p+".claim", "%q is not a claim name", rs.Claim)
			ok = false
		}
	}
	if rs.Rate == "" {
		l.errf(d, p+".rate", "is required (N/s, N/m or N/h)")
		return RateLimit{}, false
	}
	r, err := ParseRate(string(rs.Rate))
	if err != nil {
		l.errf(d, p, "%v", err)
		return RateLimit{}, false
	}
	if rs.Burst < 0 || rs.Burst > 1_000_000 {
		l.errf(d, p+".burst", "must be between 1 and 1000000 (0 or unset: the rate's N)")
		ok = false
	} else if refill := float64(rs.Burst) * r.Per.Seconds() / float64(r.N); refill > maxRefill.Seconds() {
		// A bucket that takes longer than that to fill is no rate; Redis's GCRA keeps
		// times in microseconds, which would not hold it.
		l.errf(d, p+".burst", "%d at %s takes %.0f years to refill: at most 10", rs.Burst, rs.Rate, refill/(365.25*86400))
		ok = false
	}
	r.Burst = rs.Burst
	return r, ok
}

// maxRefill bounds the time an empty bucket takes to fill again (burst × period / N).
const maxRefill = 36525 * 24 * time.Hour / 10 // ten years of 365.25 days

func sortToolRates(rs []ToolRate) {
	for i := 1; i < len(rs); i++ {
		for j := i; j > 0 && rs[j].Tool.pattern < rs[j-1].Tool.pattern; j-- {
			rs[j], rs[j-1] = rs[j-1], rs[j]
		}
	}
}

// maxRateN bounds N in a rate: a thousand million per second is beyond any MCP server,
// and the shared store counts requests in whole microseconds.
const maxRateN = 1_000_000_000

// ParseRate parses "N/s", "N/m" or "N/h".
func ParseRate(s string) (RateLimit, error) {
	n, unit, ok := strings.Cut(s, "/")
	count, err := strconv.Atoi(n)
	if !ok || err != nil || count <= 0 {
		return RateLimit{}, fmt.Errorf("%q is not a rate (N/s, N/m or N/h with N > 0)", s)
	}
	if count > maxRateN {
		return RateLimit{}, fmt.Errorf("%q: N must be at most %d", s, maxRateN)
	}
	per := map[string]time.Duration{"s": time.Second, "m": time.Minute, "h": time.Hour}[unit]
	if per == 0 {
		return RateLimit{}, fmt.Errorf("%q is not a rate (N/s, N/m or N/h with N > 0)", s)
	}
	return RateLimit{N: count, Per: per}, nil
}

func (l *loader) compileResiliency(d *document, spec ResiliencySpec) Resiliency {
	const p = "spec.mcp.resiliency"
	r := Resiliency{Retries: spec.Retries, MaxRequests: spec.CircuitBreaker.MaxRequests}
	if spec.Timeout != "" {
		t, err := time.ParseDuration(string(spec.Timeout))
		if err != nil || t <= 0 {
			l.errf(d, p+".timeout", "%q is not a positive duration (e.g. 30s)", spec.Timeout)
		}
		r.Timeout = t
	}
	if r.Retries < 0 || r.Retries > 10 {
		l.errf(d, p+".retries", "must be between 0 and 10")
	}
	if r.MaxRequests < 0 {
		l.errf(d, p+".circuitBreaker.maxRequests", "must not be negative")
	}
	return r
}

func (l *loader) compileEndpoint(d *document, s *Snapshot) *HTTPEndpoint {
	spec := d.spec.(*HTTPEndpointSpec)
	ep := &HTTPEndpoint{
		Name:      d.meta.Name,
		Namespace: d.meta.Namespace,
		Headers:   spec.Headers,
		Auth:      spec.Auth,
		Source:    fmt.Sprintf("%s:%d", d.file, d.line),
		// Passthrough is refused below with auth; kept here so the snapshot says what
		// the file said.
		Passthrough: spec.Passthrough,
	}
	if spec.BaseURL == "" {
		l.errf(d, "spec.baseUrl", "is required")
	} else if u, err := parseSecureURL(spec.BaseURL); err != nil {
		l.errf(d, "spec.baseUrl", "%v", err)
	} else {
		ep.BaseURL = u
	}
	for name, value := range spec.Headers {
		if !IsToken(name) {
			l.errf(d, "spec.headers."+name, "%q is not an HTTP header name", name)
		}
		if strings.ContainsAny(value, "\r\n\x00") {
			l.errf(d, "spec.headers."+name, "header values must not contain CR, LF or NUL")
		}
	}
	if spec.Auth == nil {
		if len(spec.Callers) > 0 {
			l.errf(d, "spec.callers", "only applies with spec.auth (without it the endpoint holds no credentials to spend)")
		}
		return ep
	}
	if spec.Passthrough {
		l.errf(d, "spec.passthrough", "cannot be combined with spec.auth: the upstream gets the token mcpgate acquires, never the agent's")
	}
	for name := range spec.Headers {
		if strings.EqualFold(name, "authorization") {
			l.errf(d, "spec.headers."+name, "conflicts with spec.auth, which sets Authorization")
		}
	}
	if len(spec.Callers) == 0 {
		l.errf(d, "spec.callers", "is required with spec.auth: name the App IDs that may call this endpoint with its credentials (\"*\" for every App)")
	}
	for i, c := range spec.Callers {
		switch {
		case c == "*":
		case !IsDNSLabel(c):
			l.errf(d, fmt.Sprintf("spec.callers[%d]", i), "%q is not an App ID", c)
		case s.Apps[c] == nil:
			l.errf(d, fmt.Sprintf("spec.callers[%d]", i), "no App %q in the policy", c)
		}
	}
	ep.Callers = spec.Callers
	cc, tx := spec.Auth.ClientCredentials, spec.Auth.TokenExchange
	switch {
	case cc == nil && tx == nil:
		l.errf(d, "spec.auth", "one of clientCredentials or tokenExchange is required")
	case cc != nil && tx != nil:
		l.errf(d, "spec.auth", "clientCredentials and tokenExchange are exclusive: the upstream gets one token")
	case cc != nil:
		const p = "spec.auth.clientCredentials"
		g := grantFields{cc.TokenURL, cc.ClientID, cc.ClientSecretFile, cc.AuthMethod, cc.Resource, cc.Scopes, "client_secret_basic, client_secret_post or private_key_jwt"}
		if cc.AuthMethod == "private_key_jwt" {
			// The key signs a client assertion; there is no secret.
			g.authMethod, g.secretFile = "", "-"
			if cc.PrivateKeyFile == "" {
				l.errf(d, p+".privateKeyFile", "is required with authMethod private_key_jwt")
			}
			if cc.ClientSecretFile != "" {
				l.errf(d, p+".clientSecretFile", "must not be set with authMethod private_key_jwt, which signs with privateKeyFile")
			}
		} else if cc.PrivateKeyFile != "" || cc.KeyID != "" {
			l.errf(d, p+".privateKeyFile", "only applies with authMethod private_key_jwt")
		}
		l.checkGrant(d, p, g)
	default:
		const p = "spec.auth.tokenExchange"
		l.checkGrant(d, p, grantFields{tx.TokenURL, tx.ClientID, tx.ClientSecretFile, tx.AuthMethod, tx.Resource, tx.Scopes, ""})
		if tx.Audience == "" && tx.Resource == "" {
			l.errf(d, p, "audience or resource is required: name the upstream the exchanged token is for")
		}
		if len(tx.SubjectIssuers) == 0 {
			l.errf(d, p+".subjectIssuers", "is required: name the Mesh issuers the agent's token must verify against")
		}
		for i, name := range tx.SubjectIssuers {
			iss := s.Mesh.Issuers[name]
			if iss == nil {
				l.errf(d, fmt.Sprintf("%s.subjectIssuers[%d]", p, i), "issuer %q is not defined in the Mesh", name)
				continue
			}
			ep.SubjectIssuers = append(ep.SubjectIssuers, iss)
		}
	}
	return ep
}

// grantFields are what both grants of HTTPEndpoint.spec.auth share.
type grantFields struct {
	tokenURL, clientID, secretFile, authMethod, resource string
	scopes                                               []string
	methods                                              string // the authMethods allowed, for the error
}

func (l *loader) checkGrant(d *document, p string, g grantFields) {
	if g.tokenURL == "" {
		l.errf(d, p+".tokenUrl", "is required")
	} else if err := checkSecureURL(g.tokenURL); err != nil {
		l.errf(d, p+".tokenUrl", "%v", err)
	}
	if g.clientID == "" {
		l.errf(d, p+".clientId", "is required")
	}
	if g.secretFile == "" {
		l.errf(d, p+".clientSecretFile", "is required (the secret is read from a file, never written in the policy)")
	}
	for i, sc := range g.scopes {
		if !isScopeToken(sc) {
			l.errf(d, fmt.Sprintf("%s.scopes[%d]", p, i), "%q is not an OAuth scope", sc)
		}
	}
	switch g.authMethod {
	case "", "client_secret_basic", "client_secret_post":
	default:
		if g.methods == "" {
			g.methods = "client_secret_basic or client_secret_post"
		}
		l.errf(d, p+".authMethod", "must be %s, got %q", g.methods, g.authMethod)
	}
	if g.resource != "" {
		if u, err := url.Parse(g.resource); err != nil || !u.IsAbs() || u.Fragment != "" {
			l.errf(d, p+".resource", "must be an absolute URI without a fragment (RFC 8707), got %q", g.resource)
		}
	}
}

func (l *loader) compileGateway(d *document, s *Snapshot) *Gateway {
	spec := d.spec.(*GatewaySpec)
	gw := &Gateway{Name: d.meta.Name, Namespace: d.meta.Namespace, Port: spec.Listener.Port, TLS: spec.Listener.TLS, Source: fmt.Sprintf("%s:%d", d.file, d.line)}
	if gw.Port < 1 || gw.Port > 65535 {
		l.errf(d, "spec.listener.port", "must be a port between 1 and 65535, got %d", gw.Port)
	}
	if t := spec.Listener.TLS; t != nil && (t.CertFile == "" || t.KeyFile == "") {
		l.errf(d, "spec.listener.tls", "certFile and keyFile are both required")
	}
	if len(spec.Routes) == 0 {
		l.errf(d, "spec.routes", "at least one route is required")
	}
	grpcHosts := map[string]string{} // host → the gRPC App it routes to
	for i, rs := range spec.Routes {
		rp := fmt.Sprintf("spec.routes[%d]", i)
		r := GatewayRoute{Host: rs.Host, Path: rs.Path}
		if r.Path == "" {
			r.Path = "/"
		} else if !strings.HasPrefix(r.Path, "/") || strings.ContainsAny(r.Path, "?# \t") {
			l.errf(d, rp+".path", "must be a path starting with \"/\", got %q", r.Path)
		}
		if r.Host != "" {
			if err := checkHost(strings.TrimPrefix(r.Host, "*.")); err != nil {
				l.errf(d, rp+".host", "%v", err)
			}
		}
		switch {
		case (rs.App == "") == (rs.Endpoint == ""):
			l.errf(d, rp, "set exactly one of app or endpoint")
		case rs.App != "":
			r.App = s.Apps[rs.App]
			switch {
			case r.App == nil:
				l.errf(d, rp+".app", "no App %q", rs.App)
			case r.App.MCP == nil:
				l.errf(d, rp+".app", "App %q does not serve MCP (it has no mcp block)", rs.App)
			case s.Mesh.MTLS != MTLSDisabled && (r.App.Sidecar == nil || r.App.Sidecar.GatewayPort == 0):
				// The Gateway must not reach the app's own port: whoever else can reach it
				// skips the policy and names any caller. It goes through the app's sidecar,
				// which takes mTLS from Gateways only (xds gatewayInbound).
				l.errf(d, rp+".app", "App %q has no spec.sidecar.gatewayPort: with mesh mTLS a Gateway reaches the app through its sidecar on that port", rs.App)
			}
			if r.App == nil || r.App.MCP == nil {
				break
			}
			if r.App.MCP.Transport == TransportGRPC {
				// A gRPC method's path is /<service>/<method> and clients cannot prefix
				// it, so the route is the service path on its host, once per host.
				if rs.Path != "" {
					l.errf(d, rp+".path", "must not be set for App %q, which serves gRPC MCP at the fixed service path %s", rs.App, grpcServicePath)
				}
				host := rs.Host
				if host == "" {
					host = "*"
				}
				if other, dup := grpcHosts[host]; dup {
					l.errf(d, rp+".app", "host %q already routes gRPC MCP (%s) to App %q", host, grpcServicePath, other)
				}
				grpcHosts[host] = rs.App
			}
		default:
			r.Endpoint = s.Endpoints[rs.Endpoint]
			if r.Endpoint == nil {
				l.errf(d, rp+".endpoint", "no HTTPEndpoint %q", rs.Endpoint)
			}
		}
		gw.Routes = append(gw.Routes, r)
	}
	return gw
}

// compileRegoPath resolves a Rego path relative to the policy file that names it. It must
// stay inside the policy directory: a policy must not read arbitrary files.
func regoPath(policyFile, rel string) (string, bool) {
	if strings.HasPrefix(rel, "/") {
		return "", false
	}
	p := path.Join(path.Dir(policyFile), rel)
	return p, fs.ValidPath(p) && !strings.HasPrefix(p, "..")
}

// Helpers for field formats.

func checkHostPort(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q is not host:port", s)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("%q: port must be between 1 and 65535", s)
	}
	return checkHost(host)
}

var hostnameRE = regexp.MustCompile(`^([a-zA-Z0-9]([-a-zA-Z0-9_]{0,61}[a-zA-Z0-9])?)(\.[a-zA-Z0-9]([-a-zA-Z0-9_]{0,61}[a-zA-Z0-9])?)*\.?$`)

func checkHost(h string) error {
	if net.ParseIP(h) != nil {
		return nil
	}
	if len(h) == 0 || len(h) > 253 || !hostnameRE.MatchString(h) {
		return fmt.Errorf("%q is not a host name or IP address", h)
	}
	return nil
}

// parseSecureURL accepts absolute https URLs, and http ones only for loopback hosts (local
// development and tests): keys and tokens fetched over plain HTTP could be forged.
func parseSecureURL(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil || !u.IsAbs() || u.Host == "" {
		return nil, fmt.Errorf("%q is not an absolute URL", s)
	}
	if u.User != nil {
		return nil, fmt.Errorf("%q: credentials in URLs are not allowed", s)
	}
	switch u.Scheme {
	case "https":
	case "http":
		if !isLoopback(u.Hostname()) {
			return nil, fmt.Errorf("%q: https is required (http only for loopback hosts)", s)
		}
	default:
		return nil, fmt.Errorf("%q: scheme must be https", s)
	}
	return u, nil
}

func checkSecureURL(s string) error {
	_, err := parseSecureURL(s)
	return err
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// isScopeToken checks RFC 6749 §3.3 scope-token syntax. Scopes end up inside quoted
// WWW-Authenticate parameters, so this is also what keeps them from breaking the header.
func isScopeToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x21 || c == '"' || c == '\\' || c > 0x7e {
			return false
		}
	}
	return true
}

// IsToken checks RFC 9110 token syntax (header names).
func IsToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0 {
			continue
		}
		return false
	}
	return true
}
