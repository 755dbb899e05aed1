package extauthz

import (
	"context"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	"github.com/mcpgate/mcpgate/integration/otlptest"
	"github.com/mcpgate/mcpgate/policy"
	"github.com/mcpgate/mcpgate/policy/decisionlog"
)

// tracedServer is a Check server whose policy traces to col at rate.
func tracedServer(t *testing.T, col *otlptest.Collector, rate float64) (*fixture, *Server, *decisionlog.Tracer, *lockedBuffer, *sdkmetric.ManualReader) {
	t.Helper()
	f := newFixture(t)
	f.server.store.Current().Mesh.Tracing = &policy.Tracing{SamplingRate: rate, Address: col.Addr()}
	reader := sdkmetric.NewManualReader()
	meter := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)).Meter("t")
	tr, err := decisionlog.NewTracer(meter, nil)
	if err != nil {
		t.Fatal(err)
	}
	logs := &lockedBuffer{}
	srv, err := NewServer(Options{Store: f.server.store, Verifier: f.server.verifier, DecisionLog: productionLogger(logs), Meter: meter, Tracer: tr})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	t.Cleanup(func() { tr.Shutdown(context.Background()) })
	return f, srv, tr, logs, reader
}

const (
	parentTrace = "4bf92f3577b34da6a3ce929d0e0e4736"
	parentSpan  = "00f067aa0ba902b7"
)

// A Check is a span of the trace Envoy propagates, with the decision's attributes and
// never the token; the decision log line names the span.
func TestCheckSpans(t *testing.T) {
	col := otlptest.Start(t)
	f, srv, tr, logs, _ := tracedServer(t, col, 1)
	tok := f.token(t, nil)
	allowed := req{target: "inventory", principal: agentID, headers: bearerHeader(tok)}
	allowed.headers["traceparent"] = "00-" + parentTrace + "-" + parentSpan + "-01"
	if resp, err := srv.Check(context.Background(), allowed.build()); err != nil || codes.Code(resp.GetStatus().GetCode()) != codes.OK {
		t.Fatalf("allowed Check: %v %v", resp, err)
	}
	denied := req{target: "inventory", principal: agentID, headers: map[string]string{"traceparent": "00-" + parentTrace + "-" + parentSpan + "-01"}}
	if resp, _ := srv.Check(context.Background(), denied.build()); codes.Code(resp.GetStatus().GetCode()) == codes.OK {
		t.Fatal("a Check without a token was allowed")
	}
	tr.Shutdown(context.Background()) // flush
	spans := col.Wait(t, 10*time.Second, 2, func(s otlptest.Span) bool { return s.TraceID == parentTrace })
	byDecision := map[string]otlptest.Span{}
	for _, s := range spans {
		if s.ParentID != parentSpan || s.Service != "mcpgate" || s.Name != "mcpgate ext_authz Check" || s.Kind != "Server" {
			t.Errorf("span %+v: want a server span of mcpgate, child of %s", s, parentSpan)
		}
		byDecision[s.Attrs["mcpgate.decision"]] = s
		for _, v := range s.Attrs {
			if strings.Contains(v, tok[:20]) {
				t.Fatal("a span attribute holds the token")
			}
		}
	}
	a, d := byDecision["allow"], byDecision["deny"]
	if a.Attrs["mcpgate.target.app_id"] != "inventory" || a.Attrs["mcpgate.caller.app_id"] != "my-agent" ||
		len(a.Attrs["mcpgate.subject.hash"]) != 16 || a.Attrs["mcpgate.decision_id"] == "" || a.Status != "Unset" {
		t.Errorf("allowed span: %+v", a)
	}
	if d.Attrs["mcpgate.reason"] != "token_missing" || d.Status != "Error" {
		t.Errorf("denied span: %+v", d)
	}
	srv.Flush()
	if !strings.Contains(logs.String(), `"trace_id":"`+parentTrace+`"`) || !strings.Contains(logs.String(), `"span_id":"`+a.SpanID+`"`) {
		t.Errorf("decision log lacks trace_id/span_id:\n%s", logs.String())
	}
}

// samplingRate 0 records nothing for new traces or unsampled parents; a marker
// trace, sampled by its parent, shows the collector would have seen them.
func TestCheckSamplingZero(t *testing.T) {
	col := otlptest.Start(t)
	f, srv, tr, _, _ := tracedServer(t, col, 0)
	tok := f.token(t, nil)
	for _, tp := range []string{"", "00-" + parentTrace + "-" + parentSpan + "-00"} {
		r := req{target: "inventory", principal: agentID, headers: bearerHeader(tok)}
		if tp != "" {
			r.headers["traceparent"] = tp
		}
		if _, err := srv.Check(context.Background(), r.build()); err != nil {
			t.Fatal(err)
		}
	}
	marker := req{target: "inventory", principal: agentID, headers: bearerHeader(tok)}
	marker.headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
	if _, err := srv.Check(context.Background(), marker.build()); err != nil {
		t.Fatal(err)
	}
	tr.Shutdown(context.Background())
	col.Wait(t, 10*time.Second, 1, func(s otlptest.Span) bool { return s.TraceID == "0af7651916cd43dd8448eb211c80319c" })
	if got := col.Spans(); len(got) != 1 {
		t.Errorf("sampling 0: %d spans, want only the marker: %+v", len(got), got)
	}
}

// A collector that is down costs the calls nothing: they are decided as ever, and the
// spans are dropped and counted.
func TestCheckCollectorDown(t *testing.T) {
	col := otlptest.Start(t)
	f, srv, tr, _, reader := tracedServer(t, col, 1)
	col.Stop()
	tok := f.token(t, nil)
	for range 20 {
		resp, err := srv.Check(context.Background(), req{target: "inventory", principal: agentID, headers: bearerHeader(tok)}.build())
		if err != nil || codes.Code(resp.GetStatus().GetCode()) != codes.OK {
			t.Fatalf("Check with the collector down: %v %v", resp, err)
		}
	}
	tr.Shutdown(context.Background()) // the export fails
	if dropped := droppedSpans(t, reader); dropped != 20 {
		t.Errorf("spans dropped = %d, want 20", dropped)
	}
}

