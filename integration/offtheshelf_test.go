//go:build integration

package integration

import (
	"slices"
	"strings"
	"testing"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
)

// TestTypeScriptClientValidatesRedactedResults: the official TypeScript SDK client checks
// structuredContent against the outputSchema tools/list gave it. The demo's get_customer
// (Go SDK server, a schema requiring every field, no others allowed) is redacted by policy
// (ssn) and by Rego (email, below the gold tier): the list the client gets must describe
// the redacted results, or it refuses every one of them with -32602.
func TestTypeScriptClientValidatesRedactedResults(t *testing.T) {
	m := startMesh(t)
	want := mcpapp.CustomerFor("c1")
	for _, tc := range []struct {
		who       string
		claims    map[string]any
		wantEmail bool
	}{
		{who: "no tier", claims: nil},
		{who: "gold", claims: map[string]any{"tier": "gold"}, wantEmail: true},
	} {
		t.Run(tc.who, func(t *testing.T) {
			steps := runTSClient(t, m.invokeURL, map[string]string{"Authorization": m.token(t, tc.claims)},
				`[{"op":"list"},{"op":"call","name":"get_customer","arguments":{"id":"c1"}}]`)
			if len(steps) != 3 || !steps[0].OK || !steps[1].OK {
				t.Fatalf("steps = %+v", steps)
			}
			call := steps[2]
			if !call.OK {
				t.Fatalf("get_customer refused by the client: %+v", call.Error)
			}
			sc := call.Result.StructuredContent
			if sc["name"] != want.Name || sc["ssn"] != nil || (sc["email"] != nil) != tc.wantEmail {
				t.Fatalf("structuredContent = %v", sc)
			}
		})
	}
}

// TestTypeScriptClientTasks: on the demo's policy (deny by default, no tasks/* method
// named), the official TypeScript SDK client makes a task-augmented call of an allowed
// tool of the official TypeScript SDK server: the task is created, polled and its result
// fetched and validated against the tool's outputSchema, redacted as the tool's results
// are. The task is its creator's: another subject can neither read it nor see it listed.
func TestTypeScriptClientTasks(t *testing.T) {
	ts := startTSServer(t)
	m := startMeshTo(t, ts.addr, nil)
	steps := runTSClient(t, m.invokeURL, map[string]string{"Authorization": m.token(t, nil)},
		`[{"op":"list"},{"op":"taskcall","name":"get_customer","arguments":{"id":"c1"}},{"op":"tasklist"}]`)
	if len(steps) != 4 || !steps[1].OK {
		t.Fatalf("steps = %+v", steps)
	}
	call := steps[2]
	if !call.OK || call.TaskID == "" {
		t.Fatalf("task-augmented get_customer: %+v", call)
	}
	if !slices.ContainsFunc(call.Events, func(e struct {
		Type   string `json:"type"`
		TaskID string `json:"taskId"`
		Status string `json:"status"`
	}) bool {
		return e.Type == "taskStatus" && e.Status == "completed"
	}) {
		t.Errorf("no completed status polled: %+v", call.Events)
	}
	sc := call.Result.StructuredContent
	if sc["name"] != "Ann Example" || sc["ssn"] != nil || sc["email"] != nil {
		t.Fatalf("task result not redacted as get_customer's (ssn by policy, email by Rego): %v", sc)
	}
	if !slices.Contains(steps[3].TaskIDs, call.TaskID) {
		t.Errorf("tasks/list = %+v, want %s", steps[3], call.TaskID)
	}

	other := m.token(t, map[string]any{"sub": "mallory@example.com"})
	steps = runTSClient(t, m.invokeURL, map[string]string{"Authorization": other},
		`[{"op":"taskget","taskId":"`+call.TaskID+`"},{"op":"taskresult","taskId":"`+call.TaskID+`"},{"op":"taskcancel","taskId":"`+call.TaskID+`"},{"op":"tasklist"}]`)
	if len(steps) != 5 {
		t.Fatalf("steps = %+v", steps)
	}
	for _, s := range steps[1:4] {
		if s.OK || s.Error == nil || !strings.Contains(s.Error.Message, "unknown task") {
			t.Errorf("%s of another subject's task: %+v", s.Op, s)
		}
	}
	if !steps[4].OK || slices.Contains(steps[4].TaskIDs, call.TaskID) {
		t.Errorf("another subject's tasks/list = %+v", steps[4])
	}
	if got := ts.calls(); !slices.Equal(got, []string{"get_customer"}) {
		t.Errorf("the server ran %v", got)
	}
}
