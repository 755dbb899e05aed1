// Package envoyemu is an Envoy emulator for tests: a Go HTTP proxy that connects to an
// xDS server (mcpgate's ADS) as an Envoy node, builds its listeners, routes and clusters
// from what it receives, and drives ext_authz and ext_proc the way Envoy's HTTP filters
// do. It implements the subset of Envoy configuration mcpgate generates and NACKs the
// rest. It is test infrastructure, never linked into the mcpgate binary.
//
// Every emulated behaviour names the Envoy source file or document it follows, relative
// to the envoyproxy/envoy repository (or envoyproxy.io docs).
package envoyemu

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// Options configure an Emulator.
type Options struct {
	// Bootstrap, if set, is what the Envoy starts with (`mcpgate bootstrap` output): the
	// node, the static clusters, the ADS cluster with its transport socket (SPIFFE mTLS to
	// mcpgate when the bootstrap says so) and the SPIRE agent's socket (bootstrap.go).
	// The fields below that it fills may be left empty.
	Bootstrap *bootstrapv3.Bootstrap
	// XDSAddress is host:port of the ADS server (plaintext gRPC without a Bootstrap).
	XDSAddress string
	// NodeID and NodeCluster identify the node; mcpgate keys snapshots by NodeCluster
	// (the App ID or gateway name). NodeID defaults to NodeCluster.
	NodeID, NodeCluster string
	// Resolve maps a cluster endpoint (a host name or IP from STATIC, STRICT_DNS,
	// LOGICAL_DNS or EDS) to the address to dial. Default: host:port as given.
	Resolve func(host string, port uint32) string
	// ClusterAddress overrides every endpoint of the named clusters, e.g. {"mcpgate":
	// grpcAddr} to reach an in-process ext_authz/ext_proc server.
	ClusterAddress map[string]string
	// Logf receives one line per configuration event (ACK, NACK, listener bound).
	Logf func(format string, args ...any)
	// FileRoot, when set, prefixes every file name in TLS contexts and SDS secrets
	// (/certs/svid.pem is read as <FileRoot>/certs/svid.pem): nodes on one host each
	// get their own certificate files, as each Envoy has its own file system.
	FileRoot string
	// SDSSocket is the SPIRE agent's Unix socket: the pipe address of the bootstrap's
	// static cluster spire_agent (mcpgate bootstrap with spireAgentSocket). Secrets whose
	// sds_config is a GRPC api_config_source on that cluster are fetched from it, one
	// SDS stream per secret (sds_spire.go). Unset: such secrets are NACKed.
	SDSSocket string
}

// Emulator is one emulated Envoy node.
type Emulator struct {
	opts   Options
	boot   *bootstrapped // nil without Options.Bootstrap
	cancel context.CancelFunc
	done   chan struct{}
	conn   *grpc.ClientConn

	// cfg is the configuration requests read; it is replaced, never mutated, so a request
	// sees one consistent version (Envoy: each worker reads an immutable snapshot).
	cfg atomic.Pointer[config]
	// cfgMu serialises read-modify-write of cfg (the ADS loop and SDS streams).
	cfgMu sync.Mutex

	// SDS streams to the SPIRE agent, by secret name (sds_spire.go).
	sdsMu      sync.Mutex
	sdsConn    *grpc.ClientConn
	sdsStreams map[string]context.CancelFunc
	sdsWG      sync.WaitGroup

	mu         sync.Mutex
	bound      map[string]*boundListener // by listener name
	versions   map[string]string         // by type URL: last ACKed version
	nacks      []string                  // error_detail of every NACK sent
	changed    chan struct{}             // closed and replaced on every change
	grpcConns  map[string]*grpc.ClientConn
	transports map[string]*http.Transport // by protocol, or TLS cluster name
	streamID   atomic.Uint64
	closeOnce  sync.Once

	spans    *spanQueue // finished sampled spans awaiting export (tracing.go)
	exportWG sync.WaitGroup
}

type boundListener struct {
	addr string
	srv  *http.Server
	// declared is the address the listener was configured with; a change re-binds.
	declared string
	tls      bool // serving TLS; a change re-binds
}

