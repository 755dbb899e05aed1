package xds

import (
	"bytes"
	"encoding/json"
	"fmt"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// Section names of the YAML rendering, in order.
var sections = []string{"listeners", "routes", "clusters", "endpoints", "secrets"}

// YAML renders the resources for people: one document with a list per resource type,
// each resource in its protojson form with Envoy's field names (as in Envoy's docs and
// config dumps) and "@type" on every typed_config.
func (r Resources) YAML() ([]byte, error) {
	lists := [][]proto.Message{toMessages(r.Listeners), toMessages(r.Routes), toMessages(r.Clusters), toMessages(r.Endpoints), toMessages(r.Secrets)}
	var js bytes.Buffer
	js.WriteByte('{')
	first := true
	opts := protojson.MarshalOptions{UseProtoNames: true}
	for i, list := range lists {
		if len(list) == 0 {
			continue
		}
		if !first {
			js.WriteByte(',')
		}
		first = false
		fmt.Fprintf(&js, "%q:[", sections[i])
		for j, m := range list {
			if j > 0 {
				js.WriteByte(',')
			}
			b, err := opts.Marshal(m)
			if err != nil {
				return nil, err
			}
			js.Write(b)
		}
		js.WriteByte(']')
	}
	js.WriteByte('}')
	return JSONToYAML(js.Bytes())
}

// JSONToYAML re-encodes a JSON document as block-style YAML, keeping key order.
func JSONToYAML(js []byte) ([]byte, error) {
	var n yaml.Node
	if err := yaml.Unmarshal(js, &n); err != nil {
		return nil, err
	}
	clearStyle(&n)
	var out bytes.Buffer
	enc := yaml.NewEncoder(&out)
	enc.SetIndent(2)
	if err := enc.Encode(&n); err != nil {
		return nil, err
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// clearStyle drops the flow and quoting styles JSON brings, so the encoder writes block
// YAML and quotes only what needs quoting.
func clearStyle(n *yaml.Node) {
	n.Style = 0
	for _, c := range n.Content {
		clearStyle(c)
	}
}

// ParseYAML reads what YAML wrote back into resources.
func ParseYAML(b []byte) (Resources, error) {
	var doc map[string][]any
	if err := yaml.Unmarshal(b, &doc); err != nil {
		return Resources{}, err
	}
	for k := range doc {
		known := false
		for _, s := range sections {
			known = known || s == k
		}
		if !known {
			return Resources{}, fmt.Errorf("unknown section %q", k)
		}
	}
	var r Resources
	var err error
	if r.Listeners, err = parseList[listenerv3.Listener](doc["listeners"]); err != nil {
		return r, err
	}
	if r.Routes, err = parseList[routev3.RouteConfiguration](doc["routes"]); err != nil {
		return r, err
	}
	if r.Clusters, err = parseList[clusterv3.Cluster](doc["clusters"]); err != nil {
		return r, err
	}
	if r.Endpoints, err = parseList[endpointv3.ClusterLoadAssignment](doc["endpoints"]); err != nil {
		return r, err
	}
	if r.Secrets, err = parseList[tlsv3.Secret](doc["secrets"]); err != nil {
		return r, err
	}
	return r, nil
}

func parseList[T any, PT interface {
	*T
	proto.Message
}](items []any) ([]PT, error) {
	var out []PT
	for _, it := range items {
		b, err := json.Marshal(it)
		if err != nil {
			return nil, err
		}
		m := PT(new(T))
		if err := protojson.Unmarshal(b, m); err != nil {
			return nil, fmt.Errorf("%s: %w", m.ProtoReflect().Descriptor().FullName(), err)
		}
		out = append(out, m)
	}
	return out, nil
}

func toMessages[T proto.Message](in []T) []proto.Message {
	out := make([]proto.Message, len(in))
	for i, m := range in {
		out[i] = m
	}
	return out
}
