package policy

import (
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/open-policy-agent/opa/v1/rego"
)

// Snapshot is one compiled, validated policy. It is immutable once built: readers share it
// without locks and a reload publishes a new one.
type Snapshot struct {
	// Version is a content hash of every file that went into the snapshot, so an edit
	// that changes nothing yields the same version.
	Version string
	// Files are the policy files read, relative to the policy directory.
	Files     []string
	Mesh      *Mesh
	Apps      map[string]*App
	Endpoints map[string]*HTTPEndpoint
	Gateways  map[string]*Gateway
}

// App returns the app with the given App ID, or nil.
func (s *Snapshot) App(id string) *App {
	if s == nil {
		return nil
	}
	return s.Apps[id]
}

// Mesh is the compiled Mesh document.
type Mesh struct {
	Name         string
	TrustDomain  string
	MTLS         MTLSMode
	AuthzAddress string
	// AuthzSpiffeID is mcpgate's SPIFFE ID when Envoys must reach it over mTLS.
	AuthzSpiffeID string
	SDS           SDSSpec
	// Issuers by name, ready for the token verifier.
	Issuers map[string]*Issuer
	// RateLimits is the shared store of the rate limits; nil: per replica.
	RateLimits *RateLimitStore
	// Tracing is nil when traces are off.
	Tracing *Tracing
}

// Tracing is where traces go and how many are kept.
type Tracing struct {
	SamplingRate float64 // 0 to 1
	Address      string  // OTLP/gRPC host:port
	Secure       bool
}

// App is one App ID.
type App struct {
	ID        string
	Namespace string
	// SpiffeID is the identity its sidecar presents: spiffe://<td>/ns/<ns>/<app-id>.
	SpiffeID string
	Address  string
	Sidecar  *SidecarSpec
	// MCP is nil when the app does not serve MCP.
	MCP *MCP
	// Source is file:line of the document, for messages.
	Source string
}

// MCP transports (spec.mcp.transport).
const (
	// TransportStreamableHTTP is MCP's Streamable HTTP: JSON-RPC over POST (and GET event
	// streams) at MCP.Path. The default.
	TransportStreamableHTTP = "streamable-http"
	// TransportGRPC is the gRPC MCP service mcpgate.mcp.v1.McpService
	// (proto/mcpgate/mcp/v1/mcp.proto), served over HTTP/2 at its fixed service path.
	TransportGRPC = "grpc"
)

// grpcServicePath is the path prefix of the gRPC MCP service's methods, for messages. The
// wire name is envoy/contract.GRPCServicePrefix, which policy may not import; a test in
// xds keeps the two equal.
const grpcServicePath = "/mcpgate.mcp.v1.McpService/"

// MCP is the compiled MCP policy of an app.
type MCP struct {
	// Transport is TransportStreamableHTTP or TransportGRPC; everything else in MCP
	// (authentication, access control, tool rules, Rego, responses, limits, resiliency)
	// applies to both alike.
	Transport string
	// Path is the Streamable HTTP endpoint (an exact path). With TransportGRPC it is the
	// service's path prefix, /mcpgate.mcp.v1.McpService/, under which every method is
	// (/mcpgate.mcp.v1.McpService/CallTool): a prefix, not a path to route exactly.
	Path     string
	Resource string
	// MetadataURL is the RFC 9728 protected resource metadata URL derived from Resource.
	MetadataURL    string
	Authentication Authentication
	AccessControl  AccessControl
	Tools          Tools
	Responses      Responses
	Limits         Limits
	Resiliency     Resiliency
	// CORS is nil when the app has no CORS policy: Envoy then refuses preflights.
	CORS *CORS
}

// CORS is the compiled CORS policy of an app's MCP endpoint, defaults applied.
type CORS struct {
	// AllowOrigins are exact origins; empty when AnyOrigin.
	AllowOrigins     []string
	AnyOrigin        bool
	AllowMethods     []string
	AllowHeaders     []string
	ExposeHeaders    []string
	MaxAge           time.Duration // whole seconds
	AllowCredentials bool
}

// CORS defaults: what a browser-based MCP client needs on Streamable HTTP.
var (
	// DefaultCORSMethods are the methods of Streamable HTTP: POST messages, GET the
	// event stream, DELETE the session.
	DefaultCORSMethods = []string{"GET", "POST", "DELETE", "OPTIONS"}
	// DefaultCORSHeaders are the request headers MCP clients send, the 2026-07-28
	// mirror headers (Mcp-Method, Mcp-Name) included.
	DefaultCORSHeaders = []string{"content-type", "accept", "authorization", "mcp-protocol-version",
		"mcp-session-id", "last-event-id", "mcp-method", "mcp-name"}
	// DefaultCORSExposeHeaders are the response headers a browser client must read:
	// the session id, the protocol version, and the RFC 9728 challenge of a 401.
	DefaultCORSExposeHeaders = []string{"mcp-session-id", "mcp-protocol-version", "www-authenticate"}
)