func droppedSpans(t *testing.T, reader *sdkmetric.ManualReader) int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	var dropped int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == "mcpgate.trace.spans.dropped" {
				for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
					dropped += dp.Value
				}
			}
		}
	}
	return dropped
}

// A collector that accepts connections and never answers holds the first export for its
// timeout: the queue fills, and the spans beyond it are dropped at once and counted, so
// memory stays bounded and Checks are not slowed.
func TestCheckCollectorHangs(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var held []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			_ = c.Close()
		}
	})
	f := newFixture(t)
	f.server.store.Current().Mesh.Tracing = &policy.Tracing{SamplingRate: 1, Address: ln.Addr().String()}
	reader := sdkmetric.NewManualReader()
	meter := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)).Meter("t")
	tr, err := decisionlog.NewTracer(meter, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(Options{Store: f.server.store, Verifier: f.server.verifier, DecisionLog: productionLogger(io.Discard), Meter: meter, Tracer: tr})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	const calls = 3000
	check := req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(t, nil))}.build()
	for range calls {
		if resp, err := srv.Check(context.Background(), check); err != nil || codes.Code(resp.GetStatus().GetCode()) != codes.OK {
			t.Fatalf("Check with the collector hanging: %v %v", resp, err)
		}
	}
	// Nothing has been exported yet (the first export waits for its 5 s timeout): at most
	// the queue's 2048 spans are held, the rest were dropped as they ended.
	if d := droppedSpans(t, reader); d < calls-2048 || d > calls {
		t.Errorf("spans dropped while the collector hangs = %d, want at least %d of %d", d, calls-2048, calls)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	tr.Shutdown(ctx)
}

// BenchmarkCheckTracing is a Check over loopback gRPC with tracing off and on at
// samplingRate 1 (exporting to the collector's receiver), alternating in one run.
func BenchmarkCheckTracing(b *testing.B) {
	col := otlptest.Start(b)
	type side struct {
		client authv3.AuthorizationClient
		check  *authv3.CheckRequest
		lat    []time.Duration
	}
	var sides [2]*side
	for i, on := range []bool{false, true} {
		f := newFixture(b)
		var tr *decisionlog.Tracer
		if on {
			f.server.store.Current().Mesh.Tracing = &policy.Tracing{SamplingRate: 1, Address: col.Addr()}
			var err error
			if tr, err = decisionlog.NewTracer(nil, nil); err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { tr.Shutdown(context.Background()) })
		}
		srv, err := NewServer(Options{Store: f.server.store, Verifier: f.server.verifier, DecisionLog: productionLogger(io.Discard), Tracer: tr})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(srv.Close)
		r := req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(b, nil))}
		r.headers["traceparent"] = "00-" + parentTrace + "-" + parentSpan + "-01"
		sd := &side{client: startGRPC(b, srv), check: r.build()}
		if resp, err := sd.client.Check(context.Background(), sd.check); err != nil || resp.GetStatus().GetCode() != 0 {
			b.Fatalf("warm-up: %v %v", resp, err)
		}
		sides[i] = sd
	}
	timed := func(sd *side) {
		t0 := time.Now()
		if _, err := sd.client.Check(context.Background(), sd.check); err != nil {
			b.Fatal(err)
		}
		sd.lat = append(sd.lat, time.Since(t0))
	}
	i := 0
	for b.Loop() {
		timed(sides[i%2])
		timed(sides[(i+1)%2])
		i++
	}
	off50, _ := percentiles(sides[0].lat)
	on50, on99 := percentiles(sides[1].lat)
	b.ReportMetric(us(off50), "off-p50-µs")
	b.ReportMetric(us(on50), "on-p50-µs")
	b.ReportMetric(us(on99), "on-p99-µs")
	b.ReportMetric(float64(on50)/float64(off50), "on/off-p50")
}

// The parent is the span Envoy's gRPC client opens for the Check (the traceparent of the
// call's metadata), not the downstream's traceparent in the request headers; a malformed
// metadata value falls back to the request's.
func TestCheckSpanParentFromGRPCMetadata(t *testing.T) {
	col := otlptest.Start(t)
	f, srv, tr, _, _ := tracedServer(t, col, 1)
	const asyncSpan = "b7ad6b7169203331"
	r := req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(t, nil))}
	r.headers["traceparent"] = "00-" + parentTrace + "-" + parentSpan + "-01"
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("traceparent", "00-"+parentTrace+"-"+asyncSpan+"-01"))
	if _, err := srv.Check(ctx, r.build()); err != nil {
		t.Fatal(err)
	}
	bad := metadata.NewIncomingContext(context.Background(), metadata.Pairs("traceparent", "00-zz-"+asyncSpan+"-01"))
	r.headers["x-marker"] = "fallback"
	if _, err := srv.Check(bad, r.build()); err != nil {
		t.Fatal(err)
	}
	tr.Shutdown(context.Background())
	spans := col.Wait(t, 10*time.Second, 2, func(s otlptest.Span) bool { return s.TraceID == parentTrace })
	parents := map[string]int{}
	for _, s := range spans {
		parents[s.ParentID]++
	}
	if parents[asyncSpan] != 1 || parents[parentSpan] != 1 {
		t.Errorf("span parents %v: want one child of the metadata's span %s and one (malformed metadata) of the request's %s", parents, asyncSpan, parentSpan)
	}
}
