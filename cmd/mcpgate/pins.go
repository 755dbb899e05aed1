package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/spf13/cobra"
)

// newPinsCmd is `mcpgate pins export`: the tool pins a running mcpgate learned from an
// app's tools/list responses (tools.pinning: record), as a pin file to review and commit.
func newPinsCmd() *cobra.Command {
	pins := &cobra.Command{Use: "pins", Short: "Tool-definition pins (tools.pinning)"}
	var app, admin string
	export := &cobra.Command{
		Use:   "export --app ID",
		Short: "Print the pin file of the tool definitions a running mcpgate saw an app list",
		Long: `Print, as a pin file, the tool definitions the app's server listed through a running
mcpgate (its admin server's /debug/pins): each pin with the canonical definition it digests
as a comment. Review them, commit the file as the app's pin file (default pins/<app>.yaml
beside the policy) and set tools.pinning.mode: enforce.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if app == "" {
				return fmt.Errorf("--app is required")
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Second)
			defer cancel()
			u := (&url.URL{Scheme: "http", Host: admin, Path: "/debug/pins", RawQuery: url.Values{"app": {app}}.Encode()}).String()
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
			if err != nil {
				return err
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				return fmt.Errorf("mcpgate's admin server at %s: %w", admin, err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
			if err != nil {
				return err
			}
			if resp.StatusCode != http.StatusOK {
				var e struct {
					Error string `json:"error"`
				}
				if json.Unmarshal(body, &e) == nil && e.Error != "" {
					return fmt.Errorf("%s: %s", admin, e.Error)
				}
				return fmt.Errorf("%s: %s: %s", u, resp.Status, body)
			}
			_, err = cmd.OutOrStdout().Write(body)
			return err
		},
	}
	export.Flags().StringVar(&app, "app", "", "the App ID whose pins to print")
	export.Flags().StringVar(&admin, "admin-addr", "127.0.0.1:9902", "host:port of the running mcpgate's admin server (serve --admin-addr)")
	pins.AddCommand(export)
	return pins
}
