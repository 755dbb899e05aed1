//go:build integration

package integration

import (
	"bufio"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
)

// The tests of this file replay, through the emulated sidecars and in front of real SDK
// servers, the classes of attack the adversarial review of issue 18 found. Each fails
// without its fix (the review ran them against the binary before it).

// tsServer is integration/tsclient/server.mjs: an MCP server on the official TypeScript
// SDK's Express app, which reports every tool it executes.
type tsServer struct {
	addr string
	mu   sync.Mutex
	ran  []string
}

func startTSServer(t *testing.T, args ...string) *tsServer {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, "node", append([]string{filepath.Join("tsclient", "server.mjs")}, args...)...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = cmd.Wait() })
	s := &tsServer{}
	listening := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var line struct {
				Listening int    `json:"listening"`
				Call      string `json:"call"`
			}
			if json.Unmarshal(sc.Bytes(), &line) != nil {
				continue
			}
			if line.Listening != 0 {
				listening <- "127.0.0.1:" + strconv.Itoa(line.Listening)
			}
			if line.Call != "" {
				s.mu.Lock()
				s.ran = append(s.ran, line.Call)
				s.mu.Unlock()
			}
		}
	}()
	select {
	case s.addr = <-listening:
	case <-time.After(20 * time.Second):
		t.Fatalf("the TypeScript SDK server did not start: %s", stderr.String())
	}
	return s
}

// calls returns the tools the server executed, in order.
func (s *tsServer) calls() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.ran...)
}

// startMeshTo starts the mesh with inventory's traffic going to addr.
func startMeshTo(t *testing.T, addr string, edit func(m *mesh)) *mesh {
	t.Helper()
	m := &mesh{iss: bearertest.NewIssuer(t), appAddr: addr}
	startMeshWith(t, m, "disabled", nil, func() {
		if edit != nil {
			edit(m)
		}
	})
	return m
}

