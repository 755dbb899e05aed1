package extproc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/open-policy-agent/opa/v1/topdown"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extproc/mcp"
	"github.com/mcpgate/mcpgate/policy"
	"github.com/mcpgate/mcpgate/policy/decisionlog"
)

// CodeHeaderMismatch is the JSON-RPC error for Mcp-Method/Mcp-Name headers that disagree
// with the body (MCP 2026-07-28).
const CodeHeaderMismatch = -32020

// Options configure a Server.
type Options struct {
	Store       *policy.Store
	DecisionLog *zap.Logger
	// Tracer records a span per request stream under the policy's Mesh.spec.tracing, the
	// child of the request's traceparent; nil: no spans.
	Tracer *decisionlog.Tracer
	// Log is for what operators need to know beyond decisions: the rate-limit store
	// going down and coming back.
	Log   *zap.Logger
	Meter metric.Meter
	// SessionKey binds the Mcp-Session-Id values clients see to the caller that opened
	// the session (see session.go): SessionKeyBytes of secret. Replicas behind the same
	// Envoys need the same key. Empty: a random key for this process, so sessions do not
	// survive a restart and every replica binds its own (clients re-initialize on 404).
	SessionKey []byte
}

// Server implements envoy.service.ext_proc.v3.ExternalProcessor.
type Server struct {
	extprocv3.UnimplementedExternalProcessorServer

	store      *policy.Store
	tracer     *decisionlog.Tracer
	sessionKey []byte
	now        func() time.Time // the clock token expiry is checked with
	log        *zap.Logger
	count      metric.Int64Counter
	latency    metric.Float64Histogram
	// countAttrs caches the attribute sets of count; tools bounds its tool label (tool
	// names come from callers: the first 200 per app of at most 128 bytes become labels).
	countAttrs *decisionlog.AttrSets[countKey]
	tools      *decisionlog.Labels
	// listCache holds list-time decisions (see listFilter); rego the cached parts of
	// Rego inputs.
	listCache decisionCache
	rego      *regoCaches
	// limits are the in-process buckets of the limits; shared the Redis store when the
	// Mesh names one (limits.go); limitCount counts their decisions.
	limits     limiters
	shared     sharedLimits
	limitCount metric.Int64Counter
	limitAttrs sync.Map // limitCountKey -> metric.AddOption

	// pins are what the lists of pinning apps showed (pinning.go); params what the lists
	// showed of tools' x-mcp-header annotations (params.go).
	pins   *pinState
	params *paramState
	// tasks are the MCP tasks callers created through this replica (tasks.go).
	tasks taskTable

	// records are logged and counted by one background goroutine, off the request path;
	// no audit line is ever dropped (see decisionlog.Queue.Add).
	records *decisionlog.Queue[procRecord]
}

// NewServer returns a Server reading policy from opts.Store.
func NewServer(opts Options) (*Server, error) {
	key := opts.SessionKey
	if len(key) == 0 {
		var err error
		if key, err = NewSessionKey(); err != nil {
			return nil, err
		}
	} else if len(key) < SessionKeyBytes {
		return nil, fmt.Errorf("session key: %d bytes, want at least %d", len(key), SessionKeyBytes)
	}
	s := &Server{store: opts.Store, tracer: opts.Tracer, sessionKey: key, now: time.Now, log: opts.DecisionLog, listCache: decisionCache{max: listCacheSize},
		countAttrs: decisionlog.NewAttrSets(10000, countSet), tools: decisionlog.NewLabels(200, 128),
		rego: newRegoCaches()}
	if s.log == nil {
		s.log = zap.NewNop()
	}
	s.shared.log = opts.Log
	if s.shared.log == nil {
		s.shared.log = zap.NewNop()
	}
	meter := opts.Meter
	if meter == nil {
		meter = noop.NewMeterProvider().Meter("")
	}
	var err error
	if s.count, err = meter.Int64Counter("mcpgate.mcp.decisions",
		metric.WithDescription("per-message MCP decisions by target, caller, method, tool, decision and rule")); err != nil {
		return nil, err
	}
	if s.latency, err = meter.Float64Histogram("mcpgate.mcp.decision.duration", metric.WithUnit("s"),
		metric.WithDescription("time to decide one MCP request body (parse, rules, Rego)"),
		metric.WithExplicitBucketBoundaries(.00001, .000025, .00005, .0001, .00025, .0005, .001, .0025, .005, .01, .05, .25, 1)); err != nil {
		return nil, err
	}
	if s.shared.dur, err = meter.Float64Histogram("mcpgate.ratelimit.store.duration", metric.WithUnit("s"),
		metric.WithDescription("round trips to the shared rate-limit store (Redis) by op (decide, refund) and result (ok, error)"),
		metric.WithExplicitBucketBoundaries(.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1)); err != nil {
		return nil, err
	}
	if s.limitCount, err = meter.Int64Counter("mcpgate.ratelimit.decisions",
		metric.WithDescription("rate-limit decisions per bucket kind (key: caller, subject, tenant, tool) by target and decision (allowed, refused, local_*, unavailable_*)")); err != nil {
		return nil, err
	}
	if s.pins, err = newPinState(meter, s.shared.log); err != nil {
		return nil, err
	}
	s.params = newParamState()
	if _, err = meter.Int64ObservableGauge("mcpgate.mcp.cache.entries",
		metric.WithDescription("entries of ext_proc's bounded caches: list-time decisions, Rego identity and target terms, rate-limit buckets"),
		metric.WithInt64Callback(s.observeCaches)); err != nil {
		return nil, err
	}
	s.records = decisionlog.New(func(batch []procRecord) {
		for i := range batch {
			s.record(&batch[i])
		}
	})
	return s, nil
}

