package extauthz

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extauthz/bearer"
	outbound "github.com/mcpgate/mcpgate/extauthz/credentials"
	"github.com/mcpgate/mcpgate/policy"
	"github.com/mcpgate/mcpgate/policy/decisionlog"
)

// Options configure a Server.
type Options struct {
	Store    *policy.Store
	Verifier *bearer.Verifier
	// DecisionLog receives one line per decision; default: none.
	DecisionLog *zap.Logger
	// Meter records decision counts and latency; default: no-op.
	Meter metric.Meter
	// Tracer records a span per Check under the policy's Mesh.spec.tracing, the child
	// of the request's traceparent; nil: no spans.
	Tracer *decisionlog.Tracer
	// Credentials are the token sources of outbound calls to HTTPEndpoints, shared with
	// the xDS server when it runs in the same process; default: the server's own.
	Credentials *outbound.Sources
}

// Server implements envoy.service.auth.v3.Authorization.
type Server struct {
	authv3.UnimplementedAuthorizationServer

	store    *policy.Store
	verifier *bearer.Verifier
	log      *zap.Logger
	count    metric.Int64Counter
	latency  metric.Float64Histogram
	attrs    *decisionlog.AttrSets[attrKey]
	// principals and routes cache what each verified token, and each pair of target and
	// caller, contribute to a response.
	principals valueCache[*bearer.Principal, *principalValues]
	routes     valueCache[routeKey, *routeValues]
	// sources acquire the tokens of outbound calls to HTTPEndpoints (outbound.go).
	sources *outbound.Sources

	// Decisions are logged and counted by one background goroutine, off the request
	// path: encoding a JSON log line and updating histograms cost more than deciding.
	// No audit line is ever dropped (see decisionlog.Queue.Add), and Close drains them all.
	records *decisionlog.Queue[recordEntry]
	tracer  *decisionlog.Tracer
}

type recordEntry struct {
	d               *Decision
	elapsed         time.Duration
	traceID, spanID string // of the Check's span, when traced
}

// attrKey is the label combination of one decision. Targets and callers come from policy
// and verified identities, reasons are constants: the labels are bounded.
type attrKey struct{ target, caller, decision, reason string }

func attrSet(k attrKey) attribute.Set {
	return attribute.NewSet(
		attribute.String("target", k.target),
		attribute.String("caller", k.caller),
		attribute.String("decision", k.decision),
		attribute.String("reason", k.reason),
	)
}

// NewServer returns a Server reading policy from opts.Store.
func NewServer(opts Options) (*Server, error) {
	s := &Server{store: opts.Store, verifier: opts.Verifier, log: opts.DecisionLog, tracer: opts.Tracer, sources: opts.Credentials}
	if s.sources == nil {
		s.sources = outbound.NewSources()
	}
	s.principals.build, s.routes.build = newPrincipalValues, newRouteValues
	s.attrs = decisionlog.NewAttrSets(10000, attrSet)
	if s.log == nil {
		s.log = zap.NewNop()
	}
	if s.verifier == nil {
		s.verifier = bearer.NewVerifier(bearer.Options{})
	}
	meter := opts.Meter
	if meter == nil {
		meter = noop.NewMeterProvider().Meter("")
	}
	var err error
	if s.count, err = meter.Int64Counter("mcpgate.authz.decisions",
		metric.WithDescription("ext_authz decisions by target, caller, decision and reason")); err != nil {
		return nil, err
	}
	if s.latency, err = meter.Float64Histogram("mcpgate.authz.duration", metric.WithUnit("s"),
		metric.WithDescription("time to decide one ext_authz Check"),
		metric.WithExplicitBucketBoundaries(.00001, .000025, .00005, .0001, .00025, .0005, .001, .0025, .005, .01, .05, .25, 1)); err != nil {
		return nil, err
	}
	ctx := context.Background()
	s.records = decisionlog.New(func(batch []recordEntry) {
		fields := make([]zap.Field, 0, maxLogFields) // reused: zap encodes fields in Write
		for _, e := range batch {
			fields = s.record(ctx, e, fields[:0])
		}
	})
	return s, nil
}

