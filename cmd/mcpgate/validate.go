package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/mcpgate/mcpgate/policy"
)

func newValidateCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "validate DIR",
		Short: "Check a policy directory: every problem as file:line: message, exit 1 on any",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			snap, err := loadPolicy(cmd, args[0])
			if err != nil {
				var ee *exitError
				if !errors.As(err, &ee) {
					fmt.Fprintln(cmd.ErrOrStderr(), err)
				}
				return &exitError{code: 1}
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), "ok: "+summary(snap))
			return err
		},
	}
}

// summary is a one-line description of a snapshot.
func summary(s *policy.Snapshot) string {
	mcp := 0
	for _, a := range s.Apps {
		if a.MCP != nil {
			mcp++
		}
	}
	return fmt.Sprintf("%d file(s), mesh %q (trust domain %s, mtls %s), %d app(s) of which %d serve MCP, %d HTTPEndpoint(s), %d gateway(s), %d issuer(s); version %s",
		len(s.Files), s.Mesh.Name, s.Mesh.TrustDomain, s.Mesh.MTLS, len(s.Apps), mcp, len(s.Endpoints), len(s.Gateways), len(s.Mesh.Issuers), s.Version)
}