var (
	cacheList       = metric.WithAttributeSet(attribute.NewSet(attribute.String("cache", "list_decisions")))
	cacheIdentities = metric.WithAttributeSet(attribute.NewSet(attribute.String("cache", "rego_identities")))
	cacheTargets    = metric.WithAttributeSet(attribute.NewSet(attribute.String("cache", "rego_targets")))
	cacheBuckets    = metric.WithAttributeSet(attribute.NewSet(attribute.String("cache", "ratelimit_buckets")))
)

func (s *Server) observeCaches(_ context.Context, o metric.Int64Observer) error {
	o.Observe(int64(s.listCache.len()), cacheList)
	o.Observe(int64(s.rego.identities.len()), cacheIdentities)
	o.Observe(int64(s.rego.targets.len()), cacheTargets)
	o.Observe(int64(s.limits.len()), cacheBuckets)
	return nil
}

// Process handles one HTTP request's stream: Envoy opens one per request and sends its
// phases in order (ext_proc.cc, processor_state.cc). End of stream and cancellation are
// normal endings: Envoy closes the stream once it expects no more replies, and cancels it
// when the downstream client goes away.
func (s *Server) Process(srv extprocv3.ExternalProcessor_ProcessServer) error {
	st := &stream{s: s, cancel: topdown.NewCancel()}
	ctx := srv.Context()
	// One canceller per stream stops a running Rego evaluation when Envoy goes away
	// (without one, OPA watches ctx with a new goroutine for every evaluation).
	defer context.AfterFunc(ctx, st.cancel.Cancel)()
	defer func() {
		st.takeEarly().release() // the body never came
		if st.span != nil {
			st.span.End()
		}
	}()
	for {
		req, err := srv.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled || ctx.Err() != nil {
				return nil
			}
			return err
		}
		resp, err := st.handle(ctx, req)
		if err != nil {
			return err
		}
		if err := srv.Send(resp); err != nil {
			return err
		}
	}
}

type phase uint8

const (
	expectRequestHeaders phase = iota
	expectRequestBody
	expectResponseHeaders
	expectResponseBody
	answered // an immediate response was sent; Envoy sends nothing more
)

// stream is the state of one HTTP request.
type stream struct {
	s     *Server
	phase phase

	ident  contract.Identity
	snap   *policy.Snapshot
	app    *policy.App
	req    Request
	maxLen int64

	mcpMethodHeader, mcpNameHeader string
	// mirrored are the MCP 2026-07-28 mirror headers of a legacy request (Mcp-Method,
	// Mcp-Name, Mcp-Param-*): meaningless there, unvalidated, so removed upstream.
	mirrored []string
	// params are the Mcp-Param-* headers of a 2026-07-28 request, lower-cased name →
	// every value sent (params.go).
	params map[string][]string
	// observing: the response is read only to learn from (responseStep.observeOnly);
	// unread: it could not be, and passes unchanged.
	observing, unread bool
	// errorStatus: the status of a non-2xx response that must be rewritten
	// (errorResponseHeaders); errorJSON: its body may be JSON-RPC mcpgate can read.
	errorStatus     string
	errorJSON       bool
	decisionID      string
	start           time.Time      // when deciding began
	cancel          topdown.Cancel // cancelled when the stream's context ends
	plan            []responseStep
	upstreamSession string                     // the server's session id, when one was presented
	isGRPC          bool                       // the request is gRPC MCP (grpc.go)
	claims          map[string]json.RawMessage // the token's, once a limit needs one (claim)
	early           *earlyLimit                // the limits decided on the headers, until the body uses them
	quota           []quotaField               // what the limits passed have left (limits.responseHeaders)
	span            trace.Span                 // nil unless traced; ended with the stream
	grpc            *grpcStream
	answering       []json.RawMessage // ids of the requests of the body
	rewriters       []rewriter
}

// errProtocol ends a stream whose messages do not follow Envoy's order: Envoy then fails
// the request closed (failure_mode_allow: false). Nothing out of order is ever processed.
func errProtocol(format string, args ...any) error {
	return status.Errorf(codes.FailedPrecondition, "ext_proc protocol: "+format, args...)
}

func (st *stream) handle(ctx context.Context, req *extprocv3.ProcessingRequest) (*extprocv3.ProcessingResponse, error) {
	if st.phase == answered {
		return nil, errProtocol("message after an immediate response")
	}
	if st.grpc != nil {
		return st.handleGRPC(ctx, req)
	}
	switch r := req.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		if st.phase != expectRequestHeaders {
			return nil, errProtocol("request headers twice")
		}
		return st.requestHeaders(ctx, req, r.RequestHeaders), nil
	case *extprocv3.ProcessingRequest_RequestBody:
		if st.phase != expectRequestBody {
			return nil, errProtocol("request body not expected here")
		}
		resp := st.requestBody(ctx, r.RequestBody)
		// An early decision on the limits that the body did not use (it was not the
		// message decided on, or it was refused first) takes nothing.
		st.takeEarly().release()
		return resp, nil
	case *extprocv3.ProcessingRequest_RequestTrailers:
		// Trailers are not part of an MCP decision; they pass unchanged.
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{RequestTrailers: &extprocv3.TrailersResponse{}}}, nil
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		if st.phase != expectResponseHeaders {
			return nil, errProtocol("response headers before the request was decided")
		}
		return st.responseHeaders(r.ResponseHeaders), nil
	case *extprocv3.ProcessingRequest_ResponseBody:
		if st.phase != expectResponseBody {
			return nil, errProtocol("response body not requested")
		}
		return st.responseBody(r.ResponseBody), nil
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{ResponseTrailers: &extprocv3.TrailersResponse{}}}, nil
	default:
		return nil, errProtocol("unknown message %T", r)
	}
}

// regoHeaders are the request headers Rego sees. Credentials (authorization, cookies) are
// never among them.
var regoHeaders = map[string]bool{
	"content-type": true, "accept": true, "user-agent": true, "x-request-id": true,
	contract.HeaderProtocolVersion: true, contract.HeaderSessionID: true, contract.HeaderMCPMethod: true, contract.HeaderMCPName: true,
}

