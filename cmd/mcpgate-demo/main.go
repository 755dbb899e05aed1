// Command mcpgate-demo runs the three programs of the docker-compose demo mesh
// (docker-compose.yaml, deploy/README.md) that are not mcpgate, Envoy or SPIRE:
//
//   - inventory: the demo MCP server, the App "inventory" of the demo policy
//     (package mcpapp's server: get_inventory, list_items, delete_product,
//     get_customer, slow_report);
//   - issuer: a DEVELOPMENT-ONLY OAuth token issuer that signs a token for any client
//     that asks, so that the demo policy's authentication can be exercised;
//   - agent: the App "my-agent": fetches a token, calls inventory through its sidecar and
//     prints what the policy allowed, denied, filtered and redacted.
//
// Nothing here belongs in production: the issuer authenticates no one.
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

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// exitError carries an exit code through cobra without printing a second message.
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "mcpgate-demo",
		Short:         "The demo mesh's MCP server, development token issuer and agent (never for production)",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newInventoryCmd(), newIssuerCmd(), newAgentCmd())
	return root
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		var ee *exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		fmt.Fprintln(os.Stderr, "mcpgate-demo:", err)
		os.Exit(1)
	}
}

// newLogger logs JSON to stderr, like mcpgate.
func newLogger() *zap.Logger {
	cfg := zap.NewProductionConfig()
	cfg.EncoderConfig.TimeKey = "ts"
	cfg.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	cfg.Sampling = nil
	log, err := cfg.Build()
	if err != nil {
		return zap.NewNop()
	}
	return log
}

// shutdownTimeout bounds how long SIGTERM waits for in-flight requests.
const shutdownTimeout = 5 * time.Second

// serveHTTP serves h on ln until ctx ends, then shuts down gracefully. Close, not only
// Shutdown, ends what is left: MCP's standalone SSE GET streams never finish on their own.
func serveHTTP(ctx context.Context, ln net.Listener, h http.Handler) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
