// Package contract is the wire contract between Envoy and mcpgate's servers: the
// context_extensions the xDS translation puts on routes, the dynamic metadata the ext_authz
// server returns and the ext_proc server reads, the headers mcpgate sets and the ones it
// reads from MCP clients, and the decision-id format. It is the only thing xds, extauthz
// and extproc share about each other; none of them imports another.
//
// Every name here is on the wire between processes that may run different versions during
// a rollout (Envoy keeps its listeners while mcpgate restarts; ext_authz and ext_proc can be
// separate replicas). A key is therefore never renamed or retyped in place: add a new one,
// read both for a release, then drop the old. [Spec] lists every entry with its type,
// writer and reader; testdata/contract.golden pins it, so any change is a visible diff.
package contract

// Context extensions. Envoy sends a route's ExtAuthzPerRoute.check_settings
// .context_extensions in CheckRequest.attributes.context_extensions. They come from
// mcpgate's own configuration of Envoy, never from the caller.
const (
	// ContextAppID (string) is the target App ID of the route. Written by xds (every
	// route to an app or HTTPEndpoint); read by extauthz, which denies without it.
	ContextAppID = "app_id"
	// ContextGateway (string) is the Gateway whose listener the request entered. Written
	// by xds on gateway routes only; read by extauthz (gateway access rules, decision log).
	ContextGateway = "gateway"
	// ContextEndpoint (string) is the HTTPEndpoint of an outbound route whose
	// credentials mcpgate supplies (HTTPEndpoint.spec.auth). Written by xds on those
	// routes of an App's outbound listener only; read by extauthz, which answers them
	// with the upstream's Authorization header instead of an access decision.
	ContextEndpoint = "endpoint"
	// ContextSourceAppID (string) is the App whose sidecar's outbound listener the
	// request entered, next to ContextEndpoint. Written by xds; read by extauthz, which
	// checks it against the HTTPEndpoint's callers and, when Envoy reaches mcpgate over
	// mTLS, against the SPIFFE ID of that connection.
	ContextSourceAppID = "source_app_id"
)

// MetadataNamespace is the dynamic-metadata namespace Envoy stores an ext_authz
// OkHttpResponse.dynamic_metadata under: the filter's canonical name, whatever name the
// filter is given in the listener. Written by Envoy from extauthz's answer; forwarded to
// ext_proc by the envoy builders (metadata_options.forwarding_namespaces.untyped); read
// by extproc, which fails closed when it is absent.
const MetadataNamespace = "envoy.filters.http.ext_authz"

// Dynamic-metadata keys in [MetadataNamespace]. Each is written by extauthz on allowed
// requests only and read by extproc (see [FromMetadata]); a denied request never reaches
// ext_proc.
const (
	// MetaDecisionID (string, [NewDecisionID] format) is the ext_authz decision id, logged
	// by ext_proc as authz_decision_id. Written by extauthz; read by extproc.
	MetaDecisionID = "decision_id"
	// MetaTarget (string) is the target App ID ext_authz allowed (ContextAppID). Written
	// by extauthz; read by extproc, which refuses a request without it.
	MetaTarget = "target_app_id"
	// MetaCallerAppID (string, "" for anonymous callers) is the caller's App ID from its
	// verified SPIFFE identity. Written by extauthz; read by extproc (rules, Rego, limits).
	MetaCallerAppID = "caller_app_id"
	// MetaCallerNamespace (string) is the caller's namespace. Written by extauthz; read by
	// extproc.
	MetaCallerNamespace = "caller_namespace"
	// MetaSpiffeID (string) is the caller's verified SPIFFE ID, "" without mTLS. Written
	// by extauthz; read by extproc (Rego input.caller.spiffe_id).
	MetaSpiffeID = "spiffe_id"
	// MetaGateway (string) is ContextGateway, present only for gateway routes. Written by
	// extauthz; read by extproc.
	MetaGateway = "gateway"
	// MetaSubject (string) is the verified token's sub claim, present only with a bearer
	// token. Written by extauthz; read by extproc (rules, Rego, decision log).
	MetaSubject = "subject"
	// MetaIssuer (string) is the name of the JWTIssuer that verified the token. Written by
	// extauthz; read by extproc.
	MetaIssuer = "issuer"
	// MetaScopes (list of strings) are the token's scopes. Written by extauthz; read by
	// extproc (requiredScopes of tool rules).
	MetaScopes = "scopes"
	// MetaTokenExpiry (number, Unix seconds) is the token's exp claim. Written by extauthz;
	// read by extproc.
	MetaTokenExpiry = "token_exp"
	// MetaClaimsJSON (string, a JSON object) are the token's verified claims, sent only
	// when the target has a Rego policy or a rate limit counted by a claim. Written by
	// extauthz; read by extproc (Rego input.claims, limits' claim values).
	MetaClaimsJSON = "claims_json"
)