// postAs sends one raw POST through the agent sidecar with my-agent's token.
func (m *mesh) postAs(t *testing.T, contentType, body string, headers ...string) (*http.Response, string) {
	t.Helper()
	req := mcpPost(t, m.invokeURL, m.token(t, nil), body)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := (&http.Client{Timeout: 20 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// Finding 1 (HIGH). The body reads, as UTF-8, as a call of get_inventory, which the demo
// policy allows; as UTF-7, which the SDK's Express JSON parser honours, as a call of
// delete_product, which rule no-deletes denies.
func TestSecurityRequestCharset(t *testing.T) {
	ts := startTSServer(t)
	m := startMeshTo(t, ts.addr, nil)
	body := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_inventory","arguments":{"product_id":"SKU-42"},"x":"+ACIALAAi-name+ACIAOgAi-delete_product"}}`

	resp, out := m.postAs(t, "application/json; charset=utf-7", body)
	if got := ts.calls(); len(got) != 0 {
		t.Fatalf("the server ran %v (HTTP %d %s)", got, resp.StatusCode, out)
	}
	if resp.StatusCode != 415 || !strings.Contains(out, "charset") {
		t.Fatalf("HTTP %d %s, want 415 naming the charset", resp.StatusCode, out)
	}
	// The same bytes as UTF-8 are the call mcpgate decided on, and that is what runs.
	resp, out = m.postAs(t, "application/json", body)
	if got := ts.calls(); resp.StatusCode != 200 || len(got) != 1 || got[0] != "get_inventory" {
		t.Fatalf("as UTF-8: HTTP %d %s; the server ran %v, want get_inventory", resp.StatusCode, out, got)
	}
}

// Finding 2 (HIGH). An id beyond 2^53 comes back from the Go SDK as another id; the
// response then matched no plan and skipped redaction.
func TestSecurityRequestIDs(t *testing.T) {
	for _, jsonResponse := range []bool{false, true} {
		t.Run(fmt.Sprintf("JSONResponse=%v", jsonResponse), func(t *testing.T) {
			m := &mesh{iss: bearertest.NewIssuer(t), app: startMCPApp(t, mcpapp.Options{DisableLocalhostProtection: true, JSONResponse: jsonResponse})}
			startMeshWith(t, m, "disabled", nil, nil)
			session := m.initialize(t)
			for _, id := range []string{"9007199254740993", "18446744073709551617", "-9007199254740993"} {
				resp, out := m.postAs(t, "", `{"jsonrpc":"2.0","id":`+id+`,"method":"tools/call","params":{"name":"get_customer","arguments":{"id":"c1"}}}`,
					"Mcp-Session-Id", session, "Mcp-Protocol-Version", "2025-06-18")
				if strings.Contains(out, mcpapp.CustomerFor("c1").SSN) {
					t.Fatalf("id %s: the ssn reached the client: HTTP %d %s", id, resp.StatusCode, out)
				}
				if resp.StatusCode != 400 || !strings.Contains(out, `"id"`) {
					t.Errorf("id %s: HTTP %d %s, want 400 naming the id", id, resp.StatusCode, out)
				}
			}
			if n := m.app.CallsTo(mcpapp.ToolGetCustomer); n != 0 {
				t.Errorf("the server ran get_customer %d times", n)
			}
			// The largest id every peer reads alike still works, redacted.
			resp, out := m.postAs(t, "", `{"jsonrpc":"2.0","id":9007199254740991,"method":"tools/call","params":{"name":"get_customer","arguments":{"id":"c1"}}}`,
				"Mcp-Session-Id", session, "Mcp-Protocol-Version", "2025-06-18")
			if resp.StatusCode != 200 || strings.Contains(out, mcpapp.CustomerFor("c1").SSN) || !strings.Contains(out, "9007199254740991") {
				t.Fatalf("id 2^53-1: HTTP %d %s", resp.StatusCode, out)
			}
		})
	}
}

// initialize opens a session on the Go SDK server with raw POSTs, as a client would.
func (m *mesh) initialize(t *testing.T) string {
	t.Helper()
	resp, out := m.postAs(t, "", initialize)
	session := resp.Header.Get("Mcp-Session-Id")
	if resp.StatusCode != 200 || session == "" {
		t.Fatalf("initialize: HTTP %d %s (session %q)", resp.StatusCode, out, session)
	}
	resp, out = m.postAs(t, "", `{"jsonrpc":"2.0","method":"notifications/initialized"}`, "Mcp-Session-Id", session, "Mcp-Protocol-Version", "2025-06-18")
	if resp.StatusCode != 202 {
		t.Fatalf("notifications/initialized: HTTP %d %s", resp.StatusCode, out)
	}
	return session
}

// gzipMiddleware compresses responses as common server middleware does: when the client
// accepts gzip, or always (a server that ignores Accept-Encoding). Event streams are
// flushed through the compressor event by event.
func gzipMiddleware(always bool) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if !always && !strings.Contains(r.Header.Get("Accept-Encoding"), "gzip") {
				next.ServeHTTP(w, r)
				return
			}
			w.Header().Set("Content-Encoding", "gzip")
			w.Header().Del("Content-Length")
			gz := gzip.NewWriter(w)
			defer gz.Close()
			next.ServeHTTP(&gzipWriter{ResponseWriter: w, gz: gz}, r)
		})
	}
}

type gzipWriter struct {
	http.ResponseWriter
	gz *gzip.Writer
}

func (g *gzipWriter) Write(b []byte) (int, error) { return g.gz.Write(b) }

func (g *gzipWriter) WriteHeader(code int) {
	g.ResponseWriter.Header().Del("Content-Length")
	g.ResponseWriter.WriteHeader(code)
}

