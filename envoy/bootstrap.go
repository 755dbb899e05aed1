package envoy

import (
	"fmt"
	"net"
	"strconv"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
)

// XDSCluster is the bootstrap cluster reaching mcpgate's ADS server.
const XDSCluster = "xds_cluster"

// DefaultAdminPort is Envoy's customary admin port.
const DefaultAdminPort = 9901

// BootstrapOptions describe one Envoy.
type BootstrapOptions struct {
	// NodeID is free per replica; NodeCluster is the App ID (or gateway name) whose
	// snapshot the Envoy receives.
	NodeID      string
	NodeCluster string
	// XDSAddress is host:port of mcpgate's ADS server.
	XDSAddress string
	// AdminPort is the admin listener's port on 127.0.0.1 (0: DefaultAdminPort).
	AdminPort uint32
	// SpireAgentSocket, if set, adds the static cluster for the SPIRE agent's SDS API.
	SpireAgentSocket string
	// XDSTLS, if set, makes the xds_cluster SPIFFE mTLS with secrets from the SPIRE agent
	// (mcpgate serve --spiffe-socket); it requires SpireAgentSocket. Nil: plaintext.
	XDSTLS *XDSTLS
}

// XDSTLS names the SDS secrets and the peer of the xds_cluster's mTLS.
type XDSTLS struct {
	// SVID is the SDS name of this Envoy's certificate (SPIRE: its SPIFFE ID) and Bundle
	// that of the trust bundle (SPIRE: the trust domain's ID, spiffe://example.org).
	SVID, Bundle string
	// ServerID is mcpgate's SPIFFE ID, the only certificate accepted from the xDS server:
	// whoever serves xDS programs this Envoy, so another workload of the trust domain must
	// not be able to stand in for it.
	ServerID string
}

// Bootstrap builds the bootstrap an Envoy starts with: its node identity, an admin
// listener on loopback only (it can change the running configuration), and everything
// else (listeners, clusters, routes, endpoints, file secrets) from ADS.
func Bootstrap(o BootstrapOptions) (*bootstrapv3.Bootstrap, error) {
	host, portStr, err := net.SplitHostPort(o.XDSAddress)
	if err != nil {
		return nil, fmt.Errorf("xds address %q: %w", o.XDSAddress, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 {
		return nil, fmt.Errorf("xds address %q: bad port", o.XDSAddress)
	}
	if o.NodeCluster == "" {
		return nil, fmt.Errorf("node cluster (the App ID or gateway name) is required")
	}
	if o.NodeID == "" {
		o.NodeID = o.NodeCluster
	}
	if o.AdminPort == 0 {
		o.AdminPort = DefaultAdminPort
	}
	xds, _, err := Cluster(ClusterOptions{Name: XDSCluster, Host: host, Port: uint32(port), Protocol: HTTP2, Static: true})
	if err != nil {
		return nil, err
	}
	if o.XDSTLS != nil {
		t := o.XDSTLS
		if o.SpireAgentSocket == "" || t.SVID == "" || t.Bundle == "" || t.ServerID == "" {
			// Envoy can only fetch these secrets from a static cluster: the xds_cluster's
			// certificates are needed before any dynamic resource arrives.
			return nil, fmt.Errorf("xDS TLS needs the SPIRE agent socket, the SVID and bundle secret names and mcpgate's SPIFFE ID")
		}
		src := SpireSDS()
		ts, err := UpstreamMTLS(MeshTLS{Cert: SecretRef(t.SVID, src), Bundle: SecretRef(t.Bundle, src)}, t.ServerID)
		if err != nil {
			return nil, err
		}
		xds.TransportSocket = ts
	}
	clusters := []*clusterv3.Cluster{xds}
	if o.SpireAgentSocket != "" {
		spire, err := spireCluster(o.SpireAgentSocket)
		if err != nil {
			return nil, err
		}
		clusters = append(clusters, spire)
	}
	b := &bootstrapv3.Bootstrap{
		Node: &corev3.Node{Id: o.NodeID, Cluster: o.NodeCluster},
		Admin: &bootstrapv3.Admin{
			Address: SocketAddress("127.0.0.1", o.AdminPort),
		},
		StaticResources: &bootstrapv3.Bootstrap_StaticResources{Clusters: clusters},
		DynamicResources: &bootstrapv3.Bootstrap_DynamicResources{
			AdsConfig: &corev3.ApiConfigSource{
				ApiType:             corev3.ApiConfigSource_GRPC,
				TransportApiVersion: corev3.ApiVersion_V3,
				GrpcServices: []*corev3.GrpcService{{
					TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: XDSCluster}},
				}},
				SetNodeOnFirstMessageOnly: true,
			},
			LdsConfig: ADSConfigSource(),
			CdsConfig: ADSConfigSource(),
		},
	}
	if err := Validate(b); err != nil {
		return nil, err
	}
	return b, nil
}

// spireCluster reaches the SPIRE agent's SDS API on its Unix socket (gRPC, so HTTP/2).
func spireCluster(socket string) (*clusterv3.Cluster, error) {
	c, _, err := Cluster(ClusterOptions{Name: SpireAgentCluster, Host: "127.0.0.1", Port: 1, Protocol: HTTP2, Static: true})
	if err != nil {
		return nil, err
	}
	c.UpstreamConnectionOptions = nil // TCP keepalive does not apply to a Unix socket
	c.LoadAssignment = &endpointv3.ClusterLoadAssignment{
		ClusterName: SpireAgentCluster,
		Endpoints: []*endpointv3.LocalityLbEndpoints{{LbEndpoints: []*endpointv3.LbEndpoint{{
			HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: &corev3.Address{Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: socket}}},
			}},
		}}}},
	}
	return c, nil
}