// Close stops the background recorder after logging every decision already made. Call it
// after the gRPC server has stopped; decisions made afterwards are logged synchronously.
func (s *Server) Close() {
	s.records.Close()
}

// Flush waits until every decision made before it has been logged and counted.
func (s *Server) Flush() {
	s.records.Flush()
}

// Check decides one request. Every outcome, malformed input included, is an answer to
// Envoy; a gRPC error would make Envoy apply failure_mode_allow/status_on_error instead of
// our reasoned denial.
func (s *Server) Check(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	start := time.Now()
	snap := s.store.Current()
	var span trace.Span
	if s.tracer != nil && snap != nil {
		s.tracer.Apply(snap.Mesh.Tracing)
		if s.tracer.Enabled() {
			ctx, span = s.tracer.Start(ctx, traceparentOf(req), "mcpgate ext_authz Check")
		}
	}
	d := s.decide(ctx, snap, req)
	resp := d.Response()
	e := recordEntry{d: d, elapsed: time.Since(start)}
	if span != nil {
		e.traceID, e.spanID = d.endSpan(span)
	}
	s.records.Add(e)
	return resp, nil
}

// traceparentOf is the request's W3C traceparent header, as Envoy sends it (header_map
// with encode_raw_headers, else the headers map); "" if none.
func traceparentOf(req *authv3.CheckRequest) string {
	h := req.GetAttributes().GetRequest().GetHttp()
	if hm := h.GetHeaderMap(); hm != nil && len(hm.GetHeaders()) > 0 {
		for _, hv := range hm.GetHeaders() {
			if strings.EqualFold(hv.GetKey(), "traceparent") {
				return contract.HeaderValue(hv)
			}
		}
		return ""
	}
	return h.GetHeaders()["traceparent"]
}

// endSpan sets the decision's attributes on span and ends it, returning its ids for
// the decision log.
func (d *Decision) endSpan(span trace.Span) (traceID, spanID string) {
	if !span.IsRecording() {
		span.End()
		return "", ""
	}
	decision := "deny"
	if d.Allowed {
		decision = "allow"
	}
	attrs := []attribute.KeyValue{
		decisionlog.AttrDecision.String(decision), decisionlog.AttrReason.String(d.Reason),
		decisionlog.AttrDecisionID.String(d.ID), decisionlog.AttrTarget.String(d.Target),
		decisionlog.AttrCaller.String(d.Caller.AppID),
	}
	if p := d.Principal; p != nil {
		attrs = append(attrs, decisionlog.AttrSubjectHash.String(decisionlog.SubjectHash(p.Subject)))
	}
	span.SetAttributes(attrs...)
	if !d.Allowed {
		span.SetStatus(otelcodes.Error, d.Reason)
	}
	traceID, spanID = decisionlog.IDs(span)
	span.End()
	return traceID, spanID
}

// maxLogFields is the most fields a decision line has.
const maxLogFields = 19

// record logs and counts one decision. fields is scratch space for the log line's
// fields, returned for reuse.
func (s *Server) record(ctx context.Context, e recordEntry, fields []zap.Field) []zap.Field {
	d, elapsed := e.d, e.elapsed
	decision := "deny"
	if d.Allowed {
		decision = "allow"
	}
	target, caller := d.Target, d.Caller.AppID
	if target == "" {
		target = "unknown"
	}
	if caller == "" {
		caller = "unknown"
	}
	attrs := s.attrs.Get(attrKey{target, caller, decision, d.Reason})
	s.count.Add(ctx, 1, attrs)
	s.latency.Record(ctx, elapsed.Seconds(), attrs)

	if ce := s.log.Check(zap.InfoLevel, "authz decision"); ce != nil {
		fields = append(fields,
			zap.String("decision_id", d.ID),
			zap.String("decision", decision),
			zap.Int("status", d.Status),
			zap.String("reason", d.Reason),
			zap.String("detail", d.Detail),
			zap.String("target", d.Target),
			zap.String("caller", d.Caller.AppID),
			zap.String("caller_namespace", d.Caller.Namespace),
			zap.String("spiffe_id", d.SpiffeID),
			zap.String("method", d.Method),
			zap.String("path", d.Path),
			zap.String("request_id", d.RequestID),
			zap.Float64("latency_ms", float64(elapsed.Microseconds())/1000),
		)
		if d.Gateway != "" {
			fields = append(fields, zap.String("gateway", d.Gateway))
		}
		if e.traceID != "" {
			fields = append(fields, zap.String("trace_id", e.traceID), zap.String("span_id", e.spanID))
		}
		if p := d.Principal; p != nil {
			fields = append(fields, zap.String("subject", p.Subject), zap.String("issuer", p.Issuer.Name), zap.Strings("scopes", p.Scopes))
		}
		ce.Write(fields...)
	}
	return fields
}

