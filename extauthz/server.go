package extauthz

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
	"go.uber.org/zap"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/policy"
)

// Headers mcpgate sets on allowed requests, after removing any the caller sent.
const (
	HeaderCallerAppID     = "x-mcpgate-caller-app-id"
	HeaderDaprCallerAppID = "dapr-caller-app-id"
	HeaderSubject         = "x-mcpgate-subject"
	HeaderDecisionID      = "x-mcpgate-decision-id"
)

// MetadataNamespace is where Envoy stores ext_authz dynamic metadata; ext_proc receives
// it through metadata_options.forwarding_namespaces.
const MetadataNamespace = "envoy.filters.http.ext_authz"

// Dynamic metadata keys: the contract between ext_authz and ext_proc.
const (
	MetaDecisionID      = "decision_id"
	MetaTarget          = "target_app_id"
	MetaCallerAppID     = "caller_app_id"
	MetaCallerNamespace = "caller_namespace"
	MetaSpiffeID        = "spiffe_id"
	MetaSubject         = "subject"
	MetaIssuer          = "issuer"
	MetaScopes          = "scopes"
	MetaTokenExpiry     = "token_exp"
	MetaClaimsJSON      = "claims_json"
	MetaGateway         = "gateway"
)

// Options configure a Server.
type Options struct {
	Store    *policy.Store
	Verifier *bearer.Verifier
	// DecisionLog receives one line per decision; default: none.
	DecisionLog *zap.Logger
	// Meter records decision counts and latency; default: no-op.
	Meter metric.Meter
}

// Server implements envoy.service.auth.v3.Authorization.
type Server struct {
	authv3.UnimplementedAuthorizationServer

	store    *policy.Store
	verifier *bearer.Verifier
	log      *zap.Logger
	count    metric.Int64Counter
	latency  metric.Float64Histogram
	attrs    attrCache
	// principals caches what each verified token contributes to a response.
	principals principalCache

	// Decisions are logged and counted by one background goroutine, off the request
	// path: encoding a JSON log line and updating histograms cost more than deciding.
	// The queue blocks when full (an audit line is never dropped), and Close drains it.
	queue     chan recordEntry
	closeOnce sync.Once
	drained   chan struct{}
}

type recordEntry struct {
	d       *Decision
	elapsed time.Duration
	flushed chan struct{} // set on Flush markers instead of d
}

// recordQueue bounds the decisions waiting to be logged; at ~100 bytes of log per
// decision this is a fraction of a second of burst at full speed.
const recordQueue = 4096

// attrCache keeps one OpenTelemetry attribute set per label combination: building a set
// sorts and copies its attributes, which profiling showed as the largest cost of a Check
// after gRPC itself. Labels are bounded (targets and callers come from policy and verified
// identities, reasons are constants), and the cache is capped all the same.
type attrCache struct {
	m sync.Map // attrKey → metric.MeasurementOption
	n atomic.Int64
}

type attrKey struct{ target, caller, decision, reason string }

const maxAttrSets = 10000

func (c *attrCache) get(k attrKey) metric.MeasurementOption {
	if v, ok := c.m.Load(k); ok {
		return v.(metric.MeasurementOption)
	}
	opt := metric.WithAttributeSet(attribute.NewSet(
		attribute.String("target", k.target),
		attribute.String("caller", k.caller),
		attribute.String("decision", k.decision),
		attribute.String("reason", k.reason),
	))
	if c.n.Load() < maxAttrSets {
		if _, loaded := c.m.LoadOrStore(k, opt); !loaded {
			c.n.Add(1)
		}
	}
	return opt
}

// NewServer returns a Server reading policy from opts.Store.
func NewServer(opts Options) (*Server, error) {
	s := &Server{store: opts.Store, verifier: opts.Verifier, log: opts.DecisionLog,
		queue: make(chan recordEntry, recordQueue), drained: make(chan struct{})}
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
	go s.recordLoop()
	return s, nil
}

// Close stops the background recorder after logging every decision already made. Call it
// after the gRPC server has stopped; Check must not be called afterwards.
func (s *Server) Close() {
	s.closeOnce.Do(func() { close(s.queue) })
	<-s.drained
}

// Flush waits until every decision made before it has been logged and counted (the
// queue is FIFO, so reaching the marker means everything before it is written).
func (s *Server) Flush() {
	done := make(chan struct{})
	s.queue <- recordEntry{flushed: done}
	<-done
}

func (s *Server) recordLoop() {
	defer close(s.drained)
	ctx := context.Background()
	for e := range s.queue {
		if e.flushed != nil {
			close(e.flushed)
			continue
		}
		s.record(ctx, e.d, e.elapsed)
	}
}

// Check decides one request. Every outcome, malformed input included, is an answer to
// Envoy; a gRPC error would make Envoy apply failure_mode_allow/status_on_error instead of
// our reasoned denial.
func (s *Server) Check(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	start := time.Now()
	d := s.decide(ctx, s.store.Current(), req)
	resp := d.Response()
	s.queue <- recordEntry{d: d, elapsed: time.Since(start)}
	return resp, nil
}