func (st *stream) requestHeaders(ctx context.Context, req *extprocv3.ProcessingRequest, h *extprocv3.HttpHeaders) *extprocv3.ProcessingResponse {
	st.decisionID = contract.NewDecisionID()
	st.start = time.Now()
	ident, err := contract.FromMetadata(req.GetMetadataContext())
	if err != nil {
		// Without ext_authz's verdict there is no caller to decide for: fail closed.
		return st.refuse(refusal{status: 403, rule: ruleIdentity, errName: "access_denied", reason: err.Error()})
	}
	st.ident = ident
	st.snap = st.s.store.Current()
	if st.snap == nil {
		return st.refuse(refusal{status: 503, rule: ruleUnavailable, errName: "unavailable", reason: "mcpgate has no policy loaded yet"})
	}
	st.app = st.snap.App(ident.Target)
	if st.app == nil || st.app.MCP == nil {
		return st.refuse(refusal{status: 403, rule: ruleIdentity, errName: "access_denied", reason: "target app " + strconvQuote(ident.Target) + " has no mcp policy"})
	}
	st.maxLen = st.app.MCP.Limits.MaxRequestBytes

	st.req = Request{
		Caller:   policy.Caller{AppID: ident.CallerAppID, Namespace: ident.CallerNamespace},
		SpiffeID: ident.SpiffeID, Subject: ident.Subject, Scopes: ident.Scopes,
		ClaimsJSON: ident.ClaimsJSON, Target: ident.Target, Headers: map[string]string{},
	}
	var contentType, contentLength, lastEventID, grpcEncoding, traceparent string
	contentTypes, sessions := 0, 0
	for _, hv := range h.GetHeaders().GetHeaders() {
		k, v := strings.ToLower(hv.GetKey()), contract.HeaderValue(hv)
		switch k {
		case ":method":
			st.req.HTTPMethod = v
		case ":path":
			st.req.Path, _, _ = strings.Cut(v, "?")
		case "content-type":
			contentType = v
			contentTypes++
		case "content-length":
			contentLength = v
		case contract.HeaderProtocolVersion:
			st.req.ProtocolVersion = v
		case contract.HeaderSessionID:
			st.req.SessionID = v
			sessions++
		case contract.HeaderMCPMethod:
			st.mcpMethodHeader = v
		case contract.HeaderMCPName:
			st.mcpNameHeader = v
		case "last-event-id":
			lastEventID = v
		case "grpc-encoding":
			grpcEncoding = v
		case "traceparent":
			traceparent = v
		}
		if regoHeaders[k] {
			st.req.Headers[k] = v
		}
		if strings.HasPrefix(k, paramHeaderPrefix) || k == contract.HeaderMCPMethod || k == contract.HeaderMCPName {
			st.mirrored = append(st.mirrored, k)
		}
		if strings.HasPrefix(k, paramHeaderPrefix) {
			if st.params == nil {
				st.params = map[string][]string{}
			}
			st.params[k] = append(st.params[k], v)
		}
	}
	// The protocol era comes from the version the request says it speaks, not from the
	// headers' presence: before 2026-07-28 the mirror headers mean nothing, so nothing is
	// decided or checked on them (a legacy client cannot trigger a -32020), and they do
	// not reach the server or anything after mcpgate unvalidated. From 2026-07-28 on
	// they are checked against the body before any decision uses them.
	if mirrorEra(st.req.ProtocolVersion) {
		st.mirrored = nil
	} else {
		st.mcpMethodHeader, st.mcpNameHeader, st.params = "", "", nil
	}
	if t := st.s.tracer; t != nil {
		t.Apply(st.snap.Mesh.Tracing)
		if t.Enabled() {
			_, st.span = t.Start(ctx, traceparent, "mcpgate ext_proc")
			if !st.span.IsRecording() {
				st.span.End()
				st.span = nil
			}
		}
	}

	if sessions > 1 {
		return st.refuse(refusal{status: 400, rule: ruleSession, code: -32600, reason: "more than one Mcp-Session-Id header"})
	}
	if sessions == 1 {
		sid, err := st.s.unbindSession(st.req.SessionID, identityOf(st.ident))
		if err != nil {
			st.req.SessionID = ""
			return st.refuse(refusal{status: 404, rule: ruleSession, code: -32001, reason: err.Error()})
		}
		st.req.SessionID, st.upstreamSession = sid, sid
		if _, ok := st.req.Headers[contract.HeaderSessionID]; ok {
			st.req.Headers[contract.HeaderSessionID] = sid
		}
	}

	if st.app.MCP.Tools.Rego != nil {
		st.req.base = newRegoBase(&st.req, st.s.rego)
		st.req.base.cancel = st.cancel
	}
	if contentTypes > 1 {
		// Servers keep the first or the last, or join them: which one is read is not ours
		// to guess.
		return st.refuse(refusal{status: 415, rule: ruleContentType, code: -32600, reason: "more than one Content-Type header"})
	}
	if isGRPC(contentType) {
		st.isGRPC = true
		return st.grpcHeaders(grpcEncoding, h.GetEndOfStream())
	}
	switch st.req.HTTPMethod {
	case "POST":
	case "GET", "DELETE":
		// GET opens the server's event stream and DELETE ends a session: neither carries a
		// client message to decide on, and ext_authz already admitted the caller.
		st.req.Method = st.req.HTTPMethod + " " + st.req.Path
		if st.req.HTTPMethod == "GET" && lastEventID != "" && filtersResponses(st.app.MCP) {
			// Resuming replays responses to earlier POSTs on this GET stream, where they
			// could no longer be matched to their request: a caller could cut a call short
			// and resume to read its unredacted result. Refuse rather than leak.
			return st.refuse(refusal{status: 403, rule: ruleProtocol, errName: "access_denied",
				reason: "stream resumption (Last-Event-ID) is not available for apps whose responses are filtered or redacted"})
		}
		st.admit([]requestDecision{{d: Decision{Allow: true, Rule: ruleProtocol}, r: st.req}})
		st.phase = expectResponseHeaders
		if st.req.HTTPMethod == "GET" && filtersResponses(st.app.MCP) {
			// A GET stream must carry no responses (MCP Streamable HTTP: only a resumed
			// stream may); for such apps any response on it ends the stream.
			st.plan = []responseStep{{noResponses: true}}
		}
		return st.continueHeaders(st.upstreamHeaders())
	default:
		return st.refuse(refusal{status: 405, rule: ruleProtocol, errName: "method_not_allowed", reason: "MCP Streamable HTTP uses POST, GET and DELETE"})
	}

	if msg := checkRequestContentType(contentType); msg != "" {
		return st.refuse(refusal{status: 415, rule: ruleContentType, code: -32600, reason: msg})
	}
	if n, err := strconv.ParseInt(contentLength, 10, 64); err == nil && n > st.maxLen {
		return st.refuse(st.tooLarge())
	}
	if h.GetEndOfStream() {
		return st.refuse(refusal{status: 400, rule: ruleParse, code: -32700, reason: "empty request body"})
	}
	// Decide early on the MCP 2026-07-28 headers: a denied call need not be buffered.
	if st.mcpMethodHeader != "" {
		early := st.req
		early.Method = st.mcpMethodHeader
		setTarget(&early, st.mcpMethodHeader, st.mcpNameHeader)
		if d := decideRules(st.app.MCP, &early); !d.Allow {
			st.req = early
			return st.refuse(st.denial(d, nil))
		}
	}
	st.limitEarly(ctx, time.Now())
	st.phase = expectRequestBody
	return st.continueHeaders(st.upstreamHeaders())
}

