// Command mcpgate secures MCP traffic between AI agents and MCP servers: it is Envoy's
// ext_authz server (and, as the project grows, its ext_proc server and xDS control plane).
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

// Set at build time with -ldflags "-X main.version=... -X main.commit=...".
var (
	version = "dev"
	commit  = "unknown"
)

// exitError carries an exit code through cobra without printing a second message.
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "mcpgate",
		Short:         "Secure Model Context Protocol traffic with Envoy: identity, per-tool policy, filtering",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newServeCmd(), newValidateCmd(), newVersionCmd(), newRenderCmd(), newBootstrapCmd(), newPinsCmd())
	return root
}

func main() {
	if err := newRootCmd().Execute(); err != nil {
		var ee *exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		fmt.Fprintln(os.Stderr, "mcpgate:", err)
		os.Exit(1)
	}
}
