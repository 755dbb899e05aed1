package mcpapp

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// LegacyProtocolVersion is the newest protocol version a stateful
// Streamable HTTP server negotiates with the v1.8.0 SDK.
const LegacyProtocolVersion = "2025-11-25"

// ConnectOptions configure [ConnectWith].
type ConnectOptions struct {
	// Endpoint is the MCP endpoint URL (e.g. Server.Endpoint(), or a proxy's
	// /v1.0/invoke/inventory/method/mcp).
	Endpoint string
	// HTTPClient is used for every request; nil means a new client on a clone
	// of http.DefaultTransport. Its Transport is wrapped to add Headers.
	HTTPClient *http.Client
	// Headers are set on every HTTP request the SDK makes (POST, GET, DELETE),
	// e.g. "Authorization": "Bearer ...", "dapr-app-id": "inventory".
	Headers map[string]string
	// ProtocolVersion is passed to the SDK; "" keeps its default (try
	// server/discover with 2026-07-28, then fall back to initialize with
	// 2025-11-25). LegacyProtocolVersion skips the discover probe.
	ProtocolVersion string
	// DisableStandaloneSSE stops the SDK from opening the GET SSE stream.
	DisableStandaloneSSE bool
	// MaxRetries is the SDK's SSE reconnect budget: 0 = SDK default (5),
	// negative = no reconnects.
	MaxRetries int
	// ManualMultiRoundTrip turns off the SDK's automatic retry of input_required
	// results (SEP-2322): the caller sees them and retries itself.
	ManualMultiRoundTrip bool
}

// ProgressEvent is one notifications/progress the client received.
type ProgressEvent struct {
	Token    any
	Progress float64
	Total    float64
	Message  string
	At       time.Time // when the SDK handed it to the client
}

// ClientSession is an SDK client session with a header-injecting transport
// and a progress recorder.
type ClientSession struct {
	// Session is the SDK session, for anything not wrapped here.
	Session *mcp.ClientSession

	headers *headerTransport
	owned   *http.Transport // created here; idle connections closed on Close

	mu       sync.Mutex
	progress []ProgressEvent
	changed  chan struct{} // closed and replaced on every progress event
}

var tokenSeq atomic.Uint64

// Connect connects an official-SDK client to endpoint over Streamable HTTP,
// sending headers on every request.
func Connect(ctx context.Context, endpoint string, httpClient *http.Client, headers map[string]string) (*ClientSession, error) {
	return ConnectWith(ctx, ConnectOptions{Endpoint: endpoint, HTTPClient: httpClient, Headers: headers})
}

// ConnectWith is Connect with all options.
func ConnectWith(ctx context.Context, o ConnectOptions) (*ClientSession, error) {
	cs := &ClientSession{changed: make(chan struct{})}

	hc := &http.Client{}
	if o.HTTPClient != nil {
		c := *o.HTTPClient
		hc = &c
	}
	base := hc.Transport
	if base == nil {
		cs.owned = http.DefaultTransport.(*http.Transport).Clone()
		base = cs.owned
	}
	cs.headers = &headerTransport{base: base, headers: maps.Clone(o.Headers)}
	hc.Transport = cs.headers

	var mrtr *mcp.MultiRoundTripOptions
	if o.ManualMultiRoundTrip {
		mrtr = &mcp.MultiRoundTripOptions{Disabled: true}
	}
	client := mcp.NewClient(&mcp.Implementation{Name: "mcpapp-client", Version: "v1.0.0"}, &mcp.ClientOptions{
		MultiRoundTrip: mrtr,
		ProgressNotificationHandler: func(_ context.Context, req *mcp.ProgressNotificationClientRequest) {
			cs.addProgress(ProgressEvent{
				Token:    req.Params.ProgressToken,
				Progress: req.Params.Progress,
				Total:    req.Params.Total,
				Message:  req.Params.Message,
				At:       time.Now(),
			})
		},
	})
	transport := &mcp.StreamableClientTransport{
		Endpoint:             o.Endpoint,
		HTTPClient:           hc,
		DisableStandaloneSSE: o.DisableStandaloneSSE,
		MaxRetries:           o.MaxRetries,
	}
	var sopts *mcp.ClientSessionOptions
	if o.ProtocolVersion != "" {
		sopts = &mcp.ClientSessionOptions{ProtocolVersion: o.ProtocolVersion}
	}
	s, err := client.Connect(ctx, transport, sopts)
	if err != nil {
		if cs.owned != nil {
			cs.owned.CloseIdleConnections()
		}
		return nil, err
	}
	cs.Session = s
	return cs, nil
}

// Close ends the session (the SDK sends DELETE).
func (c *ClientSession) Close() error {
	err := c.Session.Close()
	if c.owned != nil {
		c.owned.CloseIdleConnections()
	}
	return err
}

// ID is the Mcp-Session-Id the server assigned.
func (c *ClientSession) ID() string { return c.Session.ID() }

// ProtocolVersion is the negotiated protocol version.
func (c *ClientSession) ProtocolVersion() string {
	if r := c.Session.InitializeResult(); r != nil {
		return r.ProtocolVersion
	}
	return ""
}

// SetHeader changes (value != "") or removes (value == "") a header sent on
// every later request of this session, e.g. to swap a bearer token without
// reconnecting.
func (c *ClientSession) SetHeader(key, value string) { c.headers.set(key, value) }

