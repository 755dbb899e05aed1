package mcpapp

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/google/jsonschema-go/jsonschema"
	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// Path is where the MCP endpoint is served.
const Path = "/mcp"

// Tool names served by the App.
const (
	ToolGetInventory  = "get_inventory"
	ToolListItems     = "list_items"
	ToolDeleteProduct = "delete_product"
	ToolGetCustomer   = "get_customer"
	ToolSlowReport    = "slow_report"
)

// ProgressInterval is the pause slow_report makes after each progress
// notification.
const ProgressInterval = 20 * time.Millisecond

// MaxSteps bounds slow_report's steps argument.
const MaxSteps = 500

// DefaultListLimit is the page size list_items uses when limit is absent or 0.
const DefaultListLimit = 10

// DefaultInventory is the stock every new Server starts with.
var DefaultInventory = map[string]int{
	"SKU-42":   42, // the demo policy's Rego accepts only SKU-<digits> ids
	"SKU-7":    7,
	"widget-1": 42,
	"gadget-2": 7,
	"gizmo-3":  0,
}

// Options configure the App. The zero value is the SDK's defaults.
type Options struct {
	// JSONResponse makes the SDK answer POSTs with application/json instead
	// of text/event-stream. Progress notifications then go to the standalone
	// GET stream, not the POST's response.
	JSONResponse bool
	// DisableLocalhostProtection turns off the SDK's DNS-rebinding check
	// (403 for a non-loopback Host header on a loopback listener).
	DisableLocalhostProtection bool
	// Middleware, if set, wraps the App's HTTP handler in Start (what a server's
	// framework adds in front of the SDK: compression, say). Requests are recorded as
	// they reach the middleware.
	Middleware func(http.Handler) http.Handler
	// Cacheable, if set, decides the cacheScope and ttlMs of list results (the SDK's
	// ServerOptions.SetCacheable), as a server that marks its lists public would.
	Cacheable func(ctx context.Context, req mcp.Request, c *mcp.Cacheable)
	// Stateless serves without sessions (the SDK's StreamableHTTPOptions.Stateless): the
	// only way the SDK speaks MCP 2026-07-28, whose clients open with server/discover.
	Stateless bool
	// ParamHeaders annotates get_inventory's product_id and list_items' limit with
	// x-mcp-header (Product, Limit): MCP 2026-07-28 clients then mirror them into
	// Mcp-Param-Product and Mcp-Param-Limit, and the SDK refuses a request whose headers
	// disagree with its body.
	ParamHeaders bool
}

// Call is one tool call the App executed.
type Call struct {
	Tool string
	// Arguments are the raw JSON arguments as the server received them.
	Arguments json.RawMessage
	// Args is Arguments decoded (nil if absent).
	Args map[string]any
	// Header is the header of the HTTP request that carried the call.
	Header http.Header
	// SessionID is the MCP session id (Mcp-Session-Id).
	SessionID string
	// ProgressToken is the request's _meta.progressToken, if any.
	ProgressToken any
	At            time.Time
}

// Request is one HTTP request that reached the App (any method, any path).
type Request struct {
	Method string // HTTP method
	Path   string
	Header http.Header
	// RPCMethod is the JSON-RPC method of a single (non-batch) POSTed
	// message; "" for responses, GET and DELETE.
	RPCMethod string
	// Tool is params.name of a tools/call.
	Tool string
	// Body is the POSTed body.
	Body []byte
	// Status and ContentType are what the App answered.
	Status      int
	ContentType string
	// Response is the body the App wrote (first 1 MiB), complete once the
	// request has ended.
	Response []byte
	At       time.Time
}

// Server is a running MCP server App.
type Server struct {
	ln      net.Listener
	httpSrv *http.Server
	mcpSrv  *mcp.Server
	url     string

	mu        sync.Mutex
	calls     []Call
	requests  []*Request
	inventory map[string]int
	hold      chan struct{} // non-nil while slow_report is held
	arrived   chan struct{} // closed and replaced when a request arrives

	closeOnce sync.Once
	noRecord  bool // NewHandler: Calls stays empty
}

