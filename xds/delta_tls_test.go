package xds

import (
	"context"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// Envoy sends the node only in the first request of a delta xDS stream, and
// go-control-plane calls OnStreamDeltaRequest before it fills later requests in: over
// TLS the ACK and every later request must be checked as the stream's node, not refused
// as node.cluster "" (Envoy would reconnect in a loop and never get a second update).
func TestDeltaOverTLSAfterTheFirstRequest(t *testing.T) {
	addr, ca := startTLSADS(t)
	conn := dialTLSADS(t, addr, ca, ca.TLSCert(t, "spiffe://example.org/ns/default/my-agent"))
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: &corev3.Node{Id: "my-agent-1", Cluster: "my-agent"}, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil || len(resp.GetResources()) == 0 {
		t.Fatalf("first response: %v %v", resp, err)
	}
	// The ACK, as Envoy sends it: no node.
	if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.ClusterType, ResponseNonce: resp.GetNonce()}); err != nil {
		t.Fatal(err)
	}
	// A second subscription, also without the node, is answered.
	if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.ListenerType}); err != nil {
		t.Fatal(err)
	}
	resp, err = stream.Recv()
	if err != nil {
		t.Fatalf("the stream was refused after its first request: %v", err)
	}
	if resp.GetTypeUrl() != resource.ListenerType || len(resp.GetResources()) == 0 {
		t.Fatalf("listeners: %v", resp)
	}
}