// Headers mcpgate sets. Each is also internal (see [IsInternalHeader]): extauthz strips
// any copy the caller sent before the request goes on.
const (
	// HeaderCallerAppID is the caller's verified App ID, set on allowed requests towards
	// the app. Written by extauthz; read by MCP servers behind mcpgate.
	HeaderCallerAppID = "x-mcpgate-caller-app-id"
	// HeaderDaprCallerAppID is HeaderCallerAppID under Dapr's name, for apps written for
	// Dapr service invocation. Written by extauthz; read by MCP servers.
	HeaderDaprCallerAppID = "dapr-caller-app-id"
	// HeaderDaprCallerNamespace is the caller's namespace under Dapr's name, set with
	// HeaderDaprCallerAppID ("default" for JWT-only callers). Written by extauthz; read
	// by MCP servers (Dapr SDKs read it as the caller's identity, with the App ID).
	HeaderDaprCallerNamespace = "dapr-caller-namespace"
	// HeaderDaprCalleeAppID is the target's App ID under Dapr's name, on every allowed
	// request towards the app. Written by extauthz; read by MCP servers.
	HeaderDaprCalleeAppID = "dapr-callee-app-id"
	// HeaderSubject is the token's subject when it is a safe header value (printable
	// ASCII, at most 256 bytes). Written by extauthz; read by MCP servers.
	HeaderSubject = "x-mcpgate-subject"
	// HeaderDecisionID is a decision id ([NewDecisionID] format). Written by extauthz
	// (its id, on the request to the app and on its denials) and by extproc (its id, on
	// every response and immediate response to the client); read by operators, to find
	// the decision-log line.
	HeaderDecisionID = "x-mcpgate-decision-id"
	// InternalHeaderPrefix starts the name of every header mcpgate sets but Dapr's
	// (HeaderDaprCallerAppID, HeaderDaprCallerNamespace, HeaderDaprCalleeAppID). Written by extauthz and extproc only: extauthz strips
	// caller-sent headers with it, also spelt with '_' (see [IsInternalHeader]); read by
	// no one as a value.
	InternalHeaderPrefix = "x-mcpgate-"
)