// Start serves the App on 127.0.0.1:0 with opts, recording what it executed and what
// reached it (see [Server.Calls], [Server.Requests]): it is the instrumented App the
// integration tests and cmd/mcpgate-demo's tests run. The caller must Close it.
func Start(opts Options) (*Server, error) {
	s, mux := newServer(opts)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("mcpapp: listen: %w", err)
	}
	s.ln = ln
	s.url = "http://" + ln.Addr().String()
	var h http.Handler = mux
	if opts.Middleware != nil {
		h = opts.Middleware(h)
	}
	s.httpSrv = &http.Server{Handler: s.record(h), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = s.httpSrv.Serve(ln) }()
	return s, nil
}

// NewHandler returns the App as a plain http.Handler: the same MCP server, tools and
// [DefaultInventory] as [Start], served (Streamable HTTP) at [Path] and
// nowhere else. It is for running the App outside tests (cmd/mcpgate-demo inventory), so
// it records nothing: a long-running process must not keep every request and call.
// Every handler returned has its own inventory.
func NewHandler(opts Options) http.Handler {
	s, mux := newServer(opts)
	s.noRecord = true
	return mux
}

// newServer builds the App's MCP server and a mux serving it at Path.
func newServer(opts Options) (*Server, *http.ServeMux) {
	s := &Server{inventory: make(map[string]int, len(DefaultInventory)), arrived: make(chan struct{})}
	for k, v := range DefaultInventory {
		s.inventory[k] = v
	}
	var so *mcp.ServerOptions
	if opts.Cacheable != nil {
		so = &mcp.ServerOptions{SetCacheable: opts.Cacheable}
	}
	s.mcpSrv = mcp.NewServer(&mcp.Implementation{Name: "inventory", Version: "v1.0.0"}, so)
	s.addTools(opts.ParamHeaders)

	handler := mcp.NewStreamableHTTPHandler(func(*http.Request) *mcp.Server { return s.mcpSrv }, &mcp.StreamableHTTPOptions{
		JSONResponse:               opts.JSONResponse,
		DisableLocalhostProtection: opts.DisableLocalhostProtection,
		Stateless:                  opts.Stateless,
	})
	mux := http.NewServeMux()
	mux.Handle(Path, handler)
	return s, mux
}

// URL is the base URL, http://127.0.0.1:PORT (no path).
func (s *Server) URL() string { return s.url }

// Endpoint is the MCP endpoint, URL()+"/mcp".
func (s *Server) Endpoint() string { return s.url + Path }

// Addr is the listener's host:port.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// MCPServer gives access to the underlying SDK server.
func (s *Server) MCPServer() *mcp.Server { return s.mcpSrv }

// Close ends all MCP sessions and stops the HTTP server. It is idempotent.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		s.Release()
		for ss := range s.mcpSrv.Sessions() {
			_ = ss.Close()
		}
		// Close, not Shutdown: standalone SSE GETs hang until the client leaves.
		_ = s.httpSrv.Close()
	})
}

// Calls returns the tool calls the App executed, in order.
func (s *Server) Calls() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.calls)
}

// CallsTo counts executed calls of the named tool.
func (s *Server) CallsTo(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.calls {
		if c.Tool == name {
			n++
		}
	}
	return n
}

// Requests returns copies of every HTTP request that reached the App, in
// arrival order. Status/ContentType are filled once the handler has written
// its header.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Request, len(s.requests))
	for i, r := range s.requests {
		out[i] = *r
		out[i].Response = slices.Clone(r.Response)
	}
	return out
}

// RequestsFor returns the requests whose JSON-RPC method is rpcMethod (and,
// for tools/call, whose tool is one of tools, if given).
func (s *Server) RequestsFor(rpcMethod string, tools ...string) []Request {
	var out []Request
	for _, r := range s.Requests() {
		if r.RPCMethod == rpcMethod && (len(tools) == 0 || slices.Contains(tools, r.Tool)) {
			out = append(out, r)
		}
	}
	return out
}

// WaitRequest blocks until a request matching match has arrived (including
// ones already recorded) and returns it, or fails when ctx ends.
func (s *Server) WaitRequest(ctx context.Context, match func(Request) bool) (Request, error) {
	for {
		s.mu.Lock()
		ch := s.arrived
		s.mu.Unlock()
		for _, r := range s.Requests() {
			if match(r) {
				return r, nil
			}
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return Request{}, fmt.Errorf("mcpapp: waiting for a request: %w", ctx.Err())
		}
	}
}

