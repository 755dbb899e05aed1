package extproc

import (
	"context"
	"errors"
	"io"
	"slices"
	"strconv"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/envoy/contract"
)

// fakeStream is the server side of one ext_proc stream, fed by a test acting as Envoy.
type fakeStream struct {
	grpc.ServerStream
	ctx  context.Context
	in   chan *extprocv3.ProcessingRequest
	out  chan *extprocv3.ProcessingResponse
	done chan error
}

func (f *fakeStream) Context() context.Context { return f.ctx }

func (f *fakeStream) Recv() (*extprocv3.ProcessingRequest, error) {
	select {
	case r, ok := <-f.in:
		if !ok {
			return nil, io.EOF
		}
		return r, nil
	case <-f.ctx.Done():
		return nil, f.ctx.Err()
	}
}

func (f *fakeStream) Send(r *extprocv3.ProcessingResponse) error {
	f.out <- r
	return nil
}

// openStream starts Process on a fake stream.
func openStream(t *testing.T, s *Server) (*fakeStream, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	f := &fakeStream{ctx: ctx, in: make(chan *extprocv3.ProcessingRequest), out: make(chan *extprocv3.ProcessingResponse, 1), done: make(chan error, 1)}
	go func() { f.done <- s.Process(f) }()
	t.Cleanup(cancel)
	return f, cancel
}

// exchange sends one message and waits for the reply, as Envoy does (it sends the next
// phase only after the reply to the previous one).
func (f *fakeStream) exchange(t *testing.T, r *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
	t.Helper()
	select {
	case f.in <- r:
	case err := <-f.done:
		t.Fatalf("stream ended before the message was taken: %v", err)
	}
	select {
	case resp := <-f.out:
		return resp
	case err := <-f.done:
		f.done <- err
		return nil
	case <-time.After(5 * time.Second):
		t.Fatal("no reply within 5s")
		return nil
	}
}

// metadata is what Envoy forwards from ext_authz (metadata_options.forwarding_namespaces).
func metadata(target, caller string, scopes ...string) *corev3.Metadata {
	sc := make([]any, len(scopes))
	for i, s := range scopes {
		sc[i] = s
	}
	st, _ := structpb.NewStruct(map[string]any{
		contract.MetaDecisionID:      "authz-1",
		contract.MetaTarget:          target,
		contract.MetaCallerAppID:     caller,
		contract.MetaCallerNamespace: "default",
		contract.MetaSpiffeID:        "spiffe://example.org/ns/default/" + caller,
		contract.MetaSubject:         "alice@example.com",
		contract.MetaScopes:          sc,
		contract.MetaClaimsJSON:      `{"sub":"alice@example.com","azp":"` + caller + `","tier":"gold"}`,
	})
	return &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{contract.MetadataNamespace: st}}
}

