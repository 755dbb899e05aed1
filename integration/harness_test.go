//go:build integration

// Package integration runs the real mcpgate binary on loopback and drives it as Envoy does.
package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
)

var mcpgateBin string

// TestMain builds the binary once for every test in the package.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "mcpgate-integration")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	mcpgateBin = filepath.Join(dir, "mcpgate")
	build := exec.Command("go", "build", "-o", mcpgateBin, "../cmd/mcpgate")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build mcpgate:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// logBuffer collects the process's JSON log lines and lets tests wait for one.
type logBuffer struct {
	mu    sync.Mutex
	lines []map[string]any
	raw   bytes.Buffer
}

func (l *logBuffer) consume(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m map[string]any
		_ = json.Unmarshal(sc.Bytes(), &m)
		l.mu.Lock()
		l.raw.Write(sc.Bytes())
		l.raw.WriteByte('\n')
		if m != nil {
			l.lines = append(l.lines, m)
		}
		l.mu.Unlock()
	}
}

// find returns the first line matching pred.
func (l *logBuffer) find(pred func(map[string]any) bool) map[string]any {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, m := range l.lines {
		if pred(m) {
			return m
		}
	}
	return nil
}

func (l *logBuffer) count(pred func(map[string]any) bool) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, m := range l.lines {
		if pred(m) {
			n++
		}
	}
	return n
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.raw.String()
}

func msgIs(msg string) func(map[string]any) bool {
	return func(m map[string]any) bool { return m["msg"] == msg }
}

// gate is a running mcpgate process.
type gate struct {
	args      []string // as given to startGate
	cmd       *exec.Cmd
	logs      *logBuffer
	grpcAddr  string
	adminAddr string
	xdsAddr   string
	authz     authv3.AuthorizationClient
	proc      extprocv3.ExternalProcessorClient
	done      chan error
}

// startGate runs `mcpgate serve` on ephemeral loopback ports and waits until /readyz
// answers 200. Later args override the defaults (a restart reuses the first run's
// addresses, so that Envoys reconnect to the same place).
func startGate(t *testing.T, configDir string, args ...string) *gate {
	t.Helper()
	argv := append([]string{"serve", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0"}, args...)
	if configDir != "" {
		argv = append(argv, "--config", configDir)
	}
	cmd := exec.Command(mcpgateBin, argv...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	g := &gate{args: args, cmd: cmd, logs: &logBuffer{}, done: make(chan error, 1)}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go g.logs.consume(stderr)
	go func() { g.done <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			<-g.done
		}
		if t.Failed() {
			t.Logf("mcpgate logs:\n%s", g.logs.String())
		}
	})

	requireEventually(t, 20*time.Second, "mcpgate to log its listen addresses", func() bool {
		if l := g.logs.find(msgIs("grpc listening")); l != nil {
			g.grpcAddr, _ = l["addr"].(string)
		}
		if l := g.logs.find(msgIs("admin listening")); l != nil {
			g.adminAddr, _ = l["addr"].(string)
		}
		if l := g.logs.find(msgIs("xds listening")); l != nil {
			g.xdsAddr, _ = l["addr"].(string)
		}
		return g.grpcAddr != "" && g.adminAddr != "" && g.xdsAddr != ""
	})
	requireEventually(t, 10*time.Second, "/readyz to answer 200", func() bool {
		code, _ := g.get(t, "/readyz")
		return code == http.StatusOK
	})
	conn, err := grpc.NewClient("passthrough:///"+g.grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	g.authz = authv3.NewAuthorizationClient(conn)
	g.proc = extprocv3.NewExternalProcessorClient(conn)
	return g
}

func (g *gate) get(t *testing.T, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + g.adminAddr + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (g *gate) check(t *testing.T, req *authv3.CheckRequest) *authv3.CheckResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := g.authz.Check(ctx, req)
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	return resp
}

// restartArgs are the flags that bring mcpgate back as it was (SPIFFE flags included) on
// the same addresses.
func (g *gate) restartArgs() []string {
	return append(slices.Clone(g.args), "--grpc-addr", g.grpcAddr, "--admin-addr", g.adminAddr, "--xds-addr", g.xdsAddr)
}

// stop sends SIGTERM and requires a clean exit.
func (g *gate) stop(t *testing.T) {
	t.Helper()
	if err := g.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-g.done:
		if err != nil {
			t.Fatalf("mcpgate exited with %v after SIGTERM", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("mcpgate did not exit within 15s of SIGTERM")
	}
}

// requireEventually polls cond until it holds or the deadline passes.
func requireEventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(10 * time.Millisecond) // polling interval, not a readiness wait
	}
}

// copyDemo copies testdata/demo into a temporary directory, with the corp issuer pointed
// at a local one, and returns the directory.
func copyDemo(t *testing.T, issuerURL, jwksURL string) string {
	t.Helper()
	dst := t.TempDir()
	src := "../testdata/demo"
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if rel == "mesh.yaml" {
			b = []byte(strings.NewReplacer(
				"https://login.example.com/keys", jwksURL,
				"https://login.example.com/", issuerURL,
			).Replace(string(b)))
		}
		return os.WriteFile(filepath.Join(dst, rel), b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}

// replaceInFile edits a policy file in place the way an editor does: write a new file
// and rename it over the old one.
func replaceInFile(t *testing.T, path, old, new string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte(old)) {
		t.Fatalf("%s does not contain %q", path, old)
	}
	tmp := path + ".tmp~"
	if err := os.WriteFile(tmp, bytes.Replace(b, []byte(old), []byte(new), 1), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// startMCPApp starts the demo MCP server App, recording what reached it, and closes it
// when the test ends.
func startMCPApp(t testing.TB, opts mcpapp.Options) *mcpapp.Server {
	t.Helper()
	s, err := mcpapp.Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// mcpPost is a Streamable HTTP POST of body to url as an MCP client sends it, with auth as
// its Authorization header unless empty.
func mcpPost(t testing.TB, url, auth, body string) *http.Request {
	t.Helper()
	req, err := http.NewRequest("POST", url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	return req
}
