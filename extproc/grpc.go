package extproc

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"time"

	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extproc/grpcframe"
	"github.com/mcpgate/mcpgate/extproc/mcp"
	"github.com/mcpgate/mcpgate/policy"
	mcpv1 "github.com/mcpgate/mcpgate/proto/mcpgate/mcp/v1"
)

// gRPC MCP (proto/mcpgate/mcp/v1/mcp.proto). A request whose Content-Type is
// application/grpc is one RPC of mcpgate.mcp.v1.McpService. Its body reaches ext_proc in
// STREAMED mode, chunk by chunk (the route's per-filter processing mode): every request
// message is decided on its own as it completes, and only allowed messages go on.
//
// Every message is checked against the token's expiry, the rate limits (per message, not
// per call) and the tool rules and Rego, as the same MCP request over Streamable HTTP.
// A refused message ends the RPC with a gRPC status (trailers-only when nothing was
// answered yet, else Envoy resets the stream): ext_proc cannot originate a message on
// the response stream, and silently dropping one would leave the client waiting for an
// answer that never comes. Messages before it went on and stay answered.

// GRPCService is the path prefix of the gRPC MCP service's methods.
const GRPCService = contract.GRPCServicePrefix

// grpcMethod is what mcpgate knows of one method of the service.
type grpcMethod struct {
	name       string // e.g. "CallTool"
	mcpMethod  string // its MCP method; "" for Session (each message says)
	newRequest func() proto.Message
}

var grpcMethods = map[string]grpcMethod{}

func init() {
	for _, m := range []grpcMethod{
		{"Initialize", "initialize", func() proto.Message { return new(mcpv1.InitializeRequest) }},
		{"ListTools", "tools/list", func() proto.Message { return new(mcpv1.ListToolsRequest) }},
		{"CallTool", "tools/call", func() proto.Message { return new(mcpv1.CallToolRequest) }},
		{"CallToolStream", "tools/call", func() proto.Message { return new(mcpv1.CallToolStreamRequest) }},
		{"ListResources", "resources/list", func() proto.Message { return new(mcpv1.ListResourcesRequest) }},
		{"ReadResource", "resources/read", func() proto.Message { return new(mcpv1.ReadResourceRequest) }},
		{"ListPrompts", "prompts/list", func() proto.Message { return new(mcpv1.ListPromptsRequest) }},
		{"GetPrompt", "prompts/get", func() proto.Message { return new(mcpv1.GetPromptRequest) }},
		{"Session", "", func() proto.Message { return new(mcpv1.SessionRequest) }},
	} {
		grpcMethods[m.name] = m
	}
}

// grpcStream is the gRPC state of a stream.
type grpcStream struct {
	method  grpcMethod
	in, out grpcframe.Framer
	index   int // request messages decided so far
	// steps are the rewrites the response needs: by request_id for Session, "" for the
	// one call of the other methods.
	steps map[string]responseStep
	seen  map[string]bool // Session request_ids used so far
	// The two directions of a stream interleave: the server may answer (response
	// headers, messages) while the client still sends.
	requestDone, responseStarted, responseBody bool
}

// handleGRPC is handle for a gRPC stream, whose request body and response overlap.
func (st *stream) handleGRPC(ctx context.Context, req *extprocv3.ProcessingRequest) (*extprocv3.ProcessingResponse, error) {
	g := st.grpc
	switch r := req.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestBody:
		if g.requestDone {
			return nil, errProtocol("request body after its end")
		}
		return st.grpcBody(ctx, r.RequestBody), nil
	case *extprocv3.ProcessingRequest_RequestTrailers:
		g.requestDone = true
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{RequestTrailers: &extprocv3.TrailersResponse{}}}, nil
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		if g.responseStarted {
			return nil, errProtocol("response headers twice")
		}
		g.responseStarted = true
		return st.responseHeaders(r.ResponseHeaders), nil
	case *extprocv3.ProcessingRequest_ResponseBody:
		if !g.responseBody {
			return nil, errProtocol("response body not requested")
		}
		return st.grpcResponseBody(r.ResponseBody), nil
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{ResponseTrailers: &extprocv3.TrailersResponse{}}}, nil
	case *extprocv3.ProcessingRequest_RequestHeaders:
		return nil, errProtocol("request headers twice")
	default:
		return nil, errProtocol("unknown message %T", r)
	}
}

