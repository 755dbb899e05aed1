package xds

import (
	"context"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/mcpgate/mcpgate/policy"
)

// fakeTokens is a TokenSource holding one token for every endpoint.
type fakeTokens struct {
	mu    sync.Mutex
	token string
	ch    chan struct{}
}

func newFakeTokens() *fakeTokens { return &fakeTokens{ch: make(chan struct{}, 1)} }

func (f *fakeTokens) Token(*policy.HTTPEndpoint) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.token
}
func (f *fakeTokens) Changes() (<-chan struct{}, func()) { return f.ch, func() {} }
func (f *fakeTokens) Retain(*policy.Snapshot)            {}
func (f *fakeTokens) set(tok string) {
	f.mu.Lock()
	f.token = tok
	f.mu.Unlock()
	f.ch <- struct{}{}
}

// envoyView is what one hand-driven Envoy holds of my-agent's github-mcp endpoint: the
// token in its secret and whether its route injects it, as of the responses it ACKed.
type envoyView struct {
	c       *adsClient
	last    map[string]*discoveryv3.DiscoveryResponse // by type: the last response
	holdSDS bool                                      // leave Secret responses unACKed
}

var injectTypes = []string{resource.ClusterType, resource.ListenerType, resource.RouteType, resource.SecretType}

func newEnvoyView(t *testing.T, env *testEnv, id string) *envoyView {
	t.Helper()
	v := &envoyView{c: requireADSClient(t, env.addr, "my-agent", id), last: map[string]*discoveryv3.DiscoveryResponse{}}
	for _, typ := range injectTypes {
		v.c.send(t, typ, "", "", nil)
	}
	return v
}

// ackSecret ACKs the last Secret response held back.
func (v *envoyView) ackSecret(t *testing.T) {
	t.Helper()
	r := v.last[resource.SecretType]
	if r == nil {
		t.Fatal("no Secret response to ACK")
	}
	v.c.send(t, r.TypeUrl, r.VersionInfo, r.Nonce, nil)
}

// injects reports whether a route response turns the github-mcp injector on.
func injects(t *testing.T, r *discoveryv3.DiscoveryResponse) bool {
	t.Helper()
	for _, a := range r.Resources {
		var rc routev3.RouteConfiguration
		if err := a.UnmarshalTo(&rc); err != nil {
			t.Fatal(err)
		}
		for _, vh := range rc.VirtualHosts {
			for _, rt := range vh.Routes {
				if rt.Name == "invoke/github-mcp" && rt.TypedPerFilterConfig[FilterCredentials("github-mcp")] != nil {
					return true
				}
			}
		}
	}
	return false
}

func secretToken(t *testing.T, r *discoveryv3.DiscoveryResponse) string {
	t.Helper()
	for _, a := range r.Resources {
		var s tlsv3.Secret
		if err := a.UnmarshalTo(&s); err != nil {
			t.Fatal(err)
		}
		if s.Name == SecretToken("github-mcp") {
			return s.GetGenericSecret().GetSecret().GetInlineString()
		}
	}
	t.Fatalf("no secret %s", SecretToken("github-mcp"))
	return ""
}

// drive receives v's responses for up to d, ACKing each (a Secret one only unless
// holdSDS), and hands each to stop; it reports whether stop ended it before d.
func (v *envoyView) drive(t *testing.T, d time.Duration, stop func(*discoveryv3.DiscoveryResponse) bool) bool {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case r, ok := <-v.c.resps:
			if !ok {
				t.Fatal("stream closed")
			}
			v.last[r.TypeUrl] = r
			if r.TypeUrl != resource.SecretType || !v.holdSDS {
				v.c.send(t, r.TypeUrl, r.VersionInfo, r.Nonce, nil)
			}
			if stop(r) {
				return true
			}
		case <-deadline:
			return false
		}
	}
}

// routeInjecting returns a stop for drive: a route response whose injector is on (want).
func routeInjecting(t *testing.T, want bool) func(*discoveryv3.DiscoveryResponse) bool {
	return func(r *discoveryv3.DiscoveryResponse) bool {
		return r.TypeUrl == resource.RouteType && injects(t, r) == want
	}
}

// untilInjecting drives v until a route response turns the injector on.
func (v *envoyView) untilInjecting(t *testing.T, within time.Duration) {
	t.Helper()
	if !v.drive(t, within, routeInjecting(t, true)) {
		t.Fatalf("no route injecting the token within %s", within)
	}
}

// notInjecting drives v for d, failing if a route response turns the injector on.
func (v *envoyView) notInjecting(t *testing.T, d time.Duration, why string) {
	t.Helper()
	if v.drive(t, d, routeInjecting(t, true)) {
		t.Fatalf("the route injects the token %s", why)
	}
}

