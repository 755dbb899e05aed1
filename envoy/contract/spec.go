package contract

// Kind says which part of the wire an [Entry] is.
type Kind string

// The kinds of entries.
const (
	KindContextExtension  Kind = "context_extension"
	KindMetadataNamespace Kind = "metadata_namespace"
	KindMetadata          Kind = "metadata"
	KindHeader            Kind = "header"
	KindHeaderPrefix      Kind = "header_prefix"
	KindFormat            Kind = "format"
	KindPathPrefix        Kind = "path_prefix"
)

// Type is the type of an entry's value on the wire.
type Type string

// The types of values. Context extensions and headers are strings by nature; metadata
// values are google.protobuf.Value kinds.
const (
	TypeString     Type = "string"
	TypeStringList Type = "list<string>"
	TypeNumber     Type = "number"
	TypeDecisionID Type = "32 lowercase hex digits"
	TypeJSONObject Type = "string (JSON object)"
)

// Entry is one element of the contract.
type Entry struct {
	Kind Kind
	// Const is the Go name of the entry in this package.
	Const string
	// Name is the entry on the wire: the key, namespace or header name.
	Name   string
	Type   Type
	Writer string
	Reader string
}

// Spec is the whole contract, in the order of a request's path through Envoy. The doc
// comments of the constants say the same in prose; a test keeps them and Spec in step.
var Spec = []Entry{
	{KindContextExtension, "ContextAppID", ContextAppID, TypeString, "xds", "extauthz"},
	{KindContextExtension, "ContextGateway", ContextGateway, TypeString, "xds", "extauthz"},
	{KindContextExtension, "ContextEndpoint", ContextEndpoint, TypeString, "xds (outbound routes with credentials)", "extauthz"},
	{KindContextExtension, "ContextSourceAppID", ContextSourceAppID, TypeString, "xds (outbound routes with credentials)", "extauthz"},
	{KindHeader, "HeaderDaprAppID", HeaderDaprAppID, TypeString, "MCP clients", "Envoy routes built by xds"},
	{KindHeaderPrefix, "InternalHeaderPrefix", InternalHeaderPrefix, TypeString, "extauthz, extproc", "extauthz (strips caller copies)"},
	{KindHeader, "HeaderCallerAppID", HeaderCallerAppID, TypeString, "extauthz", "MCP servers"},
	{KindHeader, "HeaderDaprCallerAppID", HeaderDaprCallerAppID, TypeString, "extauthz", "MCP servers"},
	{KindHeader, "HeaderDaprCallerNamespace", HeaderDaprCallerNamespace, TypeString, "extauthz", "MCP servers"},
	{KindHeader, "HeaderDaprCalleeAppID", HeaderDaprCalleeAppID, TypeString, "extauthz", "MCP servers"},
	{KindHeader, "HeaderSubject", HeaderSubject, TypeString, "extauthz", "MCP servers"},
	{KindHeader, "HeaderDecisionID", HeaderDecisionID, TypeDecisionID, "extauthz, extproc", "operators"},
	{KindMetadataNamespace, "MetadataNamespace", MetadataNamespace, TypeString, "Envoy (from extauthz's answer)", "extproc (forwarded by the envoy builders)"},
	{KindMetadata, "MetaDecisionID", MetaDecisionID, TypeDecisionID, "extauthz", "extproc"},
	{KindMetadata, "MetaTarget", MetaTarget, TypeString, "extauthz", "extproc"},
	{KindMetadata, "MetaCallerAppID", MetaCallerAppID, TypeString, "extauthz", "extproc"},
	{KindMetadata, "MetaCallerNamespace", MetaCallerNamespace, TypeString, "extauthz", "extproc"},
	{KindMetadata, "MetaSpiffeID", MetaSpiffeID, TypeString, "extauthz", "extproc"},
	{KindMetadata, "MetaGateway", MetaGateway, TypeString, "extauthz (gateway routes)", "extproc"},
	{KindMetadata, "MetaSubject", MetaSubject, TypeString, "extauthz (with a token)", "extproc"},
	{KindMetadata, "MetaIssuer", MetaIssuer, TypeString, "extauthz (with a token)", "extproc"},
	{KindMetadata, "MetaScopes", MetaScopes, TypeStringList, "extauthz (with a token)", "extproc"},
	{KindMetadata, "MetaTokenExpiry", MetaTokenExpiry, TypeNumber, "extauthz (with a token)", "extproc"},
	{KindMetadata, "MetaClaimsJSON", MetaClaimsJSON, TypeJSONObject, "extauthz (with a token, targets with Rego or limits by a claim)", "extproc"},
	{KindPathPrefix, "GRPCServicePrefix", GRPCServicePrefix, TypeString, "gRPC MCP clients, xds (route prefix)", "Envoy routes built by xds, extproc"},
	{KindHeader, "HeaderProtocolVersion", HeaderProtocolVersion, TypeString, "MCP clients", "extproc"},
	{KindHeader, "HeaderSessionID", HeaderSessionID, TypeString, "MCP servers, echoed by clients", "extproc"},
	{KindHeader, "HeaderMCPMethod", HeaderMCPMethod, TypeString, "MCP clients", "extproc"},
	{KindHeader, "HeaderMCPName", HeaderMCPName, TypeString, "MCP clients", "extproc"},
	{KindHeader, "HeaderMCPParamPrefix", HeaderMCPParamPrefix, TypeString, "MCP clients", "extproc (checked, rewritten or removed; never decided on)"},
	{KindFormat, "NewDecisionID", "decision id", TypeDecisionID, "extauthz, extproc", "operators, decision logs"},
}
