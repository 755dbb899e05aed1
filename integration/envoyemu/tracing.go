package envoyemu

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	tracev3 "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	collectorv1 "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonv1 "go.opentelemetry.io/proto/otlp/common/v1"
	resourcev1 "go.opentelemetry.io/proto/otlp/resource/v1"
	tracev1 "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc/metadata"
)

// Tracing as Envoy's HTTP connection manager does it with the OpenTelemetry tracer
// (api/envoy/extensions/filters/network/http_connection_manager/v3/
// http_connection_manager.proto Tracing; api/envoy/config/trace/v3/opentelemetry.proto;
// source/extensions/tracers/opentelemetry):
//
//   - each request gets a span when it arrives (conn_manager_impl.cc traceRequest). An
//     incoming W3C traceparent makes it a child of that span and keeps its sampled flag;
//     without one a new trace starts, sampled at random_sampling (default 100%). The span
//     is "ingress", or "egress <host>" on a listener whose traffic_direction is OUTBOUND
//     (source/common/tracing/tracer_impl.cc startSpan), of kind SERVER or CLIENT;
//   - the ext_authz Check and each ext_proc stream get a child span, "async
//     <service>.<method> egress" (kind CLIENT), whose context goes in the call's initial
//     metadata (source/common/grpc/async_client_impl.cc: tags upstream_cluster,
//     upstream_address, component, and grpc.status_code and error at the end);
//   - the upstream request carries the request span's context in traceparent, replacing
//     the downstream's (router/upstream_request.cc: injectContext of the active span, the
//     router's start_child_span being off);
//   - when the stream ends the span gets the HCM's tags (tracer_impl.cc
//     finalizeDownstreamSpan: the subset below) and error=true for a 5xx;
//   - sampled spans are exported in batches over OTLP/gRPC
//     (opentelemetry.proto.collector.trace.v1.TraceService/Export) to the grpc_service's
//     cluster, with resource service.name (service_name, default
//     "unknown_service:envoy"), once 5 spans wait or every 5 s (runtime
//     tracing.opentelemetry.min_flush_spans and flush_interval_ms defaults), at most
//     max_cache_size (default 1024) waiting; what the collector refuses is dropped.
//
// Not emulated (NACKed): other tracers, http_service, custom samplers, resource
// detectors, and the tags request_size, response_size, response_flags and zone.

// tracingCfg is an HCM's tracing with the OpenTelemetry tracer.
type tracingCfg struct {
	cluster  string  // grpc_service.envoy_grpc.cluster_name ("": spans are not reported)
	service  string  // service_name
	random   float64 // random_sampling, percent
	maxCache int     // max_cache_size
	egress   bool    // the listener's traffic_direction is OUTBOUND
}

const (
	tracerOpenTelemetry = "envoy.tracers.opentelemetry"
	minFlushSpans       = 5
	flushInterval       = 5 * time.Second
	defaultMaxCache     = 1024
	defaultServiceName  = "unknown_service:envoy"
)

// parseTracing reads HttpConnectionManager.tracing; nil without tracing or without a
// provider (the bootstrap-level tracer, which mcpgate never configures, is not emulated).
func parseTracing(t *hcmv3.HttpConnectionManager_Tracing) (*tracingCfg, error) {
	if t == nil || t.GetProvider() == nil {
		return nil, nil
	}
	p := t.GetProvider()
	var oc tracev3.OpenTelemetryConfig
	if p.GetTypedConfig() == nil || p.GetTypedConfig().UnmarshalTo(&oc) != nil {
		return nil, fmt.Errorf("tracing provider %q (%s) is not emulated", p.GetName(), p.GetTypedConfig().GetTypeUrl())
	}
	switch {
	case oc.GetHttpService() != nil:
		return nil, errors.New("tracing: the OpenTelemetry http_service is not emulated")
	case oc.GetSampler() != nil || len(oc.GetResourceDetectors()) > 0 || oc.GetExporter() != nil:
		return nil, errors.New("tracing: OpenTelemetry samplers, resource detectors and exporters are not emulated")
	case oc.GetGrpcService() != nil && oc.GetGrpcService().GetEnvoyGrpc().GetClusterName() == "":
		return nil, errors.New("tracing: only grpc_service.envoy_grpc is emulated")
	}
	c := &tracingCfg{cluster: oc.GetGrpcService().GetEnvoyGrpc().GetClusterName(), service: oc.GetServiceName(),
		random: 100, maxCache: defaultMaxCache}
	if c.service == "" {
		c.service = defaultServiceName
	}
	if r := t.GetRandomSampling(); r != nil {
		c.random = r.GetValue()
	}
	if m := oc.GetMaxCacheSize(); m != nil {
		c.maxCache = int(m.GetValue())
	}
	return c, nil
}