// Start connects to the ADS server and returns once the ADS stream is open; use
// WaitReady to wait for listeners, routes and clusters. The emulator runs until ctx
// ends or Close is called.
func Start(ctx context.Context, o Options) (*Emulator, error) {
	if o.Resolve == nil {
		o.Resolve = func(host string, port uint32) string { return net.JoinHostPort(host, strconv.Itoa(int(port))) }
	}
	var boot *bootstrapped
	if o.Bootstrap != nil {
		var err error
		if boot, err = o.fromBootstrap(); err != nil {
			return nil, fmt.Errorf("envoyemu: %w", err)
		}
	}
	if o.XDSAddress == "" || o.NodeCluster == "" {
		return nil, errors.New("envoyemu: XDSAddress and NodeCluster (or a Bootstrap) are required")
	}
	if o.NodeID == "" {
		o.NodeID = o.NodeCluster
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	ctx, cancel := context.WithCancel(ctx)
	e := &Emulator{
		opts: o, boot: boot, cancel: cancel, done: make(chan struct{}),
		bound: map[string]*boundListener{}, versions: map[string]string{},
		changed: make(chan struct{}), grpcConns: map[string]*grpc.ClientConn{},
		sdsStreams: map[string]context.CancelFunc{}, spans: newSpanQueue(),
	}
	initial := newConfig()
	initial.clusters = e.staticClusters()
	for name, cl := range initial.clusters {
		if err := e.checkSpire(cl.tls); err != nil {
			cancel()
			return nil, fmt.Errorf("envoyemu: static cluster %q: %w", name, err)
		}
	}
	e.cfg.Store(initial)
	creds := insecure.NewCredentials()
	if boot != nil && initial.clusters[boot.adsCluster].tls != nil {
		// The ADS cluster's own transport socket: handshakes fail (and ADS retries) until
		// its SDS secrets have arrived from the SPIRE agent.
		creds = credentials.NewTLS(e.clientTLS(boot.adsCluster))
	}
	conn, err := grpc.NewClient("passthrough:///"+o.XDSAddress, grpc.WithTransportCredentials(creds))
	if err != nil {
		cancel()
		return nil, fmt.Errorf("envoyemu: xds client: %w", err)
	}
	e.conn = conn
	e.exportWG.Add(1)
	go func() {
		defer e.exportWG.Done()
		e.runSpanExport(ctx)
	}()
	go func() {
		defer close(e.done)
		e.syncSDS(ctx, initial) // the static clusters' secrets, before ADS needs them
		e.runADS(ctx)
	}()
	context.AfterFunc(ctx, func() { e.Close() })
	return e, nil
}

// Close stops the ADS client and every listener, and waits for the ADS loop to end.
func (e *Emulator) Close() {
	e.closeOnce.Do(func() {
		e.cancel()
		<-e.done
		e.sdsWG.Wait()
		// The spans of requests served so far go out before the connections close.
		e.exportWG.Wait()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		e.exportSpans(ctx)
		cancel()
		if e.sdsConn != nil {
			_ = e.sdsConn.Close()
		}
		e.mu.Lock()
		defer e.mu.Unlock()
		for name, b := range e.bound {
			_ = b.srv.Close()
			delete(e.bound, name)
		}
		for _, c := range e.grpcConns {
			_ = c.Close()
		}
		for _, t := range e.transports {
			t.CloseIdleConnections()
		}
		_ = e.conn.Close()
	})
}

// Listener returns the address the named listener is bound to (always 127.0.0.1 with a
// port chosen by the kernel, whatever port the configuration names), or "" if it is not
// bound (unknown, or a TLS listener still waiting for its SDS secrets).
func (e *Emulator) Listener(name string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	if b := e.bound[name]; b != nil {
		return b.addr
	}
	return ""
}

// Version returns the last ACKed version of a resource type (resource.ListenerType etc.).
func (e *Emulator) Version(typeURL string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.versions[typeURL]
}

// NACKs returns the error details of every NACK sent so far.
func (e *Emulator) NACKs() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.nacks)
}

// Wait blocks until cond holds (it is re-checked after every configuration change) or
// ctx ends.
func (e *Emulator) Wait(ctx context.Context, cond func(*Emulator) bool) error {
	for {
		e.mu.Lock()
		ch := e.changed
		e.mu.Unlock()
		if cond(e) {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("envoyemu: %w", ctx.Err())
		}
	}
}

// WaitReady waits until at least one listener is bound and every route configuration
// and cluster it needs has been received (Envoy's listener warming: a listener serves
// once its RDS and the clusters' EDS are in; source/server/listener_impl.cc).
func (e *Emulator) WaitReady(ctx context.Context) error {
	return e.Wait(ctx, func(e *Emulator) bool {
		c := e.cfg.Load()
		if len(c.listeners) == 0 {
			return false
		}
		e.mu.Lock()
		nb := len(e.bound)
		e.mu.Unlock()
		return nb > 0 && c.warm() == nil
	})
}