// LastHeader is the header of the most recent POST (the requests that carry
// JSON-RPC messages), or nil.
func (s *Server) LastHeader() http.Header {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := len(s.requests) - 1; i >= 0; i-- {
		if s.requests[i].Method == http.MethodPost {
			return s.requests[i].Header.Clone()
		}
	}
	return nil
}

// Inventory reports a product's stock.
func (s *Server) Inventory(productID string) (quantity int, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	q, ok := s.inventory[productID]
	return q, ok
}

// Hold makes every slow_report started from now on stop after its first
// progress notification until Release is called (or the call's context ends).
// A test can then wait for that notification at the client before letting
// the result be sent: proof that progress is streamed, not held back by an
// intermediary until the response completes.
func (s *Server) Hold() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hold == nil {
		s.hold = make(chan struct{})
	}
}

// Release lets held slow_report calls finish. It is safe to call any time.
func (s *Server) Release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hold != nil {
		close(s.hold)
		s.hold = nil
	}
}

func (s *Server) holdChan() chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hold
}

func (s *Server) recordCall(req *mcp.CallToolRequest) {
	if s.noRecord {
		return
	}
	c := Call{Tool: req.Params.Name, At: time.Now(), ProgressToken: req.Params.GetProgressToken()}
	if len(req.Params.Arguments) > 0 {
		c.Arguments = slices.Clone(req.Params.Arguments)
		_ = json.Unmarshal(c.Arguments, &c.Args)
	}
	if req.Extra != nil && req.Extra.Header != nil {
		c.Header = req.Extra.Header.Clone()
	}
	if req.Session != nil {
		c.SessionID = req.Session.ID()
	}
	s.mu.Lock()
	s.calls = append(s.calls, c)
	s.mu.Unlock()
}

// ---- tools ----

// InventoryArgs are get_inventory's arguments.
type InventoryArgs struct {
	ProductID string `json:"product_id" jsonschema:"the product to look up"`
}

// InventoryResult is get_inventory's structuredContent.
type InventoryResult struct {
	ProductID string `json:"product_id"`
	Quantity  int    `json:"quantity"`
}

// ListItemsArgs are list_items's arguments.
type ListItemsArgs struct {
	Limit  int    `json:"limit,omitempty" jsonschema:"maximum number of items"`
	Cursor string `json:"cursor,omitempty" jsonschema:"opaque cursor from a previous page"`
}

// ListItemsResult is list_items's structuredContent. Limit and Cursor echo
// what the server received, so tests can see argument patches.
type ListItemsResult struct {
	Limit      int      `json:"limit"`
	Cursor     string   `json:"cursor"`
	Items      []string `json:"items"`
	NextCursor string   `json:"next_cursor,omitempty"`
}

// DeleteProductArgs are delete_product's arguments.
type DeleteProductArgs struct {
	ProductID string `json:"product_id" jsonschema:"the product to delete"`
}

// DeleteProductResult is delete_product's structuredContent.
type DeleteProductResult struct {
	ProductID string `json:"product_id"`
	Deleted   bool   `json:"deleted"`
}

// CustomerArgs are get_customer's arguments.
type CustomerArgs struct {
	ID string `json:"id" jsonschema:"customer id"`
}

// Customer is get_customer's structuredContent (and its JSON text content).
// SSN is the field policies redact.
type Customer struct {
	Name  string `json:"name"`
	Email string `json:"email"`
	SSN   string `json:"ssn"`
}

// CustomerFor is the deterministic customer get_customer returns for id.
func CustomerFor(id string) Customer {
	return Customer{Name: "Customer " + id, Email: id + "@example.com", SSN: "078-05-1120"}
}

// SlowReportArgs are slow_report's arguments.
type SlowReportArgs struct {
	Steps int `json:"steps" jsonschema:"number of progress notifications to send"`
}

// SlowReportResult is slow_report's structuredContent.
type SlowReportResult struct {
	Steps        int `json:"steps"`
	ProgressSent int `json:"progress_sent"`
}

