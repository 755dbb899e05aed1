// Command otlpsink runs the OpenTelemetry Collector's own OTLP receiver (otlpreceiver,
// gRPC) on --addr and writes every span it receives to stdout as one JSON line: the
// receiver a real collector runs, for mcpgate's tests (integration/otlptest). It is a
// module of its own so that the collector's dependencies (confmap needs a gobwas/glob
// that OPA's conflicts with) never enter mcpgate's go.mod. SIGTERM stops it.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/config/configgrpc"
	"go.opentelemetry.io/collector/config/configoptional"
	"go.opentelemetry.io/collector/consumer"
	"go.opentelemetry.io/collector/pdata/pcommon"
	"go.opentelemetry.io/collector/pdata/ptrace"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/receiver/otlpreceiver"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	tracenoop "go.opentelemetry.io/otel/trace/noop"
	"go.uber.org/zap"
)

// Span is one received span, flattened (the JSON lines otlptest reads).
type Span struct {
	Service  string            `json:"service"`
	Name     string            `json:"name"`
	TraceID  string            `json:"trace_id"`
	SpanID   string            `json:"span_id"`
	ParentID string            `json:"parent_id,omitempty"`
	Kind     string            `json:"kind"`
	Attrs    map[string]string `json:"attrs"`
	Status   string            `json:"status"`
}

func main() {
	addr := flag.String("addr", "127.0.0.1:4317", "OTLP/gRPC listen address")
	flag.Parse()
	if err := run(*addr); err != nil {
		fmt.Fprintln(os.Stderr, "otlpsink:", err)
		os.Exit(1)
	}
}

var out = struct {
	sync.Mutex
	enc *json.Encoder
}{enc: json.NewEncoder(os.Stdout)}

func run(addr string) error {
	f := otlpreceiver.NewFactory()
	cfg := f.CreateDefaultConfig().(*otlpreceiver.Config)
	grpc := configgrpc.NewDefaultServerConfig()
	grpc.NetAddr.Endpoint = addr
	cfg.Protocols.GRPC = configoptional.Some(grpc)
	cfg.Protocols.HTTP = configoptional.None[otlpreceiver.HTTPConfig]()
	set := receiver.Settings{
		ID: component.NewID(f.Type()),
		TelemetrySettings: component.TelemetrySettings{
			Logger: zap.NewNop(), TracerProvider: tracenoop.NewTracerProvider(), MeterProvider: metricnoop.NewMeterProvider(),
			Resource: pcommon.NewResource(),
		},
		BuildInfo: component.NewDefaultBuildInfo(),
	}
	next, err := consumer.NewTraces(consume)
	if err != nil {
		return err
	}
	rcv, err := f.CreateTraces(context.Background(), set, cfg, next)
	if err != nil {
		return err
	}
	if err := rcv.Start(context.Background(), nopHost{}); err != nil {
		return fmt.Errorf("otlpreceiver on %s: %w", addr, err)
	}
	fmt.Fprintln(os.Stderr, "otlpsink: listening on", addr)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	return rcv.Shutdown(context.Background())
}

func consume(_ context.Context, td ptrace.Traces) error {
	out.Lock()
	defer out.Unlock()
	rss := td.ResourceSpans()
	for i := range rss.Len() {
		rs := rss.At(i)
		svc := ""
		if v, ok := rs.Resource().Attributes().Get("service.name"); ok {
			svc = v.AsString()
		}
		sss := rs.ScopeSpans()
		for j := range sss.Len() {
			spans := sss.At(j).Spans()
			for k := range spans.Len() {
				s := spans.At(k)
				sp := Span{Service: svc, Name: s.Name(), TraceID: s.TraceID().String(), SpanID: s.SpanID().String(),
					Kind: s.Kind().String(), Attrs: map[string]string{}, Status: s.Status().Code().String()}
				if !s.ParentSpanID().IsEmpty() {
					sp.ParentID = s.ParentSpanID().String()
				}
				s.Attributes().Range(func(k string, v pcommon.Value) bool {
					sp.Attrs[k] = v.AsString()
					return true
				})
				if err := out.enc.Encode(sp); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

type nopHost struct{}

func (nopHost) GetExtensions() map[component.ID]component.Component { return nil }