// CallTool calls a tool. A JSON-RPC error (e.g. a denied call) is returned
// as err; a tool error is a result with IsError set.
func (c *ClientSession) CallTool(ctx context.Context, name string, args any) (*mcp.CallToolResult, error) {
	return c.Session.CallTool(ctx, &mcp.CallToolParams{Name: name, Arguments: args})
}

// ToolCall is the outcome of [ClientSession.CallToolWithProgress].
type ToolCall struct {
	Result    *mcp.CallToolResult
	Err       error
	Token     string
	StartedAt time.Time
	ResultAt  time.Time       // when CallTool returned
	Progress  []ProgressEvent // for Token, in arrival order, as of ResultAt
}

// ProgressBeforeResult reports whether n progress events arrived, all
// strictly before the result.
func (tc *ToolCall) ProgressBeforeResult(n int) error {
	if len(tc.Progress) != n {
		return fmt.Errorf("got %d progress notifications before the result, want %d", len(tc.Progress), n)
	}
	for i, p := range tc.Progress {
		if !p.At.Before(tc.ResultAt) {
			return fmt.Errorf("progress %d arrived at %v, not before the result at %v", i+1, p.At, tc.ResultAt)
		}
	}
	return nil
}

// NewProgressToken returns a token unique within the process.
func NewProgressToken() string { return fmt.Sprintf("mcpapp-%d", tokenSeq.Add(1)) }

// CallToolWithProgress calls a tool with a fresh progress token (token ""
// picks one) and returns the result with the progress events for that token
// received before CallTool returned.
func (c *ClientSession) CallToolWithProgress(ctx context.Context, token, name string, args any) *ToolCall {
	if token == "" {
		token = NewProgressToken()
	}
	p := &mcp.CallToolParams{Name: name, Arguments: args}
	p.SetProgressToken(token)
	tc := &ToolCall{Token: token, StartedAt: time.Now()}
	tc.Result, tc.Err = c.Session.CallTool(ctx, p)
	tc.ResultAt = time.Now()
	tc.Progress = c.ProgressFor(token)
	return tc
}

// ListTools lists all tools, following cursors (at most 100 pages).
func (c *ClientSession) ListTools(ctx context.Context) ([]*mcp.Tool, error) {
	var tools []*mcp.Tool
	params := &mcp.ListToolsParams{}
	for range 100 {
		res, err := c.Session.ListTools(ctx, params)
		if err != nil {
			return nil, err
		}
		tools = append(tools, res.Tools...)
		if res.NextCursor == "" {
			return tools, nil
		}
		params = &mcp.ListToolsParams{Cursor: res.NextCursor}
	}
	return nil, fmt.Errorf("tools/list: more than 100 pages")
}

// ToolNames lists the tools' names, sorted.
func (c *ClientSession) ToolNames(ctx context.Context) ([]string, error) {
	tools, err := c.ListTools(ctx)
	if err != nil {
		return nil, err
	}
	names := make([]string, len(tools))
	for i, t := range tools {
		names[i] = t.Name
	}
	slices.Sort(names)
	return names, nil
}

// Progress returns all progress events received so far.
func (c *ClientSession) Progress() []ProgressEvent {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.progress)
}

// ProgressFor returns the progress events received for token.
func (c *ClientSession) ProgressFor(token any) []ProgressEvent {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []ProgressEvent
	for _, p := range c.progress {
		if p.Token == token {
			out = append(out, p)
		}
	}
	return out
}

// WaitProgress blocks until at least n progress events for token have
// arrived, or ctx ends.
func (c *ClientSession) WaitProgress(ctx context.Context, token any, n int) ([]ProgressEvent, error) {
	for {
		c.mu.Lock()
		ch := c.changed
		c.mu.Unlock()
		if got := c.ProgressFor(token); len(got) >= n {
			return got, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return c.ProgressFor(token), fmt.Errorf("waiting for %d progress notifications for %v: %w", n, token, ctx.Err())
		}
	}
}

func (c *ClientSession) addProgress(p ProgressEvent) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.progress = append(c.progress, p)
	close(c.changed)
	c.changed = make(chan struct{})
}

// headerTransport sets extra headers on every request.
type headerTransport struct {
	base    http.RoundTripper
	mu      sync.Mutex
	headers map[string]string
}

func (t *headerTransport) set(k, v string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.headers == nil {
		t.headers = map[string]string{}
	}
	if v == "" {
		delete(t.headers, k)
	} else {
		t.headers[k] = v
	}
}

func (t *headerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	t.mu.Lock()
	h := maps.Clone(t.headers)
	t.mu.Unlock()
	if len(h) == 0 {
		return t.base.RoundTrip(r)
	}
	r = r.Clone(r.Context()) // a RoundTripper must not modify the caller's request
	for k, v := range h {
		if http.CanonicalHeaderKey(k) == "Host" {
			r.Host = v
			continue
		}
		r.Header.Set(k, v)
	}
	return t.base.RoundTrip(r)
}

// Structured decodes a result's structuredContent into v (via JSON).
func Structured(res *mcp.CallToolResult, v any) error {
	if res == nil || res.StructuredContent == nil {
		return fmt.Errorf("no structuredContent")
	}
	b, err := json.Marshal(res.StructuredContent)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// Text concatenates a result's text content.
func Text(res *mcp.CallToolResult) string {
	if res == nil {
		return ""
	}
	var sb strings.Builder
	for _, c := range res.Content {
		if t, ok := c.(*mcp.TextContent); ok {
			sb.WriteString(t.Text)
		}
	}
	return sb.String()
}