// upstreamHeaders is the request header mutation for the upstream. For apps whose
// responses mcpgate may filter or redact, Accept-Encoding is removed: a compressed
// response could not be read, so servers must answer uncompressed (an encoded response
// to a filtered exchange is refused: see responseHeaders). Envoy's own compressor filter,
// if a listener has one, still compresses for the client after ext_proc.
//
// A bound session id goes upstream as the server's own id.
func (st *stream) upstreamHeaders() *extprocv3.HeaderMutation {
	var mut *extprocv3.HeaderMutation
	if filtersResponses(st.app.MCP) {
		mut = &extprocv3.HeaderMutation{RemoveHeaders: []string{"accept-encoding"}}
	}
	if st.upstreamSession != "" {
		if mut == nil {
			mut = &extprocv3.HeaderMutation{}
		}
		mut.SetHeaders = append(mut.SetHeaders, rawHeader(contract.HeaderSessionID, st.upstreamSession))
	}
	if len(st.mirrored) > 0 {
		if mut == nil {
			mut = &extprocv3.HeaderMutation{}
		}
		mut.RemoveHeaders = append(mut.RemoveHeaders, st.mirrored...)
	}
	return mut
}

// batchEra reports whether a body of this protocol version may be a JSON-RPC batch: only
// 2025-03-26, the version of a request without the header; later versions send one
// message per POST. Limits decided on the headers (earlyChecks) rely on it too.
func batchEra(version string) bool { return version == "" || version == "2025-03-26" }

// mirrorEra reports whether a protocol version mirrors the JSON-RPC method, name and
// annotated arguments in headers (MCP 2026-07-28 and later; versions are dates, and a
// request without the header speaks 2025-03-26).
func mirrorEra(version string) bool { return version >= "2026-07-28" }

// checkRequestContentType accepts application/json with, at most, charset=utf-8, and
// says what is wrong otherwise. mcpgate decides on the body read as UTF-8 JSON; a server
// honouring another charset (Express's JSON parser decodes any utf-*, UTF-7 included)
// would read another document than the one decided on. Such requests are refused rather
// than their header normalised: a body sent as UTF-7 is not UTF-8 JSON whatever the
// header then says, and refusing leaves nothing for a server to interpret differently.
func checkRequestContentType(contentType string) string {
	mt, params, err := mime.ParseMediaType(contentType)
	if err != nil || mt != "application/json" {
		return "Content-Type must be application/json"
	}
	for k, v := range params {
		if k != "charset" {
			return "Content-Type parameter " + strconvQuote(k) + " is not supported: only charset=utf-8 is"
		}
		if !strings.EqualFold(v, "utf-8") {
			return "Content-Type charset " + strconvQuote(clip(v, 32)) + " is not supported: MCP messages are UTF-8 JSON"
		}
	}
	return ""
}

// clip shortens s to at most n bytes for a message.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// setTarget fills the name a method targets, from an Mcp-Name header.
func setTarget(r *Request, method, name string) {
	switch method {
	case "tools/call":
		r.Tool = name
	case "prompts/get":
		r.Prompt = name
	case "resources/read", "resources/subscribe", "resources/unsubscribe":
		r.URI = name
	}
}

func (st *stream) continueHeaders(mut *extprocv3.HeaderMutation) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{
		RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{HeaderMutation: mut}},
	}}
}

func strconvQuote(s string) string { return strconv.Quote(s) }

// rawHeader is a header mutation entry; values go in raw_value as Envoy expects.
func rawHeader(k, v string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{
		Header:       &corev3.HeaderValue{Key: k, RawValue: []byte(v)},
		AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
	}
}

// immediate answers the request without forwarding it.
func (st *stream) immediate(code int, contentType string, body []byte, extra ...*corev3.HeaderValueOption) *extprocv3.ProcessingResponse {
	st.phase = answered
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{
		ImmediateResponse: &extprocv3.ImmediateResponse{
			Status: &typev3.HttpStatus{Code: typev3.StatusCode(code)},
			Headers: &extprocv3.HeaderMutation{SetHeaders: append([]*corev3.HeaderValueOption{
				rawHeader("content-type", contentType),
				rawHeader(contract.HeaderDecisionID, st.decisionID),
			}, extra...)},
			Body:    body,
			Details: "mcpgate",
		},
	}}
}