// grpcMode is the processing mode of a gRPC MCP route (envoy.GRPCProcessingMode), with
// the response body as given. A mode_override replaces the whole mode, the request side
// included (ext_proc.cc onReceiveMessage: both states take it), so it must keep the
// request body STREAMED: messages a client sends after the response began are still
// decided.
func grpcMode(responseBody extprocfilterv3.ProcessingMode_BodySendMode) *extprocfilterv3.ProcessingMode {
	return &extprocfilterv3.ProcessingMode{
		RequestHeaderMode:   extprocfilterv3.ProcessingMode_SEND,
		ResponseHeaderMode:  extprocfilterv3.ProcessingMode_SEND,
		RequestBodyMode:     extprocfilterv3.ProcessingMode_STREAMED,
		ResponseBodyMode:    responseBody,
		RequestTrailerMode:  extprocfilterv3.ProcessingMode_SKIP,
		ResponseTrailerMode: extprocfilterv3.ProcessingMode_SKIP,
	}
}

// isGRPC reports whether a Content-Type names gRPC (application/grpc, +proto, ...).
func isGRPC(contentType string) bool {
	mt, _, _ := strings.Cut(contentType, ";")
	mt = strings.TrimSpace(strings.ToLower(mt))
	return mt == "application/grpc" || strings.HasPrefix(mt, "application/grpc+")
}

// grpcHeaders starts deciding a gRPC MCP RPC.
func (st *stream) grpcHeaders(encoding string, endOfStream bool) *extprocv3.ProcessingResponse {
	name, ok := strings.CutPrefix(st.req.Path, GRPCService)
	m, known := grpcMethods[name]
	if st.req.HTTPMethod != "POST" || !ok || !known {
		return st.refuse(refusal{status: 404, grpcCode: codes.Unimplemented, rule: ruleProtocol,
			reason: "not a method of mcpgate.mcp.v1.McpService: " + strconvQuote(clip(st.req.Path, 128))})
	}
	g := &grpcStream{method: m, steps: map[string]responseStep{}, seen: map[string]bool{}}
	g.in.MaxMessageBytes, g.out.MaxMessageBytes = int(st.maxLen), int(policy.MaxMaxRequestBytes)
	switch strings.ToLower(encoding) {
	case "", "identity":
	case "gzip":
		g.in.Decompress = grpcframe.Gzip(int(st.maxLen))
	default:
		return st.refuse(refusal{status: 415, grpcCode: codes.Unimplemented, rule: ruleContentType,
			reason: "grpc-encoding " + strconvQuote(clip(encoding, 32)) + " cannot be inspected: use identity or gzip"})
	}
	st.grpc = g
	st.req.Transport, st.req.GRPCMethod, st.req.Method = "grpc", name, m.mcpMethod
	if r, ok := st.checkExpiry(); !ok {
		return st.refuse(r)
	}
	if endOfStream {
		return st.refuse(refusal{status: 400, grpcCode: codes.InvalidArgument, rule: ruleParse, reason: "a gRPC request without a message"})
	}
	return st.continueHeaders(st.upstreamHeaders())
}

// followPolicy moves a long stream to the policy in force, so that each message is
// decided by it, as a new request would be: a reload that revokes a tool or lowers a
// limit applies to open streams from their next message. What ext_authz decided when the
// stream opened (may this caller reach the app at all) is not decided again here: if the
// reload changed what it depends on, the stream is ended (UNAVAILABLE, which gRPC
// clients retry), and the new stream goes through ext_authz.
func (st *stream) followPolicy() (refusal, bool) {
	cur := st.s.store.Current()
	if cur == st.snap || cur == nil {
		return refusal{}, true
	}
	app := cur.App(st.ident.Target)
	if app == nil || app.MCP == nil {
		return refusal{status: 403, grpcCode: codes.PermissionDenied, rule: ruleIdentity,
			reason: "target app " + strconvQuote(st.ident.Target) + " has no mcp policy since the policy was reloaded"}, false
	}
	if !authorizedAlike(st.snap, cur, st.ident) {
		return refusal{status: 503, grpcCode: codes.Unavailable, rule: rulePolicyChanged,
			reason: "the app's access control or authentication changed since this stream opened: open a new stream"}, false
	}
	st.snap, st.app = cur, app
	st.maxLen = app.MCP.Limits.MaxRequestBytes
	st.grpc.in.MaxMessageBytes = int(st.maxLen)
	return refusal{}, true
}

