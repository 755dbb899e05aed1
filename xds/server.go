package xds

import (
	"context"
	"errors"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/log"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/mcpgate/mcpgate/policy"
)

// NodeHash keys snapshots by node.cluster (the App ID or gateway name), so that every
// replica of an app shares one snapshot; node.id is free per replica.
type NodeHash struct{}

// ID implements cachev3.NodeHash.
func (NodeHash) ID(node *corev3.Node) string { return node.GetCluster() }

// Options configure a Server.
type Options struct {
	// Store publishes the policy; the server re-translates on every new snapshot.
	Store  *policy.Store
	Logger *zap.Logger
	// Meter counts snapshots, translation errors and NACKs; default: no-op.
	Meter metric.Meter
	// Tokens, when set, are the outbound tokens the sidecars inject themselves
	// (TranslateWith); the server re-translates when they change. nil: outbound calls to
	// endpoints with client credentials ask ext_authz for theirs.
	Tokens TokenSource
}

// TokenSource is Tokens that say when a token may have changed, and forget endpoints
// that left the policy (extauthz/credentials.Sources).
type TokenSource interface {
	Tokens
	Changes() (ch <-chan struct{}, stop func())
	Retain(snap *policy.Snapshot)
}

// Stats are the server's counters, for tests and /debug.
type Stats struct {
	Snapshots         int64 // snapshots set
	TranslationErrors int64 // translations refused (last good kept)
	NACKs             int64 // responses Envoy rejected
}

// Server is the ADS server: go-control-plane's snapshot cache and xDS server, fed by
// translating the policy for every node group (node.cluster) with an open stream.
type Server struct {
	store  *policy.Store
	tokens TokenSource
	log    *zap.Logger
	cache  cachev3.SnapshotCache
	xds    serverv3.Server
	sub    <-chan struct{}
	unsub  func() // removes sub from the store; idempotent

	snapshots, translationErrors, nacks metric.Int64Counter
	stats                               struct{ snapshots, translationErrors, nacks atomic.Int64 }

	// update serializes translation and SetSnapshot so that an older policy never
	// overwrites a newer one.
	update sync.Mutex

	mu      sync.Mutex
	groups  map[string]int             // node.cluster → open streams
	streams map[streamKey]*streamState // per stream: its node group, what was sent
	peers   map[streamKey]string       // per TLS stream: the client certificate's SPIFFE ID
	// dirty are node groups to translate again because what their Envoys hold of the
	// outbound tokens changed (injectable); regate wakes Run for them.
	dirty  map[string]bool
	regate chan struct{}
}

type streamKey struct {
	delta bool // SotW and delta streams are numbered independently
	id    int64
}

type streamState struct {
	group string
	sent  map[string]sentResponse // by type URL: the last response
	// tokens are the outbound-token secrets this stream's Envoy holds with a token in
	// them, as of the last Secret response it ACKed; pending is the last one sent, until
	// its ACK.
	tokens  map[string]bool
	pending *secretsSent
	// proxyless is a gRPC client (grpc-go and the others name themselves "gRPC …" in
	// node.user_agent_name), which has no HTTP filters, so no injector, and never asks
	// for the secrets: it does not hold injectable back.
	proxyless bool
}

// secretsSent is what a Secret response carried of the outbound tokens: the secrets with
// a token, and (delta) those without one or removed. A SotW response is the whole set.
type secretsSent struct {
	nonce         string
	whole         bool
	with, without []string
}

type sentResponse struct{ nonce, version string }

// NewServer builds the server; call Register to serve it and Run to follow the policy.
func NewServer(ctx context.Context, o Options) (*Server, error) {
	if o.Store == nil {
		return nil, errors.New("xds: a policy store is required")
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Meter == nil {
		o.Meter = noop.NewMeterProvider().Meter("")
	}
	s := &Server{
		store:   o.Store,
		tokens:  o.Tokens,
		log:     o.Logger,
		groups:  map[string]int{},
		streams: map[streamKey]*streamState{},
		peers:   map[streamKey]string{},
		dirty:   map[string]bool{},
		regate:  make(chan struct{}, 1),
	}
	var err error
	if s.snapshots, err = o.Meter.Int64Counter("mcpgate.xds.snapshots", metric.WithDescription("xDS snapshots set, per node group")); err != nil {
		return nil, err
	}
	if s.translationErrors, err = o.Meter.Int64Counter("mcpgate.xds.translation_errors", metric.WithDescription("policy translations refused; the last good snapshot keeps serving")); err != nil {
		return nil, err
	}
	if s.nacks, err = o.Meter.Int64Counter("mcpgate.xds.nacks", metric.WithDescription("xDS responses rejected by Envoy, by type")); err != nil {
		return nil, err
	}
	// Subscribe now, not in Run: an edit between NewServer and Run is not missed. Run
	// unsubscribes when it ends; so does the end of ctx, which also ends the xDS server,
	// for a Server whose Run is never called.
	s.sub, s.unsub = o.Store.Subscribe()
	context.AfterFunc(ctx, s.unsub)
	s.cache = cachev3.NewSnapshotCache(true, NodeHash{}, cacheLogger(o.Logger.Named("cache")))
	s.xds = serverv3.NewServer(ctx, s.cache, s)
	return s, nil
}

// Register adds the Aggregated Discovery Service (state of the world and delta) to g.
func (s *Server) Register(g *grpc.Server) {
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, s.xds)
}