// tooLarge refuses a body over limits.maxRequestBytes.
func (st *stream) tooLarge() refusal {
	return refusal{status: 413, rule: ruleTooLarge, code: -32600, reason: "request body larger than " + strconv.FormatInt(st.maxLen, 10) + " bytes"}
}

// requestDecision is the decision on one message of a body.
type requestDecision struct {
	msgIndex int
	d        Decision
	r        Request         // the request as decided
	id       json.RawMessage // the message's id
	task     *taskRecord     // the task a tasks/get, tasks/result or tasks/cancel is about
}

func (st *stream) requestBody(ctx context.Context, b *extprocv3.HttpBody) *extprocv3.ProcessingResponse {
	if st.grpc != nil {
		return st.grpcBody(ctx, b)
	}
	start := time.Now()
	st.start = start
	body := b.GetBody()
	if !b.GetEndOfStream() {
		// The filter must buffer the whole body (processing mode BUFFERED): deciding on a
		// prefix of it would be deciding on something else.
		return st.refuse(refusal{status: 500, rule: ruleProtocol, code: -32603, reason: "mcpgate needs the whole request body (ext_proc request_body_mode BUFFERED)"})
	}
	if int64(len(body)) > st.maxLen {
		return st.refuse(st.tooLarge())
	}
	v := st.req.ProtocolVersion
	parsed, err := mcpParse(body, int(st.maxLen), batchEra(v))
	if err != nil {
		return st.refuse(st.parseError(err))
	}
	if r, ok := st.checkHeaders(parsed); !ok {
		return st.refuse(r)
	}
	var params paramCheck
	var bound toolParams
	if mirrorEra(v) {
		var r refusal
		var ok bool
		if params, bound, r, ok = st.checkParamHeaders(parsed); !ok {
			return st.refuse(r)
		}
	}

	decisions := make([]requestDecision, 0, len(parsed.Messages))
	denied := -1
	for i, m := range parsed.Messages {
		if ctx.Err() != nil {
			// Envoy gave up on the request (timeout, client gone): deciding the rest of a
			// batch would be work for nobody.
			return st.refuse(refusal{status: 503, rule: ruleAbandoned, code: -32603, reason: "the request ended before mcpgate decided it"})
		}
		if m.Kind == kindResponse {
			continue // the client answering a server request (sampling, elicitation)
		}
		r := st.req
		r.Method, r.Tool, r.Prompt, r.URI, r.Arguments = m.Method, m.Tool, m.Prompt, m.URI, m.Arguments
		r.ID = rawID(m.ID)
		// Limits come before the decision: a flood of calls that would be denied must
		// not be able to spend mcpgate's CPU on Rego either.
		st.req = r // the last message is what the response phase logs about
		if v, refused := st.rateLimit(ctx, &r, start); refused {
			decisions = append(decisions, requestDecision{msgIndex: i, r: r, id: m.ID})
			return st.refuseBody(parsed, decisions, len(decisions)-1, refusal{status: v.status, rule: v.rule, reason: v.reason,
				code: st.app.MCP.Tools.ErrorCode, id: m.ID, headers: v.headers})
		}
		d := Decide(ctx, st.app.MCP, &r)
		if d.Allow && m.Method == "tools/call" {
			if pd, ok := st.pinDecision(m.Tool); ok {
				d = pd
			}
		}
		var task *taskRecord
		if d.Allow && taskMethods[m.Method] {
			// The request names a task, not a tool: it is the task's creator's, while its
			// tool is allowed to them (tasks.go). Rules and Rego saw it without a tool, as
			// a method; the log names the task's tool.
			task = st.lookupTask(ctx, &r, m.TaskID)
			if d = st.decideTask(ctx, &r, task, d); task != nil && d.Allow {
				r.Tool = task.tool
			} else {
				task = nil
			}
		}
		decisions = append(decisions, requestDecision{msgIndex: i, d: d, r: r, id: m.ID, task: task})
		if !d.Allow && denied < 0 {
			denied = len(decisions) - 1
		}
	}
	if denied >= 0 {
		d := decisions[denied]
		return st.refuseBody(parsed, decisions, denied, st.denial(d.d, d.id))
	}

	// Apply Rego's argument patches, all in one pass over the body (a batch of patched
	// calls costs one copy, not one per call), then check once that the result is a body
	// mcpgate itself would accept.
	out := body
	var patches []mcp.Patch
	for _, rd := range decisions {
		if len(rd.d.Patch) > 0 {
			patches = append(patches, mcp.Patch{Message: rd.msgIndex, Ops: rd.d.Patch})
		}
	}
	if len(patches) > 0 {
		var err error
		if out, err = mcp.PatchBody(parsed, body, patches); err != nil {
			// Rego allowed the message, but its patch cannot be applied: it is denied after
			// all, and recorded so.
			k := 0
			var pe *mcp.PatchError
			if errors.As(err, &pe) {
				for i, rd := range decisions {
					if rd.msgIndex == pe.Message {
						k = i
					}
				}
			}
			return st.refuseBody(parsed, decisions, k, st.denial(Decision{Rule: ruleRego, Reason: "rego patch failed: " + err.Error()}, decisions[k].id))
		}
		patched, err := mcpParse(out, MaxPatchedBytes, true)
		if err != nil {
			return st.refuseBody(parsed, decisions, 0, refusal{status: 500, rule: ruleRego, code: -32603, reason: "the patched body is not one mcpgate accepts: " + err.Error()})
		}
		if len(bound.bindings) > 0 && len(patched.Messages) == 1 {
			// The server checks the headers against the body mcpgate changed: they must
			// say what the patched arguments say.
			params.set, params.remove = remirror(bound, patched.Messages[0].Arguments, params.remove)
		}
	}
	st.admit(decisions)
	st.planResponse(ctx, parsed, decisions)
	st.phase = expectResponseHeaders
	st.s.latency.Record(ctx, time.Since(start).Seconds())

	common := bufferedBody(body, out)
	if len(params.remove) > 0 || len(params.set) > 0 || st.learnsParams() {
		// Header changes decided on the body: Envoy applies a request body response's
		// header mutation when the body is BUFFERED (CommonResponse.header_mutation).
		if common.HeaderMutation == nil {
			common.HeaderMutation = &extprocv3.HeaderMutation{}
		}
		slices.Sort(params.remove)
		common.HeaderMutation.RemoveHeaders = append(common.HeaderMutation.RemoveHeaders, params.remove...)
		common.HeaderMutation.SetHeaders = append(common.HeaderMutation.SetHeaders, params.set...)
		if st.learnsParams() && !filtersResponses(st.app.MCP) {
			// The list is read to learn its annotations: it must come uncompressed.
			common.HeaderMutation.RemoveHeaders = append(common.HeaderMutation.RemoveHeaders, "accept-encoding")
		}
	}
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
		RequestBody: &extprocv3.BodyResponse{Response: common},
	}}
}