// WaitVersion waits until every resource type has been ACKed at version v (mcpgate
// gives all types of one snapshot the same version).
func (e *Emulator) WaitVersion(ctx context.Context, v string) error {
	return e.Wait(ctx, func(e *Emulator) bool {
		for _, t := range []string{resource.ListenerType, resource.ClusterType, resource.RouteType} {
			if e.Version(t) != v {
				return false
			}
		}
		return true
	})
}

func (e *Emulator) notify() {
	e.mu.Lock()
	close(e.changed)
	e.changed = make(chan struct{})
	e.mu.Unlock()
}

// adsState is what one ADS client remembers across streams: the last ACKed version of
// each type (sent again on reconnect, as Envoy does) and its subscriptions.
type adsState struct {
	versions map[string]string
	nonces   map[string]string
	names    map[string][]string // RDS and EDS subscriptions
}

// runADS keeps one ADS stream open, reconnecting with a bounded backoff, until ctx ends.
// Envoy keeps serving its last configuration while the control plane is away
// (source/extensions/config_subscription/grpc/grpc_stream.h: backoff and retry).
func (e *Emulator) runADS(ctx context.Context) {
	st := &adsState{versions: map[string]string{}, nonces: map[string]string{}, names: map[string][]string{}}
	e.retry(ctx, "ads", func() error { return e.stream(ctx, st) })
}

