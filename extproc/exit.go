package extproc

import (
	"encoding/json"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"

	"github.com/mcpgate/mcpgate/extproc/mcp"
	"github.com/mcpgate/mcpgate/policy/decisionlog"
)

// Every outcome of a request leaves through one of two doors, and each writes the
// decision log line and the metric of every message it concerns exactly once: admit for
// what is forwarded, refuse for what mcpgate answers itself. TestOneExit holds the rest
// of the package to it (no other code answers immediately or records a decision).

// The rules a refusal can name besides the policy's own rule names, "defaultAction" and
// "rego"; they are the decision log's rule values and the metric's rule label (the
// README's decision log section lists them).
const (
	ruleIdentity    = "identity"     // no ext_authz metadata, or a target without mcp policy
	ruleUnavailable = "unavailable"  // no policy loaded yet
	ruleProtocol    = "protocol"     // not MCP Streamable HTTP as mcpgate serves it
	ruleContentType = "content_type" // not application/json in UTF-8
	ruleTooLarge    = "too_large"    // over limits.maxRequestBytes
	ruleParse       = "parse"        // not strict JSON-RPC as MCP uses it
	ruleHeaders     = "headers"      // Mcp-Method/Mcp-Name disagree with the body
	ruleSession     = "session"      // Mcp-Session-Id not bound to this caller
	ruleRateLimit   = "ratelimit"    // a limit of limits (perCaller, perSubject, perTenant, perTool)
	// ruleRateLimitDown: the shared rate-limit store was unreachable, failureMode deny.
	ruleRateLimitDown = "ratelimit_unavailable"
	ruleBatch         = "batch"     // not processed: another message of the batch was denied
	ruleTask          = "task"      // a request about a task: its creator's, while its tool is allowed (tasks.go)
	ruleAbandoned     = "abandoned" // the stream ended before the decision
	ruleResponse      = "response"  // the server's answer could not be filtered
	ruleRego          = "rego"      // Rego's decision, or a patch of it that failed
	ruleExpired       = "expired"   // the token expired (checked again on every gRPC message)
	// rulePolicyChanged: a reload changed what ext_authz decided a gRPC stream on.
	rulePolicyChanged = "policy_changed"
)

// refusal is an answer mcpgate gives instead of the server.
type refusal struct {
	status int // HTTP status
	// grpcCode is the gRPC status of the answer to a gRPC request (0: from status).
	grpcCode codes.Code
	rule     string // what refused: a rule name or one of the rule* constants
	reason   string // why, shown to the caller and logged
	// The body, by default a JSON-RPC error with code for id (nil: null). With errName
	// the body is {"error","reason","decision_id"} instead, for refusals before any
	// JSON-RPC was read (like ext_authz's). With body set, it is the whole answer (the
	// errors of a batch).
	code    int
	id      json.RawMessage
	errName string
	body    []byte
	headers []*corev3.HeaderValueOption
	// records, if set, are the decisions of the messages the refusal answers (one per
	// message of a batch); else the refusal itself is the one record.
	records []procRecord
}

// refuse records r and answers with it.
func (st *stream) refuse(r refusal) *extprocv3.ProcessingResponse {
	if r.records == nil {
		r.records = []procRecord{st.newRecord(Decision{Rule: r.rule, Reason: r.reason}, &st.req, r.id)}
	}
	for i := range r.records {
		r.records[i].status = r.status
		st.s.records.Add(r.records[i])
	}
	if st.span != nil {
		// mcpgate answers: the exchange ends here, whenever Envoy closes the stream.
		st.span.End()
		st.span = nil
	}
	if st.isGRPC {
		// A gRPC client reads the status, not a body: Envoy answers trailers-only, with
		// the body as grpc-message (ext_proc sendImmediateResponse, sendLocalReply).
		code := r.grpcCode
		if code == codes.OK {
			code = grpcCodeOf(r.status)
		}
		resp := st.immediate(200, "application/grpc", []byte(r.reason+" (decision "+st.decisionID+")"), r.headers...)
		resp.GetImmediateResponse().GrpcStatus = &extprocv3.GrpcStatus{Status: uint32(code)}
		return resp
	}
	if r.rule != ruleRateLimit && r.rule != ruleRateLimitDown {
		// A call refused after its limits (by the policy, say) spent from them: the
		// answer says what is left. A limit's own refusal names that limit instead.
		r.headers = append(r.headers, st.quotaHeaders(corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD)...)
	}
	body := r.body
	switch {
	case body != nil:
	case r.errName != "":
		body = httpErrorBody(r.errName, r.reason, st.decisionID)
	default:
		body = errorResponse(r.id, r.code, r.reason+" (decision "+st.decisionID+")")
	}
	return st.immediate(r.status, "application/json", body, r.headers...)
}

// grpcCodeOf is the gRPC status for an HTTP status of a refusal (as Envoy maps them,
// source/common/grpc/status.cc httpToGrpcStatus, with mcpgate's denials as
// PERMISSION_DENIED).
func grpcCodeOf(status int) codes.Code {
	switch status {
	case 400, 413, 415:
		return codes.InvalidArgument
	case 401:
		return codes.Unauthenticated
	case 200, 403:
		return codes.PermissionDenied
	case 404:
		return codes.Unimplemented
	case 429:
		return codes.ResourceExhausted
	case 502, 503:
		return codes.Unavailable
	}
	return codes.Internal
}

