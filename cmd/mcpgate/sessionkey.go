package main

import (
	"bytes"
	"fmt"
	"os"

	"github.com/mcpgate/mcpgate/extproc"
)

// readSessionKey reads the key ext_proc binds Mcp-Session-Id values with: the file's
// bytes, a trailing newline aside, at least extproc.SessionKeyBytes of them (e.g. the
// output of `openssl rand -hex 32`). Every replica behind the same Envoys needs the same
// key; "" means none (a random key for this process).
func readSessionKey(path string) ([]byte, error) {
	if path == "" {
		return nil, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--session-key-file: %w", err)
	}
	b = bytes.TrimRight(b, "\r\n")
	if len(b) < extproc.SessionKeyBytes {
		return nil, fmt.Errorf("--session-key-file %s: %d bytes of key, want at least %d (e.g. openssl rand -hex 32 > %s)", path, len(b), extproc.SessionKeyBytes, path)
	}
	return b, nil
}
