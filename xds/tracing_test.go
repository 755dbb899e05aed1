package xds

import (
	"testing"

	tracev3 "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"

	"github.com/mcpgate/mcpgate/envoy"
	"github.com/mcpgate/mcpgate/policy"
)

// With Mesh.spec.tracing every policy listener traces with Envoy's OpenTelemetry tracer
// to the collector, through a cluster of its own, at the policy's sampling rate; without
// it, nothing traces.
func TestTracingListeners(t *testing.T) {
	snap := requireLoad(t, "../testdata/demo")
	for _, node := range []string{"inventory", "my-agent"} {
		res, err := Translate(snap, node)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range res.Listeners {
			var hcm hcmv3.HttpConnectionManager
			requireUnpack(t, l.FilterChains[0].Filters[0].GetTypedConfig(), &hcm)
			if hcm.Tracing != nil {
				t.Errorf("%s %s traces without spec.tracing", node, l.Name)
			}
		}
	}

	snap.Mesh.Tracing = &policy.Tracing{SamplingRate: 0.25, Address: "collector:4317"}
	for _, node := range []string{"inventory", "my-agent"} {
		res, err := Translate(snap, node)
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, c := range res.Clusters {
			if c.Name == ClusterOTLP {
				found = c.GetTypedExtensionProtocolOptions() != nil // HTTP/2 for gRPC
			}
		}
		if !found {
			t.Errorf("%s: no HTTP/2 cluster %s", node, ClusterOTLP)
		}
		for _, l := range res.Listeners {
			var hcm hcmv3.HttpConnectionManager
			requireUnpack(t, l.FilterChains[0].Filters[0].GetTypedConfig(), &hcm)
			tr := hcm.GetTracing()
			if tr.GetProvider().GetName() != envoy.TracerOpenTelemetry || tr.GetRandomSampling().GetValue() != 25 {
				t.Errorf("%s %s tracing = %v", node, l.Name, tr)
				continue
			}
			var otel tracev3.OpenTelemetryConfig
			requireUnpack(t, tr.GetProvider().GetTypedConfig(), &otel)
			if otel.GetGrpcService().GetEnvoyGrpc().GetClusterName() != ClusterOTLP || otel.GetServiceName() != node+"-envoy" {
				t.Errorf("%s %s OpenTelemetry config = %v", node, l.Name, &otel)
			}
		}
	}
}