func headerMap(kv ...string) *corev3.HeaderMap {
	hm := &corev3.HeaderMap{}
	for i := 0; i+1 < len(kv); i += 2 {
		hm.Headers = append(hm.Headers, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	return hm
}

// envoyRequest is one HTTP request as the ext_proc filter sees it.
type envoyRequest struct {
	md      *corev3.Metadata
	method  string
	headers []string // extra header key/value pairs
	body    string
	// contentType replaces the default application/json.
	contentType string
}

// envoyUpstream is the MCP server's answer.
type envoyUpstream struct {
	status      int
	contentType string
	chunks      []string // body chunks as Envoy would hand them over
	trailers    bool
	headers     []string // extra response header key/value pairs
}

// envoyResult is what the client would get.
type envoyResult struct {
	immediate      *extprocv3.ImmediateResponse
	forwardedBody  string            // what reached the MCP server
	requestSet     map[string]string // request header mutations
	requestRemove  []string          // request headers removed
	responseSet    map[string]string // response header mutations
	responseRemove []string          // response headers removed
	// responseAppended are the response headers set with APPEND_IF_EXISTS_OR_ADD: added
	// beside the server's own, not replacing them.
	responseAppended []string
	responseMode     extprocfilterv3.ProcessingMode_BodySendMode
	clientBody       string // the response body the client receives
	bodyMessages     int    // response body messages exchanged
}

func setHeaders(m *extprocv3.HeaderMutation, into map[string]string) {
	for _, h := range m.GetSetHeaders() {
		into[h.GetHeader().GetKey()] = string(h.GetHeader().GetRawValue())
	}
}

// runEnvoy plays the ext_proc filter for one request with the processing mode mcpgate
// expects: request headers SEND, request body BUFFERED, response headers SEND, response
// body NONE unless overridden (allow_mode_override), trailers SKIP unless asked.
func runEnvoy(t *testing.T, s *Server, req envoyRequest, up envoyUpstream) envoyResult {
	t.Helper()
	f, _ := openStream(t, s)
	res := envoyResult{requestSet: map[string]string{}, responseSet: map[string]string{}}
	if req.method == "" {
		req.method = "POST"
	}
	if req.contentType == "" {
		req.contentType = "application/json"
	}
	hdrs := append([]string{":method", req.method, ":path", "/mcp", ":authority", "inventory", "content-type", req.contentType,
		"accept", "application/json, text/event-stream", "authorization", "Bearer secret-token"}, req.headers...)
	if req.method == "POST" {
		hdrs = append(hdrs, "content-length", strconv.Itoa(len(req.body)))
	}
	resp := f.exchange(t, &extprocv3.ProcessingRequest{
		MetadataContext: req.md,
		Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
			Headers: headerMap(hdrs...), EndOfStream: req.method != "POST",
		}},
	})
	if res.immediate = resp.GetImmediateResponse(); res.immediate != nil {
		return res
	}
	setHeaders(resp.GetRequestHeaders().GetResponse().GetHeaderMutation(), res.requestSet)
	res.requestRemove = resp.GetRequestHeaders().GetResponse().GetHeaderMutation().GetRemoveHeaders()
	if req.method == "POST" {
		resp = f.exchange(t, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
			RequestBody: &extprocv3.HttpBody{Body: []byte(req.body), EndOfStream: true},
		}})
		if res.immediate = resp.GetImmediateResponse(); res.immediate != nil {
			return res
		}
		c := resp.GetRequestBody().GetResponse()
		res.forwardedBody = req.body
		if bm := c.GetBodyMutation(); bm != nil {
			res.forwardedBody = string(bm.GetBody())
		}
		setHeaders(c.GetHeaderMutation(), res.requestSet)
		res.requestRemove = append(slices.Clone(res.requestRemove), c.GetHeaderMutation().GetRemoveHeaders()...)
	}
	if up.status == 0 {
		up.status = 200
	}
	body := ""
	for _, c := range up.chunks {
		body += c
	}
	rh := []string{":status", strconv.Itoa(up.status)}
	if up.contentType != "" {
		rh = append(rh, "content-type", up.contentType)
	}
	rh = append(rh, up.headers...)
	resp = f.exchange(t, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: headerMap(rh...), EndOfStream: len(up.chunks) == 0 && !up.trailers},
	}})
	if res.immediate = resp.GetImmediateResponse(); res.immediate != nil {
		return res
	}
	setHeaders(resp.GetResponseHeaders().GetResponse().GetHeaderMutation(), res.responseSet)
	for _, h := range resp.GetResponseHeaders().GetResponse().GetHeaderMutation().GetSetHeaders() {
		if h.GetAppendAction() == corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD {
			res.responseAppended = append(res.responseAppended, h.GetHeader().GetKey())
		}
	}
	res.responseMode = resp.GetModeOverride().GetResponseBodyMode()
	switch res.responseMode {
	case extprocfilterv3.ProcessingMode_NONE:
		res.clientBody = body // Envoy does not send the body at all
	case extprocfilterv3.ProcessingMode_BUFFERED:
		resp = f.exchange(t, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{
			ResponseBody: &extprocv3.HttpBody{Body: []byte(body), EndOfStream: !up.trailers},
		}})
		res.bodyMessages++
		if res.immediate = resp.GetImmediateResponse(); res.immediate != nil {
			return res
		}
		c := resp.GetResponseBody().GetResponse()
		res.clientBody = body
		if bm := c.GetBodyMutation(); bm != nil {
			res.clientBody = string(bm.GetBody())
		}
		setHeaders(c.GetHeaderMutation(), res.responseSet)
		res.responseRemove = append(res.responseRemove, c.GetHeaderMutation().GetRemoveHeaders()...)
	case extprocfilterv3.ProcessingMode_STREAMED:
		for i, chunk := range up.chunks {
			resp = f.exchange(t, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{
				ResponseBody: &extprocv3.HttpBody{Body: []byte(chunk), EndOfStream: i == len(up.chunks)-1 && !up.trailers},
			}})
			res.bodyMessages++
			if res.immediate = resp.GetImmediateResponse(); res.immediate != nil {
				return res
			}
			bm := resp.GetResponseBody().GetResponse().GetBodyMutation()
			switch {
			case bm == nil:
				res.clientBody += chunk
			case bm.GetClearBody():
			default:
				res.clientBody += string(bm.GetBody())
			}
		}
	}
	if up.trailers {
		resp = f.exchange(t, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseTrailers{
			ResponseTrailers: &extprocv3.HttpTrailers{Trailers: headerMap("grpc-status", "0")},
		}})
		if resp.GetResponseTrailers() == nil {
			t.Fatalf("trailers answered with %v", resp)
		}
	}
	f.requireCleanEnd(t)
	return res
}

// requireCleanEnd closes Envoy's side, as it does once it expects no more replies, and
// requires Process to end cleanly.
func (f *fakeStream) requireCleanEnd(t *testing.T) {
	t.Helper()
	close(f.in)
	select {
	case err := <-f.done:
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Fatalf("Process ended with %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Process did not end after the stream closed")
	}
}