// authorizedAlike reports whether ext_authz would decide a stream of id alike under
// next as under prev: the same access control and authentication for its target, the same
// mesh identity settings (trust domain, mTLS), and, through a gateway, the same gateway
// and routes.
func authorizedAlike(prev, next *policy.Snapshot, id contract.Identity) bool {
	if prev.Version == next.Version {
		return true // the same files
	}
	if prev.Mesh.TrustDomain != next.Mesh.TrustDomain || prev.Mesh.MTLS != next.Mesh.MTLS {
		return false
	}
	a, b := prev.App(id.Target).MCP, next.App(id.Target).MCP
	if a == nil || !reflect.DeepEqual(a.AccessControl, b.AccessControl) || !reflect.DeepEqual(a.Authentication, b.Authentication) {
		return false
	}
	if id.Gateway == "" {
		return true
	}
	g, h := prev.Gateways[id.Gateway], next.Gateways[id.Gateway]
	if g == nil || h == nil || g.Namespace != h.Namespace || g.Port != h.Port || !reflect.DeepEqual(g.TLS, h.TLS) || len(g.Routes) != len(h.Routes) {
		return false
	}
	for i, r := range g.Routes {
		q := h.Routes[i]
		if r.Host != q.Host || r.Path != q.Path || (r.App == nil) != (q.App == nil) || r.App != nil && r.App.ID != q.App.ID ||
			(r.Endpoint == nil) != (q.Endpoint == nil) || r.Endpoint != nil && r.Endpoint.Name != q.Endpoint.Name {
			return false
		}
	}
	return true
}

// checkExpiry refuses a request whose token has expired: on a long stream it is checked
// again for every message.
func (st *stream) checkExpiry() (refusal, bool) {
	exp := st.ident.TokenExpiry
	if exp == 0 || st.s.now().Unix() < exp {
		return refusal{}, true
	}
	return refusal{status: 401, grpcCode: codes.Unauthenticated, rule: ruleExpired,
		reason: "the bearer token expired at " + time.Unix(exp, 0).UTC().Format(time.RFC3339) + ": open a new stream with a fresh token"}, false
}

// grpcBody decides the request messages a chunk completes and forwards the allowed ones.
func (st *stream) grpcBody(ctx context.Context, b *extprocv3.HttpBody) *extprocv3.ProcessingResponse {
	st.start = time.Now()
	g := st.grpc
	msgs, err := g.in.Feed(b.GetBody(), b.GetEndOfStream())
	if err != nil {
		return st.refuse(refusal{status: 400, grpcCode: codes.InvalidArgument, rule: ruleParse, reason: err.Error()})
	}
	// The messages of this chunk go on only if all of them do: a refusal answers the
	// request instead of the chunk, so the allowed ones before it in the chunk are
	// recorded as not processed.
	var out []byte
	var pending []requestDecision
	refuse := func(rf refusal) *extprocv3.ProcessingResponse {
		if len(pending) > 0 {
			rf.records = make([]procRecord, 0, len(pending)+1)
			for i := range pending {
				rf.records = append(rf.records, st.newRecord(Decision{Rule: ruleBatch, Reason: "not processed: a later message of the same chunk was refused"}, &pending[i].r, nil))
			}
			rf.records = append(rf.records, st.newRecord(Decision{Rule: rf.rule, Reason: rf.reason}, &st.req, nil))
		}
		return st.refuse(rf)
	}
	for _, m := range msgs {
		if ctx.Err() != nil {
			return refuse(refusal{status: 503, grpcCode: codes.Unavailable, rule: ruleAbandoned, reason: "the request ended before mcpgate decided it"})
		}
		if rf, ok := st.followPolicy(); !ok {
			return refuse(rf)
		}
		r, requestID, err := st.grpcRequest(m.Data)
		if err != nil {
			return refuse(refusal{status: 400, grpcCode: codes.InvalidArgument, rule: ruleParse, reason: fmt.Sprintf("message %d: %v", g.index, err)})
		}
		r.MessageIndex = g.index
		g.index++
		st.req = r
		if rf, ok := st.checkExpiry(); !ok {
			return refuse(rf)
		}
		if v, refused := st.rateLimit(ctx, &r, time.Now()); refused {
			code := codes.ResourceExhausted
			if v.status == 503 {
				code = codes.Unavailable
			}
			return refuse(refusal{status: v.status, grpcCode: code, rule: v.rule, reason: v.reason + "; retry after " + retryAfter(v.wait) + "s"})
		}
		d := Decide(ctx, st.app.MCP, &r)
		if d.Allow && r.Method == "tools/call" {
			if pd, ok := st.pinDecision(r.Tool); ok {
				d = pd // a tool without a pin (ListTools definitions are not compared yet)
			}
		}
		if !d.Allow {
			rf := st.denial(d, nil)
			rf.grpcCode = codes.PermissionDenied
			return refuse(rf)
		}
		if len(d.Patch) > 0 {
			// Argument patches need a JSON body to patch; on gRPC they are refused
			// rather than ignored.
			return refuse(refusal{status: 200, grpcCode: codes.PermissionDenied, rule: ruleRego, reason: "rego argument patches are not applied to gRPC calls"})
		}
		pending = append(pending, requestDecision{d: d, r: r})
		if step, ok := st.grpcStep(ctx, &r, d); ok {
			g.steps[requestID] = step
		}
		out = grpcframe.Append(out, m.Data)
	}
	st.admit(pending)
	if b.GetEndOfStream() {
		g.requestDone = true
	}
	common := &extprocv3.CommonResponse{}
	if string(out) != string(b.GetBody()) {
		if len(out) == 0 {
			common.BodyMutation = &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_ClearBody{ClearBody: true}}
		} else {
			common.BodyMutation = &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: out}}
		}
	}
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
		RequestBody: &extprocv3.BodyResponse{Response: common},
	}}
}

