package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/spf13/cobra"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"github.com/mcpgate/mcpgate"
	"github.com/mcpgate/mcpgate/extauthz"
	"github.com/mcpgate/mcpgate/extauthz/bearer"
	outbound "github.com/mcpgate/mcpgate/extauthz/credentials"
	"github.com/mcpgate/mcpgate/extproc"
	"github.com/mcpgate/mcpgate/policy"
	"github.com/mcpgate/mcpgate/policy/decisionlog"
)

type serveFlags struct {
	config       string
	grpcAddr     string
	xdsAddr      string
	adminAddr    string
	logLevel     string
	debounce     time.Duration
	poll         time.Duration
	shutdownWait time.Duration
	// spiffeSocket and allowedClientIDs switch the gRPC listeners to SPIFFE mTLS (tls.go).
	spiffeSocket     string
	allowedClientIDs string
	// insecureListen accepts plaintext gRPC listeners beyond loopback (checkListenSecurity).
	insecureListen bool
	// sessionKeyFile holds the key Mcp-Session-Id values are bound with (sessionkey.go).
	sessionKeyFile string
}

func newServeCmd() *cobra.Command {
	f := &serveFlags{}
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the ext_authz and ext_proc gRPC server and the admin server, hot-reloading the policy",
		Long: `Run mcpgate. Each server can be disabled with an empty address (--admin-addr=).
Without --config the embedded demo policy (testdata/demo) is served.

Transport security of the gRPC listeners (--grpc-addr for ext_authz/ext_proc, --xds-addr
for ADS): plaintext by default, which serve accepts only on loopback (127.0.0.1, [::1],
localhost). With --spiffe-socket both use SPIFFE mTLS: mcpgate takes its X.509 SVID and
trust bundles from the Workload API (rotated without restart), requires a client
certificate that chains to the bundle of the client's trust domain, and admits only the
identities in --allowed-client-ids, which is then required:

  mcpgate serve --grpc-addr 0.0.0.0:9001 --xds-addr 0.0.0.0:18000 \
    --spiffe-socket unix:///run/spire/agent.sock \
    --allowed-client-ids spiffe://example.org/ns/default/inventory,spiffe://example.org/ns/default/my-agent

A plaintext gRPC listener beyond loopback (0.0.0.0, ::, ":9001", a host name, any other
IP) makes serve refuse to start: whoever reaches xDS reads every Envoy's configuration
(secrets in HTTPEndpoint headers included), and whoever reaches ext_authz/ext_proc can ask
for decisions and drive ext_proc streams in other callers' names. --insecure-listen
accepts it anyway, with a warning: for a throwaway local try only.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return serve(ctx, f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.config, "config", "", "policy directory (default: the embedded demo policy)")
	fl.StringVar(&f.grpcAddr, "grpc-addr", "127.0.0.1:9001", "ext_authz and ext_proc gRPC listen address (empty: disabled)")
	fl.StringVar(&f.xdsAddr, "xds-addr", "127.0.0.1:18000", "xDS ADS listen address for Envoy (empty: disabled)")
	fl.StringVar(&f.adminAddr, "admin-addr", "127.0.0.1:9902", "admin HTTP listen address: /healthz /readyz /metrics /debug/snapshot (empty: disabled)")
	fl.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fl.DurationVar(&f.debounce, "reload-debounce", 100*time.Millisecond, "wait this long after a policy file event before reloading")
	fl.DurationVar(&f.poll, "reload-poll", 0, "also re-read the policy on this interval, for file systems without inotify (0: off)")
	fl.DurationVar(&f.shutdownWait, "shutdown-timeout", 10*time.Second, "how long SIGTERM waits for in-flight requests")
	fl.StringVar(&f.spiffeSocket, "spiffe-socket", "", "SPIFFE Workload API address (unix:///path, a bare /path, or tcp://ip:port); set: the gRPC listeners use SPIFFE mTLS (empty: plaintext)")
	fl.StringVar(&f.allowedClientIDs, "allowed-client-ids", "", "comma-separated SPIFFE IDs of the Envoys that may connect; an ID without a path (spiffe://example.org) admits its whole trust domain; required with --spiffe-socket")
	fl.StringVar(&f.sessionKeyFile, "session-key-file", "", "file with the key (at least 32 bytes) that binds Mcp-Session-Id values to the caller that opened the session; the same for every replica (empty: a random key per process)")
	fl.BoolVar(&f.insecureListen, "insecure-listen", false, "accept plaintext --grpc-addr/--xds-addr beyond loopback (anyone who reaches them reads every Envoy's configuration and asks for decisions); a local try only, never a deployment")
	return cmd
}

func newLogger(level string) (*zap.Logger, error) {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	cfg := zap.NewProductionConfig()
	cfg.Level = zap.NewAtomicLevelAt(lvl)
	cfg.EncoderConfig.TimeKey = "ts"
	cfg.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	cfg.Sampling = nil // decision logs are an audit trail: never sampled
	return cfg.Build()
}

func serve(ctx context.Context, f *serveFlags) error {
	log, err := newLogger(f.logLevel)
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	ts, err := parseTransportSecurity(f)
	if err != nil {
		return err
	}
	exposed, err := checkListenSecurity(f, ts)
	if err != nil {
		return err
	}
	sessionKey, err := readSessionKey(f.sessionKeyFile)
	if err != nil {
		return err
	}
	for _, l := range exposed {
		log.Warn("plaintext gRPC listener beyond loopback (--insecure-listen): "+l.exposes,
			zap.String("flag", l.flag), zap.String("addr", l.addr))
	}

	tel, err := newTelemetry()
	if err != nil {
		return err
	}
	reloads, err := tel.meter.Int64Counter("mcpgate.policy.reloads",
		metric.WithDescription("policy reload attempts by result (applied, unchanged, rejected)"))
	if err != nil {
		return err
	}

	// The first load must succeed: with no good policy there is nothing to serve. Later
	// bad edits only log and keep the last good snapshot.
	store := policy.NewStore(nil)
	var snap *policy.Snapshot
	if f.config == "" {
		snap, err = policy.Load(ctx, mcpgate.DemoPolicy(), "demo")
	} else {
		snap, err = policy.LoadDir(ctx, f.config)
	}
	if err != nil {
		var le *policy.LoadError
		if errors.As(err, &le) {
			log.Error("policy rejected", zap.Strings("problems", problemStrings(le)))
		}
		return fmt.Errorf("initial policy load: %w", err)
	}
	store.Set(snap)
	reloads.Add(ctx, 1, metric.WithAttributes(attribute.String("result", "applied")))
	log.Info("policy loaded", zap.String("version", snap.Version), zap.String("summary", summary(snap)))
	if msg := authzTLSMismatch(snap, ts, f.grpcAddr); msg != "" {
		log.Warn(msg, zap.String("authz_spiffe_id", snap.Mesh.AuthzSpiffeID))
	}

	// One Workload API source for both listeners, closed after they have stopped.
	var grpcOpts []grpc.ServerOption
	if f.grpcAddr != "" || f.xdsAddr != "" {
		opts, closeCreds, err := ts.grpcServerOptions(ctx, log)
		if err != nil {
			if ctx.Err() != nil { // SIGTERM while waiting for the first SVID
				return nil
			}
			return err
		}
		defer closeCreds()
		grpcOpts = opts
	}

	g, ctx := errgroup.WithContext(ctx)
	if f.config != "" {
		opts := policy.WatchOptions{
			Dir:          f.config,
			Debounce:     f.debounce,
			PollInterval: f.poll,
			Logger:       log.Named("policy"),
			OnReload: func(result string, _ *policy.Snapshot, _ error) {
				reloads.Add(context.Background(), 1, metric.WithAttributes(attribute.String("result", result)))
			},
		}
		g.Go(func() error { return policy.Watch(ctx, store, opts) })
	} else {
		log.Info("serving the embedded demo policy; pass --config DIR to serve and watch your own")
	}

	var limitStatus func(context.Context) *extproc.RateLimitStatus
	var pins pinSource // ext_proc's, when it serves
	tracer, err := decisionlog.NewTracer(tel.meter, log.Named("tracing"))
	if err != nil {
		return err
	}
	// Mesh.spec.tracing applies at load and after every reload (and, lazily, on the
	// request path); the spans in flight are flushed at exit.
	tracer.Apply(store.Current().Mesh.Tracing)
	policyChanges, stopChanges := store.Subscribe()
	defer stopChanges()
	go func() {
		for {
			select {
			case <-policyChanges:
				tracer.Apply(store.Current().Mesh.Tracing)
			case <-ctx.Done():
				return
			}
		}
	}()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		tracer.Shutdown(ctx)
	}()
	// One set of outbound credential sources: ext_authz answers with their tokens while a
	// sidecar has none, and the xDS server gives the sidecars the tokens to inject.
	credentials := outbound.NewSources()
	if f.grpcAddr != "" {
		authz, err := extauthz.NewServer(extauthz.Options{
			Credentials: credentials,
			Store:       store,
			Verifier:    bearer.NewVerifier(bearer.Options{}),
			DecisionLog: log.Named("decision"),
			Meter:       tel.meter,
			Tracer:      tracer,
		})
		if err != nil {
			return err
		}
		if sessionKey == nil {
			log.Info("Mcp-Session-Id values are bound with a key of this process: sessions end with it, and replicas need a shared --session-key-file")
		}
		proc, err := extproc.NewServer(extproc.Options{Store: store, DecisionLog: log.Named("decision"), Log: log.Named("ratelimit"), Meter: tel.meter, Tracer: tracer, SessionKey: sessionKey})
		if err != nil {
			return err
		}
		pins = proc
		limitStatus = func(ctx context.Context) *extproc.RateLimitStatus {
			st := proc.RateLimitStatus(ctx)
			return &st
		}
		lis, err := net.Listen("tcp", f.grpcAddr)
		if err != nil {
			return fmt.Errorf("--grpc-addr: %w", err)
		}
		srv := newGRPCServer(authz, proc, grpcOpts...)
		log.Info("grpc listening", zap.String("addr", lis.Addr().String()), zap.Strings("services", []string{
			"envoy.service.auth.v3.Authorization", "envoy.service.ext_proc.v3.ExternalProcessor", "grpc.health.v1.Health"}))
		g.Go(func() error { return srv.Serve(lis) })
		g.Go(func() error {
			<-ctx.Done()
			gracefulStop(srv, f.shutdownWait)
			authz.Close() // every decision made is logged before exit
			proc.Close()
			return nil
		})
	}

	if f.xdsAddr != "" {
		if err := startXDS(ctx, g, f.xdsAddr, store, credentials, log, tel, grpcOpts...); err != nil {
			return err
		}
	}

	if f.adminAddr != "" {
		lis, err := net.Listen("tcp", f.adminAddr)
		if err != nil {
			return fmt.Errorf("--admin-addr: %w", err)
		}
		hs := &http.Server{Handler: adminHandler(store, tel, limitStatus, pins), ReadHeaderTimeout: 5 * time.Second}
		log.Info("admin listening", zap.String("addr", lis.Addr().String()))
		g.Go(func() error {
			if err := hs.Serve(lis); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
		g.Go(func() error {
			<-ctx.Done()
			sctx, cancel := context.WithTimeout(context.Background(), f.shutdownWait)
			defer cancel()
			return hs.Shutdown(sctx)
		})
	}

	err = g.Wait()
	log.Info("stopped")
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// errPlaintextBeyondLoopback is why serve refuses a gRPC listener: no TLS, and bound
// where other hosts can reach it.
var errPlaintextBeyondLoopback = errors.New("plaintext gRPC listener beyond loopback")

// grpcListener is one of serve's gRPC listeners as its flag names it, with what a
// plaintext one gives away to whoever reaches it.
type grpcListener struct {
	flag, addr, exposes string
}

// checkListenSecurity enforces that a gRPC listener without TLS binds only loopback: a
// plaintext xDS server hands every node's configuration (secrets in HTTPEndpoint headers
// included) to anyone who asks for it by node.cluster, and a plaintext ext_authz/ext_proc
// server answers anyone, who can then open ext_proc streams that spend another caller's
// rate limit. With SPIFFE mTLS (--spiffe-socket) both check the client's identity. The
// address is judged as written, before anything is bound: a host name other than
// localhost may resolve beyond loopback, and ":port" binds every interface. It returns
// the exposed listeners, which are an error unless --insecure-listen accepts them.
//
// The admin server (--admin-addr) is not covered: it serves health, metrics and a
// summary of the policy (names, never header values or secrets: describeSnapshot), and
// Kubernetes probes need it on the pod IP.
func checkListenSecurity(f *serveFlags, ts transportSecurity) ([]grpcListener, error) {
	if ts.workloadAPI != "" {
		return nil, nil
	}
	var exposed []grpcListener
	var errs []error
	for _, l := range []grpcListener{
		{"--grpc-addr", f.grpcAddr, "any host that reaches it can ask for authorization decisions and open ext_proc streams that spend other callers' rate limits"},
		{"--xds-addr", f.xdsAddr, "any host that reaches it can read every Envoy's configuration, secrets in HTTPEndpoint headers included"},
	} {
		if l.addr == "" || isLoopbackAddr(l.addr) {
			continue
		}
		if _, _, err := net.SplitHostPort(l.addr); err != nil {
			continue // not an address: net.Listen reports it
		}
		exposed = append(exposed, l)
		errs = append(errs, fmt.Errorf("%s %s: %w: %s; serve SPIFFE mTLS (--spiffe-socket and --allowed-client-ids), bind a loopback address (127.0.0.1, [::1], localhost), or pass --insecure-listen to accept plaintext",
			l.flag, l.addr, errPlaintextBeyondLoopback, l.exposes))
	}
	if f.insecureListen {
		return exposed, nil
	}
	return exposed, errors.Join(errs...)
}

// authzTLSMismatch says why the Envoys the policy programs cannot reach this server's
// ext_authz/ext_proc listener, or "": the Mesh's authz.spiffeId is what makes their
// mcpgate cluster use mTLS, so it must be set exactly when the listener serves mTLS.
// Either mismatch fails closed (every request is denied), hence a warning, not an error:
// another replica may be the one the Envoys reach.
func authzTLSMismatch(snap *policy.Snapshot, ts transportSecurity, grpcAddr string) string {
	switch {
	case grpcAddr == "" || snap == nil || snap.Mesh == nil:
		return ""
	case ts.workloadAPI != "" && snap.Mesh.AuthzSpiffeID == "":
		return "the gRPC listeners use SPIFFE mTLS but the Mesh names no authz.spiffeId: the Envoys it programs reach ext_authz/ext_proc in plaintext and are refused; set authz.spiffeId to mcpgate's SPIFFE ID"
	case ts.workloadAPI == "" && snap.Mesh.AuthzSpiffeID != "":
		return "the Mesh names authz.spiffeId but the gRPC listeners are plaintext: the Envoys it programs reach ext_authz/ext_proc over mTLS and fail; start serve with --spiffe-socket and --allowed-client-ids"
	}
	return ""
}

// newGRPCServer builds the gRPC server Envoy talks to; the health service lets Envoy
// health check the mcpgate cluster. opts carry the transport credentials, if any.
func newGRPCServer(authz authv3.AuthorizationServer, proc extprocv3.ExternalProcessorServer, opts ...grpc.ServerOption) *grpc.Server {
	srv := grpc.NewServer(append(extauthz.ServerOptions(), opts...)...)
	authv3.RegisterAuthorizationServer(srv, authz)
	extprocv3.RegisterExternalProcessorServer(srv, proc)
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("envoy.service.auth.v3.Authorization", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("envoy.service.ext_proc.v3.ExternalProcessor", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	reflection.Register(srv)
	return srv
}

// gracefulStop lets in-flight Checks finish, but not forever: Envoy retries elsewhere or
// fails closed, so a hung stream must not block shutdown.
func gracefulStop(srv *grpc.Server, wait time.Duration) {
	done := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(wait):
		srv.Stop()
	}
}

func problemStrings(le *policy.LoadError) []string {
	out := make([]string, len(le.Problems))
	for i, p := range le.Problems {
		out[i] = p.Error()
	}
	return out
}