// MaxPatchedBytes bounds a body after Rego patches.
const MaxPatchedBytes = policy.MaxMaxRequestBytes

// checkHeaders enforces that Mcp-Method and Mcp-Name, when sent, say what the body says
// (MCP 2026-07-28): a proxy deciding on headers and a server acting on the body must
// never disagree.
func (st *stream) checkHeaders(b *parsedBody) (refusal, bool) {
	if st.mcpMethodHeader == "" && st.mcpNameHeader == "" {
		return refusal{}, true
	}
	if b.Batch || len(b.Messages) != 1 {
		return refusal{status: 400, rule: ruleHeaders, code: CodeHeaderMismatch, reason: "Mcp-Method/Mcp-Name headers cannot describe a batch"}, false
	}
	m := b.Messages[0]
	name := m.Tool + m.Prompt + m.URI
	if st.mcpMethodHeader != m.Method || st.mcpNameHeader != name {
		return refusal{status: 400, rule: ruleHeaders, code: CodeHeaderMismatch, id: m.ID, reason: "Mcp-Method/Mcp-Name headers do not match the body"}, false
	}
	return refusal{}, true
}

func (st *stream) parseError(err error) refusal {
	if errors.Is(err, errTooLarge) {
		return st.tooLarge()
	}
	var je *jsonrpcError
	if errors.As(err, &je) {
		return refusal{status: 400, rule: ruleParse, code: je.Code, id: je.ID, reason: je.Message}
	}
	return refusal{status: 400, rule: ruleParse, code: -32700, reason: "unreadable request body"}
}

// responseRefusal refuses a server's answer that mcpgate cannot filter: it must not reach
// the client.
func (st *stream) responseRefusal(reason string) *extprocv3.ProcessingResponse {
	return st.refuse(refusal{status: 502, rule: ruleResponse, code: -32603, reason: reason})
}

func (st *stream) responseHeaders(h *extprocv3.HttpHeaders) *extprocv3.ProcessingResponse {
	mut := &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{rawHeader(contract.HeaderDecisionID, st.decisionID)}}
	resp := &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{HeaderMutation: mut}}
	out := &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: resp}}
	var code, contentType, encoding, grpcEncoding string
	contentTypes, encodings := 0, 0
	for _, hv := range h.GetHeaders().GetHeaders() {
		switch strings.ToLower(hv.GetKey()) {
		case ":status":
			code = contract.HeaderValue(hv)
		case "content-type":
			contentType = contract.HeaderValue(hv)
			contentTypes++
		case "content-encoding":
			encoding = contract.HeaderValue(hv)
			encodings++
		case "grpc-encoding":
			grpcEncoding = contract.HeaderValue(hv)
		case contract.HeaderSessionID:
			// The client gets the server's session id bound to this caller.
			mut.SetHeaders = append(mut.SetHeaders, rawHeader(contract.HeaderSessionID, st.s.bindSession(contract.HeaderValue(hv), identityOf(st.ident))))
		}
	}
	if st.grpc != nil {
		if code != "200" || h.GetEndOfStream() {
			return out // gRPC answers 200; a trailers-only answer carries no message
		}
		return st.grpcResponseHeaders(out, contentType, grpcEncoding)
	}
	// Added to the server's own RateLimit fields, if it sends any: one list, its limits
	// and mcpgate's.
	mut.SetHeaders = append(mut.SetHeaders, st.quotaHeaders(corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD)...)
	if len(st.plan) == 0 || h.GetEndOfStream() {
		return out // nothing to rewrite: the body mode stays NONE and costs nothing
	}
	// From here the response answers a request whose response must be rewritten: what
	// mcpgate cannot read must not reach the client. A response only read to learn from
	// is simply not learned from.
	st.observing = !slices.ContainsFunc(st.plan, func(s responseStep) bool { return !s.observeOnly() })
	// Every 2xx counts: clients read the body of any successful status as the answer.
	if len(code) != 3 || code[0] != '2' {
		if st.observing {
			return out // an error teaches nothing
		}
		return st.errorResponseHeaders(out, code, contentType, encoding, contentTypes > 1 || encodings > 1)
	}
	if contentTypes > 1 || encodings > 1 {
		// Clients disagree on which one counts (Go's Header.Get takes the first, this
		// loop the last; others join them): mcpgate could filter the body as one type
		// while the client reads it as another.
		if st.observing {
			return out
		}
		return st.responseRefusal("mcpgate cannot filter a response with more than one Content-Type or Content-Encoding header")
	}
	if st.observing {
		mt, params, _ := mime.ParseMediaType(contentType)
		if encoding != "" && !strings.EqualFold(encoding, "identity") || mt != "application/json" && mt != "text/event-stream" ||
			mt == "application/json" && params["charset"] != "" && !strings.EqualFold(params["charset"], "utf-8") {
			return out
		}
	}
	if encoding != "" && !strings.EqualFold(encoding, "identity") {
		return st.responseRefusal("mcpgate cannot filter a response with Content-Encoding " + strconvQuote(clip(encoding, 32)) + ": the server must not compress it")
	}
	mt, params, err := mime.ParseMediaType(contentType)
	if err != nil {
		return st.responseRefusal("mcpgate cannot filter a response with Content-Type " + strconvQuote(clip(contentType, 64)))
	}
	switch mt {
	case "application/json":
		if cs, ok := params["charset"]; ok && !strings.EqualFold(cs, "utf-8") {
			return st.responseRefusal("mcpgate cannot filter a JSON response in charset " + strconvQuote(clip(cs, 32)))
		}
		out.ModeOverride = &extprocfilterv3.ProcessingMode{ResponseBodyMode: extprocfilterv3.ProcessingMode_BUFFERED}
	case "text/event-stream":
		// Event streams are UTF-8 whatever their charset says (WHATWG HTML, server-sent
		// events): clients decode them so, and so does the rewriter.
		// Streamed chunk by chunk: progress notifications and server requests must reach
		// the client as they happen, never held until the result.
		out.ModeOverride = &extprocfilterv3.ProcessingMode{ResponseBodyMode: extprocfilterv3.ProcessingMode_STREAMED}
		st.rewriters = st.newRewriters()
	default:
		return st.responseRefusal("mcpgate cannot filter a response with Content-Type " + strconvQuote(clip(mt, 64)))
	}
	if slices.ContainsFunc(st.plan, func(s responseStep) bool { return s.private }) {
		// A list filtered for this caller is no one else's: whatever the server said,
		// no HTTP cache between here and the client may keep it for others.
		mut.SetHeaders = append(mut.SetHeaders, rawHeader("cache-control", "private, no-store"))
	}
	st.phase = expectResponseBody
	return out
}