// DefaultCORSMaxAge is how long a browser may cache a preflight's answer.
const DefaultCORSMaxAge = 10 * time.Minute

// Authentication is the compiled authentication block.
type Authentication struct {
	Required bool
	Issuers  []*Issuer
	// Audiences are the app's own audiences (spec audiences, or its resource): a
	// verified token's aud must name one of them. Empty only when Issuers is.
	Audiences []string
	Scopes    []string
}

// Issuer is one trusted token issuer, compiled from a Mesh JWTIssuer. ext_authz verifies
// tokens against it (extauthz/bearer). Treat it as immutable once compiled: a reload builds
// new Issuers.
type Issuer struct {
	// Name is the config name, e.g. "corp".
	Name string
	// Issuer is the exact expected "iss".
	Issuer string
	// JWKSURI is where the signing keys are. If empty, OIDC discovery is used:
	// GET <Issuer without trailing slash>/.well-known/openid-configuration → jwks_uri.
	JWKSURI string
	// Audiences must intersect the token's "aud". Required: an empty list rejects every
	// token, because a token minted for another service must not be replayable here.
	Audiences []string
	// AppIDClaim optionally names a claim whose string value is the caller's App ID.
	AppIDClaim string
	// Leeway is the clock skew allowed for exp, nbf and iat.
	Leeway time.Duration
}

// Tools holds the per-request rules of an app.
type Tools struct {
	DefaultAction Action
	Rules         []*Rule
	Rego          *Rego
	ErrorCode     int
	Pinning       Pinning
}

// PinMode is tools.pinning.mode.
type PinMode string

// Pinning modes.
const (
	PinOff     PinMode = "off"
	PinRecord  PinMode = "record"
	PinEnforce PinMode = "enforce"
)

// Pinning is an app's compiled tool pinning.
type Pinning struct {
	Mode PinMode
	// File is the pin file as the policy names it (display path), "" when off.
	File string
	// Pins are the pinned definitions by tool name (nil: no pin file, as record mode may
	// start). Treat as immutable.
	Pins map[string]ToolPin
}

// Rule is a compiled tool rule.
type Rule struct {
	Name      string
	AnyCaller bool
	Callers   []string
	Subjects  []Glob
	Scopes    []string
	Methods   []Glob
	Tools     []Glob
	Prompts   []Glob
	Resources []Glob
	Action    Action
}

// Rego is a prepared Rego decision query (data.mcpgate.decision), prepared once per
// snapshot so that evaluation does no compilation.
type Rego struct {
	File  string
	Query rego.PreparedEvalQuery
}

// Responses says how responses are filtered and redacted.
type Responses struct {
	FilterToolsList bool
	Redact          []Redaction
}

// Redaction removes JSON pointers from the results of matching tools.
type Redaction struct {
	Tools []Glob
	// Pointers are RFC 6901 JSON pointers, already split into unescaped reference tokens.
	Pointers []Pointer
}

// Pointer is a parsed RFC 6901 JSON pointer.
type Pointer struct {
	Raw    string
	Tokens []string
}

// Limits bounds requests to the app.
type Limits struct {
	MaxRequestBytes int64
	PerCaller       *RateLimit
	PerSubject      *RateLimit
	PerTenant       *RateLimit
	PerTool         []ToolRate
	// SubjectClaim and TenantClaim name the token claims perSubject and perTenant count
	// by: "sub" (the verified subject) and "tid" unless the policy says otherwise.
	SubjectClaim string
	TenantClaim  string
	// ResponseHeaders: the answers of admitted calls carry the RateLimit fields too.
	ResponseHeaders bool
}

// ReadsClaims reports whether a limit counts by a token claim other than the verified
// subject (perTenant, perSubject by another claim, perTool per subject or tenant by a
// claim): ext_authz must then hand ext_proc the token's claims.
func (l *Limits) ReadsClaims() bool {
	if l.PerTenant != nil || l.PerSubject != nil && l.SubjectClaim != DefaultSubjectClaim {
		return true
	}
	for _, t := range l.PerTool {
		if (t.Per == PerSubject || t.Per == PerTenant) && t.Claim != DefaultSubjectClaim {
			return true
		}
	}
	return false
}

// ToolRate is a rate limit for tools matching a glob, counted for all callers together
// (Per ""), or per caller, subject or tenant.
type ToolRate struct {
	Tool Glob
	Rate RateLimit
	Per  LimitScope
	// Claim is the token claim of Per subject or tenant ("sub", "tid" by default).
	Claim string
}

// LimitScope says whose calls one bucket counts.
type LimitScope string

// Scopes of a rate limit.
const (
	PerApp     LimitScope = ""
	PerCaller  LimitScope = "caller"
	PerSubject LimitScope = "subject"
	PerTenant  LimitScope = "tenant"
)

// Default claims of perSubject and perTenant.
const (
	DefaultSubjectClaim = "sub"
	DefaultTenantClaim  = "tid"
)

