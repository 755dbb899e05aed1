package xds

import (
	"crypto/sha256"
	"encoding/hex"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
)

// all lists every resource in a stable order: listeners, routes, clusters, endpoints,
// secrets.
func (r Resources) all() []proto.Message {
	out := make([]proto.Message, 0, len(r.Listeners)+len(r.Routes)+len(r.Clusters)+len(r.Endpoints)+len(r.Secrets))
	for _, m := range r.Listeners {
		out = append(out, m)
	}
	for _, m := range r.Routes {
		out = append(out, m)
	}
	for _, m := range r.Clusters {
		out = append(out, m)
	}
	for _, m := range r.Endpoints {
		out = append(out, m)
	}
	for _, m := range r.Secrets {
		out = append(out, m)
	}
	return out
}

// ByType groups the resources by xDS type URL, as go-control-plane's snapshots want
// them. Every type is present (possibly empty) so that a removed resource is removed
// from Envoy too.
func (r Resources) ByType() map[resource.Type][]types.Resource {
	m := map[resource.Type][]types.Resource{
		resource.ListenerType: make([]types.Resource, 0, len(r.Listeners)),
		resource.RouteType:    make([]types.Resource, 0, len(r.Routes)),
		resource.ClusterType:  make([]types.Resource, 0, len(r.Clusters)),
		resource.EndpointType: make([]types.Resource, 0, len(r.Endpoints)),
		resource.SecretType:   make([]types.Resource, 0, len(r.Secrets)),
	}
	for _, x := range r.Listeners {
		m[resource.ListenerType] = append(m[resource.ListenerType], x)
	}
	for _, x := range r.Routes {
		m[resource.RouteType] = append(m[resource.RouteType], x)
	}
	for _, x := range r.Clusters {
		m[resource.ClusterType] = append(m[resource.ClusterType], x)
	}
	for _, x := range r.Endpoints {
		m[resource.EndpointType] = append(m[resource.EndpointType], x)
	}
	for _, x := range r.Secrets {
		m[resource.SecretType] = append(m[resource.SecretType], x)
	}
	return m
}

// Hash is a content hash of the resources (deterministic protobuf encoding): the
// snapshot version. An edit that does not change a node's resources does not change its
// version, so its Envoys receive nothing.
func (r Resources) Hash() string {
	h := sha256.New()
	opts := proto.MarshalOptions{Deterministic: true}
	var buf []byte
	for _, m := range r.all() {
		var err error
		buf, err = opts.MarshalAppend(buf[:0], m)
		if err != nil {
			// Validated messages always marshal; keep the hash distinct all the same.
			buf = append(buf[:0], err.Error()...)
		}
		h.Write([]byte(m.ProtoReflect().Descriptor().FullName()))
		h.Write(buf)
	}
	return hex.EncodeToString(h.Sum(nil)[:12])
}