// TestInjectorWaitsForTheSecret: when mcpgate gets a token, the sidecars get it in their
// secret first and the route that injects it only once each of them ACKed that secret;
// a sidecar that connects sends the group back to ext_authz until it has ACKed the token
// too. Otherwise a call between the two updates meets an injector with no credential
// (401), whichever order Envoy receives them in.
func TestInjectorWaitsForTheSecret(t *testing.T) {
	tokens := newFakeTokens()
	env := requireADSServerWith(t, tokens)
	a := newEnvoyView(t, env, "my-agent-1")
	a.notInjecting(t, 300*time.Millisecond, "with no token")
	if a.last[resource.SecretType] == nil || secretToken(t, a.last[resource.SecretType]) != "" {
		t.Fatal("no empty secret before the token")
	}

	a.holdSDS = true
	tokens.set("tok-1")
	a.notInjecting(t, 500*time.Millisecond, "before the sidecar ACKed the secret")
	if got := secretToken(t, a.last[resource.SecretType]); got != "tok-1" {
		t.Fatalf("secret holds %q, want the token", got)
	}
	a.ackSecret(t)
	a.holdSDS = false
	a.untilInjecting(t, 5*time.Second)

	// A second sidecar of my-agent connects (or the first reconnects from another
	// mcpgate replica): the group asks ext_authz again until it holds the token.
	b := newEnvoyView(t, env, "my-agent-2")
	b.holdSDS = true
	if !a.drive(t, 5*time.Second, routeInjecting(t, false)) {
		t.Fatal("the first sidecar's route still injects while the second holds no token")
	}
	b.notInjecting(t, 500*time.Millisecond, "to a sidecar that has not ACKed the secret")
	b.ackSecret(t)
	b.holdSDS = false
	b.untilInjecting(t, 5*time.Second)
	a.untilInjecting(t, 5*time.Second)

	// A proxyless gRPC client of the group never asks for secrets (it has no injector):
	// it does not send the sidecars back to ext_authz.
	g := requireADSClient(t, env.addr, "my-agent", "grpc-go-my-agent")
	g.node.UserAgentName = "gRPC Go"
	g.send(t, resource.ListenerType, "", "", nil)
	g.recv(t, 5*time.Second)
	if a.drive(t, 500*time.Millisecond, routeInjecting(t, false)) {
		t.Fatal("a proxyless gRPC client sent the sidecars back to ext_authz")
	}
}

// TestInjectorWaitsForTheSecretDelta is the same over incremental xDS, whose responses
// carry only what changed and are ACKed by nonce.
func TestInjectorWaitsForTheSecretDelta(t *testing.T) {
	tokens := newFakeTokens()
	env := requireADSServerWith(t, tokens)
	conn, err := grpc.NewClient(env.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	resps := make(chan *discoveryv3.DeltaDiscoveryResponse, 16)
	go func() {
		defer close(resps)
		for {
			r, err := stream.Recv()
			if err != nil {
				return
			}
			resps <- r
		}
	}()
	send := func(r *discoveryv3.DeltaDiscoveryRequest) {
		t.Helper()
		if err := stream.Send(r); err != nil {
			t.Fatal(err)
		}
	}
	node := &corev3.Node{Id: "d", Cluster: "my-agent"}
	for _, typ := range []string{resource.ListenerType, resource.RouteType, resource.SecretType} {
		send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: typ})
	}
	asDiscovery := func(r *discoveryv3.DeltaDiscoveryResponse) *discoveryv3.DiscoveryResponse {
		out := &discoveryv3.DiscoveryResponse{TypeUrl: r.TypeUrl}
		for _, res := range r.Resources {
			out.Resources = append(out.Resources, res.Resource)
		}
		return out
	}
	// drive ACKs every response (a Secret one only when ackSecrets) for d or until stop
	// says so, and returns the last Secret response left unACKed.
	drive := func(d time.Duration, ackSecrets bool, stop func(*discoveryv3.DeltaDiscoveryResponse) bool) (held *discoveryv3.DeltaDiscoveryResponse) {
		t.Helper()
		deadline := time.After(d)
		for {
			select {
			case r, ok := <-resps:
				if !ok {
					t.Fatal("stream closed")
				}
				if r.TypeUrl != resource.SecretType || ackSecrets {
					send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: r.TypeUrl, ResponseNonce: r.Nonce})
				} else {
					held = r
				}
				if stop(r) {
					return held
				}
			case <-deadline:
				return held
			}
		}
	}
	injecting := func(r *discoveryv3.DeltaDiscoveryResponse) bool {
		return r.TypeUrl == resource.RouteType && injects(t, asDiscovery(r))
	}
	never := func(r *discoveryv3.DeltaDiscoveryResponse) bool {
		if injecting(r) {
			t.Fatal("the route injects the token before the sidecar ACKed the secret")
		}
		return false
	}
	drive(300*time.Millisecond, true, never)
	tokens.set("tok-1")
	held := drive(500*time.Millisecond, false, never)
	if held == nil || secretToken(t, asDiscovery(held)) != "tok-1" {
		t.Fatalf("no Secret response with the token: %v", held)
	}
	send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.SecretType, ResponseNonce: held.Nonce})
	saw := false
	drive(5*time.Second, true, func(r *discoveryv3.DeltaDiscoveryResponse) bool { saw = injecting(r); return saw })
	if !saw {
		t.Fatal("the route never injected the token after the sidecar ACKed it")
	}
}
