package envoyemu

// Starting from a bootstrap, as Envoy does (envoy -c bootstrap.yaml): the node, the static
// clusters, and ADS over the static cluster the bootstrap's ads_config names, with that
// cluster's transport socket (api/envoy/config/bootstrap/v3/bootstrap.proto). The SPIRE
// agent's cluster (a pipe address) becomes Options.SDSSocket. Static clusters stay in
// every configuration: CDS adds to them and may not replace them
// (source/common/upstream/cluster_manager_impl.cc addOrUpdateCluster refuses to update a
// cluster that was not added through the API).

import (
	"errors"
	"fmt"
	"maps"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
)

// bootstrapped is what the emulator takes from a bootstrap beyond Options.
type bootstrapped struct {
	static     map[string]*clusterCfg // static_resources.clusters, SPIRE's excepted
	adsCluster string                 // the static cluster ADS runs on
}

// fromBootstrap fills o's node, XDSAddress and SDSSocket from o.Bootstrap; values
// already set in o must agree with it.
func (o *Options) fromBootstrap() (*bootstrapped, error) {
	b := o.Bootstrap
	if o.NodeCluster != "" && o.NodeCluster != b.GetNode().GetCluster() {
		return nil, fmt.Errorf("NodeCluster %q differs from the bootstrap's %q", o.NodeCluster, b.GetNode().GetCluster())
	}
	o.NodeCluster, o.NodeID = b.GetNode().GetCluster(), b.GetNode().GetId()
	out := &bootstrapped{static: map[string]*clusterCfg{}}
	for _, cl := range b.GetStaticResources().GetClusters() {
		if cl.GetName() == SpireCluster {
			pipe := ""
			if eps := cl.GetLoadAssignment().GetEndpoints(); len(eps) == 1 && len(eps[0].GetLbEndpoints()) == 1 {
				pipe = eps[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetPipe().GetPath()
			}
			if pipe == "" {
				return nil, fmt.Errorf("static cluster %s: only a pipe address is emulated", SpireCluster)
			}
			if o.SDSSocket == "" {
				o.SDSSocket = pipe
			}
			continue
		}
		cc, err := parseCluster(cl)
		if err != nil {
			return nil, fmt.Errorf("static cluster %q: %w", cl.GetName(), err)
		}
		if cc.eds != "" {
			return nil, fmt.Errorf("static cluster %q: EDS needs ADS, which needs a static cluster", cl.GetName())
		}
		out.static[cl.GetName()] = cc
	}
	ads := b.GetDynamicResources().GetAdsConfig()
	if ads.GetApiType() != corev3.ApiConfigSource_GRPC || len(ads.GetGrpcServices()) != 1 {
		return nil, errors.New("bootstrap: ads_config must be one GRPC service")
	}
	out.adsCluster = ads.GetGrpcServices()[0].GetEnvoyGrpc().GetClusterName()
	cc := out.static[out.adsCluster]
	if cc == nil {
		return nil, fmt.Errorf("bootstrap: ADS cluster %q is not a static cluster", out.adsCluster)
	}
	if !cc.h2 {
		return nil, fmt.Errorf("bootstrap: ADS cluster %q is not HTTP/2", out.adsCluster)
	}
	if len(cc.endpoints) != 1 {
		return nil, fmt.Errorf("bootstrap: ADS cluster %q needs one endpoint", out.adsCluster)
	}
	if o.XDSAddress == "" {
		o.XDSAddress = o.Resolve(cc.endpoints[0].host, cc.endpoints[0].port)
	}
	return out, nil
}

// staticClusters returns a copy of the bootstrap's clusters (none without a bootstrap).
func (e *Emulator) staticClusters() map[string]*clusterCfg {
	if e.boot == nil {
		return map[string]*clusterCfg{}
	}
	return maps.Clone(e.boot.static)
}

// isStatic reports whether name is a bootstrap cluster.
func (e *Emulator) isStatic(name string) bool {
	return e.boot != nil && e.boot.static[name] != nil
}
