// Package redistest runs a real redis-server for tests, on a free loopback port in a
// temporary directory, never a mock: the rate limiter's Lua script, its clock (Redis
// TIME) and go-redis's reconnects are what the tests are about, and only the real server
// has them. Install the server with `make redis` (the Debian package).
package redistest

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// binaries are where Start looks for redis-server, in order: "" is the PATH. The
// Debian package installs /usr/bin/redis-server, which a test's PATH may lack.
var binaries = []string{"", "/usr/bin/redis-server"}

const (
	// startAttempts bounds the retries when another process takes the free port between
	// the probe listener's Close and redis-server's bind.
	startAttempts = 5
	// readyTimeout bounds the wait for PING to answer after a start; a cold start on
	// loopback takes a few milliseconds.
	readyTimeout = 10 * time.Second
	// pollInterval is the pause between two readiness probes.
	pollInterval = 5 * time.Millisecond
	// killTimeout bounds the wait for the process to exit after SIGKILL.
	killTimeout = 10 * time.Second
)

// Server is a redis-server process that a test started. Its methods are safe for
// concurrent use.
type Server struct {
	bin  string
	dir  string
	port int
	bus  int // the cluster bus port of a cluster node; 0: not a cluster node
	// conf is a config file given first (a sentinel's, which Sentinel rewrites); extra
	// are arguments after the defaults (a replica's --replicaof).
	conf  string
	extra []string
	// tlsDir holds server.crt, server.key and ca.crt when the server also listens for
	// TLS, on tlsPort.
	tlsDir  string
	tlsPort int

	mu   sync.Mutex
	proc *process // nil when not running
	runs int      // starts so far, to name each run's log file
}

// process is one run of redis-server.
type process struct {
	cmd  *exec.Cmd
	log  string        // its log file
	done chan struct{} // closed when it has exited
	err  error         // Wait's result, set before done is closed
}

// Start starts redis-server on 127.0.0.1 at a free port, with no persistence, in a
// directory of t.TempDir(), and returns once it answers PING. t.Cleanup stops it. A
// missing redis-server fails the test (not skips it: a skipped rate-limit test would
// hide that the shared limit is untested) with a message saying to run `make redis`.
func Start(t testing.TB) *Server {
	t.Helper()
	return startServer(t, false)
}

// startServer starts a server, a cluster node (cluster-enabled, with a free bus port
// too) when node is set.
func startServer(t testing.TB, node bool, set ...func(*Server)) *Server {
	t.Helper()
	bin, err := findBinary()
	if err != nil {
		t.Fatalf("redistest: %v: run `make redis` to install it (Debian package redis-server)", err)
	}
	s := &Server{bin: bin, dir: t.TempDir()}
	for _, f := range set {
		f(s)
	}
	t.Cleanup(s.Kill)
	var errs []error
	for range startAttempts {
		port, err := freePort()
		if err != nil {
			t.Fatalf("redistest: %v", err)
		}
		s.port = port
		if node {
			if s.bus, err = freePort(); err != nil {
				t.Fatalf("redistest: %v", err)
			}
		}
		if s.tlsDir != "" {
			if s.tlsPort, err = freePort(); err != nil {
				t.Fatalf("redistest: %v", err)
			}
		}
		err = s.start()
		if err == nil {
			return s
		}
		errs = append(errs, err)
		if !errors.Is(err, errAddrInUse) {
			break
		}
	}
	t.Fatalf("redistest: %v", errors.Join(errs...))
	return nil
}

// Addr is the server's address, 127.0.0.1:port. It stays the same across Restart.
func (s *Server) Addr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port))
}

// Kill stops the server with SIGKILL, as a crash would, and waits for it to exit. It
// does nothing when the server is not running.
func (s *Server) Kill() {
	s.mu.Lock()
	p := s.proc
	s.proc = nil
	s.mu.Unlock()
	if p == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(killTimeout):
		// A process that outlives SIGKILL is stuck in the kernel; nothing more to do.
		fmt.Fprintf(os.Stderr, "redistest: redis-server (pid %d) did not exit %s after SIGKILL\n", p.cmd.Process.Pid, killTimeout)
	}
}