// annotated is the input schema of T with x-mcp-header annotations (property → header
// name), or nil (the SDK then infers it) without any. It returns any: Tool.InputSchema
// is an interface, and a typed nil in it would not be "unset".
func annotated[T any](headers map[string]string) any {
	if len(headers) == 0 {
		return nil
	}
	schema, err := jsonschema.For[T](nil)
	if err != nil {
		panic(err) // the argument types are this package's own
	}
	for prop, header := range headers {
		schema.Properties[prop].Extra = map[string]any{"x-mcp-header": header}
	}
	return schema
}

func (s *Server) addTools(paramHeaders bool) {
	var inventoryHeaders, listHeaders map[string]string
	if paramHeaders {
		inventoryHeaders, listHeaders = map[string]string{"product_id": "Product"}, map[string]string{"limit": "Limit"}
	}
	mcp.AddTool(s.mcpSrv, &mcp.Tool{Name: ToolGetInventory, Description: "Stock level of a product.", InputSchema: annotated[InventoryArgs](inventoryHeaders)},
		func(ctx context.Context, req *mcp.CallToolRequest, in InventoryArgs) (*mcp.CallToolResult, InventoryResult, error) {
			s.recordCall(req)
			q, ok := s.Inventory(in.ProductID)
			if !ok {
				return nil, InventoryResult{}, fmt.Errorf("product %q not found", in.ProductID)
			}
			return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{
				Text: fmt.Sprintf("%s: %d in stock", in.ProductID, q),
			}}}, InventoryResult{ProductID: in.ProductID, Quantity: q}, nil
		})

	mcp.AddTool(s.mcpSrv, &mcp.Tool{Name: ToolListItems, Description: "Lists catalogue items, one page at a time.", InputSchema: annotated[ListItemsArgs](listHeaders)},
		func(ctx context.Context, req *mcp.CallToolRequest, in ListItemsArgs) (*mcp.CallToolResult, ListItemsResult, error) {
			s.recordCall(req)
			if in.Limit < 0 {
				return nil, ListItemsResult{}, fmt.Errorf("limit must not be negative, got %d", in.Limit)
			}
			n := in.Limit
			if n == 0 {
				n = DefaultListLimit
			}
			n = min(n, 1000)
			start := 0
			if in.Cursor != "" {
				if _, err := fmt.Sscanf(in.Cursor, "item-%d", &start); err != nil {
					return nil, ListItemsResult{}, fmt.Errorf("bad cursor %q", in.Cursor)
				}
			}
			res := ListItemsResult{Limit: in.Limit, Cursor: in.Cursor, Items: make([]string, 0, n)}
			for i := range n {
				res.Items = append(res.Items, fmt.Sprintf("item-%d", start+i))
			}
			res.NextCursor = fmt.Sprintf("item-%d", start+n)
			return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{
				Text: fmt.Sprintf("%d items (limit %d)", len(res.Items), in.Limit),
			}}}, res, nil
		})

	mcp.AddTool(s.mcpSrv, &mcp.Tool{Name: ToolDeleteProduct, Description: "Deletes a product.",
		Annotations: &mcp.ToolAnnotations{DestructiveHint: ptr(true)}},
		func(ctx context.Context, req *mcp.CallToolRequest, in DeleteProductArgs) (*mcp.CallToolResult, DeleteProductResult, error) {
			s.recordCall(req)
			s.mu.Lock()
			_, ok := s.inventory[in.ProductID]
			delete(s.inventory, in.ProductID)
			s.mu.Unlock()
			return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{
				Text: fmt.Sprintf("deleted %s: %t", in.ProductID, ok),
			}}}, DeleteProductResult{ProductID: in.ProductID, Deleted: ok}, nil
		})

	// Content is left nil: the SDK fills it with the JSON of the output.
	mcp.AddTool(s.mcpSrv, &mcp.Tool{Name: ToolGetCustomer, Description: "Customer record."},
		func(ctx context.Context, req *mcp.CallToolRequest, in CustomerArgs) (*mcp.CallToolResult, Customer, error) {
			s.recordCall(req)
			return nil, CustomerFor(in.ID), nil
		})

	mcp.AddTool(s.mcpSrv, &mcp.Tool{Name: ToolSlowReport, Description: "Builds a report slowly, reporting progress."},
		func(ctx context.Context, req *mcp.CallToolRequest, in SlowReportArgs) (*mcp.CallToolResult, SlowReportResult, error) {
			s.recordCall(req)
			if in.Steps < 0 || in.Steps > MaxSteps {
				return nil, SlowReportResult{}, fmt.Errorf("steps must be in [0, %d], got %d", MaxSteps, in.Steps)
			}
			token := req.Params.GetProgressToken()
			hold := s.holdChan()
			res := SlowReportResult{Steps: in.Steps}
			timer := time.NewTimer(ProgressInterval)
			defer timer.Stop()
			for i := 1; i <= in.Steps; i++ {
				if token != nil {
					// The request's ctx routes the notification to this POST's SSE stream.
					err := req.Session.NotifyProgress(ctx, &mcp.ProgressNotificationParams{
						ProgressToken: token,
						Progress:      float64(i),
						Total:         float64(in.Steps),
						Message:       fmt.Sprintf("step %d of %d", i, in.Steps),
					})
					if err == nil {
						res.ProgressSent++
					}
				}
				if i == 1 && hold != nil {
					select {
					case <-hold:
					case <-ctx.Done():
						return nil, SlowReportResult{}, ctx.Err()
					}
				}
				timer.Reset(ProgressInterval) // Go ≥1.23: Reset needs no drain
				select {
				case <-timer.C:
				case <-ctx.Done():
					return nil, SlowReportResult{}, ctx.Err()
				}
			}
			return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{
				Text: fmt.Sprintf("report done after %d steps", in.Steps),
			}}}, res, nil
		})
}