func (s *Server) record(ctx context.Context, d *Decision, elapsed time.Duration) {
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
	attrs := s.attrs.get(attrKey{target, caller, decision, d.Reason})
	s.count.Add(ctx, 1, attrs)
	s.latency.Record(ctx, elapsed.Seconds(), attrs)

	if ce := s.log.Check(zap.InfoLevel, "authz decision"); ce != nil {
		fields := []zap.Field{
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
		}
		if d.Gateway != "" {
			fields = append(fields, zap.String("gateway", d.Gateway))
		}
		if p := d.Principal; p != nil {
			fields = append(fields, zap.String("subject", p.Subject), zap.String("issuer", p.Issuer.Name), zap.Strings("scopes", p.Scopes))
		}
		ce.Write(fields...)
	}
}

// Response renders the decision as Envoy expects it.
func (d *Decision) Response() *authv3.CheckResponse {
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

func (d *Decision) okResponse() *authv3.CheckResponse {
	ok := &authv3.OkHttpResponse{}
	set := map[string]bool{}
	add := func(k, v string) {
		ok.Headers = append(ok.Headers, header(k, v))
		set[k] = true
	}
	add(HeaderDecisionID, d.ID)
	if d.Caller.AppID != "" {
		add(HeaderCallerAppID, d.Caller.AppID)
		add(HeaderDaprCallerAppID, d.Caller.AppID)
	}
	if p := d.Principal; p != nil {
		pv := d.pv
		if pv == nil {
			pv = newPrincipalValues(p)
		}
		if pv.subjectHeader != nil {
			ok.Headers = append(ok.Headers, pv.subjectHeader)
			set[HeaderSubject] = true
		}
	}
	// Spoofed identity headers are removed. The ones set above are left out of the
	// removal list: they are overwritten anyway, and Envoy's order of set and remove
	// must not decide whether our own header survives.
	for _, h := range d.Strip {
		if !set[h] {
			ok.HeadersToRemove = append(ok.HeadersToRemove, h)
		}
	}
	return &authv3.CheckResponse{
		Status:          &status.Status{Code: int32(codes.OK)},
		HttpResponse:    &authv3.CheckResponse_OkResponse{OkResponse: ok},
		DynamicMetadata: d.metadata(),
	}
}

// metadata is everything ext_proc needs to decide per tool without re-verifying anything.
func (d *Decision) metadata() *structpb.Struct {
	f := map[string]*structpb.Value{
		MetaDecisionID:      structpb.NewStringValue(d.ID),
		MetaTarget:          structpb.NewStringValue(d.Target),
		MetaCallerAppID:     structpb.NewStringValue(d.Caller.AppID),
		MetaCallerNamespace: structpb.NewStringValue(d.Caller.Namespace),
		MetaSpiffeID:        structpb.NewStringValue(d.SpiffeID),
	}
	if d.Gateway != "" {
		f[MetaGateway] = structpb.NewStringValue(d.Gateway)
	}
	if p := d.Principal; p != nil {
		pv := d.pv
		if pv == nil {
			pv = newPrincipalValues(p)
		}
		f[MetaSubject], f[MetaIssuer], f[MetaScopes], f[MetaTokenExpiry] = pv.subject, pv.issuer, pv.scopes, pv.exp
		// Only Rego reads claims; other apps are spared the bytes on every request.
		if d.wantClaims && pv.claims != nil {
			f[MetaClaimsJSON] = pv.claims
		}
	}
	return &structpb.Struct{Fields: f}
}

type denialBody struct {
	Error      string `json:"error"`
	Reason     string `json:"reason"`
	DecisionID string `json:"decision_id"`
}

func (d *Decision) deniedResponse() *authv3.CheckResponse {
	body, _ := json.Marshal(denialBody{Error: d.Error, Reason: d.Detail, DecisionID: d.ID})
	headers := []*corev3.HeaderValueOption{
		header("content-type", "application/json"),
		header(HeaderDecisionID, d.ID),
	}
	if d.WWWAuthenticate != "" {
		headers = append(headers, header("www-authenticate", d.WWWAuthenticate))
	}
	code := codes.PermissionDenied
	if d.Status == 401 {
		code = codes.Unauthenticated
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

// newDecisionID returns a 128-bit random id. math/rand/v2's generator is ChaCha8-based:
// unpredictable enough for correlation ids and far cheaper than crypto/rand per request.
func newDecisionID() string {
	var b [16]byte
	for i := 0; i < 16; i += 8 {
		v := rand.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return hex.EncodeToString(b[:])
}

// principalValues are the metadata values and header derived from one verified token.
// The verifier returns the same *Principal for every use of a cached token, so they are
// built once per token instead of per request. Sharing them between responses is safe:
// gRPC only reads a message while marshalling it, and protobuf-go allows concurrent
// marshalling of an unmodified message.
type principalValues struct {
	subject, issuer, scopes, exp, claims *structpb.Value
	subjectHeader                        *corev3.HeaderValueOption // nil if not header-safe
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
		pv.subjectHeader = header(HeaderSubject, p.Subject)
	}
	return pv
}

// principalCache maps verified principals to their values. Bounded: cleared when full,
// which only costs rebuilding values for tokens still in use.
type principalCache struct {
	mu sync.RWMutex
	m  map[*bearer.Principal]*principalValues
}

const maxPrincipals = 10000

func (c *principalCache) get(p *bearer.Principal) *principalValues {
	c.mu.RLock()
	pv := c.m[p]
	c.mu.RUnlock()
	if pv != nil {
		return pv
	}
	pv = newPrincipalValues(p)
	c.mu.Lock()
	if c.m == nil || len(c.m) >= maxPrincipals {
		c.m = make(map[*bearer.Principal]*principalValues, 64)
	}
	c.m[p] = pv
	c.mu.Unlock()
	return pv
}
