package extproc

import (
	"context"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/integration/otlptest"
	"github.com/mcpgate/mcpgate/policy"
	"github.com/mcpgate/mcpgate/policy/decisionlog"
)

// Each ext_proc exchange is a span of the trace Envoy propagates, with the MCP method,
// tool and decision; a denial carries its rule and reason.
func TestExchangeSpans(t *testing.T) {
	col := otlptest.Start(t)
	tr, err := decisionlog.NewTracer(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := newDemoServer(t)
	s.tracer = tr
	t.Cleanup(s.Close)
	s.store.Current().Mesh.Tracing = &policy.Tracing{SamplingRate: 1, Address: col.Addr()}
	const trace = "4bf92f3577b34da6a3ce929d0e0e4736"
	tp := func(span string) []string { return []string{"traceparent", "00-" + trace + "-" + span + "-01"} }

	res := runEnvoy(t, s, envoyRequest{md: agentMD, headers: tp("00f067aa0ba902b7"), body: call(1, "get_inventory", `{"product_id":"SKU-42"}`)}, envoyUpstream{})
	if res.immediate != nil {
		t.Fatalf("allowed call answered: %s", res.immediate.GetBody())
	}
	res = runEnvoy(t, s, envoyRequest{md: agentMD, headers: tp("00f067aa0ba902b8"), body: call(2, "delete_product", `{"product_id":"SKU-42"}`)}, envoyUpstream{})
	if res.immediate == nil {
		t.Fatal("delete_product was forwarded")
	}
	// The allowed exchange's span ends with its stream, which the emulated Envoy closes
	// as it returns: flush until both are exported.
	var spans []otlptest.Span
	for deadline := time.Now().Add(10 * time.Second); len(spans) < 2 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		tr.Flush(context.Background())
		spans = spans[:0]
		for _, sp := range col.Spans() {
			if sp.TraceID == trace {
				spans = append(spans, sp)
			}
		}
	}
	if len(spans) != 2 {
		t.Fatalf("%d spans of the trace, want 2: %+v", len(spans), col.Spans())
	}
	byParent := map[string]otlptest.Span{}
	for _, sp := range spans {
		byParent[sp.ParentID] = sp
	}
	ok := byParent["00f067aa0ba902b7"]
	if ok.Name != "mcpgate ext_proc" || ok.Attrs["mcp.method.name"] != "tools/call" || ok.Attrs["gen_ai.tool.name"] != "get_inventory" ||
		ok.Attrs["mcpgate.decision"] != "allow" || ok.Attrs["mcpgate.target.app_id"] != "inventory" || ok.Attrs["mcpgate.caller.app_id"] != "my-agent" ||
		ok.Attrs["mcpgate.decision_id"] == "" || len(ok.Attrs["mcpgate.subject.hash"]) != 16 {
		t.Errorf("allowed call's span: %+v", ok)
	}
	denied := byParent["00f067aa0ba902b8"]
	if denied.Attrs["mcpgate.decision"] != "deny" || denied.Attrs["mcpgate.rule"] != "no-deletes" || denied.Status != "Error" || denied.Attrs["mcpgate.reason"] == "" {
		t.Errorf("denied call's span: %+v", denied)
	}
}