// ServerOptions are the gRPC options of a server dedicated to xDS: Envoy keeps one ADS
// stream open forever and pings it (the bootstrap sets HTTP/2 keepalives), so pings
// must be allowed and dead peers detected.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
	}
}

// Cache is the snapshot cache (for tests and debugging).
func (s *Server) Cache() cachev3.SnapshotCache { return s.cache }

// Stats returns the counters.
func (s *Server) Stats() Stats {
	return Stats{
		Snapshots:         s.stats.snapshots.Load(),
		TranslationErrors: s.stats.translationErrors.Load(),
		NACKs:             s.stats.nacks.Load(),
	}
}

// Run re-translates every connected node group whenever the store publishes a new policy,
// until ctx ends; then it unsubscribes from the store, so Run is called once per Server.
func (s *Server) Run(ctx context.Context) error {
	defer s.unsub()
	var tokens <-chan struct{} // nil without Tokens: never ready
	if s.tokens != nil {
		ch, stop := s.tokens.Changes()
		defer stop()
		tokens = ch
	}
	s.updateAll(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-s.sub:
			s.updateAll(ctx)
		case <-tokens:
			s.updateAll(ctx)
		case <-s.regate:
			s.updateDirty(ctx)
		}
	}
}

// updateDirty translates again the node groups whose Envoys' tokens changed.
func (s *Server) updateDirty(ctx context.Context) {
	s.update.Lock()
	defer s.update.Unlock()
	s.mu.Lock()
	groups := make([]string, 0, len(s.dirty))
	for g := range s.dirty {
		if s.groups[g] > 0 {
			groups = append(groups, g)
		}
	}
	clear(s.dirty)
	s.mu.Unlock()
	if snap := s.store.Current(); snap != nil {
		for _, g := range groups {
			s.updateGroup(ctx, snap, g)
		}
	}
}

// markDirtyLocked queues group for updateDirty; s.mu is held.
func (s *Server) markDirtyLocked(group string) {
	s.dirty[group] = true
	select {
	case s.regate <- struct{}{}:
	default: // a wake-up is pending already
	}
}

// gatedTokens are the Server's tokens for one node group, with injectable.
type gatedTokens struct {
	Tokens
	s     *Server
	group string
}

// injectable reports whether every open stream of the group (but proxyless gRPC
// clients) has ACKed a Secret response holding the endpoint's token. A stream that joins resets it for its group (its Envoy
// may hold an older secret, an empty one, from another mcpgate replica), so the routes go
// back to ext_authz until it has the token too.
func (g gatedTokens) injectable(endpoint string) bool {
	name := SecretToken(endpoint)
	g.s.mu.Lock()
	defer g.s.mu.Unlock()
	for _, st := range g.s.streams {
		if st.group == g.group && !st.proxyless && !st.tokens[name] {
			return false
		}
	}
	return true
}

// secretsOf reads which outbound-token secrets of resources hold a token.
func secretsOf(resources []*anypb.Any) (with, without []string) {
	for _, a := range resources {
		var sec tlsv3.Secret
		if a.UnmarshalTo(&sec) != nil || !strings.HasPrefix(sec.GetName(), SecretToken("")) {
			continue
		}
		if sec.GetGenericSecret().GetSecret().GetInlineString() != "" {
			with = append(with, sec.GetName())
		} else {
			without = append(without, sec.GetName())
		}
	}
	return with, without
}

// secretsSentLocked records the Secret response about to go to the stream; s.mu is held.
func (s *Server) secretsSentLocked(key streamKey, sent *secretsSent) {
	if st := s.streams[key]; st != nil {
		st.pending = sent
	}
}

