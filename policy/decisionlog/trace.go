package decisionlog

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
	"go.uber.org/zap"
	"google.golang.org/grpc/metadata"

	"github.com/mcpgate/mcpgate/policy"
)

// Span attribute keys of mcpgate's spans. Values come from the decision, never from a
// token: the subject is hashed.
const (
	AttrCaller      = attribute.Key("mcpgate.caller.app_id")
	AttrTarget      = attribute.Key("mcpgate.target.app_id")
	AttrSubjectHash = attribute.Key("mcpgate.subject.hash")
	AttrDecision    = attribute.Key("mcpgate.decision")
	AttrReason      = attribute.Key("mcpgate.reason")
	AttrRule        = attribute.Key("mcpgate.rule")
	AttrDecisionID  = attribute.Key("mcpgate.decision_id")
	AttrMethod      = attribute.Key("mcp.method.name") // OpenTelemetry's MCP semantic conventions
	AttrTool        = attribute.Key("gen_ai.tool.name")
)

// Bounds of the export pipeline: memory stays bounded whatever the collector does.
const (
	maxQueuedSpans = 2048
	exportTimeout  = 5 * time.Second
)

// Tracer starts mcpgate's spans under the tracing the policy in force asks for
// (Mesh.spec.tracing): with none, Start returns a span that records nothing, for the cost
// of one atomic load. Apply switches the exporter when the policy changes. Spans are
// exported over OTLP/gRPC in batches; a collector that is down or slow costs no call
// anything: batches it does not take are dropped and counted
// (mcpgate_trace_spans_dropped_total), and the queue is bounded.
type Tracer struct {
	cur     atomic.Pointer[tracerState]
	mu      sync.Mutex
	log     *zap.Logger
	dropped metric.Int64Counter
	sent    metric.Int64Counter
}

type tracerState struct {
	cfg policy.Tracing
	tp  *sdktrace.TracerProvider
	tr  trace.Tracer
}

var (
	propagator       = propagation.TraceContext{}
	errorHandlerOnce sync.Once
)

// NewTracer returns a Tracer that is off until Apply turns it on. meter and log may be nil.
func NewTracer(meter metric.Meter, log *zap.Logger) (*Tracer, error) {
	if meter == nil {
		meter = noop.NewMeterProvider().Meter("")
	}
	if log == nil {
		log = zap.NewNop()
	}
	t := &Tracer{log: log}
	errorHandlerOnce.Do(func() {
		// The SDK reports failed exports through a process-wide handler that prints
		// every one; mcpgate counts dropped spans and logs at most one line a minute.
		var last atomic.Int64
		otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
			now := time.Now().UnixNano()
			if prev := last.Load(); now-prev < int64(time.Minute) || !last.CompareAndSwap(prev, now) {
				return
			}
			log.Warn("tracing: spans not exported (counted in mcpgate_trace_spans_dropped_total; next report in a minute at most)", zap.Error(err))
		}))
	})
	var err error
	if t.dropped, err = meter.Int64Counter("mcpgate.trace.spans.dropped",
		metric.WithDescription("spans the OTLP collector did not take (down, slow, refusing): dropped, never retried")); err != nil {
		return nil, err
	}
	if t.sent, err = meter.Int64Counter("mcpgate.trace.spans.exported",
		metric.WithDescription("spans exported to the OTLP collector")); err != nil {
		return nil, err
	}
	return t, nil
}

// Apply makes cfg (nil: off) the tracing in force. An unchanged cfg costs nothing; a
// changed one starts a new exporter and flushes the old in the background.
func (t *Tracer) Apply(cfg *policy.Tracing) {
	if t == nil {
		return
	}
	cur := t.cur.Load()
	if (cfg == nil && cur == nil) || (cfg != nil && cur != nil && cur.cfg == *cfg) {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	var next *tracerState
	if cfg != nil {
		next = t.newState(*cfg)
		t.log.Info("tracing on", zap.String("otlp_address", cfg.Address), zap.Float64("sampling_rate", cfg.SamplingRate))
	} else {
		t.log.Info("tracing off")
	}
	if old := t.cur.Swap(next); old != nil {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), exportTimeout)
			defer cancel()
			_ = old.tp.Shutdown(ctx)
		}()
	}
}

func (t *Tracer) newState(cfg policy.Tracing) *tracerState {
	opts := []otlptracegrpc.Option{
		otlptracegrpc.WithEndpoint(cfg.Address),
		otlptracegrpc.WithTimeout(exportTimeout),
		// No retries: a batch the collector does not take is dropped and counted, so a
		// collector that is down never grows memory or delays the batches after it.
		otlptracegrpc.WithRetry(otlptracegrpc.RetryConfig{Enabled: false}),
	}
	if !cfg.Secure {
		opts = append(opts, otlptracegrpc.WithInsecure())
	}
	// New does not dial: the client connects lazily, so a collector that is down at
	// start is only dropped spans.
	tpOpts := []sdktrace.TracerProviderOption{
		sdktrace.WithResource(resource.NewSchemaless(attribute.String("service.name", "mcpgate"))),
		// Envoy decides for the calls it traces (the sampled flag of traceparent); the
		// rate applies to traces mcpgate starts itself.
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(cfg.SamplingRate))),
	}
	if exp, err := otlptracegrpc.New(context.Background(), opts...); err != nil {
		t.log.Error("tracing: the OTLP exporter cannot be made; spans are dropped", zap.Error(err))
	} else {
		q := &queueBound{max: maxQueuedSpans, dropped: t.dropped}
		bsp := sdktrace.NewBatchSpanProcessor(&countingExporter{SpanExporter: exp, dropped: t.dropped, sent: t.sent, queued: q},
			sdktrace.WithMaxQueueSize(maxQueuedSpans), sdktrace.WithExportTimeout(exportTimeout),
			sdktrace.WithBatchTimeout(200*time.Millisecond))
		tpOpts = append(tpOpts, sdktrace.WithSpanProcessor(&boundedProcessor{SpanProcessor: bsp, q: q}))
	}
	tp := sdktrace.NewTracerProvider(tpOpts...)
	return &tracerState{cfg: cfg, tp: tp, tr: tp.Tracer("github.com/mcpgate/mcpgate")}
}

