package envoyemu

import (
	"encoding/hex"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tracev3 "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func tracingWith(t *testing.T, m proto.Message, random *typev3.Percent) *hcmv3.HttpConnectionManager_Tracing {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return &hcmv3.HttpConnectionManager_Tracing{RandomSampling: random,
		Provider: &tracev3.Tracing_Http{Name: tracerOpenTelemetry, ConfigType: &tracev3.Tracing_Http_TypedConfig{TypedConfig: a}}}
}

func TestParseTracing(t *testing.T) {
	grpc := &corev3.GrpcService{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: "otlp"}}}
	c, err := parseTracing(tracingWith(t, &tracev3.OpenTelemetryConfig{GrpcService: grpc, ServiceName: "a-envoy"}, &typev3.Percent{Value: 10}))
	if err != nil || c.cluster != "otlp" || c.service != "a-envoy" || c.random != 10 || c.maxCache != defaultMaxCache {
		t.Errorf("parseTracing = %+v, %v", c, err)
	}
	c, err = parseTracing(tracingWith(t, &tracev3.OpenTelemetryConfig{GrpcService: grpc, MaxCacheSize: wrapperspb.UInt32(7)}, nil))
	if err != nil || c.random != 100 || c.service != defaultServiceName || c.maxCache != 7 {
		t.Errorf("defaults: %+v, %v", c, err)
	}
	if c, err := parseTracing(nil); c != nil || err != nil {
		t.Errorf("no tracing: %+v, %v", c, err)
	}
	for name, bad := range map[string]proto.Message{
		"http_service": &tracev3.OpenTelemetryConfig{HttpService: &corev3.HttpService{}},
		"google_grpc": &tracev3.OpenTelemetryConfig{GrpcService: &corev3.GrpcService{TargetSpecifier: &corev3.GrpcService_GoogleGrpc_{
			GoogleGrpc: &corev3.GrpcService_GoogleGrpc{TargetUri: "x"}}}},
		"zipkin": &tracev3.ZipkinConfig{CollectorCluster: "z"},
	} {
		if c, err := parseTracing(tracingWith(t, bad, nil)); err == nil {
			t.Errorf("%s: accepted as %+v, want a NACK", name, c)
		}
	}
}

func TestParseTraceparent(t *testing.T) {
	const tr, sp = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	for v, want := range map[string]struct{ ok, sampled bool }{
		"00-" + tr + "-" + sp + "-01":                       {true, true},
		"00-" + tr + "-" + sp + "-00":                       {true, false},
		"01-" + tr + "-" + sp + "-01-future":                {true, true}, // a later version may add fields
		"00-" + tr + "-" + sp + "-01-extra":                 {false, false},
		"ff-" + tr + "-" + sp + "-01":                       {false, false},
		"00-00000000000000000000000000000000-" + sp + "-01": {false, false},
		"00-" + tr + "-0000000000000000-01":                 {false, false},
		"00-" + tr[:30] + "-" + sp + "-01":                  {false, false},
		"00-" + tr + "-" + sp + "-zz":                       {false, false},
		"":                                                  {false, false},
	} {
		trace, parent, sampled, ok := parseTraceparent(v)
		if ok != want.ok || sampled != want.sampled {
			t.Errorf("parseTraceparent(%q) = sampled %v ok %v, want %+v", v, sampled, ok, want)
		}
		if ok && (spanHex(trace[:]) != tr || spanHex(parent[:]) != sp) {
			t.Errorf("parseTraceparent(%q) ids %x %x", v, trace, parent)
		}
	}
	s := &span{sampled: true}
	copy(s.traceID[:], mustHex(t, tr))
	copy(s.spanID[:], mustHex(t, sp))
	if got := s.traceparent(); got != "00-"+tr+"-"+sp+"-01" {
		t.Errorf("traceparent() = %s", got)
	}
}

func spanHex(b []byte) string { return hex.EncodeToString(b) }

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