// admit records the decisions of messages that go on to the server.
func (st *stream) admit(ds []requestDecision) {
	for _, rd := range ds {
		st.s.records.Add(st.newRecord(rd.d, &rd.r, rd.id))
	}
}

// newRecord is the decision log line and metric of decision d on request r.
func (st *stream) newRecord(d Decision, r *Request, id []byte) procRecord {
	rec := procRecord{
		allow: d.Allow, rule: d.Rule, reason: d.Reason, patches: len(d.Patch),
		id:         append([]byte(nil), id...),
		decisionID: st.decisionID, authzID: st.ident.DecisionID,
		target: st.ident.Target, caller: st.ident.CallerAppID, subject: st.ident.Subject,
		method: r.Method, tool: r.Tool, name: r.Tool + r.Prompt + r.URI,
		elapsed: time.Since(st.start),
	}
	if st.span != nil {
		rec.traceID, rec.spanID = st.traceDecision(&rec)
	}
	return rec
}

// traceDecision puts one decision on the stream's span: an event per message, and the
// span's own attributes say the last (for a single call, the only) one.
func (st *stream) traceDecision(rec *procRecord) (traceID, spanID string) {
	decision := "deny"
	if rec.allow {
		decision = "allow"
	}
	attrs := []attribute.KeyValue{
		decisionlog.AttrDecision.String(decision), decisionlog.AttrRule.String(rec.rule),
		decisionlog.AttrReason.String(clip(rec.reason, maxLogField)), decisionlog.AttrDecisionID.String(rec.decisionID),
		decisionlog.AttrTarget.String(rec.target), decisionlog.AttrCaller.String(rec.caller),
		decisionlog.AttrSubjectHash.String(decisionlog.SubjectHash(rec.subject)),
		decisionlog.AttrMethod.String(clip(rec.method, maxLogField)),
	}
	if rec.tool != "" {
		attrs = append(attrs, decisionlog.AttrTool.String(clip(rec.tool, maxLogField)))
	}
	st.span.AddEvent("mcp decision", trace.WithAttributes(attrs...))
	st.span.SetAttributes(attrs...)
	if !rec.allow {
		st.span.SetStatus(otelcodes.Error, clip(rec.reason, maxLogField))
	}
	return decisionlog.IDs(st.span)
}

// httpErrorBody is {"error":errName,"reason":reason,"decision_id":id} as JSON, whatever
// bytes reason holds.
func httpErrorBody(errName, reason, decisionID string) []byte {
	b := make([]byte, 0, 48+len(errName)+len(reason)+len(decisionID))
	b = append(b, `{"error":`...)
	b = mcp.AppendJSONString(b, errName)
	b = append(b, `,"reason":`...)
	b = mcp.AppendJSONString(b, reason)
	b = append(b, `,"decision_id":`...)
	b = mcp.AppendJSONString(b, decisionID)
	return append(b, '}')
}

// denial answers one denied message. A request gets HTTP 200 with a JSON-RPC error for its
// id (the MCP client reports it to the model as a failed call). Without an id to answer
// (a notification, or a decision made on the Mcp-Method header before the body was read)
// the answer is HTTP 403 with a JSON-RPC error whose id is null.
func (st *stream) denial(d Decision, id []byte) refusal {
	r := refusal{status: 200, rule: d.Rule, reason: "denied by mcpgate: " + d.Reason, code: st.app.MCP.Tools.ErrorCode, id: id}
	if len(id) == 0 {
		r.status, r.id = 403, nil
	}
	return r
}

// refuseBody answers a body of which message k's decision refused it. Any refusal
// refuses a whole batch: each request in it gets an error, the refused one its reason,
// and each decided message is recorded, the others as not processed (ruleBatch).
func (st *stream) refuseBody(b *parsedBody, ds []requestDecision, k int, r refusal) *extprocv3.ProcessingResponse {
	records := make([]procRecord, len(ds))
	for i, rd := range ds {
		d := rd.d
		if i != k && (d.Allow || !b.Batch) {
			d = Decision{Rule: ruleBatch, Reason: "not processed: another message of the batch was denied"}
		}
		if i == k && (d.Allow || d.Rule == "") {
			d = Decision{Rule: r.rule, Reason: r.reason} // refused after its decision allowed it
		}
		records[i] = st.newRecord(d, &ds[i].r, rd.id)
	}
	r.records = records
	if !b.Batch {
		return st.refuse(r)
	}
	var out []byte
	for i, rd := range ds {
		if b.Messages[rd.msgIndex].Kind != kindRequest {
			continue
		}
		reason := "not processed: another message of the batch was denied"
		if i == k {
			reason = r.reason
		} else if !rd.d.Allow {
			reason = "denied by mcpgate: " + rd.d.Reason
		}
		if out == nil {
			out = []byte{'['}
		} else {
			out = append(out, ',')
		}
		out = append(out, errorResponse(rd.id, r.code, reason+" (decision "+st.decisionID+")")...)
	}
	if out == nil {
		r.status, r.id = 403, nil
		return st.refuse(r)
	}
	r.status, r.body = 200, append(out, ']')
	return st.refuse(r)
}