// secretsACKed applies the stream's pending Secret response when nonce ACKs it, and
// queues its group when what its Envoy holds changed.
func (s *Server) secretsACKed(key streamKey, nonce string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.streams[key]
	if st == nil || st.pending == nil || st.pending.nonce != nonce {
		return
	}
	p := st.pending
	st.pending = nil
	next := map[string]bool{}
	if !p.whole {
		maps.Copy(next, st.tokens)
	}
	for _, n := range p.without {
		delete(next, n)
	}
	for _, n := range p.with {
		next[n] = true
	}
	if !maps.Equal(next, st.tokens) {
		st.tokens = next
		s.markDirtyLocked(st.group)
	}
}

func (s *Server) updateAll(ctx context.Context) {
	s.update.Lock()
	defer s.update.Unlock()
	snap := s.store.Current()
	if snap == nil {
		return
	}
	if s.tokens != nil {
		s.tokens.Retain(snap)
	}
	s.mu.Lock()
	groups := make([]string, 0, len(s.groups))
	for g := range s.groups {
		groups = append(groups, g)
	}
	s.mu.Unlock()
	for _, g := range groups {
		s.updateGroup(ctx, snap, g)
	}
}

// updateGroup translates the policy for one node group and sets its snapshot, unless the
// content is unchanged. A translation error keeps the last good snapshot.
func (s *Server) updateGroup(ctx context.Context, snap *policy.Snapshot, group string) {
	res, err := s.translate(snap, group)
	switch {
	case errors.Is(err, ErrUnknownNode):
		// An empty snapshot, not none: Envoy gets an answer (and drops what it had, if
		// its app was removed from the policy) instead of waiting forever.
		s.log.Warn("xds node group names no App with a sidecar or Gateway; serving it nothing",
			zap.String("node_cluster", group), zap.String("policy_version", snap.Version))
		res = Resources{}
	case err != nil:
		s.stats.translationErrors.Add(1)
		s.translationErrors.Add(ctx, 1)
		s.log.Error("xds translation failed; the last good snapshot keeps serving",
			zap.String("node_cluster", group), zap.String("policy_version", snap.Version), zap.Error(err))
		return
	}
	version := res.Hash()
	if old, err := s.cache.GetSnapshot(group); err == nil && old.GetVersion(resource.ListenerType) == version {
		return
	}
	cs, err := cachev3.NewSnapshot(version, res.ByType())
	if err == nil {
		err = cs.Consistent()
	}
	if err == nil {
		err = s.cache.SetSnapshot(ctx, group, cs)
	}
	if err != nil {
		s.stats.translationErrors.Add(1)
		s.translationErrors.Add(ctx, 1)
		s.log.Error("xds snapshot refused; the last good snapshot keeps serving",
			zap.String("node_cluster", group), zap.String("version", version), zap.Error(err))
		return
	}
	s.stats.snapshots.Add(1)
	s.snapshots.Add(ctx, 1)
	s.log.Info("xds snapshot set", zap.String("node_cluster", group), zap.String("version", version),
		zap.String("policy_version", snap.Version), zap.Int("listeners", len(res.Listeners)),
		zap.Int("clusters", len(res.Clusters)), zap.Int("routes", len(res.Routes)))
}

func (s *Server) translate(snap *policy.Snapshot, group string) (Resources, error) {
	var tokens Tokens // nil, not a TokenSource holding nil, when there are none
	if s.tokens != nil {
		tokens = gatedTokens{Tokens: s.tokens, s: s, group: group}
	}
	return TranslateWith(snap, group, tokens)
}

// join registers a stream's node group on its first request and, for a group not seen
// before, sets its snapshot before go-control-plane opens the watch, so the first
// response needs no wait.
func (s *Server) join(key streamKey, node *corev3.Node) {
	s.mu.Lock()
	if st := s.streams[key]; st != nil || node == nil {
		s.mu.Unlock()
		return
	}
	group := node.GetCluster()
	s.streams[key] = &streamState{group: group, sent: map[string]sentResponse{}, proxyless: strings.HasPrefix(node.GetUserAgentName(), "gRPC")}
	s.groups[group]++
	first := s.groups[group] == 1
	s.mu.Unlock()
	s.log.Info("xds stream opened", zap.String("node_cluster", group), zap.String("node_id", node.GetId()), zap.Bool("delta", key.delta))
	// With outbound tokens, every new stream, not only a group's first: the stream holds
	// no token yet, so the group's routes go back to ext_authz (injectable) before its
	// first response. (An unchanged translation sets no snapshot.)
	if first || s.tokens != nil {
		s.update.Lock()
		if snap := s.store.Current(); snap != nil {
			s.updateGroup(context.Background(), snap, group)
		}
		s.update.Unlock()
	}
}

