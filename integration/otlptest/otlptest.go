// Package otlptest runs the OpenTelemetry Collector's own OTLP receiver for tests: the
// otlpsink program (integration/tools/otlpsink, a module of its own, built by `make
// otlpsink`) on a free loopback port, and keeps every span it receives. What mcpgate
// exports is read by the receiver a real collector runs, never a mock.
package otlptest

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Version is the collector release otlpsink is built from.
const Version = "v0.165.0"

// Span is one received span, flattened for assertions.
type Span struct {
	Service  string            `json:"service"`
	Name     string            `json:"name"`
	TraceID  string            `json:"trace_id"`
	SpanID   string            `json:"span_id"`
	ParentID string            `json:"parent_id,omitempty"`
	Kind     string            `json:"kind"`
	Attrs    map[string]string `json:"attrs"`
	Status   string            `json:"status"`
}

// Collector is a running receiver. Its methods are safe for concurrent use.
type Collector struct {
	bin, addr string

	mu    sync.Mutex
	spans []Span
	cmd   *exec.Cmd     // nil while stopped
	done  chan struct{} // closed when cmd's output is read to the end
}

// Binary is where `make otlpsink` puts the program: bin/ at the repository root.
func Binary() (string, error) {
	_, file, _, _ := runtime.Caller(0)
	bin := filepath.Join(filepath.Dir(file), "..", "..", "bin", "otlpsink-"+Version)
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("%s: %w: run `make otlpsink` (the OpenTelemetry Collector's otlpreceiver %s)", bin, err, Version)
	}
	return bin, nil
}

// Start runs the receiver on a free loopback port and waits until it accepts
// connections; t.Cleanup stops it.
func Start(t testing.TB) *Collector {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		t.Fatalf("otlptest: %v", err)
	}
	var c *Collector
	for attempt := 0; ; attempt++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		_ = l.Close()
		c = &Collector{bin: bin, addr: addr}
		if err = c.start(); err == nil {
			break
		}
		if attempt == 4 { // another process took the port between Close and the bind
			t.Fatalf("otlptest: %v", err)
		}
	}
	t.Cleanup(c.Stop)
	return c
}

// Addr is the receiver's host:port.
func (c *Collector) Addr() string { return c.addr }

func (c *Collector) start() error {
	cmd := exec.Command(c.bin, "--addr", c.addr)
	cmd.SysProcAttr = sysProcAttr()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var s Span
			if json.Unmarshal(sc.Bytes(), &s) == nil {
				c.mu.Lock()
				c.spans = append(c.spans, s)
				c.mu.Unlock()
			}
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		conn, err := net.DialTimeout("tcp", c.addr, time.Second)
		if err == nil {
			_ = conn.Close()
			break
		}
		select {
		case <-done:
			_ = cmd.Wait()
			return fmt.Errorf("otlpsink on %s exited: %s", c.addr, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			return errors.New("otlpsink did not listen within 10s: " + stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	c.mu.Lock()
	c.cmd, c.done = cmd, done
	c.mu.Unlock()
	return nil
}

// Stop stops the receiver (a collector that is down); spans received so far are kept.
func (c *Collector) Stop() {
	c.mu.Lock()
	cmd, done := c.cmd, c.done
	c.cmd = nil
	c.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
	_ = cmd.Wait()
}

// Restart starts a stopped receiver again on the same address.
func (c *Collector) Restart(t testing.TB) {
	t.Helper()
	if err := c.start(); err != nil {
		t.Fatalf("otlptest: restart: %v", err)
	}
}

// Spans returns the spans received so far.
func (c *Collector) Spans() []Span {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Span(nil), c.spans...)
}

// Wait polls until match selects at least n received spans, or fails t after within.
func (c *Collector) Wait(t testing.TB, within time.Duration, n int, match func(Span) bool) []Span {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		var out []Span
		for _, s := range c.Spans() {
			if match(s) {
				out = append(out, s)
			}
		}
		if len(out) >= n {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("otlptest: %d matching spans after %s, want %d; received: %+v", len(out), within, n, c.Spans())
		}
		time.Sleep(20 * time.Millisecond)
	}
}