// grpcRequest decodes one request message as the MCP request it carries, and its
// request_id on a Session.
func (st *stream) grpcRequest(data []byte) (Request, string, error) {
	g := st.grpc
	msg := g.method.newRequest()
	if err := proto.Unmarshal(data, msg); err != nil {
		return Request{}, "", err
	}
	r := st.req
	r.Method, r.Tool, r.Prompt, r.URI, r.Arguments = g.method.mcpMethod, "", "", "", nil
	id := ""
	if s, ok := msg.(*mcpv1.SessionRequest); ok {
		id = s.GetRequestId()
		switch q := s.GetRequest().(type) {
		case *mcpv1.SessionRequest_CallTool:
			r.Method, msg = "tools/call", q.CallTool
		case *mcpv1.SessionRequest_ListTools:
			r.Method = "tools/list"
		case *mcpv1.SessionRequest_ListResources:
			r.Method = "resources/list"
		case *mcpv1.SessionRequest_ReadResource:
			r.Method, msg = "resources/read", q.ReadResource
		case *mcpv1.SessionRequest_ListPrompts:
			r.Method = "prompts/list"
		case *mcpv1.SessionRequest_GetPrompt:
			r.Method, msg = "prompts/get", q.GetPrompt
		default:
			return Request{}, "", fmt.Errorf("a Session message carries no request")
		}
		if g.seen[id] {
			return Request{}, "", fmt.Errorf("request_id %q is already in use on this stream", clip(id, 64))
		}
		g.seen[id] = true
	}
	if c, ok := msg.(*mcpv1.CallToolStreamRequest); ok {
		msg = c.GetCall()
	}
	switch q := msg.(type) {
	case *mcpv1.CallToolRequest:
		if q.GetName() == "" {
			return Request{}, "", fmt.Errorf("tools/call without a tool name")
		}
		r.Tool = q.GetName()
		if a := q.GetArguments(); a != nil {
			r.Arguments = jsonNumbers(a.AsMap())
		}
	case *mcpv1.ReadResourceRequest:
		r.URI = q.GetUri()
	case *mcpv1.GetPromptRequest:
		r.Prompt = q.GetName()
	}
	r.ID = id
	return r, id, nil
}

// jsonNumbers turns float64 numbers into json.Number, as Streamable HTTP arguments are
// decoded, so that rules and Rego see the same values on both transports.
func jsonNumbers(m map[string]any) map[string]any {
	var conv func(any) any
	conv = func(v any) any {
		switch x := v.(type) {
		case float64:
			return json.Number(fmt.Sprint(x))
		case map[string]any:
			for k, e := range x {
				x[k] = conv(e)
			}
		case []any:
			for i, e := range x {
				x[i] = conv(e)
			}
		}
		return v
	}
	conv(m)
	return m
}

// grpcStep plans what the response to r needs: tools/list filtered, tool results
// redacted.
func (st *stream) grpcStep(ctx context.Context, r *Request, d Decision) (responseStep, bool) {
	m := st.app.MCP
	var step responseStep
	if r.Method == "tools/list" {
		st.planToolsList(ctx, &step)
		step.private, step.addScope = false, false // no cacheScope on the gRPC transport
	}
	if r.Method == "tools/call" {
		step.redact = append(toolRedactions(m, r.Tool), pointerTokens(d.Redact)...)
	}
	return step, step.filtersList() || len(step.redact) > 0
}