// RateLimit is N requests per Per, with up to Burst at once (Burst 0: N).
type RateLimit struct {
	N     int
	Per   time.Duration
	Burst int
}

// String is the rate as the policy writes it, "100/m", with " burst 20" when the burst
// is not N. It names the rate in bucket keys (extproc), so it must not change.
func (r RateLimit) String() string {
	if r.Burst > 0 && r.Burst != r.N {
		return RateLimit{N: r.N, Per: r.Per}.String() + " burst " + strconv.Itoa(r.Burst)
	}
	unit := r.Per.String() // the policy accepts only s, m and h
	switch r.Per {
	case time.Second:
		unit = "s"
	case time.Minute:
		unit = "m"
	case time.Hour:
		unit = "h"
	}
	return strconv.Itoa(r.N) + "/" + unit
}

// Capacity is the requests a full bucket allows at once.
func (r RateLimit) Capacity() int {
	if r.Burst > 0 {
		return r.Burst
	}
	return r.N
}

// RateLimitStore is where the limits are counted: Redis, shared by the replicas. nil in
// a Mesh: each replica's memory.
type RateLimitStore struct {
	Address      string         // "" with Sentinel
	Cluster      bool           // Address is a node (or configuration endpoint) of a Redis Cluster
	Sentinel     *SentinelStore // nil: Address is the primary
	KeyPrefix    string         // "": the store's default
	DB           int
	PasswordFile string
	TLS          bool
	CAFile       string
	ServerName   string
	FailureMode  FailureMode
	Timeout      time.Duration
}

// SentinelStore is a primary that Redis Sentinel watches and fails over.
type SentinelStore struct {
	MasterName   string
	Addrs        []string // the sentinels, host:port
	PasswordFile string   // the sentinels' own password; "" none
}

// Where names the store for logs and status: its address, or the primary's name and
// the sentinels. It never holds a password.
func (s *RateLimitStore) Where() string {
	if s.Sentinel != nil {
		return s.Sentinel.MasterName + " (sentinel " + strings.Join(s.Sentinel.Addrs, ",") + ")"
	}
	return s.Address
}

// Equal reports whether s and o describe the same store, reached the same way (nil
// equals only nil): a replica keeps its connections across a reload that changes
// neither.
func (s *RateLimitStore) Equal(o *RateLimitStore) bool {
	if s == nil || o == nil {
		return s == o
	}
	a, b := *s, *o
	a.Sentinel, b.Sentinel = nil, nil
	if a != b || (s.Sentinel == nil) != (o.Sentinel == nil) {
		return false
	}
	return s.Sentinel == nil || s.Sentinel.MasterName == o.Sentinel.MasterName &&
		s.Sentinel.PasswordFile == o.Sentinel.PasswordFile && slices.Equal(s.Sentinel.Addrs, o.Sentinel.Addrs)
}

// FailureMode decides limited calls while the shared store is unreachable.
type FailureMode string

// Failure modes.
const (
	FailLocal FailureMode = "local"
	FailDeny  FailureMode = "deny"
	FailAllow FailureMode = "allow"
)

// DefaultRateLimitTimeout and MaxRateLimitTimeout bound one decision in Redis.
const (
	DefaultRateLimitTimeout = 50 * time.Millisecond
	MaxRateLimitTimeout     = time.Second
)

// Resiliency is applied by Envoy to the app's route and cluster.
type Resiliency struct {
	Timeout     time.Duration
	Retries     int
	MaxRequests int
}

// HTTPEndpoint is a remote MCP server reached by name.
type HTTPEndpoint struct {
	Name      string
	Namespace string
	BaseURL   *url.URL
	Headers   map[string]string
	Auth      *HTTPEndpointAuthSpec
	// Callers may use Auth's credentials (App IDs, "*" for every App); empty without
	// Auth.
	Callers     []string
	Passthrough bool
	// SubjectIssuers verify the agent's token before a token exchange
	// (auth.tokenExchange.subjectIssuers).
	SubjectIssuers []*Issuer
	Source         string
}

// MayUseCredentials reports whether the App appID may call the endpoint with the
// credentials of its auth.
func (ep *HTTPEndpoint) MayUseCredentials(appID string) bool {
	for _, c := range ep.Callers {
		if c == "*" || c == appID {
			return true
		}
	}
	return false
}

// Gateway is an edge listener for callers outside the mesh.
type Gateway struct {
	Name      string
	Namespace string
	Port      int
	TLS       *TLSFilesSpec
	Routes    []GatewayRoute
	Source    string
}

// GatewayRoute routes to exactly one of App or Endpoint.
type GatewayRoute struct {
	Host     string
	Path     string
	App      *App
	Endpoint *HTTPEndpoint
}

// Defaults applied when a field is absent.
const (
	DefaultMaxRequestBytes = 1 << 20
	MaxMaxRequestBytes     = 64 << 20
	DefaultDenyErrorCode   = -32001
	DefaultLeeway          = 30 * time.Second
	MaxLeeway              = 5 * time.Minute
	DefaultNamespace       = "default"
)