// span is one span; a nil *span is a request that is not traced (all methods no-ops).
type span struct {
	cfg      *tracingCfg
	e        *Emulator
	traceID  [16]byte
	spanID   [8]byte
	parentID [8]byte // zero for a root span
	sampled  bool
	name     string
	kind     tracev1.Span_SpanKind
	start    time.Time

	mu    sync.Mutex
	tags  map[string]string
	ended bool
}

// parseTraceparent reads a W3C traceparent value (version 00, https://www.w3.org/TR/trace-context/).
func parseTraceparent(v string) (trace [16]byte, parent [8]byte, sampled, ok bool) {
	p := strings.Split(strings.TrimSpace(v), "-")
	if len(p) < 4 || p[0] == "ff" || len(p[0]) != 2 || len(p[1]) != 32 || len(p[2]) != 16 || len(p[3]) != 2 || (p[0] == "00" && len(p) != 4) {
		return trace, parent, false, false
	}
	if _, err := hex.Decode(trace[:], []byte(p[1])); err != nil || trace == [16]byte{} {
		return trace, parent, false, false
	}
	if _, err := hex.Decode(parent[:], []byte(p[2])); err != nil || parent == [8]byte{} {
		return trace, parent, false, false
	}
	flags, err := strconv.ParseUint(p[3], 16, 8)
	if err != nil {
		return trace, parent, false, false
	}
	return trace, parent, flags&1 == 1, true
}

// startRequestSpan is the HCM's span of a request on a traced listener.
func (s *stream) startRequestSpan() *span {
	cfg := s.l.tracing
	if cfg == nil {
		return nil
	}
	sp := &span{cfg: cfg, e: s.e, start: time.Now(), kind: tracev1.Span_SPAN_KIND_SERVER, name: "ingress", tags: map[string]string{}}
	if cfg.egress {
		sp.kind, sp.name = tracev1.Span_SPAN_KIND_CLIENT, "egress "+s.req.value(":authority")
	}
	if tp, ok := s.req.get("traceparent"); ok {
		if t, p, sampled, ok := parseTraceparent(tp); ok {
			sp.traceID, sp.parentID, sp.sampled = t, p, sampled
		}
	}
	if sp.traceID == [16]byte{} {
		_, _ = rand.Read(sp.traceID[:])
		sp.sampled = mrand.Float64()*100 < cfg.random
	}
	_, _ = rand.Read(sp.spanID[:])
	return sp
}

// child starts a child span (Span::spawnChild).
func (sp *span) child(name string, kind tracev1.Span_SpanKind) *span {
	if sp == nil {
		return nil
	}
	c := &span{cfg: sp.cfg, e: sp.e, traceID: sp.traceID, parentID: sp.spanID, sampled: sp.sampled,
		name: name, kind: kind, start: time.Now(), tags: map[string]string{}}
	_, _ = rand.Read(c.spanID[:])
	return c
}

// traceparent is the span's context as the OpenTelemetry tracer injects it.
func (sp *span) traceparent() string {
	flags := "00"
	if sp.sampled {
		flags = "01"
	}
	return "00-" + hex.EncodeToString(sp.traceID[:]) + "-" + hex.EncodeToString(sp.spanID[:]) + "-" + flags
}