// grpcResponseHeaders asks for the response messages when some need rewriting.
func (st *stream) grpcResponseHeaders(out *extprocv3.ProcessingResponse, contentType, encoding string) *extprocv3.ProcessingResponse {
	if len(st.grpc.steps) == 0 {
		return out
	}
	if !isGRPC(contentType) {
		return st.responseRefusal("mcpgate cannot filter a gRPC response with Content-Type " + strconvQuote(clip(contentType, 64)))
	}
	switch strings.ToLower(encoding) {
	case "", "identity":
	case "gzip":
		st.grpc.out.Decompress = grpcframe.Gzip(int(policy.MaxMaxRequestBytes))
	default:
		return st.responseRefusal("mcpgate cannot filter a gRPC response with grpc-encoding " + strconvQuote(clip(encoding, 32)))
	}
	out.ModeOverride = grpcMode(extprocfilterv3.ProcessingMode_STREAMED)
	st.grpc.responseBody = true
	return out
}

// grpcResponseBody rewrites the response messages a chunk completes.
func (st *stream) grpcResponseBody(b *extprocv3.HttpBody) *extprocv3.ProcessingResponse {
	g := st.grpc
	msgs, err := g.out.Feed(b.GetBody(), b.GetEndOfStream())
	if err != nil {
		return st.responseRefusal("mcpgate could not read the server's gRPC messages: " + err.Error())
	}
	var out []byte
	for _, m := range msgs {
		data, err := st.grpcRewrite(m.Data)
		if err != nil {
			return st.responseRefusal("mcpgate could not filter the server's gRPC message: " + err.Error())
		}
		out = grpcframe.Append(out, data)
	}
	wrap := func(c *extprocv3.CommonResponse) *extprocv3.ProcessingResponse {
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{ResponseBody: &extprocv3.BodyResponse{Response: c}}}
	}
	if string(out) == string(b.GetBody()) {
		return wrap(&extprocv3.CommonResponse{})
	}
	if len(out) == 0 {
		return wrap(&extprocv3.CommonResponse{BodyMutation: &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_ClearBody{ClearBody: true}}})
	}
	return wrap(&extprocv3.CommonResponse{BodyMutation: &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: out}}})
}

// grpcRewrite applies the planned step to one response message.
func (st *stream) grpcRewrite(data []byte) ([]byte, error) {
	g := st.grpc
	var msg proto.Message
	switch g.method.name {
	case "ListTools":
		msg = new(mcpv1.ListToolsResponse)
	case "CallTool":
		msg = new(mcpv1.CallToolResponse)
	case "CallToolStream":
		msg = new(mcpv1.CallToolStreamResponse)
	case "Session":
		msg = new(mcpv1.SessionResponse)
	default:
		return data, nil
	}
	if err := proto.Unmarshal(data, msg); err != nil {
		return nil, err
	}
	key := ""
	if s, ok := msg.(*mcpv1.SessionResponse); ok {
		key = s.GetRequestId()
		switch r := s.GetResponse().(type) {
		case *mcpv1.SessionResponse_ListTools:
			msg = r.ListTools
		case *mcpv1.SessionResponse_CallTool:
			msg = r.CallTool
		default:
			return data, nil
		}
	}
	if c, ok := msg.(*mcpv1.CallToolStreamResponse); ok {
		if c.GetResult() == nil {
			return data, nil // progress
		}
		msg = c.GetResult()
	}
	step, ok := g.steps[key]
	if !ok {
		return data, nil
	}
	switch r := msg.(type) {
	case *mcpv1.ListToolsResponse:
		if step.filtersList() {
			names := make([]string, len(r.GetTools()))
			for i, t := range r.GetTools() {
				names[i] = t.GetName()
			}
			keep, replace, err := step.decideList(names, func() [][]byte {
				entries := make([][]byte, len(names))
				for i, t := range r.GetTools() {
					entries[i] = grpcToolJSON(t)
				}
				return entries
			})
			if err != nil {
				return nil, err
			}
			kept := r.Tools[:0]
			for i, t := range r.GetTools() {
				if keep[i] && t.GetName() != "" {
					if replace != nil && replace[i] != nil {
						if err := setGRPCOutputSchema(t, replace[i]); err != nil {
							return nil, err
						}
					}
					kept = append(kept, t)
				}
			}
			r.Tools = kept
		}
	case *mcpv1.CallToolResponse:
		if len(step.redact) > 0 {
			if err := redactGRPC(r, step.redact); err != nil {
				return nil, err
			}
		}
	}
	return proto.Marshal(g.rootOf(msg, data))
}