// bufferedBody answers a BUFFERED body that became out: nothing if it is unchanged, else
// the new body with its content-length. With SEND headers content-length is ours to keep
// right, or Envoy rejects the mutation (ProcessingMode.BodySendMode docs).
func bufferedBody(body, out []byte) *extprocv3.CommonResponse {
	if string(out) == string(body) {
		return &extprocv3.CommonResponse{}
	}
	return &extprocv3.CommonResponse{
		BodyMutation:   &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: out}},
		HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{rawHeader("content-length", strconv.Itoa(len(out)))}},
	}
}

// errorResponseHeaders takes a non-2xx answer to an exchange whose responses are
// rewritten. No client reads it as the answer, but clients do show its body: the
// TypeScript SDK puts it in the error it throws, and agents hand that error to the model.
// So a body that could carry what the policy removes (a 500 echoing a tool's result, a
// framework's dump of it) gets the same filtering as a 2xx, and one mcpgate cannot read
// is replaced. The status and the other headers pass: a 401's WWW-Authenticate, a 429's
// Retry-After, a 404 that tells a client its session is gone.
func (st *stream) errorResponseHeaders(out *extprocv3.ProcessingResponse, code, contentType, encoding string, repeated bool) *extprocv3.ProcessingResponse {
	mt, params, err := mime.ParseMediaType(contentType)
	st.errorStatus = "non-2xx"
	if len(code) == 3 && strings.Trim(code, "0123456789") == "" {
		st.errorStatus = code
	}
	st.errorJSON = err == nil && !repeated && mt == "application/json" &&
		(encoding == "" || strings.EqualFold(encoding, "identity")) &&
		(params["charset"] == "" || strings.EqualFold(params["charset"], "utf-8"))
	out.ModeOverride = &extprocfilterv3.ProcessingMode{ResponseBodyMode: extprocfilterv3.ProcessingMode_BUFFERED}
	st.phase = expectResponseBody
	return out
}

// errorResponseBody filters the body of a non-2xx response (errorResponseHeaders). JSON-RPC
// errors pass as sent, whatever their ids: they carry no result, and the client reads none
// from a failed status. Results are rewritten as in a 2xx. Anything else is replaced by a
// note, so what the server sent never reaches the client unfiltered.
func (st *stream) errorResponseBody(body []byte) *extprocv3.CommonResponse {
	if st.errorJSON {
		if rb, err := mcp.ParseResponseBody(body, st.limits()); err == nil &&
			!slices.ContainsFunc(rb.Responses, func(r mcp.Response) bool { return r.Error == nil }) {
			return &extprocv3.CommonResponse{}
		}
		if out, err := st.rewriteJSON(body); err == nil {
			return bufferedBody(body, out)
		}
	}
	if ce := st.s.log.Check(zap.WarnLevel, "mcpgate replaced the body of an error response it could not filter"); ce != nil {
		ce.Write(zap.String("decision_id", st.decisionID), zap.String("target", st.ident.Target), zap.String("status", st.errorStatus))
	}
	note := []byte("mcpgate removed the body of this " + st.errorStatus + " response: this app's responses are filtered, and the body is not JSON-RPC that mcpgate can filter\n")
	return &extprocv3.CommonResponse{
		BodyMutation: &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: note}},
		HeaderMutation: &extprocv3.HeaderMutation{
			SetHeaders:    []*corev3.HeaderValueOption{rawHeader("content-type", "text/plain; charset=utf-8"), rawHeader("content-length", strconv.Itoa(len(note)))},
			RemoveHeaders: []string{"content-encoding"},
		},
	}
}