// Restart starts the server again on the same port, with empty data (nothing is
// persisted), after stopping it if it is still running. It returns once the server
// answers PING, so clients holding Addr can reconnect.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.Kill()
	// The port was ours until the kill; another process may take it in between. That is
	// rare on a test machine and cannot be helped (clients hold the address), so a few
	// attempts and then fail.
	var err error
	for range startAttempts {
		if err = s.start(); err == nil || !errors.Is(err, errAddrInUse) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("redistest: restart on port %d: %v", s.port, err)
	}
}

var errAddrInUse = errors.New("address already in use")

// start runs redis-server on s.port and waits for PING to answer.
func (s *Server) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil {
		return errors.New("already running")
	}
	s.runs++
	logFile := filepath.Join(s.dir, fmt.Sprintf("redis-%d.log", s.runs))
	var args []string
	if s.conf != "" {
		args = append(args, s.conf, "--sentinel")
	}
	cmd := exec.Command(s.bin, append(args,
		"--port", strconv.Itoa(s.port),
		"--bind", "127.0.0.1",
		"--protected-mode", "yes",
		"--save", "",
		"--appendonly", "no",
		"--dir", s.dir,
		"--daemonize", "no",
		"--logfile", logFile,
	)...)
	if s.conf == "" {
		// A replica's first sync starts at once, not after Redis's default 5s wait for
		// more replicas to share it.
		cmd.Args = append(cmd.Args, "--repl-diskless-sync-delay", "0")
	}
	cmd.Args = append(cmd.Args, s.extra...)
	if s.tlsDir != "" {
		cmd.Args = append(cmd.Args,
			"--tls-port", strconv.Itoa(s.tlsPort),
			"--tls-cert-file", filepath.Join(s.tlsDir, "server.crt"),
			"--tls-key-file", filepath.Join(s.tlsDir, "server.key"),
			"--tls-ca-cert-file", filepath.Join(s.tlsDir, "ca.crt"),
			"--tls-auth-clients", "no", // server TLS, as managed Redis offers
		)
	}
	if s.bus != 0 {
		cmd.Args = append(cmd.Args,
			"--cluster-enabled", "yes",
			"--cluster-port", strconv.Itoa(s.bus),
			"--cluster-config-file", filepath.Join(s.dir, "nodes.conf"),
		)
	}
	cmd.Dir = s.dir
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", s.bin, err)
	}
	p := &process{cmd: cmd, log: logFile, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := waitReady(s.Addr(), p); err != nil {
		_ = cmd.Process.Signal(syscall.SIGKILL)
		<-p.done
		tail := p.logTail()
		if bytes.Contains(tail, []byte("Address already in use")) {
			err = fmt.Errorf("%w: %w", errAddrInUse, err)
		}
		return fmt.Errorf("redis-server on port %d: %w\n%s", s.port, err, tail)
	}
	s.proc = p
	return nil
}

// waitReady polls PING on addr until it answers PONG, the process exits, or
// readyTimeout passes.
func waitReady(addr string, p *process) error {
	deadline := time.Now().Add(readyTimeout)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			return fmt.Errorf("exited before answering PING: %v", p.err)
		default:
		}
		if last = ping(addr); last == nil {
			return nil
		}
		time.Sleep(pollInterval)
	}
	return fmt.Errorf("no PONG within %s: %w", readyTimeout, last)
}

// ping sends PING and expects PONG: the server is serving (-LOADING and the like are
// errors: not ready yet).
func ping(addr string) error {
	r, err := Do(addr, "PING")
	if err == nil && r != "PONG" {
		err = fmt.Errorf("PING answered %q", r)
	}
	return err
}

// logTail is the end of the run's log, for failure messages.
func (p *process) logTail() []byte {
	b, err := os.ReadFile(p.log)
	if err != nil {
		return []byte("(no log: " + err.Error() + ")")
	}
	const max = 2000
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return b
}

// findBinary returns the first redis-server of binaries.
func findBinary() (string, error) {
	for _, b := range binaries {
		if b == "" {
			if p, err := exec.LookPath("redis-server"); err == nil {
				return p, nil
			}
			continue
		}
		if fi, err := os.Stat(b); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return b, nil
		}
	}
	return "", errors.New("redis-server not found on PATH nor at /usr/bin/redis-server")
}

// freePort returns a loopback port that was free a moment ago: the kernel picks it for
// a listener on 127.0.0.1:0, which is then closed for redis-server to bind (which may
// race with another process; Start retries).
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, fmt.Errorf("pick a free port: %w", err)
	}
	return port, nil
}