func (s *Server) leave(key streamKey) {
	s.mu.Lock()
	st := s.streams[key]
	delete(s.streams, key)
	delete(s.peers, key)
	if st == nil {
		s.mu.Unlock()
		return
	}
	s.groups[st.group]--
	last := s.groups[st.group] == 0
	if last {
		delete(s.groups, st.group)
	} else {
		s.markDirtyLocked(st.group) // the streams left may all hold the tokens now
	}
	s.mu.Unlock()
	if last {
		// Forget the group: an unbounded set of node.cluster names must not pin memory.
		// The next stream of the group translates afresh.
		s.update.Lock()
		s.mu.Lock()
		if s.groups[st.group] == 0 {
			s.cache.ClearSnapshot(st.group)
		}
		s.mu.Unlock()
		s.update.Unlock()
	}
}

func (s *Server) nack(ctx context.Context, key streamKey, typeURL, version, msg string) {
	s.stats.nacks.Add(1)
	s.nacks.Add(ctx, 1, metric.WithAttributes(attribute.String("type_url", typeURL)))
	s.mu.Lock()
	group := ""
	if st := s.streams[key]; st != nil {
		group = st.group
	}
	s.mu.Unlock()
	s.log.Error("envoy rejected xds resources (NACK)", zap.String("node_cluster", group),
		zap.String("type_url", typeURL), zap.String("version", version), zap.String("error_detail", msg))
}

// OnStreamOpen implements serverv3.Callbacks: it remembers the SPIFFE ID of a TLS client.
func (s *Server) OnStreamOpen(ctx context.Context, id int64, _ string) error {
	s.rememberPeer(ctx, streamKey{id: id})
	return nil
}

// OnStreamClosed implements serverv3.Callbacks.
func (s *Server) OnStreamClosed(id int64, _ *corev3.Node) { s.leave(streamKey{id: id}) }

// rememberPeer records the SPIFFE ID of the client certificate of a TLS stream (mcpgate
// serve --spiffe-socket). Plaintext streams (the loopback dev default) have none.
func (s *Server) rememberPeer(ctx context.Context, key streamKey) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		return
	}
	id := ""
	for _, u := range info.State.PeerCertificates[0].URIs {
		if u.Scheme == "spiffe" {
			id = u.String()
			break
		}
	}
	s.mu.Lock()
	s.peers[key] = id
	s.mu.Unlock()
}

// authorizeNode refuses a TLS client asking for another node group's configuration: an
// Envoy may only fetch the resources of the App (or Gateway) its certificate names, or
// one workload's credentials would reveal every app's listeners, routes and clusters.
func (s *Server) authorizeNode(key streamKey, node *corev3.Node) error {
	s.mu.Lock()
	id, tlsStream := s.peers[key]
	s.mu.Unlock()
	if !tlsStream {
		return nil // plaintext: the listener is loopback-only or the operator chose so
	}
	want := ""
	if snap := s.store.Current(); snap != nil {
		cluster := node.GetCluster()
		if app := snap.App(cluster); app != nil {
			want = app.SpiffeID
		} else if gw := snap.Gateways[cluster]; gw != nil {
			want = GatewaySpiffeID(snap.Mesh.TrustDomain, gw)
		}
	}
	if id == "" || id != want {
		s.log.Warn("xds client refused: its identity does not match the node it asked for",
			zap.String("node_cluster", node.GetCluster()), zap.String("peer_spiffe_id", id), zap.String("expected", want))
		return status.Errorf(codes.PermissionDenied, "node.cluster %q is not the identity %q of this client", node.GetCluster(), id)
	}
	return nil
}

// OnStreamRequest implements serverv3.Callbacks. A NACK is logged and counted, and the
// request is marked as being at the rejected version: go-control-plane answers every
// request whose version differs from the snapshot's at once, so without this Envoy and
// the server would exchange the same rejected resources in a tight loop. The next
// snapshot (a fixed policy) has a new version and is sent as usual.
func (s *Server) OnStreamRequest(id int64, req *discoveryv3.DiscoveryRequest) error {
	key := streamKey{id: id}
	if err := s.authorizeNode(key, req.GetNode()); err != nil {
		return err
	}
	s.join(key, req.GetNode())
	if req.GetErrorDetail() == nil {
		if req.GetTypeUrl() == resource.SecretType {
			s.secretsACKed(key, req.GetResponseNonce())
		}
		return nil
	}
	s.mu.Lock()
	var rejected string
	if st := s.streams[key]; st != nil {
		if sent, ok := st.sent[req.GetTypeUrl()]; ok && sent.nonce == req.GetResponseNonce() {
			rejected = sent.version
		}
	}
	s.mu.Unlock()
	s.nack(context.Background(), key, req.GetTypeUrl(), rejected, req.GetErrorDetail().GetMessage())
	if rejected != "" {
		req.VersionInfo = rejected
	}
	return nil
}