// retry runs stream until ctx ends, waiting a backoff that doubles from 50ms to 2s after
// each time it returns.
func (e *Emulator) retry(ctx context.Context, what string, stream func() error) {
	backoff := 50 * time.Millisecond
	for ctx.Err() == nil {
		err := stream()
		if ctx.Err() != nil {
			return
		}
		e.opts.Logf("envoyemu: %s stream ended: %v; retrying in %s", what, err, backoff)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

func (e *Emulator) stream(ctx context.Context, st *adsState) error {
	s, err := discoveryv3.NewAggregatedDiscoveryServiceClient(e.conn).StreamAggregatedResources(ctx)
	if err != nil {
		return err
	}
	node := &corev3.Node{Id: e.opts.NodeID, Cluster: e.opts.NodeCluster, UserAgentName: "envoyemu"}
	send := func(typeURL string, nack *status.Status) error {
		return s.Send(&discoveryv3.DiscoveryRequest{
			Node: node, TypeUrl: typeURL, VersionInfo: st.versions[typeURL],
			ResponseNonce: st.nonces[typeURL], ResourceNames: st.names[typeURL], ErrorDetail: nack,
		})
	}
	// Envoy subscribes to CDS, then LDS, as wildcards; RDS and EDS by name once listeners
	// and clusters name them (source/common/upstream/cluster_manager_impl.cc,
	// source/common/listener_manager/lds_api.cc). On a new stream the nonces are void.
	clear(st.nonces)
	for _, t := range []string{resource.ClusterType, resource.ListenerType, resource.RouteType, resource.EndpointType, resource.SecretType} {
		if t != resource.ClusterType && t != resource.ListenerType && len(st.names[t]) == 0 {
			continue
		}
		if err := send(t, nil); err != nil {
			return err
		}
	}
	for {
		resp, err := s.Recv()
		if err != nil {
			return err
		}
		t := resp.GetTypeUrl()
		st.nonces[t] = resp.GetNonce()
		e.cfgMu.Lock()
		next, applyErr := e.with(e.cfg.Load(), t, resp)
		if applyErr == nil {
			e.cfg.Store(next)
		}
		e.cfgMu.Unlock()
		if applyErr != nil {
			// NACK: the previous version stays, with the reason in error_detail
			// (xDS protocol, "ACK/NACK and resource type instance version").
			e.mu.Lock()
			// Bounded: a control plane that re-sends a rejected version at once (as a
			// plain go-control-plane server does) must not grow memory forever.
			e.nacks = append(e.nacks, applyErr.Error())
			if len(e.nacks) > maxNACKs {
				e.nacks = e.nacks[len(e.nacks)-maxNACKs:]
			}
			e.mu.Unlock()
			e.opts.Logf("envoyemu: NACK %s version %s: %v", t, resp.GetVersionInfo(), applyErr)
			if err := send(t, &status.Status{Code: int32(codes.InvalidArgument), Message: applyErr.Error()}); err != nil {
				return err
			}
			e.notify()
			continue
		}
		st.versions[t] = resp.GetVersionInfo()
		e.mu.Lock()
		e.versions[t] = resp.GetVersionInfo()
		e.mu.Unlock()
		if t == resource.ListenerType || t == resource.SecretType {
			e.syncListeners(next)
		}
		if t == resource.ListenerType || t == resource.ClusterType {
			e.syncSDS(ctx, next)
		}
		if err := send(t, nil); err != nil { // ACK
			return err
		}
		e.opts.Logf("envoyemu: ACK %s version %s", t, resp.GetVersionInfo())
		// New names to subscribe to: RDS for listeners, EDS for clusters, SDS for the
		// secrets their TLS contexts and credential injectors name (sds_config: ads;
		// source/common/secret/sds_api.cc subscribes by name over the ADS mux).
		for _, sub := range []struct {
			typeURL string
			names   []string
		}{{resource.RouteType, next.routeNames()}, {resource.EndpointType, next.edsNames()}, {resource.SecretType, next.secretNames()}} {
			if !slices.Equal(sub.names, st.names[sub.typeURL]) {
				st.names[sub.typeURL] = sub.names
				if err := send(sub.typeURL, nil); err != nil {
					return err
				}
			}
		}
		e.notify()
	}
}

// syncListeners binds new listeners and closes removed ones. Listeners bind on
// 127.0.0.1:0 whatever their configured address: tests run many nodes on one host. A
// listener with SDS secrets (a TLS context's, a credential injector's) binds once they
// are in (a new listener warms until its init targets, SDS included, are ready:
// source/common/listener_manager/listener_impl.cc); secret updates after that apply to
// new handshakes and the next requests without a re-bind.
func (e *Emulator) syncListeners(c *config) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for name, b := range e.bound {
		l := c.listeners[name]
		if l == nil || l.declared != b.declared || (l.tls != nil) != b.tls {
			_ = b.srv.Close()
			delete(e.bound, name)
		}
	}
	for name, l := range c.listeners {
		if e.bound[name] != nil || !c.received(l.secretNames()) {
			continue
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			e.opts.Logf("envoyemu: listener %s: %v", name, err)
			continue
		}
		srv := e.newServer(name, l.tls != nil)
		served := ln
		if l.tls != nil {
			served = tls.NewListener(ln, e.serverTLS(name))
		}
		go func() { _ = srv.Serve(served) }()
		e.bound[name] = &boundListener{addr: ln.Addr().String(), srv: srv, declared: l.declared, tls: l.tls != nil}
		e.opts.Logf("envoyemu: listener %s (%s, tls=%v) bound on %s", name, l.declared, l.tls != nil, ln.Addr())
	}
}

// grpcConn returns a shared connection to a cluster's first endpoint (Envoy's envoy_grpc
// client uses the cluster's connection pool; gRPC needs HTTP/2 so plaintext is h2c).
func (e *Emulator) grpcConn(c *config, cluster string) (*grpc.ClientConn, error) {
	addr, err := e.endpoint(c, cluster)
	if err != nil {
		return nil, err
	}
	creds := insecure.NewCredentials()
	secure := false
	if cl := c.clusters[cluster]; cl != nil && cl.tls != nil {
		// The cluster's UpstreamTlsContext (SPIFFE mTLS to mcpgate when the Mesh names
		// authz.spiffeId), resolved per handshake like any TLS cluster.
		creds, secure = credentials.NewTLS(e.clientTLS(cluster)), true
	}
	key := fmt.Sprintf("%s|%s|tls=%v", cluster, addr, secure)
	e.mu.Lock()
	defer e.mu.Unlock()
	if g := e.grpcConns[key]; g != nil {
		return g, nil
	}
	g, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, err
	}
	e.grpcConns[key] = g
	return g, nil
}

// endpoint picks the address of a cluster's first endpoint (the emulator does no load
// balancing: mcpgate's clusters have one endpoint each).
func (e *Emulator) endpoint(c *config, cluster string) (string, error) {
	if a := e.opts.ClusterAddress[cluster]; a != "" {
		return a, nil
	}
	cl := c.clusters[cluster]
	if cl == nil {
		return "", fmt.Errorf("%w: unknown cluster %q", errNoHealthyUpstream, cluster)
	}
	if cl.unsupported != "" {
		return "", fmt.Errorf("%w: cluster %q: %s", errNoHealthyUpstream, cluster, cl.unsupported)
	}
	eps := cl.endpoints
	if cl.eds != "" {
		eps = c.endpoints[cl.eds]
	}
	if len(eps) == 0 {
		return "", fmt.Errorf("%w: cluster %q has no endpoints", errNoHealthyUpstream, cluster)
	}
	return e.opts.Resolve(eps[0].host, eps[0].port), nil
}

// maxNACKs bounds the NACK history kept for tests.
const maxNACKs = 100

var errNoHealthyUpstream = errors.New("no healthy upstream")
