//go:build integration

package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
)

// tsStep is one line of integration/tsclient/client.mjs output.
type tsStep struct {
	Op    string   `json:"op"`
	Name  string   `json:"name"`
	OK    bool     `json:"ok"`
	Tools []string `json:"tools"`
	Error *struct {
		Code    any    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
	Result struct {
		StructuredContent map[string]any `json:"structuredContent"`
		IsError           bool           `json:"isError"`
	} `json:"result"`
	Progress []struct {
		Progress float64 `json:"progress"`
		AtMs     int64   `json:"atMs"`
	} `json:"progress"`
	ResultAtMs int64 `json:"resultAtMs"`
	// Task ops.
	TaskID string `json:"taskId"`
	Events []struct {
		Type   string `json:"type"`
		TaskID string `json:"taskId"`
		Status string `json:"status"`
	} `json:"events"`
	TaskIDs []string `json:"taskIds"`
}

// runTSClient runs the official TypeScript MCP SDK client (npm, pinned) against url.
func runTSClient(t *testing.T, url string, headers map[string]string, steps string) []tsStep {
	t.Helper()
	args := []string{"tsclient/client.mjs", "--url", url, "--steps", steps}
	for k, v := range headers {
		args = append(args, "--header", k+": "+v)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var exit *exec.ExitError
	if err != nil && !(errors.As(err, &exit) && exit.ExitCode() == 2) {
		t.Fatalf("node client: %v\nstderr: %s\nstdout: %s", err, stderr.String(), out)
	}
	var res []tsStep
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var s tsStep
		if err := json.Unmarshal(sc.Bytes(), &s); err != nil {
			t.Fatalf("client output %q: %v", sc.Text(), err)
		}
		res = append(res, s)
	}
	return res
}

// TestTypeScriptClientAgainstGoSDKServer checks the two off-the-shelf peers talk to each
// other directly, before mcpgate is put between them.
func TestTypeScriptClientAgainstGoSDKServer(t *testing.T) {
	srv := startMCPApp(t, mcpapp.Options{})
	steps := runTSClient(t, srv.Endpoint(), map[string]string{"X-Test": "1"},
		`[{"op":"list"},{"op":"call","name":"get_inventory","arguments":{"product_id":"widget-1"}},{"op":"call","name":"slow_report","arguments":{"steps":3}}]`)
	if len(steps) != 4 || !steps[0].OK {
		t.Fatalf("steps = %+v", steps)
	}
	if len(steps[1].Tools) != 5 {
		t.Errorf("tools = %v", steps[1].Tools)
	}
	if !steps[2].OK || steps[2].Result.StructuredContent["quantity"] == nil {
		t.Errorf("get_inventory = %+v", steps[2])
	}
	slow := steps[3]
	if !slow.OK || len(slow.Progress) != 3 {
		t.Fatalf("slow_report = %+v", slow)
	}
	if last := slow.Progress[len(slow.Progress)-1]; last.AtMs > slow.ResultAtMs {
		t.Errorf("progress after the result: %+v", slow)
	}
	if srv.CallsTo("get_inventory") != 1 || srv.CallsTo("slow_report") != 1 {
		t.Errorf("server saw %v", srv.Calls())
	}
}
