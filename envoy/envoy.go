// Package envoy holds small, stateless builders of the Envoy protos mcpgate's control plane
// serves: one file per resource or filter. Builders do no I/O and know nothing of the
// policy; package xds maps a policy.Snapshot onto them.
//
// Every typed_config is validated with ValidateAll before it is packed into an Any,
// because protoc-gen-validate does not look inside Any: a bad filter config would
// otherwise only show up as a NACK from Envoy.
package envoy

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Well-known names of the Envoy extensions mcpgate configures.
const (
	FilterCORS     = "envoy.filters.http.cors"
	FilterExtAuthz = "envoy.filters.http.ext_authz"
	FilterExtProc  = "envoy.filters.http.ext_proc"
	FilterRouter   = "envoy.filters.http.router"
	FilterHCM      = "envoy.filters.network.http_connection_manager"
	TransportTLS   = "envoy.transport_sockets.tls"
	ProtocolOpts   = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
)

// validator is what protoc-gen-validate generates on every Envoy message.
type validator interface {
	ValidateAll() error
}

// Validate runs ValidateAll on m, naming the message type in the error.
func Validate(m proto.Message) error {
	v, ok := m.(validator)
	if !ok {
		return nil
	}
	if err := v.ValidateAll(); err != nil {
		return fmt.Errorf("%s: %w", m.ProtoReflect().Descriptor().FullName(), err)
	}
	return nil
}

// Any validates m and packs it into an Any.
func Any(m proto.Message) (*anypb.Any, error) {
	if err := Validate(m); err != nil {
		return nil, err
	}
	a, err := anypb.New(m)
	if err != nil {
		return nil, fmt.Errorf("pack %s: %w", m.ProtoReflect().Descriptor().FullName(), err)
	}
	return a, nil
}

// duration returns nil for a negative d (unset), and a Duration otherwise (0 means
// "disabled" for most Envoy timeouts).
func duration(d time.Duration) *durationpb.Duration {
	if d < 0 {
		return nil
	}
	return durationpb.New(d)
}