// Response renders the decision as Envoy expects it.
func (d *Decision) Response() *authv3.CheckResponse {
	if d.upstreamToken != "" && d.Allowed {
		return d.credentialsResponse()
	}
	if d.Allowed {
		return d.okResponse()
	}
	return d.deniedResponse()
}

func header(key, value string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{
		Header:       &corev3.HeaderValue{Key: key, Value: value},
		AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
	}
}

// okMessages are the messages of an allowed response that are new for every request.
// They are allocated together, one allocation instead of ten on the hottest path, and
// live as long as the response does.
type okMessages struct {
	resp     authv3.CheckResponse
	status   status.Status
	oneof    authv3.CheckResponse_OkResponse
	ok       authv3.OkHttpResponse
	metadata structpb.Struct
	id       structpb.Value
	idKind   structpb.Value_StringValue
	idHeader corev3.HeaderValueOption
	idValue  corev3.HeaderValue
	// headers: the decision id, the callee, the caller (three), the subject.
	headers [6]*corev3.HeaderValueOption
}

func (d *Decision) okResponse() *authv3.CheckResponse {
	rv := d.rv
	if rv == nil {
		rv = newRouteValues(d.routeKey())
	}
	var pv *principalValues
	if p := d.Principal; p != nil {
		if pv = d.pv; pv == nil {
			pv = newPrincipalValues(p)
		}
	}
	m := &okMessages{}
	m.idValue = corev3.HeaderValue{Key: contract.HeaderDecisionID, Value: d.ID}
	m.idHeader.Header, m.idHeader.AppendAction = &m.idValue, corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD
	ok := &m.ok
	ok.Headers = append(append(m.headers[:0], &m.idHeader), rv.callerHeaders...)
	setSubject := pv != nil && pv.subjectHeader != nil
	if setSubject {
		ok.Headers = append(ok.Headers, pv.subjectHeader)
	}
	// Spoofed identity headers are removed. The ones set above are left out of the
	// removal list: they are overwritten anyway, and Envoy's order of set and remove
	// must not decide whether our own header survives. Other spellings of them
	// ("x_mcpgate_caller_app_id") are not overwritten, so they are always removed.
	for _, h := range d.Strip {
		switch {
		case h == contract.HeaderDecisionID,
			h == contract.HeaderDaprCalleeAppID,
			rv.callerAppID.GetStringValue() != "" && (h == contract.HeaderCallerAppID || h == contract.HeaderDaprCallerAppID || h == contract.HeaderDaprCallerNamespace),
			setSubject && h == contract.HeaderSubject:
			continue
		}
		ok.HeadersToRemove = append(ok.HeadersToRemove, h)
	}
	m.status.Code = int32(codes.OK)
	m.oneof.OkResponse = ok
	m.resp.Status, m.resp.HttpResponse = &m.status, &m.oneof
	// The metadata goes pre-encoded (wire.go) when every part has its wire form.
	var pvWire, claimsWire []byte
	wire := rv.wire != nil
	if pv != nil {
		pvWire, wire = pv.wire, wire && pv.wire != nil
		if d.wantClaims && pv.claims != nil {
			claimsWire, wire = pv.claimsWire, wire && pv.claimsWire != nil
		}
	}
	if wire {
		setWireMetadata(&m.resp, d.ID, rv.wire, pvWire, claimsWire)
		return &m.resp
	}
	m.idKind.StringValue = d.ID
	m.id.Kind = &m.idKind
	m.metadata.Fields = d.metadataFields(&m.id, rv, pv)
	m.resp.DynamicMetadata = &m.metadata
	return &m.resp
}

