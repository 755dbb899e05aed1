package main

import (
	"context"
	"net"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
)

type inventoryFlags struct {
	addr                string
	localhostProtection bool
	jsonResponse        bool
}

func newInventoryCmd() *cobra.Command {
	f := &inventoryFlags{}
	cmd := &cobra.Command{
		Use:   "inventory",
		Short: "Serve the demo inventory MCP server (Streamable HTTP at /mcp)",
		Long: `Serve the demo policy's App "inventory": an MCP server (official Go SDK, Streamable
HTTP at ` + mcpapp.Path + `) with the tools get_inventory, list_items, delete_product,
get_customer (whose result carries an ssn field) and slow_report (with progress). It is also
the server the integration tests use (package mcpapp). The stock starts as
SKU-42: 42, SKU-7: 7, ... and lives in memory; delete_product really deletes.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ln, err := net.Listen("tcp", f.addr)
			if err != nil {
				return err
			}
			log := newLogger()
			defer func() { _ = log.Sync() }()
			return runInventory(cmd.Context(), ln, f, log)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.addr, "addr", ":8000", "listen address")
	// Off by default: the SDK's DNS-rebinding check answers 403 to a request that arrives
	// on a loopback address with a non-loopback Host, which is what a sidecar on the same
	// host sends when it forwards Host: inventory (mcp.StreamableHTTPOptions).
	fl.BoolVar(&f.localhostProtection, "localhost-protection", false, "enable the MCP SDK's DNS-rebinding protection (403 for a non-loopback Host on a loopback listener)")
	fl.BoolVar(&f.jsonResponse, "json-response", false, "answer POSTs with application/json instead of text/event-stream (progress then goes to the GET stream)")
	return cmd
}

func runInventory(ctx context.Context, ln net.Listener, f *inventoryFlags, log *zap.Logger) error {
	h := mcpapp.NewHandler(mcpapp.Options{
		JSONResponse:               f.jsonResponse,
		DisableLocalhostProtection: !f.localhostProtection,
	})
	log.Info("inventory MCP server listening", zap.String("addr", ln.Addr().String()), zap.String("path", mcpapp.Path))
	return serveHTTP(ctx, ln, h)
}
