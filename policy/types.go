// Package policy loads mcpgate's App-ID policy files, validates them and compiles them into
// an immutable Snapshot that ext_authz, ext_proc and xDS read.
//
// The YAML field names are the user-facing contract described in DESIGN.md: add fields
// where a capability needs them, never rename or drop one.
package policy

import "go.yaml.in/yaml/v3"

// APIVersion is the only apiVersion mcpgate accepts.
const APIVersion = "mcpgate.dev/v1alpha1"

// Kinds of policy documents.
const (
	KindMesh         = "Mesh"
	KindApp          = "App"
	KindHTTPEndpoint = "HTTPEndpoint"
	KindGateway      = "Gateway"
)

// Metadata names a document. For an App the name is its App ID.
type Metadata struct {
	Name        string            `yaml:"name"`
	Namespace   string            `yaml:"namespace"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

// MTLSMode says how sidecars authenticate each other.
type MTLSMode string

// mTLS modes. Strict is the default: a caller without a SPIFFE identity is refused.
const (
	MTLSStrict     MTLSMode = "strict"
	MTLSPermissive MTLSMode = "permissive"
	MTLSDisabled   MTLSMode = "disabled"
)

// Action is allow or deny.
type Action string

// Actions.
const (
	Allow Action = "allow"
	Deny  Action = "deny"
)

// MeshSpec is the spec of the one Mesh document: trust domain, mTLS mode, where Envoy
// reaches mcpgate, where Envoy gets certificates, and the trusted token issuers.
type MeshSpec struct {
	TrustDomain string       `yaml:"trustDomain"`
	MTLS        MTLSMode     `yaml:"mtls"`
	Authz       AuthzSpec    `yaml:"authz"`
	SDS         SDSSpec      `yaml:"sds"`
	Issuers     []IssuerSpec `yaml:"issuers"`
	// RateLimits says where the rate limits of every App are counted: without redis,
	// in each replica's memory.
	RateLimits RateLimitsSpec `yaml:"rateLimits"`
	// Tracing turns on OpenTelemetry traces: every Envoy's and mcpgate's own spans,
	// exported over OTLP/gRPC (Dapr's Configuration shape).
	Tracing *TracingSpec `yaml:"tracing"`
}

// TracingSpec samples traces and says where they go.
type TracingSpec struct {
	// SamplingRate is the fraction of new traces kept, "0" to "1" (a string, as in
	// Dapr's Configuration); a call whose caller already sampled it is kept.
	SamplingRate string   `yaml:"samplingRate"`
	OTLP         OTLPSpec `yaml:"otlp"`
}

// OTLPSpec is an OTLP/gRPC collector.
type OTLPSpec struct {
	Address  string `yaml:"address"`  // host:port
	IsSecure bool   `yaml:"isSecure"` // TLS to the collector (system roots)
}

// RateLimitsSpec is the store of the rate limits that replicas share.
type RateLimitsSpec struct {
	Redis *RedisSpec `yaml:"redis"`
	// FailureMode decides a limited call while Redis is down or slow: local (count in
	// this replica's memory, the default), deny or allow.
	FailureMode string `yaml:"failureMode"`
	// Timeout bounds one decision in Redis (default 50ms, at most 1s).
	Timeout Duration `yaml:"timeout"`
}

// RedisSpec is a standalone Redis (or a Sentinel-managed primary behind one address), or
// a Redis Cluster.
type RedisSpec struct {
	// Address is host:port, or unix:///path/to.sock.
	Address string `yaml:"address"`
	// Cluster: Address is one node of a Redis Cluster, or a managed service's
	// configuration endpoint; the other nodes are learnt from it. Database 0 only.
	Cluster bool `yaml:"cluster"`
	// Sentinel finds the primary through Redis Sentinel, instead of Address.
	Sentinel *SentinelSpec `yaml:"sentinel"`
	// KeyPrefix starts every key mcpgate writes (default "mcpgate:rl:"): meshes sharing
	// one Redis keep their limits and tasks apart with their own, as db cannot on a
	// cluster.
	KeyPrefix string `yaml:"keyPrefix"`
	// TLS is true (the system's roots) or {caFile, serverName}.
	TLS          TLSSpec `yaml:"tls"`
	PasswordFile string  `yaml:"passwordFile"`
	DB           int     `yaml:"db"`
}

// SentinelSpec is a primary watched by Redis Sentinel.
type SentinelSpec struct {
	// MasterName is the name the sentinels monitor the primary under.
	MasterName string `yaml:"masterName"`
	// Addresses are the sentinels, host:port (26379 is Sentinel's port).
	Addresses []string `yaml:"addresses"`
	// PasswordFile holds the sentinels' own password, if they require one.
	PasswordFile string `yaml:"passwordFile"`
}

// TLSSpec is written true or false, or as a mapping (which means true).
type TLSSpec struct {
	Enabled    bool   `yaml:"-"`
	CAFile     string `yaml:"caFile"`
	ServerName string `yaml:"serverName"`
}

// UnmarshalYAML reads true/false or the mapping. The walker has checked the shape.
func (t *TLSSpec) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		return n.Decode(&t.Enabled)
	}
	type plain TLSSpec
	if err := n.Decode((*plain)(t)); err != nil {
		return err
	}
	t.Enabled = true
	return nil
}

// AuthzSpec says where Envoy reaches mcpgate's ext_authz and ext_proc gRPC server.
type AuthzSpec struct {
	Address string `yaml:"address"`
	// SpiffeID, when set, is mcpgate's own SPIFFE ID (mcpgate serve --spiffe-socket):
	// Envoys then reach mcpgate over mTLS, presenting their SVID and accepting only this
	// identity, for ext_authz/ext_proc and for xDS.
	SpiffeID string `yaml:"spiffeId"`
}

// SDSSpec says where Envoy gets its certificates: the SPIRE agent's SDS socket or files.
type SDSSpec struct {
	SpireAgentSocket string `yaml:"spireAgentSocket"`
	CertDir          string `yaml:"certDir"`
}

// IssuerSpec is a trusted JWT issuer.
type IssuerSpec struct {
	Name       string   `yaml:"name"`
	Issuer     string   `yaml:"issuer"`
	JWKSURI    string   `yaml:"jwksUri"`
	Audiences  []string `yaml:"audiences"`
	AppIDClaim string   `yaml:"appIdClaim"`
	// Leeway is the clock skew allowed on exp, nbf and iat (default 30s, at most 5m).
	Leeway Duration `yaml:"leeway"`
}

// AppSpec is the spec of an App document: one per App ID.
type AppSpec struct {
	Address string       `yaml:"address"`
	Sidecar *SidecarSpec `yaml:"sidecar"`
	MCP     *MCPSpec     `yaml:"mcp"`
}

// SidecarSpec says where the app's Envoy sidecar listens.
type SidecarSpec struct {
	Address      string `yaml:"address"`
	InboundPort  int    `yaml:"inboundPort"`
	OutboundPort int    `yaml:"outboundPort"`
	// GatewayPort is where the sidecar takes the traffic of Gateways that route to the
	// app: over mTLS, from those Gateways' SPIFFE IDs only, straight to the app (the
	// Gateway has enforced the app's policy). Required for an app a Gateway routes to
	// unless the Mesh has mtls: disabled.
	GatewayPort int `yaml:"gatewayPort"`
}

// MCPSpec is present when the app serves MCP; it holds every MCP policy of the app.
type MCPSpec struct {
	// Transport is how the app serves MCP: "streamable-http" (the default) or "grpc"
	// (mcpgate.mcp.v1.McpService, proto/mcpgate/mcp/v1/mcp.proto).
	Transport string `yaml:"transport"`
	// Path is the Streamable HTTP endpoint (default /mcp); not set with transport grpc,
	// whose service path is fixed.
	Path           string             `yaml:"path"`
	Resource       string             `yaml:"resource"`
	Authentication AuthenticationSpec `yaml:"authentication"`
	AccessControl  AccessControlSpec  `yaml:"accessControl"`
	Tools          ToolsSpec          `yaml:"tools"`
	Responses      ResponsesSpec      `yaml:"responses"`
	Limits         LimitsSpec         `yaml:"limits"`
	Resiliency     ResiliencySpec     `yaml:"resiliency"`
	// CORS lets browser-based MCP clients on the listed origins call the app: Envoy
	// answers their preflights from this policy (granting nothing else) and adds the
	// Access-Control-* headers to responses. Absent, preflights are refused.
	CORS *CORSSpec `yaml:"cors"`
}

// CORSSpec is the CORS policy of an app's MCP endpoint. Every list left out takes the
// default that MCP's Streamable HTTP transport needs (DefaultCORS*).
type CORSSpec struct {
	// AllowOrigins are exact origins (scheme://host[:port], as browsers send them) or
	// "*" for any origin (not with allowCredentials).
	AllowOrigins     []string `yaml:"allowOrigins"`
	AllowMethods     []string `yaml:"allowMethods"`
	AllowHeaders     []string `yaml:"allowHeaders"`
	ExposeHeaders    []string `yaml:"exposeHeaders"`
	MaxAge           Duration `yaml:"maxAge"`
	AllowCredentials bool     `yaml:"allowCredentials"`
}

// AuthenticationSpec says which bearer tokens the app accepts.
type AuthenticationSpec struct {
	Required bool     `yaml:"required"`
	Issuers  []string `yaml:"issuers"`
	// Audiences are the "aud" values that make a token this app's (default: its
	// resource, as MCP clients ask for with RFC 8707 resource=). A token must name one
	// of them as well as one of its issuer's audiences: a token minted for another MCP
	// server of the mesh is not accepted here, even from the same issuer.
	Audiences []string `yaml:"audiences"`
	Scopes    []string `yaml:"scopes"`
}

// AccessControlSpec has the shape and semantics of Dapr's Configuration accessControl:
// the caller's policy applies if there is one, the top-level defaultAction otherwise.
type AccessControlSpec struct {
	DefaultAction Action             `yaml:"defaultAction"`
	TrustDomain   string             `yaml:"trustDomain"`
	Policies      []AccessPolicySpec `yaml:"policies"`
}

// AccessPolicySpec is the access policy for one calling App ID.
type AccessPolicySpec struct {
	AppID         string          `yaml:"appId"`
	Namespace     string          `yaml:"namespace"`
	TrustDomain   string          `yaml:"trustDomain"`
	DefaultAction Action          `yaml:"defaultAction"`
	Operations    []OperationSpec `yaml:"operations"`
}

// OperationSpec allows or denies a path (prefix or wildcard) for some HTTP verbs.
type OperationSpec struct {
	Name     string   `yaml:"name"`
	HTTPVerb []string `yaml:"httpVerb"`
	Action   Action   `yaml:"action"`
}

// ToolsSpec decides per MCP request: rules in order, first match wins, then Rego.
type ToolsSpec struct {
	DefaultAction Action     `yaml:"defaultAction"`
	Rules         []RuleSpec `yaml:"rules"`
	// Rego is a Rego file, relative to the policy file, defining data.mcpgate.decision.
	Rego string `yaml:"rego"`
	// ErrorCode is the JSON-RPC error code of a denial (default -32001).
	ErrorCode int `yaml:"errorCode"`
	// Pinning compares the tool definitions the server lists with pins (pin.go).
	Pinning PinningSpec `yaml:"pinning"`
}

// PinningSpec turns tool-definition pinning on: mode off (default), record (learn the
// definitions the server lists) or enforce (hide and refuse tools that differ from their
// pin or have none). File is the pin file, relative to the policy file (default
// pins/<app>.yaml).
type PinningSpec struct {
	Mode string `yaml:"mode"`
	File string `yaml:"file"`
}

// RuleSpec matches MCP requests. Every matcher that is set must match; a rule with no
// matchers matches every request of its callers.
type RuleSpec struct {
	Name      string   `yaml:"name"`
	Callers   []string `yaml:"callers"`
	Subjects  []string `yaml:"subjects"`
	Scopes    []string `yaml:"scopes"`
	Methods   []string `yaml:"methods"`
	Tools     []string `yaml:"tools"`
	Prompts   []string `yaml:"prompts"`
	Resources []string `yaml:"resources"`
	Action    Action   `yaml:"action"`
}

// ResponsesSpec says how responses are filtered and redacted.
type ResponsesSpec struct {
	FilterToolsList bool         `yaml:"filterToolsList"`
	Redact          []RedactSpec `yaml:"redact"`
}

// RedactSpec removes JSON pointers from the results of the named tools.
type RedactSpec struct {
	Tools    []string `yaml:"tools"`
	Pointers []string `yaml:"pointers"`
}

// LimitsSpec bounds requests.
type LimitsSpec struct {
	MaxRequestBytes int64    `yaml:"maxRequestBytes"`
	PerCaller       RateSpec `yaml:"perCaller"`
	// PerSubject limits each user: the verified token's sub (or claim), whatever App
	// they call through; requests without a token share one allowance.
	PerSubject RateSpec `yaml:"perSubject"`
	// PerTenant limits each tenant: a claim of the verified token (claim, default tid);
	// requests without it share one allowance.
	PerTenant RateSpec `yaml:"perTenant"`
	// PerTool limits the tools matching each glob: all callers together, or each
	// caller, subject or tenant on its own (per).
	PerTool map[string]RateSpec `yaml:"perTool"`
	// ResponseHeaders adds the IETF RateLimit-Policy and RateLimit fields of the limits a
	// message passed to every answer of an admitted call, not only to the 429 of a
	// refused one.
	ResponseHeaders bool `yaml:"responseHeaders"`
}

// RateSpec is a rate, written "100/m", or a mapping: {rate: 100/m, burst: 20} and, where
// they apply, per (perTool: app, caller, subject or tenant) and claim (perSubject,
// perTenant, and perTool per subject or tenant).
type RateSpec struct {
	Rate  Rate   `yaml:"rate"`
	Burst int    `yaml:"burst"`
	Per   string `yaml:"per"`
	Claim string `yaml:"claim"`
}

// UnmarshalYAML reads the short form "N/s" or the mapping. The walker has checked the
// shape.
func (r *RateSpec) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.ScalarNode {
		r.Rate = Rate(n.Value)
		return nil
	}
	type plain RateSpec
	return n.Decode((*plain)(r))
}

func (r RateSpec) isZero() bool { return r == RateSpec{} }

// ResiliencySpec is applied by Envoy on the route and cluster of the app.
type ResiliencySpec struct {
	Timeout        Duration           `yaml:"timeout"`
	Retries        int                `yaml:"retries"`
	CircuitBreaker CircuitBreakerSpec `yaml:"circuitBreaker"`
}

// CircuitBreakerSpec bounds concurrent requests to the app.
type CircuitBreakerSpec struct {
	MaxRequests int `yaml:"maxRequests"`
}

// HTTPEndpointSpec is a remote MCP server reached by name, like Dapr's HTTPEndpoint.
type HTTPEndpointSpec struct {
	BaseURL string                `yaml:"baseUrl"`
	Headers map[string]string     `yaml:"headers"`
	Auth    *HTTPEndpointAuthSpec `yaml:"auth"`
	// Callers are the App IDs whose sidecars may call the endpoint with the credentials
	// of auth ("*": every App). Required with auth: a token mcpgate acquires is spent
	// only for the Apps named here.
	Callers []string `yaml:"callers"`
	// Passthrough keeps the Authorization header the agent sent. Off by default: the
	// header is removed before the call leaves the sidecar, because an agent's header
	// is usually a token someone gave it for another audience, and the MCP
	// authorization spec forbids passing such tokens through. Not allowed with auth.
	Passthrough bool `yaml:"passthrough"`
}

// HTTPEndpointAuthSpec says how mcpgate authenticates to a remote endpoint: exactly one
// grant.
type HTTPEndpointAuthSpec struct {
	ClientCredentials *ClientCredentialsSpec `yaml:"clientCredentials"`
	TokenExchange     *TokenExchangeSpec     `yaml:"tokenExchange"`
}

// TokenExchangeSpec is an OAuth 2.0 token exchange (RFC 8693): the bearer token the agent
// sends (the signed-in user's, verified against subjectIssuers) is exchanged for a token
// for the upstream, which gets that token instead. mcpgate authenticates to the token
// endpoint as a client, like clientCredentials.
type TokenExchangeSpec struct {
	TokenURL         string   `yaml:"tokenUrl"`
	ClientID         string   `yaml:"clientId"`
	ClientSecretFile string   `yaml:"clientSecretFile"`
	AuthMethod       string   `yaml:"authMethod"`
	Scopes           []string `yaml:"scopes"`
	Audience         string   `yaml:"audience"`
	Resource         string   `yaml:"resource"`
	// SubjectIssuers name the Mesh issuers the agent's token must verify against before
	// it is exchanged.
	SubjectIssuers []string `yaml:"subjectIssuers"`
}

// ClientCredentialsSpec is an OAuth 2.0 client credentials grant. The secret is read from
// a file so that it never sits in the policy.
type ClientCredentialsSpec struct {
	TokenURL         string   `yaml:"tokenUrl"`
	ClientID         string   `yaml:"clientId"`
	ClientSecretFile string   `yaml:"clientSecretFile"`
	Scopes           []string `yaml:"scopes"`
	// AuthMethod is how the client authenticates to the token endpoint:
	// client_secret_basic (default), client_secret_post, or private_key_jwt (RFC 7523:
	// a client assertion signed with privateKeyFile instead of a secret).
	AuthMethod string `yaml:"authMethod"`
	// PrivateKeyFile is the PEM RSA or EC key of private_key_jwt, re-read at every
	// fetch; KeyID its kid, as registered with the authorization server.
	PrivateKeyFile string `yaml:"privateKeyFile"`
	KeyID          string `yaml:"keyId"`
	// Audience and Resource (RFC 8707) name the upstream the token is for, as the
	// authorization server expects.
	Audience string `yaml:"audience"`
	Resource string `yaml:"resource"`
}

// GatewaySpec is an edge Envoy for callers outside the mesh (JWT only).
type GatewaySpec struct {
	Listener GatewayListenerSpec `yaml:"listener"`
	Routes   []GatewayRouteSpec  `yaml:"routes"`
}

// GatewayListenerSpec is the gateway's listening port and TLS certificate.
type GatewayListenerSpec struct {
	Port int           `yaml:"port"`
	TLS  *TLSFilesSpec `yaml:"tls"`
}

// TLSFilesSpec names a certificate and key on the Envoy's file system.
type TLSFilesSpec struct {
	CertFile string `yaml:"certFile"`
	KeyFile  string `yaml:"keyFile"`
}

// GatewayRouteSpec routes host and path to an App or an HTTPEndpoint.
type GatewayRouteSpec struct {
	Host     string `yaml:"host"`
	Path     string `yaml:"path"`
	App      string `yaml:"app"`
	Endpoint string `yaml:"endpoint"`
}

// Duration is a Go duration string such as "30s", parsed during validation so that a bad
// value is reported with its file and line.
type Duration string

// Rate is "N/s", "N/m" or "N/h", parsed during validation.
type Rate string