// maxMetadataFields is the most keys metadata sets; sizing the map for them up front
// saves growing it on every response.
const maxMetadataFields = 11

// metadataFields is everything ext_proc needs to decide per tool without re-verifying
// anything. id is the decision ID's value, rv holds the values of the route, pv those of
// d.Principal (nil without one).
func (d *Decision) metadataFields(id *structpb.Value, rv *routeValues, pv *principalValues) map[string]*structpb.Value {
	f := make(map[string]*structpb.Value, maxMetadataFields)
	f[contract.MetaDecisionID] = id
	f[contract.MetaTarget], f[contract.MetaCallerAppID], f[contract.MetaCallerNamespace], f[contract.MetaSpiffeID] = rv.target, rv.callerAppID, rv.callerNamespace, rv.spiffeID
	if rv.gateway != nil {
		f[contract.MetaGateway] = rv.gateway
	}
	if pv != nil {
		f[contract.MetaSubject], f[contract.MetaIssuer], f[contract.MetaScopes], f[contract.MetaTokenExpiry] = pv.subject, pv.issuer, pv.scopes, pv.exp
		// Only Rego and limits by a claim read them; other apps are spared the bytes on
		// every request.
		if d.wantClaims && pv.claims != nil {
			f[contract.MetaClaimsJSON] = pv.claims
		}
	}
	return f
}

type denialBody struct {
	Error      string `json:"error"`
	Reason     string `json:"reason"`
	DecisionID string `json:"decision_id"`
}

func (d *Decision) deniedResponse() *authv3.CheckResponse {
	body, _ := json.Marshal(denialBody{Error: d.Error, Reason: d.Detail, DecisionID: d.ID})
	if d.endpointDenial {
		body = []byte(d.endpointBody())
	}
	headers := []*corev3.HeaderValueOption{
		header("content-type", "application/json"),
		header(contract.HeaderDecisionID, d.ID),
	}
	if d.WWWAuthenticate != "" {
		headers = append(headers, header("www-authenticate", d.WWWAuthenticate))
	}
	code := codes.PermissionDenied
	switch d.Status {
	case 401:
		code = codes.Unauthenticated
	case 503:
		code = codes.Unavailable
	}
	return &authv3.CheckResponse{
		Status: &status.Status{Code: int32(code), Message: d.Reason},
		HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: &authv3.DeniedHttpResponse{
			Status:  &typev3.HttpStatus{Code: typev3.StatusCode(d.Status)},
			Headers: headers,
			Body:    string(body),
		}},
	}
}

// isHeaderSafe keeps values Envoy would reject (or that could split headers) out of
// request headers; such a subject still reaches ext_proc through metadata.
func isHeaderSafe(s string) bool {
	if s == "" || len(s) > 256 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == 0x7f || c >= 0x80 {
			return false
		}
	}
	return true
}

// principalValues are the metadata values and header derived from one verified token.
// The verifier returns the same *Principal for every use of a cached token, so they are
// built once per token instead of per request. Sharing them between responses is safe:
// gRPC only reads a message while marshalling it, and protobuf-go allows concurrent
// marshalling of an unmodified message.
type principalValues struct {
	subject, issuer, scopes, exp, claims *structpb.Value
	subjectHeader                        *corev3.HeaderValueOption // nil if not header-safe
	// wire and claimsWire are the metadata entries in wire form (wire.go); nil if they
	// cannot be encoded.
	wire, claimsWire []byte
}

