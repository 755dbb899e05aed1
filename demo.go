// Package mcpgate holds what the whole module shares at its root: the demo policy, embedded
// so that `mcpgate serve` with no --config serves it.
package mcpgate

import (
	"embed"
	"io/fs"
)

//go:embed testdata/demo
var demo embed.FS

// DemoPolicy returns the demo policy directory (testdata/demo) as a file system.
func DemoPolicy() fs.FS {
	sub, err := fs.Sub(demo, "testdata/demo")
	if err != nil {
		panic(err) // the embed directive above guarantees the directory exists
	}
	return sub
}