// OnStreamResponse implements serverv3.Callbacks: it remembers what was sent, by nonce,
// so that a NACK can be matched to the version it rejects.
func (s *Server) OnStreamResponse(_ context.Context, id int64, _ *discoveryv3.DiscoveryRequest, resp *discoveryv3.DiscoveryResponse) {
	s.mu.Lock()
	if st := s.streams[streamKey{id: id}]; st != nil {
		st.sent[resp.GetTypeUrl()] = sentResponse{nonce: resp.GetNonce(), version: resp.GetVersionInfo()}
	}
	if resp.GetTypeUrl() == resource.SecretType {
		with, _ := secretsOf(resp.GetResources())
		s.secretsSentLocked(streamKey{id: id}, &secretsSent{nonce: resp.GetNonce(), whole: true, with: with})
	}
	s.mu.Unlock()
}

// OnDeltaStreamOpen implements serverv3.Callbacks: it remembers the SPIFFE ID of a TLS client.
func (s *Server) OnDeltaStreamOpen(ctx context.Context, id int64, _ string) error {
	s.rememberPeer(ctx, streamKey{delta: true, id: id})
	return nil
}

// OnDeltaStreamClosed implements serverv3.Callbacks.
func (s *Server) OnDeltaStreamClosed(id int64, _ *corev3.Node) {
	s.leave(streamKey{delta: true, id: id})
}

// OnStreamDeltaRequest implements serverv3.Callbacks. Delta NACKs are logged and counted;
// go-control-plane does not re-send them (it tracks what it sent, not what was ACKed).
//
// Envoy sends the node in a delta stream's first request only, and go-control-plane calls
// this before it fills later requests in from the stream: a request without one is
// checked as the node the stream opened with (none yet: refused).
func (s *Server) OnStreamDeltaRequest(id int64, req *discoveryv3.DeltaDiscoveryRequest) error {
	key := streamKey{delta: true, id: id}
	node := req.GetNode()
	if node == nil {
		s.mu.Lock()
		if st := s.streams[key]; st != nil {
			node = &corev3.Node{Cluster: st.group}
		}
		s.mu.Unlock()
	}
	if err := s.authorizeNode(key, node); err != nil {
		return err
	}
	s.join(key, req.GetNode())
	if req.GetErrorDetail() != nil {
		s.nack(context.Background(), key, req.GetTypeUrl(), "nonce "+req.GetResponseNonce(), req.GetErrorDetail().GetMessage())
	} else if req.GetTypeUrl() == resource.SecretType {
		s.secretsACKed(key, req.GetResponseNonce())
	}
	return nil
}

// OnStreamDeltaResponse implements serverv3.Callbacks: it remembers which outbound-token
// secrets the response changes, for their ACK.
func (s *Server) OnStreamDeltaResponse(id int64, _ *discoveryv3.DeltaDiscoveryRequest, resp *discoveryv3.DeltaDiscoveryResponse) {
	if resp.GetTypeUrl() != resource.SecretType {
		return
	}
	anys := make([]*anypb.Any, 0, len(resp.GetResources()))
	for _, r := range resp.GetResources() {
		anys = append(anys, r.GetResource())
	}
	with, without := secretsOf(anys)
	for _, n := range resp.GetRemovedResources() {
		if strings.HasPrefix(n, SecretToken("")) {
			without = append(without, n)
		}
	}
	s.mu.Lock()
	s.secretsSentLocked(streamKey{delta: true, id: id}, &secretsSent{nonce: resp.GetNonce(), with: with, without: without})
	s.mu.Unlock()
}

// OnFetchRequest implements serverv3.Callbacks (REST fetches are not served).
func (s *Server) OnFetchRequest(context.Context, *discoveryv3.DiscoveryRequest) error { return nil }

// OnFetchResponse implements serverv3.Callbacks.
func (s *Server) OnFetchResponse(*discoveryv3.DiscoveryRequest, *discoveryv3.DiscoveryResponse) {}

// cacheLogger adapts zap to go-control-plane's logger; its info chatter goes to debug.
func cacheLogger(l *zap.Logger) log.Logger {
	sl := l.Sugar()
	return log.LoggerFuncs{
		DebugFunc: sl.Debugf,
		InfoFunc:  sl.Debugf,
		WarnFunc:  sl.Warnf,
		ErrorFunc: sl.Errorf,
	}
}
