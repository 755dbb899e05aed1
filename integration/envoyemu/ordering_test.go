package envoyemu

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/durationpb"
)

// These tests replay the message sequences of Envoy's
// test/extensions/filters/http/ext_proc/ordering_test.cc that matter for mcpgate's
// processing mode (request headers SEND, request body BUFFERED, response headers SEND,
// response body NONE unless mode_override), against a scripted processor.

func do(t *testing.T, method, url, body string, hdr ...string) (*http.Response, string) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	return getBodyReq(t, http.DefaultClient, req)
}

// ordering_test.cc DefaultOrderingGet: headers only, both ways.
func TestOrderingHeadersOnlyGet(t *testing.T) {
	rg := requireRig(t, rigOptions{})
	resp, body := do(t, "GET", "http://"+rg.addr+"/x", "")
	if resp.StatusCode != 200 || body != "hello" {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
	rg.requireMessages(t, "request_headers eos=true", "response_headers eos=false", "<eof>")
}

// ordering_test.cc DefaultOrderingPost with a BUFFERED request body.
func TestOrderingPostBufferedBody(t *testing.T) {
	rg := requireRig(t, rigOptions{upstream: func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		_, _ = w.Write([]byte("got " + string(b)))
	}})
	rg.proc.script = func(r *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		if r.GetRequestBody() != nil {
			return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{
				Response: &extprocv3.CommonResponse{
					HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-mutated", RawValue: []byte("yes")}}}},
					BodyMutation:   &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: []byte("replaced body")}},
				}}}}
		}
		return nil
	}
	resp, body := do(t, "POST", "http://"+rg.addr+"/x", `{"a":1}`)
	if resp.StatusCode != 200 || body != "got replaced body" {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
	up := <-rg.hits
	if up.Header.Get("x-mutated") != "yes" || up.ContentLength != int64(len("replaced body")) {
		t.Fatalf("upstream saw x-mutated=%q content-length=%d", up.Header.Get("x-mutated"), up.ContentLength)
	}
	rg.requireMessages(t, "request_headers eos=false", `request_body "{\"a\":1}" eos=true`, "response_headers eos=false", "<eof>")
}

func overrideOnResponseHeaders(mode extprocfilterv3.ProcessingMode_BodySendMode) func(*extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
	return func(r *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		if r.GetResponseHeaders() != nil {
			resp := continueFor(r)
			resp.ModeOverride = &extprocfilterv3.ProcessingMode{ResponseBodyMode: mode}
			return resp
		}
		if b := r.GetResponseBody(); b != nil {
			return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{ResponseBody: &extprocv3.BodyResponse{
				Response: &extprocv3.CommonResponse{BodyMutation: &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: []byte(strings.ToUpper(string(b.GetBody())))}}}}}}
		}
		return nil
	}
}

// mode_override to BUFFERED on response headers: the whole response body, once.
func TestOrderingResponseModeOverrideBuffered(t *testing.T) {
	rg := requireRig(t, rigOptions{upstream: func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("content-type", "application/json")
		_, _ = io.WriteString(w, `{"ok":true}`)
	}})
	rg.proc.script = overrideOnResponseHeaders(extprocfilterv3.ProcessingMode_BUFFERED)
	resp, body := do(t, "GET", "http://"+rg.addr+"/x", "")
	if resp.StatusCode != 200 || body != `{"OK":TRUE}` || resp.ContentLength != int64(len(body)) {
		t.Fatalf("got %d %q (content-length %d)", resp.StatusCode, body, resp.ContentLength)
	}
	rg.requireMessages(t, "request_headers eos=true", "response_headers eos=false", `response_body "{\"ok\":true}" eos=true`, "<eof>")
}

// mode_override to STREAMED: one message per chunk, as the chunks arrive; the client
// reads each mutated chunk before the upstream writes the next.
func TestOrderingResponseModeOverrideStreamed(t *testing.T) {
	next := make(chan struct{})
	rg := requireRig(t, rigOptions{upstream: func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("content-type", "text/event-stream")
		for i, c := range []string{"one;", "two;", "three;"} {
			if i > 0 {
				select {
				case <-next:
				case <-time.After(5 * time.Second):
					return
				}
			}
			_, _ = io.WriteString(w, c)
			w.(http.Flusher).Flush()
		}
		// End the body only once the client read the last chunk, so that the end of
		// stream comes as its own empty message.
		select {
		case <-next:
		case <-time.After(5 * time.Second):
		}
	}})
	rg.proc.script = overrideOnResponseHeaders(extprocfilterv3.ProcessingMode_STREAMED)
	resp, err := http.Get("http://" + rg.addr + "/x")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	buf := make([]byte, 64)
	var got string
	for _, want := range []string{"ONE;", "TWO;", "THREE;"} {
		n, err := io.ReadAtLeast(resp.Body, buf, len(want))
		if err != nil {
			t.Fatalf("reading %q: %v", want, err)
		}
		if string(buf[:n]) != want {
			t.Fatalf("chunk %q, want %q", buf[:n], want)
		}
		got += want
		next <- struct{}{}
	}
	if rest, _ := io.ReadAll(resp.Body); len(rest) != 0 {
		t.Fatalf("trailing %q", rest)
	}
	rg.requireMessages(t, "request_headers eos=true", "response_headers eos=false",
		`response_body "one;" eos=false`, `response_body "two;" eos=false`, `response_body "three;" eos=false`,
		`response_body "" eos=true`, "<eof>")
}