func (g *gzipWriter) Flush() {
	_ = g.gz.Flush()
	if f, ok := g.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Finding 3 (MEDIUM). A compressing server: the Go SDK client asks for gzip (Go's
// transport does by default) and decompresses transparently, so a compressed event
// stream that mcpgate could not read reached it unredacted.
func TestSecurityCompressedResponses(t *testing.T) {
	ssn := mcpapp.CustomerFor("c1").SSN
	t.Run("compressing when asked", func(t *testing.T) {
		m := &mesh{iss: bearertest.NewIssuer(t), app: startMCPApp(t, mcpapp.Options{DisableLocalhostProtection: true, Middleware: gzipMiddleware(false)})}
		startMeshWith(t, m, "disabled", nil, nil)
		s := m.connect(t, m.invokeURL, map[string]string{"Authorization": m.token(t, nil)})
		res, err := s.CallTool(callCtx(t), mcpapp.ToolGetCustomer, map[string]any{"id": "c1"})
		if err != nil || res.IsError {
			t.Fatalf("get_customer: %v %v", err, res)
		}
		if whole, _ := json.Marshal(res); strings.Contains(string(whole), ssn) || !strings.Contains(string(whole), "c1") {
			t.Fatalf("result %s: want it without the ssn", whole)
		}
		for _, r := range m.app.Requests() {
			if ae := r.Header.Get("Accept-Encoding"); ae != "" {
				t.Errorf("%s reached the server with Accept-Encoding %q", r.RPCMethod, ae)
			}
		}
	})
	t.Run("compressing always", func(t *testing.T) {
		m := &mesh{iss: bearertest.NewIssuer(t), app: startMCPApp(t, mcpapp.Options{DisableLocalhostProtection: true, Middleware: gzipMiddleware(true)})}
		startMeshWith(t, m, "disabled", nil, nil)
		req := mcpPost(t, m.invokeURL, m.token(t, nil), `{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"get_customer","arguments":{"id":"c1"}}}`)
		// The transport decompresses, as the SDK client's does.
		resp, err := (&http.Client{Timeout: 20 * time.Second}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if strings.Contains(string(b), ssn) {
			t.Fatalf("the ssn reached the client: HTTP %d %s", resp.StatusCode, b)
		}
		if resp.StatusCode != 502 || !strings.Contains(string(b), "Content-Encoding") {
			t.Fatalf("HTTP %d %s, want 502 naming Content-Encoding", resp.StatusCode, b)
		}
	})
}

// A failing server (a framework's 500 page, a handler echoing what it was about to
// return) puts the body in front of the client, which shows it: the TypeScript SDK puts
// it in the error it throws. The body is filtered or replaced; status and headers pass.
func TestSecurityErrorResponses(t *testing.T) {
	ssn := mcpapp.CustomerFor("c1").SSN
	failing := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b, _ := io.ReadAll(r.Body)
			if !strings.Contains(string(b), `"get_customer"`) {
				r.Body = io.NopCloser(strings.NewReader(string(b)))
				next.ServeHTTP(w, r)
				return
			}
			w.Header().Set("Content-Type", "text/plain")
			w.Header().Set("Retry-After", "7")
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "panic while encoding {ssn: %s}", ssn)
		})
	}
	for name, mw := range map[string]func(http.Handler) http.Handler{
		"plain":      failing,
		"compressed": func(h http.Handler) http.Handler { return gzipMiddleware(true)(failing(h)) },
	} {
		t.Run(name, func(t *testing.T) {
			m := &mesh{iss: bearertest.NewIssuer(t), app: startMCPApp(t, mcpapp.Options{DisableLocalhostProtection: true, Middleware: mw})}
			startMeshWith(t, m, "disabled", nil, nil)
			resp, body := m.postAs(t, "", `{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"get_customer","arguments":{"id":"c1"}}}`)
			if strings.Contains(body, ssn) {
				t.Fatalf("the ssn reached the client: HTTP %d %s", resp.StatusCode, body)
			}
			if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") != "7" ||
				resp.Header.Get("Content-Encoding") != "" || !strings.HasPrefix(body, "mcpgate removed the body of this 503 response") {
				t.Fatalf("HTTP %d %v %q: want the server's 503 and Retry-After with mcpgate's note", resp.StatusCode, resp.Header, body)
			}
		})
	}
}

// Finding 4 (MEDIUM). A task-augmented call is answered with a handle; the result, ssn
// included, came on tasks/result, which nothing redacted. Now the task is remembered with
// its tool: its result is redacted as the tool's, and it is its creator's alone.
func TestSecurityTaskResults(t *testing.T) {
	ts := startTSServer(t)
	m := startMeshTo(t, ts.addr, nil) // the demo's policy: no tasks/* method named
	resp, out := m.postAs(t, "", `{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"get_customer","arguments":{"id":"c1"},"task":{"ttl":60000}}}`)
	taskID := regexp.MustCompile(`"taskId":"([^"]+)"`).FindStringSubmatch(out)
	if resp.StatusCode != 200 || taskID == nil {
		t.Fatalf("HTTP %d %s, want a task handle", resp.StatusCode, out)
	}
	resp, out = m.postAs(t, "", `{"jsonrpc":"2.0","id":6,"method":"tasks/result","params":{"taskId":"`+taskID[1]+`"}}`)
	if resp.StatusCode != 200 || strings.Contains(out, "123-45-6789") || !strings.Contains(out, "Ann Example") {
		t.Fatalf("tasks/result: HTTP %d %s", resp.StatusCode, out)
	}
	// Another subject of the same caller App ID, with the same scopes.
	req := mcpPost(t, m.invokeURL, m.token(t, map[string]any{"sub": "mallory@example.com"}), `{"jsonrpc":"2.0","id":7,"method":"tasks/result","params":{"taskId":"`+taskID[1]+`"}}`)
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(r.Body)
	r.Body.Close()
	if strings.Contains(string(b), "Ann Example") || !strings.Contains(string(b), "unknown task") {
		t.Fatalf("another subject's tasks/result: HTTP %d %s", r.StatusCode, b)
	}
	if got := ts.calls(); len(got) != 1 {
		t.Fatalf("the server ran %v", got)
	}
}

