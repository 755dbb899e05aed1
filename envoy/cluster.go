package envoy

import (
	"net"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Protocol is the HTTP protocol a cluster speaks upstream.
type Protocol int

// Upstream protocols.
const (
	// HTTP1 is for app processes and servers on the internet.
	HTTP1 Protocol = iota
	// HTTP2 is for gRPC (mcpgate): ext_authz and ext_proc are gRPC streams.
	HTTP2
	// HTTPAuto negotiates h2 or http/1.1 by ALPN; it needs a TLS transport socket.
	HTTPAuto
)

// Defaults of every cluster.
const (
	ConnectTimeout = 5 * time.Second
	// HTTP/2 PINGs on connections that carry long-lived streams (ext_proc, SSE), so that a
	// dead peer behind a NAT or load balancer is noticed instead of hanging a request.
	KeepaliveInterval = 30 * time.Second
	KeepaliveTimeout  = 5 * time.Second
)

// ClusterOptions describe a cluster with a single upstream host.
type ClusterOptions struct {
	Name string
	Host string
	Port uint32
	// Internet selects LOGICAL_DNS (one connection pool for a name that resolves to many,
	// changing addresses), as Envoy recommends for large web services.
	Internet        bool
	Protocol        Protocol
	TransportSocket *corev3.TransportSocket
	// MaxRequests is the circuit breaker (0: Envoy's defaults).
	MaxRequests int
	// OutlierDetection ejects a host after consecutive 5xx.
	OutlierDetection bool
	// Static is for bootstrap clusters, which cannot use EDS: an IP address becomes a
	// STATIC cluster instead.
	Static bool
}

// Cluster builds a cluster. A host that is an IP address becomes an EDS cluster whose
// ClusterLoadAssignment is returned too (served over ADS); a host name becomes STRICT_DNS
// (or LOGICAL_DNS) with the assignment inline, because EDS endpoints must be IP
// addresses.
func Cluster(o ClusterOptions) (*clusterv3.Cluster, *endpointv3.ClusterLoadAssignment, error) {
	c := &clusterv3.Cluster{
		Name:            o.Name,
		ConnectTimeout:  duration(ConnectTimeout),
		TransportSocket: o.TransportSocket,
		UpstreamConnectionOptions: &clusterv3.UpstreamConnectionOptions{
			TcpKeepalive: &corev3.TcpKeepalive{},
		},
	}
	cla := LoadAssignment(o.Name, o.Host, o.Port)
	var eds *endpointv3.ClusterLoadAssignment
	switch {
	case net.ParseIP(o.Host) != nil && o.Static:
		c.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC}
		c.LoadAssignment = cla
	case net.ParseIP(o.Host) != nil:
		c.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS}
		c.EdsClusterConfig = &clusterv3.Cluster_EdsClusterConfig{EdsConfig: ADSConfigSource()}
		eds = cla
	case o.Internet:
		c.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_LOGICAL_DNS}
		c.DnsLookupFamily = clusterv3.Cluster_V4_PREFERRED
		c.LoadAssignment = cla
	default:
		c.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STRICT_DNS}
		c.DnsLookupFamily = clusterv3.Cluster_V4_PREFERRED
		c.LoadAssignment = cla
	}
	opts, err := protocolOptions(o.Protocol)
	if err != nil {
		return nil, nil, err
	}
	c.TypedExtensionProtocolOptions = map[string]*anypb.Any{ProtocolOpts: opts}
	if o.MaxRequests > 0 {
		n := wrapperspb.UInt32(uint32(o.MaxRequests))
		c.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{
			Priority:           corev3.RoutingPriority_DEFAULT,
			MaxConnections:     n,
			MaxPendingRequests: n,
			MaxRequests:        n,
			TrackRemaining:     true,
		}}}
	}
	if o.OutlierDetection {
		c.OutlierDetection = &clusterv3.OutlierDetection{
			Consecutive_5Xx:  wrapperspb.UInt32(5),
			Interval:         duration(10 * time.Second),
			BaseEjectionTime: duration(30 * time.Second),
		}
	}
	return c, eds, nil
}

// LoadAssignment is the single-endpoint assignment of a cluster. The locality is named
// because some xDS clients (grpc-go) reject EDS localities without one, and weighted
// because they require a weight.
func LoadAssignment(cluster, host string, port uint32) *endpointv3.ClusterLoadAssignment {
	return &endpointv3.ClusterLoadAssignment{
		ClusterName: cluster,
		Endpoints: []*endpointv3.LocalityLbEndpoints{{
			Locality:            &corev3.Locality{Region: "mcpgate"},
			LoadBalancingWeight: wrapperspb.UInt32(1),
			LbEndpoints: []*endpointv3.LbEndpoint{{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
					Address: SocketAddress(host, port),
				}},
			}},
		}},
	}
}

func protocolOptions(p Protocol) (*anypb.Any, error) {
	h2 := &corev3.Http2ProtocolOptions{ConnectionKeepalive: &corev3.KeepaliveSettings{
		Interval: duration(KeepaliveInterval),
		Timeout:  duration(KeepaliveTimeout),
	}}
	o := &httpv3.HttpProtocolOptions{
		CommonHttpProtocolOptions: &corev3.HttpProtocolOptions{IdleTimeout: duration(ConnectionIdleTimeout)},
	}
	switch p {
	case HTTP2:
		o.UpstreamProtocolOptions = &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: h2},
		}}
	case HTTPAuto:
		o.UpstreamProtocolOptions = &httpv3.HttpProtocolOptions_AutoConfig{AutoConfig: &httpv3.HttpProtocolOptions_AutoHttpConfig{
			HttpProtocolOptions:  &corev3.Http1ProtocolOptions{},
			Http2ProtocolOptions: h2,
		}}
	default:
		o.UpstreamProtocolOptions = &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: &corev3.Http1ProtocolOptions{}},
		}}
	}
	return Any(o)
}