func immediate(code typev3.StatusCode, body string) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{ImmediateResponse: &extprocv3.ImmediateResponse{
		Status:  &typev3.HttpStatus{Code: code},
		Headers: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-immediate", RawValue: []byte("1")}}}},
		Body:    []byte(body),
	}}}
}

// ordering_test.cc ImmediateResponseOnRequest: nothing reaches the upstream, the stream
// ends after the immediate response.
func TestOrderingImmediateResponseOnRequestHeaders(t *testing.T) {
	rg := requireRig(t, rigOptions{})
	rg.proc.script = func(r *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		if r.GetRequestHeaders() != nil {
			return immediate(typev3.StatusCode_Unauthorized, "go away")
		}
		return nil
	}
	resp, body := do(t, "POST", "http://"+rg.addr+"/x", "payload")
	if resp.StatusCode != 401 || body != "go away" || resp.Header.Get("x-immediate") != "1" {
		t.Fatalf("got %d %q %v", resp.StatusCode, body, resp.Header)
	}
	rg.requireMessages(t, "request_headers eos=false", "<eof>")
	requireNoHit(t, rg)
}

// ordering_test.cc ImmediateResponseOnRequestBody.
func TestOrderingImmediateResponseOnRequestBody(t *testing.T) {
	rg := requireRig(t, rigOptions{})
	rg.proc.script = func(r *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		if r.GetRequestBody() != nil {
			return immediate(typev3.StatusCode_OK, `{"jsonrpc":"2.0","error":{"code":-32001}}`)
		}
		return nil
	}
	resp, body := do(t, "POST", "http://"+rg.addr+"/x", "payload")
	if resp.StatusCode != 200 || !strings.Contains(body, "-32001") {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
	rg.requireMessages(t, "request_headers eos=false", `request_body "payload" eos=true`, "<eof>")
	requireNoHit(t, rg)
}

// Over the route's request_body_buffer_limit a BUFFERED body gets 413, after the headers
// were processed and before any body message.
func TestBufferLimit413(t *testing.T) {
	rg := requireRig(t, rigOptions{})
	resp, _ := do(t, "POST", "http://"+rg.addr+"/x", strings.Repeat("x", 65))
	if resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("got %d, want 413", resp.StatusCode)
	}
	rg.requireMessages(t, "request_headers eos=false", "<eof>")
	requireNoHit(t, rg)
}

// message_timeout: a slow processor fails the request closed with 504, not
// status_on_error (ext_proc.cc onMessageTimeout), and nothing reaches the upstream.
func TestMessageTimeoutFailsClosed(t *testing.T) {
	rg := requireRig(t, rigOptions{extProc: func(p *extprocfilterv3.ExternalProcessor) {
		p.MessageTimeout = durationpb.New(50 * time.Millisecond)
	}})
	rg.proc.delay = 300 * time.Millisecond
	resp, _ := do(t, "GET", "http://"+rg.addr+"/x", "")
	if resp.StatusCode != http.StatusGatewayTimeout {
		t.Fatalf("got %d, want 504", resp.StatusCode)
	}
	requireNoHit(t, rg)
}

// A reply that does not answer the message sent fails the request closed
// (processor_state.cc: spurious message).
func TestSpuriousReplyFailsClosed(t *testing.T) {
	rg := requireRig(t, rigOptions{})
	rg.proc.script = func(*extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		return &extprocv3.ProcessingResponse{} // no oneof: a spurious reply
	}
	resp, _ := do(t, "GET", "http://"+rg.addr+"/x", "")
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("got %d, want 503", resp.StatusCode)
	}
	requireNoHit(t, rg)
}

func requireNoHit(t *testing.T, rg *rig) {
	t.Helper()
	select {
	case r := <-rg.hits:
		t.Fatalf("the upstream was reached: %s %s", r.Method, r.URL)
	default:
	}
}
