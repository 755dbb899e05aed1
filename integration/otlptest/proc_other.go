//go:build !linux

package otlptest

import "syscall"

// sysProcAttr is empty where there is no Pdeathsig: t.Cleanup alone stops the server.
func sysProcAttr() *syscall.SysProcAttr { return nil }