// Headers mcpgate reads from clients.
const (
	// HeaderDaprAppID names the target app on the Dapr-style header route
	// (/v1.0/invoke/ needs none). Written by MCP clients; read by Envoy, matching the
	// routes xds builds.
	HeaderDaprAppID = "dapr-app-id"
	// HeaderProtocolVersion is MCP's Mcp-Protocol-Version. Written by MCP clients; read
	// by extproc (Rego input.headers).
	HeaderProtocolVersion = "mcp-protocol-version"
	// HeaderSessionID is MCP's Mcp-Session-Id. Written by MCP servers and echoed by
	// clients; read by extproc (Rego input.headers).
	HeaderSessionID = "mcp-session-id"
	// HeaderMCPMethod is MCP 2026-07-28's Mcp-Method, naming the JSON-RPC method so
	// proxies can decide before the body. Written by MCP clients; read by extproc, which
	// decides on it early and refuses a body that disagrees (400, -32020). Client-
	// injectable: on a request whose Mcp-Protocol-Version is older than 2026-07-28 it
	// means nothing, is never decided on, and extproc removes it before the upstream.
	HeaderMCPMethod = "mcp-method"
	// HeaderMCPName is MCP 2026-07-28's Mcp-Name (the tool, prompt or resource). Written
	// by MCP clients; read by extproc, like HeaderMCPMethod (checked, or removed on
	// legacy requests).
	HeaderMCPName = "mcp-name"
	// HeaderMCPParamPrefix starts MCP 2026-07-28's Mcp-Param-{Name} headers: tool
	// arguments a client mirrors because the tool's inputSchema annotates them with
	// x-mcp-header. Written by MCP clients; read by extproc, which decides nothing on
	// them but checks each against the body once a tools/list showed the tool's
	// annotations (400, -32020 on a disagreement), rewrites one whose argument a Rego
	// patch changed, and removes before the upstream every one it did not validate as
	// bound (legacy requests, other methods, unannotated names). Headers of a tool no
	// list has shown yet pass unchanged: the server must check them itself.
	HeaderMCPParamPrefix = "mcp-param-"
)

// GRPCServicePrefix is the path prefix of every method of the gRPC MCP service
// (proto/mcpgate/mcp/v1/mcp.proto): a gRPC request's :path is /<package>.<service>/<method>
// (gRPC over HTTP/2, "Path"), so "/mcpgate.mcp.v1.McpService/CallTool" is one call.
// Written by gRPC MCP clients (as the request path) and by xds (the route prefix of apps
// with mcp.transport grpc); read by Envoy, matching those routes, and by extproc, which
// names the method from the rest of the path (extproc.GRPCService has the same value).
const GRPCServicePrefix = "/mcpgate.mcp.v1.McpService/"

// SetHeaders are the request headers mcpgate sets towards an app, by name: where no
// extauthz Check strips what a caller sent (the routes to HTTPEndpoints, on which
// ext_authz runs only while mcpgate supplies a token), xds has the router remove them,
// so no upstream sees a caller's forgery of an identity mcpgate would vouch for. (Any
// other x-mcpgate- name means nothing to anyone; the listeners reject the '_' spellings.)
func SetHeaders() []string {
	return []string{HeaderCallerAppID, HeaderDaprCallerAppID, HeaderDaprCallerNamespace, HeaderDaprCalleeAppID, HeaderSubject, HeaderDecisionID}
}

// IsInternalHeader reports whether a request header is one only mcpgate may set:
// extauthz removes any the caller sent. Names match in any ASCII case and with '_' for
// any '-' ("x_mcpgate_caller_app_id", "X-MCPGATE_subject"): many servers read them as
// the same header (CGI-style environment variables such as HTTP_X_MCPGATE_CALLER_APP_ID,
// frameworks that fold '_' into '-'), so a caller could otherwise forge an identity
// under another spelling. The Envoy listeners refuse such names first
// (headers_with_underscores_action: REJECT_REQUEST); this holds even where one does not.
func IsInternalHeader(key string) bool {
	return sameHeaderName(key, HeaderDaprCallerAppID) || sameHeaderName(key, HeaderDaprCallerNamespace) || sameHeaderName(key, HeaderDaprCalleeAppID) ||
		len(key) >= len(InternalHeaderPrefix) && sameHeaderName(key[:len(InternalHeaderPrefix)], InternalHeaderPrefix)
}

// sameHeaderName reports whether key spells name (lower case, '-' separated) in any
// ASCII case and with '_' for any '-'. It allocates nothing: extauthz calls it for
// every header of every request.
func sameHeaderName(key, name string) bool {
	if len(key) != len(name) {
		return false
	}
	for i := 0; i < len(key); i++ {
		c := key[i]
		switch {
		case c == '_':
			c = '-'
		case 'A' <= c && c <= 'Z':
			c += 'a' - 'A'
		}
		if c != name[i] {
			return false
		}
	}
	return true
}