// rootOf returns the top-level message that was decoded from data and holds msg (the
// nested messages were changed in place).
func (g *grpcStream) rootOf(msg proto.Message, data []byte) proto.Message {
	switch g.method.name {
	case "Session", "CallToolStream":
		// Decode again and put the changed part back: the wrappers were not kept.
		var root proto.Message
		if g.method.name == "Session" {
			s := new(mcpv1.SessionResponse)
			_ = proto.Unmarshal(data, s)
			switch s.GetResponse().(type) {
			case *mcpv1.SessionResponse_ListTools:
				s.Response = &mcpv1.SessionResponse_ListTools{ListTools: msg.(*mcpv1.ListToolsResponse)}
			case *mcpv1.SessionResponse_CallTool:
				s.Response = &mcpv1.SessionResponse_CallTool{CallTool: msg.(*mcpv1.CallToolResponse)}
			}
			root = s
		} else {
			root = &mcpv1.CallToolStreamResponse{Event: &mcpv1.CallToolStreamResponse_Result{Result: msg.(*mcpv1.CallToolResponse)}}
		}
		return root
	}
	return msg
}

// redactGRPC removes the pointers from a tool result exactly as Streamable HTTP results
// are redacted: the result goes through mcp.Redact as the JSON it stands for (its
// structuredContent and any text content mirroring it as JSON), and comes back.
func redactGRPC(r *mcpv1.CallToolResponse, pointers [][]string) error {
	// Each block carries its index, so blocks Redact drops (text mirroring a redacted
	// structuredContent can go whole) are told apart from the ones it keeps.
	const idx = "mcpgate_block"
	content := make([]any, len(r.GetContent()))
	for i, c := range r.GetContent() {
		content[i] = map[string]any{"type": c.GetType(), "text": c.GetText(), idx: i}
	}
	result := map[string]any{"content": content, "isError": r.GetIsError()}
	if sc := r.GetStructuredContent(); sc != nil {
		result["structuredContent"] = sc.AsMap()
	}
	resp, err := json.Marshal(map[string]any{"jsonrpc": "2.0", "id": 1, "result": result})
	if err != nil {
		return err
	}
	out, _, err := mcp.Redact(resp, pointers)
	if err != nil {
		return err
	}
	var back struct {
		Result struct {
			Content []struct {
				Text  string `json:"text"`
				Block *int   `json:"mcpgate_block"`
			} `json:"content"`
			StructuredContent map[string]any `json:"structuredContent"`
		} `json:"result"`
	}
	if err := json.Unmarshal(out, &back); err != nil {
		return err
	}
	kept := make([]*mcpv1.Content, 0, len(back.Result.Content))
	for _, c := range back.Result.Content {
		if c.Block == nil || *c.Block < 0 || *c.Block >= len(r.GetContent()) {
			return fmt.Errorf("redaction lost track of a content block")
		}
		b := r.Content[*c.Block]
		if b.GetType() == "text" {
			b.Text = c.Text
		}
		kept = append(kept, b)
	}
	r.Content = kept
	r.StructuredContent = nil
	if back.Result.StructuredContent != nil {
		sc, err := structpb.NewStruct(back.Result.StructuredContent)
		if err != nil {
			return err
		}
		r.StructuredContent = sc
	}
	return nil
}

// setGRPCOutputSchema sets a tool's output_schema from a tool definition's JSON as
// PruneOutputSchema rewrote it (no outputSchema: none).
func setGRPCOutputSchema(t *mcpv1.Tool, entry []byte) error {
	var def struct {
		OutputSchema json.RawMessage `json:"outputSchema"`
	}
	if err := json.Unmarshal(entry, &def); err != nil {
		return fmt.Errorf("tool %s: %w", clip(t.GetName(), 64), err)
	}
	if len(def.OutputSchema) == 0 {
		t.OutputSchema = nil
		return nil
	}
	var st structpb.Struct
	if err := protojson.Unmarshal(def.OutputSchema, &st); err != nil {
		return fmt.Errorf("tool %s: outputSchema: %w", clip(t.GetName(), 64), err)
	}
	t.OutputSchema = &st
	return nil
}
