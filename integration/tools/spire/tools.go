//go:build tools

// Package tools pins the SPIRE server and agent used by the integration suite
// (make spire builds them into bin/spire-*-v1.15.3). It is a module of its own
// so that SPIRE's dependencies never enter mcpgate's go.mod.
package tools

import (
	_ "github.com/spiffe/spire/cmd/spire-agent"
	_ "github.com/spiffe/spire/cmd/spire-server"
)