func (sp *span) setTag(k, v string) {
	if sp == nil {
		return
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if !sp.ended {
		sp.tags[k] = v
	}
}

// inject puts the span's context into the outgoing gRPC metadata of ctx.
func (sp *span) inject(ctx context.Context) context.Context {
	if sp == nil {
		return ctx
	}
	return metadata.AppendToOutgoingContext(ctx, "traceparent", sp.traceparent())
}

// finish ends the span once and queues it for export if it is sampled.
func (sp *span) finish() {
	if sp == nil {
		return
	}
	sp.mu.Lock()
	if sp.ended {
		sp.mu.Unlock()
		return
	}
	sp.ended = true
	end := time.Now()
	out := &tracev1.Span{
		TraceId: append([]byte(nil), sp.traceID[:]...), SpanId: append([]byte(nil), sp.spanID[:]...),
		Name: sp.name, Kind: sp.kind,
		StartTimeUnixNano: uint64(sp.start.UnixNano()), EndTimeUnixNano: uint64(end.UnixNano()),
	}
	if sp.parentID != [8]byte{} {
		out.ParentSpanId = append([]byte(nil), sp.parentID[:]...)
	}
	for k, v := range sp.tags {
		out.Attributes = append(out.Attributes, &commonv1.KeyValue{Key: k, Value: &commonv1.AnyValue{Value: &commonv1.AnyValue_StringValue{StringValue: v}}})
	}
	// The tracer maps the error tag to the span status (opentelemetry/span_context and
	// tracer.cc setTag: "error" → STATUS_CODE_ERROR).
	if sp.tags["error"] == "true" {
		out.Status = &tracev1.Status{Code: tracev1.Status_STATUS_CODE_ERROR}
	}
	sp.mu.Unlock()
	if sp.sampled && sp.cfg.cluster != "" {
		sp.e.spans.add(sp.cfg, out)
	}
}

// asyncSpan is the span Envoy's gRPC client opens for a call to cluster.
func (s *stream) asyncSpan(method, cluster string) *span {
	c := s.span.child("async "+method+" egress", tracev1.Span_SPAN_KIND_CLIENT)
	c.setTag("upstream_cluster", cluster)
	c.setTag("upstream_address", cluster)
	c.setTag("component", "proxy")
	return c
}

// finishRequestSpan sets the HCM's tags on the request span and ends it.
func (s *stream) finishRequestSpan(status int) {
	sp := s.span
	if sp == nil {
		return
	}
	proto := "HTTP/1.1"
	if s.r.ProtoMajor == 2 {
		proto = "HTTP/2"
	}
	url := s.req.value("x-forwarded-proto") + "://" + s.req.value(":authority") + s.req.value(":path")
	if len(url) > 256 { // tracer_impl.cc: http.url is cut at 256 characters
		url = url[:256]
	}
	peer, _, _ := net.SplitHostPort(s.r.RemoteAddr)
	tags := map[string]string{
		"component": "proxy", "node_id": s.e.opts.NodeID, "guid:x-request-id": s.req.value("x-request-id"),
		"http.url": url, "http.method": s.req.value(":method"), "http.protocol": proto,
		"user_agent": orDash(s.req.value("user-agent")), "downstream_cluster": orDash(s.req.value("x-envoy-downstream-service-cluster")),
		"peer.address": peer, "http.status_code": strconv.Itoa(status),
	}
	if s.route != nil {
		if c := s.route.r.GetRoute().GetCluster(); c != "" {
			tags["upstream_cluster"], tags["upstream_cluster.name"] = c, c
		}
	}
	if status >= 500 {
		tags["error"] = "true"
	}
	for k, v := range tags {
		sp.setTag(k, v)
	}
	sp.finish()
}

func orDash(v string) string {
	if v == "" {
		return "-"
	}
	return v
}

// spanQueue holds finished sampled spans until they are exported, per tracer (collector
// cluster and service name).
type spanQueue struct {
	mu      sync.Mutex
	pending map[tracerKey][]*tracev1.Span
	kick    chan struct{}
	dropped int
}

type tracerKey struct{ cluster, service string }

func newSpanQueue() *spanQueue {
	return &spanQueue{pending: map[tracerKey][]*tracev1.Span{}, kick: make(chan struct{}, 1)}
}

func (q *spanQueue) add(cfg *tracingCfg, s *tracev1.Span) {
	q.mu.Lock()
	k := tracerKey{cfg.cluster, cfg.service}
	if len(q.pending[k]) >= cfg.maxCache {
		q.dropped++
		q.mu.Unlock()
		return
	}
	q.pending[k] = append(q.pending[k], s)
	n := len(q.pending[k])
	q.mu.Unlock()
	if n >= minFlushSpans {
		select {
		case q.kick <- struct{}{}:
		default:
		}
	}
}

func (q *spanQueue) take() map[tracerKey][]*tracev1.Span {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := q.pending
	q.pending = map[tracerKey][]*tracev1.Span{}
	return out
}

// runSpanExport exports queued spans until ctx ends.
func (e *Emulator) runSpanExport(ctx context.Context) {
	t := time.NewTicker(flushInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-e.spans.kick:
		}
		e.exportSpans(ctx)
	}
}

// exportSpans sends every queued span to its collector, one Export per tracer.
func (e *Emulator) exportSpans(ctx context.Context) {
	for k, spans := range e.spans.take() {
		if len(spans) == 0 {
			continue
		}
		req := &collectorv1.ExportTraceServiceRequest{ResourceSpans: []*tracev1.ResourceSpans{{
			Resource: &resourcev1.Resource{Attributes: []*commonv1.KeyValue{
				{Key: "service.name", Value: &commonv1.AnyValue{Value: &commonv1.AnyValue_StringValue{StringValue: k.service}}},
				{Key: "telemetry.sdk.name", Value: &commonv1.AnyValue{Value: &commonv1.AnyValue_StringValue{StringValue: "envoy"}}},
				{Key: "telemetry.sdk.language", Value: &commonv1.AnyValue{Value: &commonv1.AnyValue_StringValue{StringValue: "cpp"}}},
			}},
			ScopeSpans: []*tracev1.ScopeSpans{{Scope: &commonv1.InstrumentationScope{Name: "envoy"}, Spans: spans}},
		}}}
		conn, err := e.grpcConn(e.cfg.Load(), k.cluster)
		if err != nil {
			e.opts.Logf("envoyemu: tracing: %d spans dropped: %v", len(spans), err)
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err = collectorv1.NewTraceServiceClient(conn).Export(cctx, req)
		cancel()
		if err != nil {
			e.opts.Logf("envoyemu: tracing: export of %d spans to cluster %s failed (dropped): %v", len(spans), k.cluster, err)
		}
	}
}