// Start starts a server span named name. Its parent is the span the gRPC call's own
// traceparent metadata names: Envoy's gRPC client opens a span per ext_authz Check and
// ext_proc stream ("async envoy.service.auth.v3.Authorization.Check egress", a child of
// the HCM's span) and injects it into the call's initial metadata
// (source/common/grpc/async_client_impl.cc). Without a valid one, the parent is what
// traceparent (the HTTP request's header, "" if none) names: the downstream's span.
func (t *Tracer) Start(ctx context.Context, traceparent, name string) (context.Context, trace.Span) {
	var st *tracerState
	if t != nil {
		st = t.cur.Load()
	}
	if st == nil {
		return ctx, noopSpan
	}
	parent := ctx
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get("traceparent"); len(v) == 1 {
			if c := propagator.Extract(ctx, traceparentCarrier(v[0])); trace.SpanContextFromContext(c).IsValid() {
				parent, traceparent = c, ""
			}
		}
	}
	if traceparent != "" {
		parent = propagator.Extract(ctx, traceparentCarrier(traceparent))
	}
	return st.tr.Start(parent, name, trace.WithSpanKind(trace.SpanKindServer))
}

// Enabled reports whether spans are recorded at all (tracing on).
func (t *Tracer) Enabled() bool { return t != nil && t.cur.Load() != nil }

// Flush exports the spans ended so far.
func (t *Tracer) Flush(ctx context.Context) {
	if t == nil {
		return
	}
	if st := t.cur.Load(); st != nil {
		_ = st.tp.ForceFlush(ctx)
	}
}

// Shutdown flushes the spans in flight and stops exporting.
func (t *Tracer) Shutdown(ctx context.Context) {
	if t == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if old := t.cur.Swap(nil); old != nil {
		_ = old.tp.Shutdown(ctx)
	}
}

var noopSpan = tracenoop.Span{}

// traceparentCarrier holds one traceparent value for the propagator.
type traceparentCarrier string

func (c traceparentCarrier) Get(key string) string {
	if key == "traceparent" {
		return string(c)
	}
	return ""
}
func (traceparentCarrier) Set(string, string) {}
func (traceparentCarrier) Keys() []string     { return []string{"traceparent"} }

// countingExporter counts what the collector took and what it did not.
type countingExporter struct {
	sdktrace.SpanExporter
	dropped, sent metric.Int64Counter
	queued        *queueBound
}

// queueBound counts the spans handed to the batch processor and not yet through an
// export: the SDK drops spans silently when its queue is full, so mcpgate drops them
// first, at the same bound, and counts them (a batch being exported counts too, so the
// bound is a little stricter than the SDK's).
type queueBound struct {
	n       atomic.Int64
	max     int64
	dropped metric.Int64Counter
}

// boundedProcessor is the batch processor behind queueBound.
type boundedProcessor struct {
	sdktrace.SpanProcessor
	q *queueBound
}

func (p *boundedProcessor) OnEnd(s sdktrace.ReadOnlySpan) {
	if !s.SpanContext().IsSampled() {
		return // the batch processor exports sampled spans only
	}
	if p.q.n.Add(1) > p.q.max {
		p.q.n.Add(-1)
		p.q.dropped.Add(context.Background(), 1)
		otel.Handle(errQueueFull)
		return
	}
	p.SpanProcessor.OnEnd(s)
}

var errQueueFull = errors.New("the span queue is full (the collector is slow or unreachable): spans dropped")

func (e *countingExporter) ExportSpans(ctx context.Context, spans []sdktrace.ReadOnlySpan) error {
	defer e.queued.n.Add(-int64(len(spans)))
	err := e.SpanExporter.ExportSpans(ctx, spans)
	if err != nil {
		e.dropped.Add(ctx, int64(len(spans)))
		return err
	}
	e.sent.Add(ctx, int64(len(spans)))
	return nil
}

// SubjectHash is the span attribute of a token subject: enough to tell users apart in
// a trace, not to name them.
func SubjectHash(sub string) string {
	if sub == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(sub))
	return hex.EncodeToString(sum[:8])
}

// IDs are a span's trace and span ids for a log line, "" when it records nothing.
func IDs(span trace.Span) (traceID, spanID string) {
	sc := span.SpanContext()
	if !sc.IsValid() || !span.IsRecording() {
		return "", ""
	}
	return sc.TraceID().String(), sc.SpanID().String()
}
