package otlptest

import "syscall"

// sysProcAttr has the kernel kill otlpsink when the test binary dies without its
// cleanups (a panic, go test's -timeout), so no server outlives its test. (Pdeathsig
// follows the OS thread that started the process, and Go ends a thread only when a
// goroutine exits locked to it, which the callers of Start do not do.)
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