func (st *stream) responseBody(b *extprocv3.HttpBody) *extprocv3.ProcessingResponse {
	wrap := func(c *extprocv3.CommonResponse) *extprocv3.ProcessingResponse {
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{ResponseBody: &extprocv3.BodyResponse{Response: c}}}
	}
	if st.grpc != nil {
		return st.grpcResponseBody(b)
	}
	chunk := b.GetBody()
	if st.unread {
		return wrap(&extprocv3.CommonResponse{})
	}
	if st.errorStatus != "" {
		return wrap(st.errorResponseBody(chunk))
	}
	if st.rewriters == nil { // BUFFERED JSON
		out, err := st.rewriteJSON(chunk)
		if err != nil && st.observing {
			return wrap(&extprocv3.CommonResponse{})
		}
		if err != nil {
			// A response we cannot read cannot be filtered: it must not reach the client.
			return st.responseRefusal("mcpgate could not filter the server's response: " + err.Error())
		}
		return wrap(bufferedBody(chunk, out))
	}
	out := chunk
	for _, rw := range st.rewriters {
		var err error
		if out, err = rw.Feed(out, b.GetEndOfStream()); err != nil && st.observing {
			// Only learning: the rest of the stream passes as the server sent it.
			st.unread = true
			return wrap(&extprocv3.CommonResponse{})
		} else if err != nil {
			// Headers are gone; an immediate response makes Envoy reset the stream, which
			// is the only fail-closed move left mid-stream.
			return st.responseRefusal("mcpgate could not filter the server's event stream: " + err.Error())
		}
	}
	if string(out) == string(chunk) {
		return wrap(&extprocv3.CommonResponse{})
	}
	if len(out) == 0 {
		return wrap(&extprocv3.CommonResponse{BodyMutation: &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_ClearBody{ClearBody: true}}})
	}
	return wrap(&extprocv3.CommonResponse{BodyMutation: &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: out}}})
}

// procRecord is what the recorder needs of one decision, copied out of the stream.
type procRecord struct {
	allow                                 bool
	status                                int // of mcpgate's own answer; 0 when forwarded
	rule, reason                          string
	patches                               int
	id                                    []byte
	decisionID, authzID                   string
	target, caller, subject, method, tool string
	name                                  string
	elapsed                               time.Duration
	traceID, spanID                       string // of the stream's span, when traced
}

// Close stops the recorder after writing every decision already made. Call it after the
// gRPC server has stopped; decisions made afterwards are written synchronously.
func (s *Server) Close() {
	s.shared.close()
	s.records.Close()
}

// Flush waits until every decision made before it has been logged and counted.
func (s *Server) Flush() {
	s.records.Flush()
}

func (s *Server) record(r *procRecord) {
	decision := "deny"
	if r.allow {
		decision = "allow"
	}
	caller := r.caller
	if caller == "" {
		caller = "unknown"
	}
	s.count.Add(context.Background(), 1, s.countAttrs.Get(countKey{
		target: r.target, caller: caller, method: methodLabel(r.method),
		tool: s.tools.Get(r.target, r.tool), decision: decision, rule: r.rule,
	}))
	if ce := s.log.Check(zap.InfoLevel, "mcp decision"); ce != nil {
		fields := []zap.Field{
			zap.String("decision_id", r.decisionID),
			zap.String("authz_decision_id", r.authzID),
			zap.String("decision", decision),
			zap.String("rule", r.rule),
			zap.String("reason", r.reason),
			zap.String("target", r.target),
			zap.String("caller", r.caller),
			zap.String("subject", r.subject),
			zap.String("method", clip(r.method, maxLogField)),
			zap.Float64("latency_ms", float64(r.elapsed.Microseconds())/1000),
		}
		if r.status != 0 {
			fields = append(fields, zap.Int("status", r.status))
		}
		if len(r.id) > 0 {
			fields = append(fields, zap.String("id", clip(string(r.id), maxLogField)))
		}
		if r.name != "" {
			fields = append(fields, zap.String("name", clip(r.name, maxLogField)))
		}
		if r.patches > 0 {
			fields = append(fields, zap.Int("patches", r.patches))
		}
		if r.traceID != "" {
			fields = append(fields, zap.String("trace_id", r.traceID), zap.String("span_id", r.spanID))
		}
		ce.Write(fields...)
	}
}

// knownMethods are the MCP methods (MCP 2025-11-25 and 2026-07-28) used as metric labels;
// anything else is "other". Method names come from callers: a label per name would let a
// caller mint series until the SDK's cardinality limit sends every later decision,
// denials included, to the overflow series.
var knownMethods = map[string]bool{
	"server/discover": true, "initialize": true, "ping": true, "tools/list": true, "tools/call": true, "prompts/list": true,
	"prompts/get": true, "resources/list": true, "resources/templates/list": true, "resources/read": true,
	"resources/subscribe": true, "resources/unsubscribe": true, "completion/complete": true,
	"logging/setLevel": true, "tasks/get": true, "tasks/result": true, "tasks/list": true, "tasks/cancel": true,
	"notifications/initialized": true, "notifications/cancelled": true, "notifications/progress": true,
	"notifications/roots/list_changed": true, "notifications/tasks/status": true,
	"GET /mcp": true, "DELETE /mcp": true,
}

func methodLabel(m string) string {
	if knownMethods[m] {
		return m
	}
	if strings.HasPrefix(m, "GET ") {
		return "GET"
	}
	if strings.HasPrefix(m, "DELETE ") {
		return "DELETE"
	}
	return decisionlog.Other
}

// Decision-log lines carry caller-chosen strings (method, name, id); each is cut at
// maxLogField bytes so that junk input cannot make lines of megabytes.
const maxLogField = 256

// countKey is the label combination of one ext_proc decision. Targets and callers come
// from policy and verified identities, methods from methodLabel, rules from policy; tool
// names come from callers and are bounded by Server.tools.
type countKey struct{ target, caller, method, tool, decision, rule string }

func countSet(k countKey) attribute.Set {
	return attribute.NewSet(
		attribute.String("target", k.target),
		attribute.String("caller", k.caller),
		attribute.String("method", k.method),
		attribute.String("tool", k.tool),
		attribute.String("decision", k.decision),
		attribute.String("rule", k.rule),
	)
}