// Finding 5 (MEDIUM). A batch is bounded before any of it is decided or forwarded.
func TestSecurityBatchBounded(t *testing.T) {
	m := startMesh(t)
	var msgs []string
	for i := range 101 {
		msgs = append(msgs, fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"list_items","arguments":{"limit":1000}}}`, i))
	}
	before := len(m.app.Requests())
	resp, out := m.postAs(t, "", "["+strings.Join(msgs, ",")+"]")
	if resp.StatusCode != 400 || !strings.Contains(out, "at most 100") {
		t.Fatalf("HTTP %d %.300s, want 400", resp.StatusCode, out)
	}
	if n := len(m.app.Requests()) - before; n != 0 {
		t.Fatalf("%d requests reached the server", n)
	}
}

// Finding 6 (MEDIUM). Junk method names do not become metric series: after thousands,
// a denial is still counted in its own series, not in the SDK's overflow series.
func TestSecurityMetricLabels(t *testing.T) {
	m := &mesh{iss: bearertest.NewIssuer(t)}
	startMeshWith(t, m, "disabled", nil, func() {
		// The flood must reach the decision, not the demo's rate limit.
		replaceInFile(t, filepath.Join(m.dir, "inventory.yaml"), "perCaller: 100/m", "perCaller: 100000/m")
	})
	const junk = 2100 // past the OpenTelemetry SDK's default cardinality limit of 2000
	client := &http.Client{Timeout: 20 * time.Second}
	tok := m.token(t, nil)
	for i := range junk {
		req := mcpPost(t, m.invokeURL, tok, fmt.Sprintf(`{"jsonrpc":"2.0","method":"notifications/junk-%d"}`, i))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	resp, out := m.postAs(t, "", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_product","arguments":{"product_id":"SKU-1"}}}`)
	if !strings.Contains(out, "no-deletes") {
		t.Fatalf("delete_product: HTTP %d %s", resp.StatusCode, out)
	}
	var metrics string
	requireEventually(t, 10*time.Second, "the denial in /metrics", func() bool {
		_, metrics = m.gate.get(t, "/metrics")
		return strings.Contains(metrics, `rule="no-deletes"`)
	})
	series := 0
	for _, line := range strings.Split(metrics, "\n") {
		if strings.HasPrefix(line, "mcpgate_mcp_decisions_total{") {
			series++
			if strings.Contains(line, "overflow") {
				t.Errorf("overflow series: %s", line)
			}
		}
	}
	if series > 20 {
		t.Errorf("%d decision series after %d junk method names, want a handful", series, junk)
	}
}

// From the review, decided: an Mcp-Session-Id works only for the identity that opened the
// session. The SDK client never notices (it echoes what it got); another subject
// presenting the id is answered as for an unknown session.
func TestSecuritySessionBinding(t *testing.T) {
	m := startMesh(t)
	s := m.connect(t, m.invokeURL, map[string]string{"Authorization": m.token(t, nil)})
	if res, err := s.CallTool(callCtx(t), mcpapp.ToolGetInventory, map[string]any{"product_id": "SKU-42"}); err != nil || res.IsError {
		t.Fatalf("get_inventory in the bound session: %v %v", err, res)
	}
	calls := m.app.Calls()
	serverID := calls[len(calls)-1].SessionID
	if serverID == "" || s.ID() == serverID || !strings.HasPrefix(s.ID(), serverID+".") {
		t.Fatalf("client session %q, server session %q: want the server's id bound to the caller", s.ID(), serverID)
	}
	before := len(m.app.Calls())
	ping := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_inventory","arguments":{"product_id":"SKU-42"}}}`
	for name, sid := range map[string]string{"the client's id": s.ID(), "the server's id": serverID} {
		req := mcpPost(t, m.invokeURL, m.token(t, map[string]any{"sub": "mallory@example.com"}), ping)
		req.Header.Set("Mcp-Session-Id", sid)
		req.Header.Set("Mcp-Protocol-Version", s.ProtocolVersion())
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 404 || !strings.Contains(string(b), "session not found") {
			t.Errorf("another subject with %s: HTTP %d %s, want 404", name, resp.StatusCode, b)
		}
	}
	if n := len(m.app.Calls()) - before; n != 0 {
		t.Errorf("the server ran %d calls for another subject", n)
	}
}
