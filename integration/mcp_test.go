//go:build integration

package integration

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/protobuf/types/known/structpb"
)

// mcpOutcome is what the client sees of one MCP POST through both filters.
type mcpOutcome struct {
	authzStatus int    // 200 when ext_authz allowed
	status      int    // HTTP status the client gets
	body        string // the JSON-RPC answer the client gets
	forwarded   string // the body the MCP server received ("" if it received nothing)
	decisionID  string
}

func headerMap(kv ...string) *corev3.HeaderMap {
	hm := &corev3.HeaderMap{}
	for i := 0; i+1 < len(kv); i += 2 {
		hm.Headers = append(hm.Headers, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	return hm
}

// mcpPost sends one MCP request through ext_authz then ext_proc, as Envoy's filter chain
// does: the Check's dynamic metadata is forwarded to ext_proc (forwarding_namespaces),
// the body is buffered, and the upstream's answer (serverResponse, JSON) goes back
// through ext_proc when it asks for it with mode_override.
func (g *gate) mcpPost(t *testing.T, principal, authorization, body, serverResponse string) mcpOutcome {
	t.Helper()
	check := g.check(t, envoyCheck(principal, "POST", "/mcp", map[string]string{"authorization": authorization}))
	if check.GetOkResponse() == nil {
		d := check.GetDeniedResponse()
		return mcpOutcome{authzStatus: int(d.GetStatus().GetCode()), status: int(d.GetStatus().GetCode()), body: d.GetBody()}
	}
	md := &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"envoy.filters.http.ext_authz": check.GetDynamicMetadata()}}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := g.proc.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = stream.CloseSend() }()
	exchange := func(r *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		if err := stream.Send(r); err != nil {
			t.Fatal(err)
		}
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	out := mcpOutcome{authzStatus: 200}
	immediate := func(ir *extprocv3.ImmediateResponse) mcpOutcome {
		out.status, out.body = int(ir.GetStatus().GetCode()), string(ir.GetBody())
		for _, h := range ir.GetHeaders().GetSetHeaders() {
			if h.GetHeader().GetKey() == "x-mcpgate-decision-id" {
				out.decisionID = string(h.GetHeader().GetRawValue())
			}
		}
		return out
	}
	resp := exchange(&extprocv3.ProcessingRequest{MetadataContext: md, Request: &extprocv3.ProcessingRequest_RequestHeaders{
		RequestHeaders: &extprocv3.HttpHeaders{Headers: headerMap(":method", "POST", ":path", "/mcp", "content-type", "application/json",
			"content-length", strconv.Itoa(len(body)), "mcp-protocol-version", "2025-06-18")}}})
	if ir := resp.GetImmediateResponse(); ir != nil {
		return immediate(ir)
	}
	resp = exchange(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
		RequestBody: &extprocv3.HttpBody{Body: []byte(body), EndOfStream: true}}})
	if ir := resp.GetImmediateResponse(); ir != nil {
		return immediate(ir)
	}
	out.forwarded = body
	if bm := resp.GetRequestBody().GetResponse().GetBodyMutation(); bm != nil {
		out.forwarded = string(bm.GetBody())
	}
	resp = exchange(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: headerMap(":status", "200", "content-type", "application/json")}}})
	for _, h := range resp.GetResponseHeaders().GetResponse().GetHeaderMutation().GetSetHeaders() {
		if h.GetHeader().GetKey() == "x-mcpgate-decision-id" {
			out.decisionID = string(h.GetHeader().GetRawValue())
		}
	}
	out.status, out.body = 200, serverResponse
	if resp.GetModeOverride().GetResponseBodyMode() == extprocfilterv3.ProcessingMode_BUFFERED {
		resp = exchange(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{
			ResponseBody: &extprocv3.HttpBody{Body: []byte(serverResponse), EndOfStream: true}}})
		if ir := resp.GetImmediateResponse(); ir != nil {
			return immediate(ir)
		}
		if bm := resp.GetResponseBody().GetResponse().GetBodyMutation(); bm != nil {
			out.body = string(bm.GetBody())
		}
	}
	return out
}

func toolCall(id int, tool, args string) string {
	return fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":%q,"arguments":%s}}`, id, tool, args)
}