func newPrincipalValues(p *bearer.Principal) *principalValues {
	scopes := make([]*structpb.Value, len(p.Scopes))
	for i, sc := range p.Scopes {
		scopes[i] = structpb.NewStringValue(sc)
	}
	pv := &principalValues{
		subject: structpb.NewStringValue(p.Subject),
		issuer:  structpb.NewStringValue(p.Issuer.Name),
		scopes:  structpb.NewListValue(&structpb.ListValue{Values: scopes}),
		exp:     structpb.NewNumberValue(float64(p.ExpiresAt.Unix())),
	}
	if len(p.RawClaims) > 0 {
		pv.claims = structpb.NewStringValue(string(p.RawClaims))
	}
	if isHeaderSafe(p.Subject) {
		pv.subjectHeader = header(contract.HeaderSubject, p.Subject)
	}
	pv.wire = structEntries(contract.MetaSubject, pv.subject, contract.MetaIssuer, pv.issuer, contract.MetaScopes, pv.scopes, contract.MetaTokenExpiry, pv.exp)
	if pv.claims != nil {
		pv.claimsWire = structEntries(contract.MetaClaimsJSON, pv.claims)
	}
	return pv
}

// valueCache maps keys to response values built once per key: verified principals to
// principalValues, routes to routeValues. Bounded: cleared when full, which only costs
// rebuilding values still in use.
type valueCache[K comparable, V any] struct {
	mu    sync.RWMutex
	m     map[K]V
	build func(K) V
}

const maxCachedValues = 10000

func (c *valueCache[K, V]) get(k K) V {
	c.mu.RLock()
	v, ok := c.m[k]
	c.mu.RUnlock()
	if ok {
		return v
	}
	v = c.build(k)
	c.mu.Lock()
	if c.m == nil || len(c.m) >= maxCachedValues {
		c.m = make(map[K]V, 64)
	}
	c.m[k] = v
	c.mu.Unlock()
	return v
}

// routeKey is what routeValues are built from. Its parts are bounded: targets and
// gateways come from policy, callers from verified identities.
type routeKey struct {
	target, gateway string
	caller          policy.Caller
	spiffeID        string
}

// routeValues are the metadata values and headers derived from the target and the
// caller, shared between responses like principalValues.
type routeValues struct {
	target, callerAppID, callerNamespace, spiffeID *structpb.Value
	gateway                                        *structpb.Value             // nil without a gateway
	callerHeaders                                  []*corev3.HeaderValueOption // the callee's; the caller's too if it has an App ID
	wire                                           []byte                      // the entries in wire form (wire.go); nil if they cannot be encoded
}

func newRouteValues(k routeKey) *routeValues {
	rv := &routeValues{
		target:          structpb.NewStringValue(k.target),
		callerAppID:     structpb.NewStringValue(k.caller.AppID),
		callerNamespace: structpb.NewStringValue(k.caller.Namespace),
		spiffeID:        structpb.NewStringValue(k.spiffeID),
	}
	if k.gateway != "" {
		rv.gateway = structpb.NewStringValue(k.gateway)
	}
	// Dapr stamps the callee and, for a caller it knows, the caller's App ID and
	// namespace; apps written for it read them (and Dapr overwrites callers' copies, as
	// we do).
	rv.callerHeaders = []*corev3.HeaderValueOption{header(contract.HeaderDaprCalleeAppID, k.target)}
	if k.caller.AppID != "" {
		rv.callerHeaders = append(rv.callerHeaders, header(contract.HeaderCallerAppID, k.caller.AppID), header(contract.HeaderDaprCallerAppID, k.caller.AppID),
			header(contract.HeaderDaprCallerNamespace, k.caller.Namespace))
	}
	rv.wire = structEntries(contract.MetaTarget, rv.target, contract.MetaCallerAppID, rv.callerAppID, contract.MetaCallerNamespace, rv.callerNamespace,
		contract.MetaSpiffeID, rv.spiffeID, contract.MetaGateway, rv.gateway)
	return rv
}

func (d *Decision) routeKey() routeKey {
	return routeKey{target: d.Target, gateway: d.Gateway, caller: d.Caller, spiffeID: d.SpiffeID}
}
