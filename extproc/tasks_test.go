package extproc

import (
	"fmt"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/integration/redistest"
	"github.com/mcpgate/mcpgate/policy"
)

// withSubject is md with another subject (and its claims) or scopes.
func withSubject(md *corev3.Metadata, subject, claims string, scopes ...string) *corev3.Metadata {
	out := proto.Clone(md).(*corev3.Metadata)
	f := out.FilterMetadata[contract.MetadataNamespace].Fields
	if subject != "" {
		f[contract.MetaSubject] = structpb.NewStringValue(subject)
		f[contract.MetaClaimsJSON] = structpb.NewStringValue(claims)
	}
	if scopes != nil {
		l := make([]any, len(scopes))
		for i, sc := range scopes {
			l[i] = sc
		}
		v, _ := structpb.NewList(l)
		f[contract.MetaScopes] = structpb.NewListValue(v)
	}
	return out
}

// withIssuer is md with the token verified by issuer.
func withIssuer(md *corev3.Metadata, issuer string) *corev3.Metadata {
	out := proto.Clone(md).(*corev3.Metadata)
	out.FilterMetadata[contract.MetadataNamespace].Fields[contract.MetaIssuer] = structpb.NewStringValue(issuer)
	return out
}

func taskReq(id int, method, taskID string) string {
	return fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"method":%q,"params":{"taskId":%q}}`, id, method, taskID)
}

// TestTasksGoverned: on the demo policy (which names no tasks/* method), a task-augmented
// call of an allowed tool works; the task is then its creator's alone, its result gets the
// tool's redactions (policy and the creating call's Rego), tasks/list shows the caller's
// own tasks, and a task mcpgate did not see created, or whose tool the caller may no
// longer use, or that expired, is denied.
func TestTasksGoverned(t *testing.T) {
	s := newDemoServer(t)
	now := time.Now()
	s.now = func() time.Time { return now }
	bob := withSubject(agentMD, "bob", `{"sub":"bob","azp":"my-agent","tier":"silver"}`)

	created := `{"jsonrpc":"2.0","id":3,"result":{"task":{"taskId":"t-1","status":"working","ttl":60000,"createdAt":"2026-12-07T00:00:00Z","pollInterval":10}}}`
	res := runEnvoy(t, s, envoyRequest{md: bob, body: `{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"get_customer","arguments":{"id":"c1"},"task":{"ttl":60000}}}`},
		envoyUpstream{contentType: "text/event-stream", chunks: []string{"event: message\ndata: " + created + "\n\n"}})
	if res.immediate != nil || !strings.Contains(res.clientBody, `"taskId":"t-1"`) {
		t.Fatalf("task-augmented get_customer: answered %v, client got %q", res.immediate, res.clientBody)
	}
	// Someone else's task (created through mcpgate, by alice).
	if res := runEnvoy(t, s, envoyRequest{md: agentMD, body: `{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"get_inventory","arguments":{"product_id":"SKU-1"},"task":{}}}`},
		envoyUpstream{contentType: "application/json", chunks: []string{`{"jsonrpc":"2.0","id":4,"result":{"task":{"taskId":"t-alice","status":"working"}}}`}}); res.immediate != nil {
		t.Fatalf("alice's task call: %s", res.immediate.GetBody())
	}

	for _, m := range []string{"tasks/get", "tasks/cancel"} {
		if res := runEnvoy(t, s, envoyRequest{md: bob, body: taskReq(5, m, "t-1")}, envoyUpstream{}); res.immediate != nil {
			t.Fatalf("%s of bob's own task: %s", m, res.immediate.GetBody())
		}
	}
	result := `{"jsonrpc":"2.0","id":6,"result":{"content":[{"type":"text","text":"{\"name\":\"Ann\",\"email\":\"ann@example.com\",\"ssn\":\"123-45-6789\"}"}],` +
		`"structuredContent":{"name":"Ann","email":"ann@example.com","ssn":"123-45-6789"},"_meta":{"io.modelcontextprotocol/related-task":{"taskId":"t-1"}}}}`
	res = runEnvoy(t, s, envoyRequest{md: bob, body: taskReq(6, "tasks/result", "t-1")}, envoyUpstream{contentType: "application/json", chunks: []string{result}})
	if res.immediate != nil {
		t.Fatalf("tasks/result: %s", res.immediate.GetBody())
	}
	if strings.Contains(res.clientBody, "123-45-6789") || strings.Contains(res.clientBody, "ann@example.com") || !strings.Contains(res.clientBody, "Ann") {
		t.Fatalf("tasks/result not redacted like get_customer (ssn by policy, email by Rego for bob): %s", res.clientBody)
	}

	list := `{"jsonrpc":"2.0","id":7,"result":{"tasks":[{"taskId":"t-1","status":"completed"},{"taskId":"t-alice","status":"working"},{"taskId":"t-direct","status":"working"}]}}`
	res = runEnvoy(t, s, envoyRequest{md: bob, body: `{"jsonrpc":"2.0","id":7,"method":"tasks/list"}`}, envoyUpstream{contentType: "application/json", chunks: []string{list}})
	if res.immediate != nil || !strings.Contains(res.clientBody, `"t-1"`) || strings.Contains(res.clientBody, "t-alice") || strings.Contains(res.clientBody, "t-direct") {
		t.Fatalf("tasks/list: answered %v, client got %s", res.immediate, res.clientBody)
	}

	for _, tc := range []struct {
		name, method, task string
		md                 *corev3.Metadata
		reason             string
	}{
		{"another subject", "tasks/result", "t-1", agentMD, unknownTask},
		{"another subject cancels", "tasks/cancel", "t-1", agentMD, unknownTask},
		{"another caller", "tasks/get", "t-1", withSubject(metadata("inventory", "other-agent", "mcp:tools", "inventory:read"), "bob", `{"sub":"bob"}`), ""},
		// The same sub minted by another issuer the app trusts is another user.
		{"another issuer's bob", "tasks/result", "t-1", withIssuer(bob, "partner"), unknownTask},
		{"another issuer's bob cancels", "tasks/cancel", "t-1", withIssuer(bob, "partner"), unknownTask},
		{"unknown task", "tasks/get", "t-never", bob, unknownTask},
		{"the tool no longer allowed to the caller", "tasks/result", "t-1", withSubject(bob, "", "", "mcp:tools"), "get_customer\\\" is not allowed"},
	} {
		res := runEnvoy(t, s, envoyRequest{md: tc.md, body: taskReq(8, tc.method, tc.task)}, envoyUpstream{contentType: "application/json", chunks: []string{result}})
		if res.immediate == nil || !strings.Contains(string(res.immediate.GetBody()), tc.reason) || res.forwardedBody != "" {
			t.Errorf("%s: answered %v, forwarded %q", tc.name, res.immediate, res.forwardedBody)
		}
	}
	now = now.Add(61 * time.Second)
	if res := runEnvoy(t, s, envoyRequest{md: bob, body: taskReq(9, "tasks/get", "t-1")}, envoyUpstream{}); res.immediate == nil {
		t.Fatal("an expired task was still served")
	}
}

// TestTaskIDsAreNotReassigned: a server answering with a task id another caller holds
// does not hand that task over.
func TestTaskIDsAreNotReassigned(t *testing.T) {
	s := newDemoServer(t)
	bob := withSubject(agentMD, "bob", `{"sub":"bob","azp":"my-agent","tier":"silver"}`)
	handle := func(id int) envoyUpstream {
		return envoyUpstream{contentType: "application/json", chunks: []string{fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"result":{"task":{"taskId":"same","status":"working"}}}`, id)}}
	}
	call := func(id int) string {
		return fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"get_inventory","arguments":{"product_id":"SKU-1"},"task":{}}}`, id)
	}
	runEnvoy(t, s, envoyRequest{md: agentMD, body: call(1)}, handle(1))
	runEnvoy(t, s, envoyRequest{md: bob, body: call(2)}, handle(2))
	if res := runEnvoy(t, s, envoyRequest{md: bob, body: taskReq(3, "tasks/get", "same")}, envoyUpstream{}); res.immediate == nil {
		t.Fatal("bob got alice's task")
	}
	if res := runEnvoy(t, s, envoyRequest{md: agentMD, body: taskReq(4, "tasks/get", "same")}, envoyUpstream{}); res.immediate != nil {
		t.Fatalf("alice lost her task: %s", res.immediate.GetBody())
	}
}

// TestTasksSharedAcrossReplicas: with the Mesh's Redis (standalone or a cluster), a task
// created through one replica is its creator's through any other, redacted there as well; without Redis the
// other replica does not know it and denies it.
func TestTasksSharedAcrossReplicas(t *testing.T) {
	t.Parallel() // its cluster serves 2s after its start
	srv := redistest.Start(t)
	bob := withSubject(agentMD, "bob", `{"sub":"bob","azp":"my-agent","tier":"silver"}`)
	create := func(s *Server, id, taskID string, md *corev3.Metadata) {
		t.Helper()
		res := runEnvoy(t, s, envoyRequest{md: md, body: `{"jsonrpc":"2.0","id":` + id + `,"method":"tools/call","params":{"name":"get_customer","arguments":{"id":"c1"},"task":{}}}`},
			envoyUpstream{contentType: "application/json", chunks: []string{`{"jsonrpc":"2.0","id":` + id + `,"result":{"task":{"taskId":"` + taskID + `","status":"working","ttl":60000}}}`}})
		if res.immediate != nil {
			t.Fatalf("task call: %s", res.immediate.GetBody())
		}
	}
	result := `{"jsonrpc":"2.0","id":2,"result":{"content":[],"structuredContent":{"name":"Ann","email":"ann@example.com","ssn":"123-45-6789"}}}`

	// A standalone Redis, and a Redis Cluster: task records are one key each, in the
	// slot of their hash.
	for _, topo := range []string{"standalone", "cluster"} {
		t.Run(topo, func(t *testing.T) {
			store := redisStore(srv.Addr(), policy.FailLocal)
			if topo == "cluster" {
				store = redisStore(redistest.StartCluster(t, 3).Addr(), policy.FailLocal)
				store.Cluster = true
			}
			shared := func(s *policy.Snapshot) { s.Mesh.RateLimits = store }
			rs := newReplicas(t, 2, shared)
			create(rs.servers[0], "1", "shared-1", bob)
			res := runEnvoy(t, rs.servers[1], envoyRequest{md: bob, body: taskReq(2, "tasks/result", "shared-1")}, envoyUpstream{contentType: "application/json", chunks: []string{result}})
			if res.immediate != nil || strings.Contains(res.clientBody, "123-45-6789") || strings.Contains(res.clientBody, "ann@example.com") || !strings.Contains(res.clientBody, "Ann") {
				t.Fatalf("tasks/result through the other replica: answered %v, client got %s", res.immediate, res.clientBody)
			}
			if res := runEnvoy(t, rs.servers[1], envoyRequest{md: agentMD, body: taskReq(3, "tasks/get", "shared-1")}, envoyUpstream{}); res.immediate == nil {
				t.Fatal("another subject got bob's task through the other replica")
			}
			if res := runEnvoy(t, newReplicas(t, 1, shared).servers[0], envoyRequest{md: withIssuer(bob, "partner"), body: taskReq(3, "tasks/get", "shared-1")}, envoyUpstream{}); res.immediate == nil {
				t.Fatal("another issuer's bob got bob's task through Redis")
			}
			// A server reusing bob's id for alice, through the replica that has not seen it yet.
			create(rs.servers[1], "4", "shared-1", agentMD)
			rs2 := newReplicas(t, 1, shared)
			if res := runEnvoy(t, rs2.servers[0], envoyRequest{md: agentMD, body: taskReq(5, "tasks/get", "shared-1")}, envoyUpstream{}); res.immediate == nil {
				t.Fatal("a reused task id changed hands in Redis")
			}
			if res := runEnvoy(t, rs2.servers[0], envoyRequest{md: bob, body: taskReq(6, "tasks/get", "shared-1")}, envoyUpstream{}); res.immediate != nil {
				t.Fatalf("bob lost his task: %s", res.immediate.GetBody())
			}
		})
	}

	local := newReplicas(t, 2, func(*policy.Snapshot) {})
	create(local.servers[0], "7", "local-1", bob)
	if res := runEnvoy(t, local.servers[1], envoyRequest{md: bob, body: taskReq(8, "tasks/get", "local-1")}, envoyUpstream{}); res.immediate == nil {
		t.Fatal("a replica without the shared store served a task it never saw")
	}
}

// TestTasksOnAnUnfilteredApp: an app whose responses mcpgate otherwise leaves alone still
// has its task handles read, so its tasks can be used; a handle it cannot read passes
// unchanged, and that task is then unknown (denied).
func TestTasksOnAnUnfilteredApp(t *testing.T) {
	s := loadPlainApp(t, "")
	body := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"run","arguments":{},"task":{}}}`
	res := runEnvoy(t, s, envoyRequest{md: appMD, body: body},
		envoyUpstream{contentType: "text/event-stream", chunks: []string{`event: message` + "\ndata: " + `{"jsonrpc":"2.0","id":1,"result":{"task":{"taskId":"p-1","status":"working"}}}` + "\n\n"}})
	if res.immediate != nil || !strings.Contains(res.clientBody, "p-1") {
		t.Fatalf("task call: answered %v, client got %q", res.immediate, res.clientBody)
	}
	if res := runEnvoy(t, s, envoyRequest{md: appMD, body: taskReq(2, "tasks/get", "p-1")}, envoyUpstream{}); res.immediate != nil {
		t.Fatalf("tasks/get: %s", res.immediate.GetBody())
	}
	res = runEnvoy(t, s, envoyRequest{md: appMD, body: body}, envoyUpstream{contentType: "application/json", chunks: []string{"\x1f\x8b"}, headers: []string{"content-encoding", "gzip"}})
	if res.immediate != nil || res.clientBody != "\x1f\x8b" {
		t.Fatalf("unreadable handle: answered %v, client got %q", res.immediate, res.clientBody)
	}
}
