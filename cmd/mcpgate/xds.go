package main

import (
	"context"
	"errors"
	"fmt"
	"net"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/mcpgate/mcpgate"
	"github.com/mcpgate/mcpgate/envoy"
	outbound "github.com/mcpgate/mcpgate/extauthz/credentials"
	"github.com/mcpgate/mcpgate/policy"
	"github.com/mcpgate/mcpgate/xds"
)

// loadPolicy loads DIR, or the embedded demo policy when dir is empty, printing every
// problem on stderr.
func loadPolicy(cmd *cobra.Command, dir string) (*policy.Snapshot, error) {
	var snap *policy.Snapshot
	var err error
	if dir == "" {
		snap, err = policy.Load(cmd.Context(), mcpgate.DemoPolicy(), "demo")
	} else {
		snap, err = policy.LoadDir(cmd.Context(), dir)
	}
	if err != nil {
		var le *policy.LoadError
		if errors.As(err, &le) {
			for _, p := range le.Problems {
				fmt.Fprintln(cmd.ErrOrStderr(), p.Error())
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "%d problem(s)\n", len(le.Problems))
			return nil, &exitError{code: 1}
		}
		return nil, err
	}
	return snap, nil
}

func newRenderCmd() *cobra.Command {
	var app, config string
	cmd := &cobra.Command{
		Use:   "render --app ID [--config DIR]",
		Short: "Print, as YAML, the Envoy resources the xDS server sends to an App's sidecar or a Gateway",
		Long: `Print the listeners, routes, clusters, endpoints and secrets the control plane would send
to the Envoy whose node.cluster is ID (an App ID or a Gateway name), each validated as the
server validates it. Without --config the embedded demo policy is used.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			snap, err := loadPolicy(cmd, config)
			if err != nil {
				return err
			}
			res, err := xds.Translate(snap, app)
			if err != nil {
				return err
			}
			y, err := res.YAML()
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(y)
			return err
		},
	}
	cmd.Flags().StringVar(&app, "app", "", "App ID or Gateway name (the Envoy's node.cluster)")
	cmd.Flags().StringVar(&config, "config", "", "policy directory (default: the embedded demo policy)")
	_ = cmd.MarkFlagRequired("app")
	return cmd
}

func newBootstrapCmd() *cobra.Command {
	var o envoy.BootstrapOptions
	var config, spire string
	var noSpire bool
	cmd := &cobra.Command{
		Use:   "bootstrap --app ID --xds-address HOST:PORT",
		Short: "Print an Envoy bootstrap (YAML) for an App's sidecar or a Gateway",
		Long: `Print a bootstrap to start Envoy with (envoy -c bootstrap.yaml): the node (cluster = the App
ID or Gateway name), the admin interface on 127.0.0.1, the ADS cluster to mcpgate over HTTP/2,
and the SPIRE agent's SDS cluster when the Mesh uses spireAgentSocket. When the Mesh names
mcpgate's SPIFFE ID (authz.spiffeId) and certificates come from SPIRE, the ADS cluster is
SPIFFE mTLS: the Envoy presents its SVID and accepts only mcpgate's.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.SpireAgentSocket = spire
			if !noSpire {
				snap, err := loadPolicy(cmd, config)
				if err != nil {
					return err
				}
				if _, err := xds.Translate(snap, o.NodeCluster); errors.Is(err, xds.ErrUnknownNode) {
					fmt.Fprintf(cmd.ErrOrStderr(), "warning: %v; the Envoy will receive nothing\n", err)
				}
				if o.SpireAgentSocket == "" && snap.Mesh.MTLS != policy.MTLSDisabled {
					o.SpireAgentSocket = snap.Mesh.SDS.SpireAgentSocket
				}
				o.XDSTLS = xdsTLS(cmd, snap, o.NodeCluster, o.SpireAgentSocket)
			}
			b, err := envoy.Bootstrap(o)
			if err != nil {
				return err
			}
			js, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(b)
			if err != nil {
				return err
			}
			y, err := xds.JSONToYAML(js)
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(y)
			return err
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&o.NodeCluster, "app", "", "App ID or Gateway name: the Envoy's node.cluster")
	fl.StringVar(&o.NodeID, "node-id", "", "node.id, free per replica (default: the App ID)")
	fl.StringVar(&o.XDSAddress, "xds-address", "", "host:port of mcpgate's ADS server (serve --xds-addr)")
	fl.Uint32Var(&o.AdminPort, "admin-port", envoy.DefaultAdminPort, "Envoy admin port, on 127.0.0.1 only")
	fl.StringVar(&config, "config", "", "policy directory, read for the SPIRE agent socket (default: the embedded demo policy)")
	fl.StringVar(&spire, "spire-agent-socket", "", "SPIRE agent socket path (default: the Mesh's sds.spireAgentSocket)")
	fl.BoolVar(&noSpire, "no-spire", false, "do not add the SPIRE agent SDS cluster")
	_ = cmd.MarkFlagRequired("app")
	_ = cmd.MarkFlagRequired("xds-address")
	return cmd
}

// startXDS serves ADS on its own gRPC listener at addr, re-translating on every policy
// change, until ctx ends. opts carry the transport credentials, if any.
func startXDS(ctx context.Context, g *errgroup.Group, addr string, store *policy.Store, tokens *outbound.Sources, log *zap.Logger, tel *telemetry, opts ...grpc.ServerOption) error {
	srv, err := xds.NewServer(ctx, xds.Options{Store: store, Tokens: tokens, Logger: log.Named("xds"), Meter: tel.meter})
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--xds-addr: %w", err)
	}
	gs := grpc.NewServer(append(xds.ServerOptions(), opts...)...)
	srv.Register(gs)
	log.Info("xds listening", zap.String("addr", lis.Addr().String()),
		zap.Strings("services", []string{"envoy.service.discovery.v3.AggregatedDiscoveryService"}))
	g.Go(func() error { return srv.Run(ctx) })
	g.Go(func() error { return gs.Serve(lis) })
	g.Go(func() error {
		<-ctx.Done()
		// ADS streams never end by themselves: Stop, not GracefulStop. Envoy keeps its
		// configuration and reconnects.
		gs.Stop()
		return nil
	})
	return nil
}

// xdsTLS is the ADS cluster's mTLS when the Mesh names mcpgate's SPIFFE ID. Only with
// SPIRE: with certDir the certificates themselves arrive over xDS, so xDS cannot need them.
func xdsTLS(cmd *cobra.Command, snap *policy.Snapshot, node, spireSocket string) *envoy.XDSTLS {
	server := snap.Mesh.AuthzSpiffeID
	if server == "" {
		return nil
	}
	if spireSocket == "" {
		fmt.Fprintln(cmd.ErrOrStderr(), "warning: authz.spiffeId is set but certificates do not come from SPIRE; the ADS connection stays plaintext")
		return nil
	}
	self := ""
	if app := snap.App(node); app != nil {
		self = app.SpiffeID
	} else if gw := snap.Gateways[node]; gw != nil {
		self = xds.GatewaySpiffeID(snap.Mesh.TrustDomain, gw)
	}
	if self == "" {
		return nil
	}
	return &envoy.XDSTLS{SVID: self, Bundle: "spiffe://" + snap.Mesh.TrustDomain, ServerID: server}
}