func ptr[T any](v T) *T { return &v }

// ---- HTTP recording ----

const (
	maxRecordedBody     = 8 << 20
	maxRecordedResponse = 1 << 20
)

func (s *Server) record(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &Request{Method: r.Method, Path: r.URL.Path, Header: r.Header.Clone(), At: time.Now()}
		if r.Body != nil && r.Method == http.MethodPost {
			body, err := io.ReadAll(io.LimitReader(r.Body, maxRecordedBody))
			rec.Body = body
			rest := io.Reader(http.NoBody)
			if err == nil && int64(len(body)) == maxRecordedBody {
				rest = r.Body // larger than we record: hand on the remainder unread
			}
			orig := r.Body
			r.Body = readCloser{io.MultiReader(bytes.NewReader(body), rest), orig}
			rec.RPCMethod, rec.Tool = rpcMethod(body)
		}
		s.mu.Lock()
		s.requests = append(s.requests, rec)
		close(s.arrived)
		s.arrived = make(chan struct{})
		s.mu.Unlock()
		next.ServeHTTP(&statusWriter{ResponseWriter: w, s: s, rec: rec}, r)
		s.mu.Lock()
		if rec.Status == 0 {
			rec.Status = http.StatusOK
		}
		s.mu.Unlock()
	})
}

func rpcMethod(body []byte) (method, tool string) {
	var msg struct {
		Method string `json:"method"`
		Params struct {
			Name string `json:"name"`
		} `json:"params"`
	}
	if err := json.Unmarshal(body, &msg); err != nil {
		return "", ""
	}
	if msg.Method == "tools/call" {
		tool = msg.Params.Name
	}
	return msg.Method, tool
}

type readCloser struct {
	io.Reader
	io.Closer
}

// statusWriter records the status and content type; Unwrap keeps
// http.ResponseController (which the SDK uses to flush SSE events) working.
type statusWriter struct {
	http.ResponseWriter
	s    *Server
	rec  *Request
	once sync.Once
}

func (w *statusWriter) note(status int) {
	w.once.Do(func() {
		ct := w.ResponseWriter.Header().Get("Content-Type")
		w.s.mu.Lock()
		w.rec.Status, w.rec.ContentType = status, ct
		w.s.mu.Unlock()
	})
}

func (w *statusWriter) WriteHeader(code int) {
	w.note(code)
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	w.note(http.StatusOK)
	w.s.mu.Lock()
	if room := maxRecordedResponse - len(w.rec.Response); room > 0 {
		w.rec.Response = append(w.rec.Response, b[:min(room, len(b))]...)
	}
	w.s.mu.Unlock()
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Flush() {
	w.note(http.StatusOK)
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
