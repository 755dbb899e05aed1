package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/modelcontextprotocol/go-sdk/jsonrpc"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/spf13/cobra"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
)

// The demo session's arguments.
const (
	demoProduct    = "SKU-42"   // in mcpapp.DefaultInventory; the demo Rego accepts SKU-<digits>
	demoBadProduct = "42; drop" // refused by the demo Rego (rego/inventory.rego)
	demoDeleted    = "SKU-7"    // what delete_product tries to delete (never SKU-42, read every run)
	demoCustomer   = "c1"
	demoSteps      = 3
)

// Backoff of the first connection: sidecars, SPIRE and mcpgate come up in any order.
const (
	backoffMin = 200 * time.Millisecond
	backoffMax = 5 * time.Second
)

type agentFlags struct {
	mcpURL       string
	tokenURL     string
	clientID     string
	scope        string
	expectPolicy bool
	wait         time.Duration
	callTimeout  time.Duration
	loop         time.Duration
	maxRuns      int
}

func newAgentCmd() *cobra.Command {
	f := &agentFlags{}
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Call the inventory MCP server with a token and print what the policy did",
		Long: `Run the demo agent (the App "my-agent"): fetch a token from --token-url (client
credentials, client_id = --client-id), connect to --mcp-url with the official MCP Go SDK
(Authorization: Bearer), then list the tools, call get_inventory, get_customer,
delete_product and slow_report, and print a transcript.

With --expect-policy (the default) it expects what the demo policy (testdata/demo) does
through mcpgate: tools/list without delete_product, get_inventory allowed, get_inventory
with a malformed id denied (Rego), get_customer without ssn, delete_product denied with a
JSON-RPC error, slow_report's progress streamed. With --expect-policy=false it expects the
inventory server without mcpgate in front: everything is listed and allowed, ssn included.
It exits 1 if any expectation is not met.

The first connection (token and MCP initialize) is retried with backoff for --wait: the
sidecars may come up after the agent.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runAgent(cmd.Context(), f, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.mcpURL, "mcp-url", "", "the MCP endpoint, e.g. the sidecar's http://127.0.0.1:3500/v1.0/invoke/inventory/method/mcp (required)")
	fl.StringVar(&f.tokenURL, "token-url", "", "the issuer's token endpoint, e.g. http://issuer:8080/token (empty: no token)")
	fl.StringVar(&f.clientID, "client-id", "my-agent", "client_id: the App ID the token names (azp)")
	fl.StringVar(&f.scope, "scope", "mcp:tools inventory:read", "scopes to ask for (space-separated)")
	fl.BoolVar(&f.expectPolicy, "expect-policy", true, "expect the demo policy's decisions (false: expect a server without mcpgate)")
	fl.DurationVar(&f.wait, "wait", 2*time.Minute, "how long to retry the first token request and connection")
	fl.DurationVar(&f.callTimeout, "call-timeout", 30*time.Second, "timeout of each MCP call")
	fl.DurationVar(&f.loop, "loop", 0, "repeat the session at this interval (0: run once)")
	fl.IntVar(&f.maxRuns, "max-runs", 120, "with --loop: stop after this many sessions")
	return cmd
}

func runAgent(ctx context.Context, f *agentFlags, out, errOut io.Writer) error {
	switch {
	case f.mcpURL == "":
		return errors.New("--mcp-url is required")
	case f.loop < 0 || f.wait <= 0 || f.callTimeout <= 0:
		return errors.New("--loop must not be negative, --wait and --call-timeout must be positive")
	case f.loop > 0 && f.maxRuns < 1:
		return errors.New("--max-runs must be at least 1")
	}
	runs := 1
	if f.loop > 0 {
		runs = f.maxRuns
	}
	failed := 0
	for n := 1; n <= runs; n++ {
		if n > 1 {
			t := time.NewTimer(f.loop)
			select {
			case <-ctx.Done():
				t.Stop()
				return finish(out, failed, n-1)
			case <-t.C:
			}
		}
		if runs > 1 {
			fmt.Fprintf(out, "=== session %d of at most %d (%s)\n", n, runs, time.Now().UTC().Format(time.RFC3339))
		}
		if !session(ctx, f, out, errOut) {
			failed++
		}
		if ctx.Err() != nil {
			return finish(out, failed, n)
		}
	}
	return finish(out, failed, runs)
}

func finish(out io.Writer, failed, runs int) error {
	if runs > 1 {
		fmt.Fprintf(out, "=== %d of %d sessions met every expectation\n", runs-failed, runs)
	}
	if failed > 0 || runs == 0 {
		return &exitError{code: 1}
	}
	return nil
}

// transcript numbers the steps of one session and counts unmet expectations.
type transcript struct {
	out    io.Writer
	step   int
	failed int
}

func (t *transcript) line(what, verdict, detail string, err error) {
	t.step++
	fmt.Fprintf(t.out, "%2d. %-40s %-10s %s\n", t.step, what, verdict, detail)
	if err != nil {
		t.failed++
		fmt.Fprintf(t.out, "    UNEXPECTED: %v\n", err)
	}
}

// session runs the demo once and reports whether every expectation was met.
func session(ctx context.Context, f *agentFlags, out, errOut io.Writer) bool {
	mode := "the demo policy through mcpgate"
	if !f.expectPolicy {
		mode = "a server without mcpgate (--expect-policy=false)"
	}
	fmt.Fprintf(out, "%s → %s, expecting %s\n", f.clientID, f.mcpURL, mode)
	tr := &transcript{out: out}

	cs, tok, attempts, err := connect(ctx, f, errOut)
	if err != nil {
		tr.line("connect", "FAILED", fmt.Sprintf("after %d attempts in %s", attempts, f.wait), err)
		fmt.Fprintln(out, "RESULT: FAILED")
		return false
	}
	defer func() { _ = cs.Close() }()
	if tok != nil {
		tr.line("token", "ISSUED", fmt.Sprintf("client_id %s, scope %q, expires in %ds (%s)", f.clientID, tok.Scope, tok.ExpiresIn, f.tokenURL), nil)
	}
	tr.line("initialize", "CONNECTED", fmt.Sprintf("session %s, protocol %s (attempt %d)", cs.ID(), cs.ProtocolVersion(), attempts), nil)

	call := func(name string, args map[string]any) (*mcp.CallToolResult, error) {
		cctx, cancel := context.WithTimeout(ctx, f.callTimeout)
		defer cancel()
		return cs.CallTool(cctx, name, args)
	}

	// tools/list: the demo policy shows only the tools my-agent may call.
	lctx, cancel := context.WithTimeout(ctx, f.callTimeout)
	names, err := cs.ToolNames(lctx)
	cancel()
	switch {
	case err != nil:
		tr.line("tools/list", "ERROR", "", err)
	case !slices.Contains(names, mcpapp.ToolDeleteProduct):
		tr.line("tools/list", "FILTERED", strings.Join(names, ", ")+" (the server also has delete_product)",
			listExpectation(f.expectPolicy, names))
	default:
		tr.line("tools/list", "LISTED", strings.Join(names, ", "),
			expect(!f.expectPolicy, "want delete_product filtered out by the policy (filterToolsList)"))
	}

	// get_inventory: allowed by rule readers and the Rego policy in both modes.
	what := fmt.Sprintf("get_inventory {product_id: %s}", demoProduct)
	res, err := call(mcpapp.ToolGetInventory, map[string]any{"product_id": demoProduct})
	v, detail := outcome(res, err)
	tr.line(what, v, detail, expect(v == verdictAllowed, "want the call to succeed"))

	// deniedByPolicy records a call the demo policy denies; without mcpgate the server
	// answers it with verdict without.
	deniedByPolicy := func(what, tool string, args map[string]any, rule, without, withoutWhy string) {
		v, detail := outcome(call(tool, args))
		if f.expectPolicy {
			tr.line(what, v, detail, expect(v == verdictDenied, "want mcpgate's JSON-RPC denial (%s)", rule))
		} else {
			tr.line(what, v, detail, expect(v == without, "%s", withoutWhy))
		}
	}

	// get_inventory with a malformed id: the demo Rego refuses it before the server sees it.
	deniedByPolicy(fmt.Sprintf("get_inventory {product_id: %q}", demoBadProduct), mcpapp.ToolGetInventory,
		map[string]any{"product_id": demoBadProduct}, "rego/inventory.rego",
		verdictToolError, "want the server's tool error (unknown product)")

	// get_customer: the demo policy redacts /structuredContent/ssn (and Rego the email).
	what = fmt.Sprintf("get_customer {id: %s}", demoCustomer)
	res, err = call(mcpapp.ToolGetCustomer, map[string]any{"id": demoCustomer})
	if v, detail := outcome(res, err); v != verdictAllowed {
		tr.line(what, v, detail, errors.New("want the call to succeed"))
	} else {
		sc, _ := json.Marshal(res.StructuredContent)
		whole, _ := json.Marshal(res)
		// Anywhere in the result: the text content mirrors structuredContent.
		leaked := hasKey(res.StructuredContent, "ssn") || strings.Contains(string(whole), mcpapp.CustomerFor(demoCustomer).SSN)
		if leaked {
			tr.line(what, verdictAllowed, fmt.Sprintf("structuredContent %s", sc),
				expect(!f.expectPolicy, "the ssn reached the client: want it redacted (responses.redact)"))
		} else {
			tr.line(what, "REDACTED", fmt.Sprintf("structuredContent %s: no ssn", sc),
				expect(f.expectPolicy, "want the ssn from a server without mcpgate"))
		}
	}

	// delete_product: rule no-deletes.
	deniedByPolicy(fmt.Sprintf("delete_product {product_id: %s}", demoDeleted), mcpapp.ToolDeleteProduct,
		map[string]any{"product_id": demoDeleted}, "rule no-deletes",
		verdictAllowed, "want success from a server without mcpgate")

	// slow_report: progress notifications stream through both sidecars before the result.
	cctx, cancel := context.WithTimeout(ctx, f.callTimeout)
	tc := cs.CallToolWithProgress(cctx, "", mcpapp.ToolSlowReport, map[string]any{"steps": demoSteps})
	cancel()
	what = fmt.Sprintf("slow_report {steps: %d}", demoSteps)
	if v, detail := outcome(tc.Result, tc.Err); v != verdictAllowed {
		tr.line(what, v, detail, errors.New("want the call to succeed"))
	} else {
		var at []string
		for _, p := range tc.Progress {
			at = append(at, fmt.Sprintf("%dms", p.At.Sub(tc.StartedAt).Milliseconds()))
		}
		tr.line(what, "STREAMED", fmt.Sprintf("progress at %s, result at %dms", strings.Join(at, ", "), tc.ResultAt.Sub(tc.StartedAt).Milliseconds()),
			tc.ProgressBeforeResult(demoSteps))
	}

	if tr.failed > 0 {
		fmt.Fprintf(out, "RESULT: %d expectation(s) not met\n", tr.failed)
		return false
	}
	fmt.Fprintln(out, "RESULT: every expectation met")
	return true
}

// connect fetches a token and opens an MCP session, retrying with backoff until f.wait
// has passed. It returns the number of attempts made.
func connect(ctx context.Context, f *agentFlags, errOut io.Writer) (*mcpapp.ClientSession, *tokenResponse, int, error) {
	ctx, cancel := context.WithTimeout(ctx, f.wait)
	defer cancel()
	backoff := backoffMin
	for attempt := 1; ; attempt++ {
		cs, tok, err := connectOnce(ctx, f)
		if err == nil {
			return cs, tok, attempt, nil
		}
		if ctx.Err() != nil {
			return nil, nil, attempt, err
		}
		fmt.Fprintf(errOut, "agent: attempt %d: %v (retrying in %s)\n", attempt, err, backoff)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, nil, attempt, err
		case <-t.C:
		}
		backoff = min(2*backoff, backoffMax)
	}
}

func connectOnce(ctx context.Context, f *agentFlags) (*mcpapp.ClientSession, *tokenResponse, error) {
	headers := map[string]string{}
	var tok *tokenResponse
	if f.tokenURL != "" {
		var err error
		if tok, err = fetchToken(ctx, f.tokenURL, f.clientID, f.scope); err != nil {
			return nil, nil, err
		}
		headers["Authorization"] = "Bearer " + tok.AccessToken
	}
	// One attempt may not use up the whole --wait: a hung sidecar would leave no retries.
	cctx, cancel := context.WithTimeout(ctx, min(f.callTimeout, f.wait))
	defer cancel()
	cs, err := mcpapp.ConnectWith(cctx, mcpapp.ConnectOptions{
		Endpoint: f.mcpURL,
		Headers:  headers,
		// No standalone GET stream: the session only makes calls, and a stream that
		// outlives cctx would be cut by it.
		DisableStandaloneSSE: true,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("connect %s: %w", f.mcpURL, err)
	}
	return cs, tok, nil
}

// tokenResponse is RFC 6749 §5.1's response (and §5.2's error fields).
type tokenResponse struct {
	AccessToken string `json:"access_token"`
	TokenType   string `json:"token_type"`
	ExpiresIn   int    `json:"expires_in"`
	Scope       string `json:"scope"`
	Error       string `json:"error"`
	ErrorDesc   string `json:"error_description"`
}

var tokenClient = &http.Client{Timeout: 10 * time.Second}

func fetchToken(ctx context.Context, tokenURL, clientID, scope string) (*tokenResponse, error) {
	form := url.Values{"grant_type": {"client_credentials"}, "client_id": {clientID}}
	if scope != "" {
		form.Set("scope", scope)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, tokenURL, strings.NewReader(form.Encode()))
	if err != nil {
		return nil, fmt.Errorf("token request: %w", err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := tokenClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("token request: %w", err)
	}
	defer resp.Body.Close()
	var tr tokenResponse
	derr := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&tr)
	switch {
	case resp.StatusCode != http.StatusOK && tr.Error != "":
		return nil, fmt.Errorf("token request: %s: %s: %s", resp.Status, tr.Error, tr.ErrorDesc)
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("token request: %s", resp.Status)
	case derr != nil || tr.AccessToken == "":
		return nil, fmt.Errorf("token request: no access_token in the response")
	case !strings.EqualFold(tr.TokenType, "bearer"):
		return nil, fmt.Errorf("token request: token_type %q, want Bearer", tr.TokenType)
	}
	return &tr, nil
}

// Verdicts of a tools/call.
const (
	verdictAllowed   = "ALLOWED"    // a result without isError
	verdictToolError = "TOOL ERROR" // a result with isError: the server ran the tool and failed
	verdictDenied    = "DENIED"     // a JSON-RPC error saying it denied the call: mcpgate's
	verdictError     = "ERROR"      // anything else (transport, other JSON-RPC errors)
)

// outcome classifies a tools/call. DENIED needs a JSON-RPC error whose message says so,
// as mcpgate's do ("denied by rule ...", Rego's reason after "denied"), so that a broken
// connection or an unknown tool is never mistaken for the policy at work.
func outcome(res *mcp.CallToolResult, err error) (verdict, detail string) {
	var we *jsonrpc.Error
	switch {
	case errors.As(err, &we) && strings.Contains(strings.ToLower(we.Message), "denied"):
		return verdictDenied, fmt.Sprintf("JSON-RPC error %d: %s", we.Code, we.Message)
	case err != nil:
		return verdictError, err.Error()
	case res == nil:
		return verdictError, "no result"
	case res.IsError:
		return verdictToolError, fmt.Sprintf("%q", mcpapp.Text(res))
	default:
		return verdictAllowed, fmt.Sprintf("%q", mcpapp.Text(res))
	}
}

func listExpectation(expectPolicy bool, names []string) error {
	if !expectPolicy {
		return errors.New("want every tool listed by a server without mcpgate")
	}
	return expect(slices.Contains(names, mcpapp.ToolGetInventory) && slices.Contains(names, mcpapp.ToolGetCustomer),
		"want get_inventory and get_customer listed: rule readers allows them")
}

func expect(ok bool, format string, args ...any) error {
	if ok {
		return nil
	}
	return fmt.Errorf(format, args...)
}

func hasKey(v any, key string) bool {
	b, err := json.Marshal(v)
	if err != nil {
		return false
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(b, &m) != nil {
		return false
	}
	_, ok := m[key]
	return ok
}
