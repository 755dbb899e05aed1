package envoyemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

// defaultMessageTimeout bounds each ext_proc exchange when message_timeout is unset
// (api/envoy/extensions/filters/http/ext_proc/v3/ext_proc.proto: 200ms).
const defaultMessageTimeout = 200 * time.Millisecond

// ext_proc processing mode values, shortened.
const (
	modeSend     = extprocfilterv3.ProcessingMode_SEND
	modeSkip     = extprocfilterv3.ProcessingMode_SKIP
	modeNone     = extprocfilterv3.ProcessingMode_NONE
	modeBuffered = extprocfilterv3.ProcessingMode_BUFFERED
	modeStreamed = extprocfilterv3.ProcessingMode_STREAMED
)

var errImmediate = errors.New("ext_proc sent an immediate response")

// procFilter is one ext_proc filter instance on one request: at most one gRPC stream,
// opened on the first message (source/extensions/filters/http/ext_proc/ext_proc.cc).
type procFilter struct {
	s       *stream
	f       *filterCfg
	cfg     *extprocfilterv3.ExternalProcessor
	mode    *extprocfilterv3.ProcessingMode
	timeout time.Duration

	ctx     context.Context
	cancel  context.CancelFunc
	client  extprocv3.ExternalProcessor_ProcessClient
	replies chan procReply
	sent    int
	closed  bool
	// failed is set when an error was let through by failure_mode_allow: the filter
	// does nothing more on this request.
	failed bool
	// immediate is an immediate response (or fail-closed reply) that arrived while a
	// body was streaming upstream.
	immediate *localReply
	mu        sync.Mutex
}

type procReply struct {
	r   *extprocv3.ProcessingResponse
	err error
}

func (s *stream) newProc(f *filterCfg) *procFilter {
	p := &procFilter{s: s, f: f, cfg: f.proc, timeout: defaultMessageTimeout}
	p.mode = &extprocfilterv3.ProcessingMode{}
	if m := f.proc.GetProcessingMode(); m != nil {
		p.mode = proto.Clone(m).(*extprocfilterv3.ProcessingMode)
	}
	if s.route != nil {
		// A route's ExtProcPerRoute may replace the processing mode
		// (ext_proc.cc FilterConfigPerRoute, mergePerRouteConfig).
		if pr, ok := s.route.perFilter[f.name].(*extprocfilterv3.ExtProcPerRoute); ok {
			if m := pr.GetOverrides().GetProcessingMode(); m != nil {
				p.mode = proto.Clone(m).(*extprocfilterv3.ProcessingMode)
			}
		}
	}
	if t := f.proc.GetMessageTimeout(); t != nil {
		p.timeout = t.AsDuration()
	}
	return p
}

// kind names a ProcessingRequest/Response oneof, to detect replies out of order.
func reqKind(r *extprocv3.ProcessingRequest) string {
	switch r.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		return "request_headers"
	case *extprocv3.ProcessingRequest_RequestBody:
		return "request_body"
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		return "response_headers"
	case *extprocv3.ProcessingRequest_ResponseBody:
		return "response_body"
	}
	return "?"
}

func respKind(r *extprocv3.ProcessingResponse) string {
	switch r.GetResponse().(type) {
	case *extprocv3.ProcessingResponse_RequestHeaders:
		return "request_headers"
	case *extprocv3.ProcessingResponse_RequestBody:
		return "request_body"
	case *extprocv3.ProcessingResponse_ResponseHeaders:
		return "response_headers"
	case *extprocv3.ProcessingResponse_ResponseBody:
		return "response_body"
	case *extprocv3.ProcessingResponse_ImmediateResponse:
		return "immediate_response"
	}
	return fmt.Sprintf("%T", r.GetResponse())
}

// exchange sends one message and waits for its reply, bounded by message_timeout
// (ext_proc.cc onMessageTimeout). A reply of another kind is a protocol error
// (processor_state.cc: "spurious response message").
func (p *procFilter) exchange(req *extprocv3.ProcessingRequest) (*extprocv3.ProcessingResponse, error) {
	if p.closed {
		return nil, errors.New("ext_proc stream already closed")
	}
	if p.client == nil {
		conn, err := p.s.e.grpcConn(p.s.c, p.cfg.GetGrpcService().GetEnvoyGrpc().GetClusterName())
		if err != nil {
			return nil, err
		}
		p.ctx, p.cancel = context.WithCancel(p.s.r.Context())
		p.client, err = extprocv3.NewExternalProcessorClient(conn).Process(p.ctx)
		if err != nil {
			return nil, err
		}
		p.replies = make(chan procReply, 1)
		go func(c extprocv3.ExternalProcessor_ProcessClient, ctx context.Context) {
			for {
				r, err := c.Recv()
				select {
				case p.replies <- procReply{r, err}:
				case <-ctx.Done():
					return
				}
				if err != nil {
					return
				}
			}
		}(p.client, p.ctx)
		// The first message says which body modes this stream uses
		// (ext_proc.cc: protocol_config is sent once per stream).
		req.ProtocolConfig = &extprocv3.ProtocolConfiguration{
			RequestBodyMode:                         p.mode.GetRequestBodyMode(),
			ResponseBodyMode:                        p.mode.GetResponseBodyMode(),
			SendBodyWithoutWaitingForHeaderResponse: p.cfg.GetSendBodyWithoutWaitingForHeaderResponse(),
		}
	}
	// Namespaces of dynamic metadata named by forwarding_namespaces go with every message
	// (ext_proc.cc addDynamicMetadata).
	if ns := p.cfg.GetMetadataOptions().GetForwardingNamespaces().GetUntyped(); len(ns) > 0 {
		md := &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{}}
		for _, n := range ns {
			if v := p.s.dynMeta[n]; v != nil {
				md.FilterMetadata[n] = cloneStruct(v)
			}
		}
		req.MetadataContext = md
	}
	p.sent++
	if err := p.client.Send(req); err != nil {
		return nil, fmt.Errorf("send %s: %w", reqKind(req), err)
	}
	t := time.NewTimer(p.timeout)
	defer t.Stop()
	select {
	case r := <-p.replies:
		if r.err != nil {
			return nil, fmt.Errorf("ext_proc stream ended awaiting %s: %w", reqKind(req), r.err)
		}
		if k := respKind(r.r); k != reqKind(req) && k != "immediate_response" {
			return nil, fmt.Errorf("spurious ext_proc response %s to %s", k, reqKind(req))
		}
		return r.r, nil
	case <-t.C:
		return nil, fmt.Errorf("ext_proc message timeout (%s) awaiting %s", p.timeout, reqKind(req))
	case <-p.ctx.Done():
		return nil, p.ctx.Err()
	}
}

// close half-closes the stream once no more replies are expected (ext_proc.cc
// closeStream); the server sees end of stream.
func (p *procFilter) close() {
	if p.closed {
		return
	}
	p.closed = true
	if p.client != nil {
		_ = p.client.CloseSend()
	}
}

// finish ends the stream's gRPC context when the request is done (ext_proc.cc onDestroy).
func (p *procFilter) finish() {
	p.close()
	if p.cancel != nil {
		p.cancel()
	}
}

// fail handles an error on the stream: failure_mode_allow lets the request go on without
// processing; otherwise a local reply with status_on_error, 500 by default
// (ext_proc.cc onGrpcError, onMessageTimeout).
func (p *procFilter) fail(err error) *localReply {
	p.s.e.opts.Logf("envoyemu: %s ext_proc error: %v", p.s, err)
	p.close()
	if p.cfg.GetFailureModeAllow() {
		p.failed = true
		return nil
	}
	code := http.StatusInternalServerError
	if c := p.cfg.GetStatusOnError().GetCode(); c != 0 {
		code = int(c)
	}
	return &localReply{status: code, details: "ext_proc_error"}
}

// immediateReply turns an ImmediateResponse into a local reply: its status (200 when
// unset), header mutations and body (ext_proc.cc sendImmediateResponse).
func (p *procFilter) immediateReply(ir *extprocv3.ImmediateResponse) *localReply {
	p.close()
	lr := &localReply{status: http.StatusOK, h: &headerMap{}, body: ir.GetBody(), details: ir.GetDetails()}
	if c := ir.GetStatus().GetCode(); c != 0 {
		lr.status = int(c)
	}
	applyHeaderMutation(ir.GetHeaders(), lr.h)
	return lr
}

// applyHeaderMutation applies set_headers then remove_headers; pseudo-headers and host
// are not modifiable (source/extensions/filters/http/ext_proc/mutation_utils.cc).
func applyHeaderMutation(m *extprocv3.HeaderMutation, h *headerMap) {
	for _, o := range m.GetSetHeaders() {
		if modifiable(o.GetHeader().GetKey()) {
			h.apply(o)
		}
	}
	for _, k := range m.GetRemoveHeaders() {
		if modifiable(k) {
			h.del(k)
		}
	}
}

// bodyMutation applies a BodyMutation to data (mutation_utils.cc applyBodyMutations).
func bodyMutation(m *extprocv3.BodyMutation, data []byte) []byte {
	switch {
	case m == nil:
		return data
	case m.GetClearBody():
		return nil
	default:
		if b, ok := m.GetMutation().(*extprocv3.BodyMutation_Body); ok {
			return b.Body
		}
	}
	return data
}

// override applies mode_override when allow_mode_override is set and the mode is one of
// allowed_override_modes (if any); it replaces the mode for the rest of the stream
// (ext_proc.cc onReceiveMessage, mode_override).
func (p *procFilter) override(r *extprocv3.ProcessingResponse) {
	mo := r.GetModeOverride()
	if mo == nil || !p.cfg.GetAllowModeOverride() {
		return
	}
	if allowed := p.cfg.GetAllowedOverrideModes(); len(allowed) > 0 {
		ok := false
		for _, a := range allowed {
			ok = ok || proto.Equal(a, mo)
		}
		if !ok {
			return
		}
	}
	p.mode = proto.Clone(mo).(*extprocfilterv3.ProcessingMode)
}

func protoHeaders(h *headerMap) *corev3.HeaderMap {
	out := &corev3.HeaderMap{}
	for _, e := range h.h {
		out.Headers = append(out.Headers, &corev3.HeaderValue{Key: e.k, RawValue: []byte(e.v)})
	}
	return out
}

// bufferLimit is the route's request_body_buffer_limit, else its per_request_buffer_limit
// _bytes, else the listener's per_connection_buffer_limit_bytes
// (api/envoy/config/route/v3/route_components.proto).
func (s *stream) bufferLimit() uint64 {
	if s.route != nil {
		if v := s.route.r.GetRequestBodyBufferLimit(); v != nil {
			return v.GetValue()
		}
		//lint:ignore SA1019 Envoy still honours the deprecated per-route buffer limit, so must we
		if v := s.route.r.GetPerRequestBufferLimitBytes(); v != nil {
			return uint64(v.GetValue())
		}
	}
	return s.l.bufferLimit
}

var errTooLarge = errors.New("body over the buffer limit")

func readLimited(r io.Reader, limit uint64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, int64(limit)+1))
	if err != nil {
		return nil, err
	}
	if uint64(len(b)) > limit {
		return nil, errTooLarge
	}
	return b, nil
}

// decode is the filter's decodeHeaders and decodeData: request headers, then the request
// body per request_body_mode. Envoy sends each phase only after the reply to the previous
// one (processor_state.cc; test/extensions/filters/http/ext_proc/ordering_test.cc).
func (p *procFilter) decode() *localReply {
	s := p.s
	hasBody := s.body != nil
	if p.mode.GetRequestHeaderMode() != modeSkip { // DEFAULT means SEND
		r, err := p.exchange(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{
			RequestHeaders: &extprocv3.HttpHeaders{Headers: protoHeaders(s.req), EndOfStream: !hasBody}}})
		if err != nil {
			return p.fail(err)
		}
		if ir := r.GetImmediateResponse(); ir != nil {
			return p.immediateReply(ir)
		}
		c := r.GetRequestHeaders().GetResponse()
		applyHeaderMutation(c.GetHeaderMutation(), s.req)
		s.clearRoute = s.clearRoute || c.GetClearRouteCache()
		p.override(r)
		if c.GetStatus() == extprocv3.CommonResponse_CONTINUE_AND_REPLACE {
			// The headers response carries the whole body; no body message is sent
			// (ext_proc.cc handleHeadersResponse, CONTINUE_AND_REPLACE).
			b := bodyMutation(c.GetBodyMutation(), nil)
			s.body, s.buffered, s.isBuffered = nil, b, true
			s.req.set("content-length", strconv.Itoa(len(b)))
			hasBody = false
		}
	}
	if hasBody {
		switch p.mode.GetRequestBodyMode() {
		case modeBuffered:
			// The whole body, end_of_stream true; over the buffer limit the request gets
			// 413 (source/common/http/filter_manager.cc requestDataTooLarge).
			data, err := readLimited(s.body, s.bufferLimit())
			if errors.Is(err, errTooLarge) {
				p.close()
				return &localReply{status: http.StatusRequestEntityTooLarge, body: []byte("Payload Too Large"), details: "request_payload_too_large"}
			}
			if err != nil {
				p.close()
				return &localReply{status: http.StatusBadRequest, details: "downstream_read_error"}
			}
			r, err := p.exchange(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
				RequestBody: &extprocv3.HttpBody{Body: data, EndOfStream: true}}})
			if err != nil {
				if lr := p.fail(err); lr != nil {
					return lr
				}
			} else if ir := r.GetImmediateResponse(); ir != nil {
				return p.immediateReply(ir)
			} else {
				c := r.GetRequestBody().GetResponse()
				applyHeaderMutation(c.GetHeaderMutation(), s.req)
				data = bodyMutation(c.GetBodyMutation(), data)
			}
			// The buffered body goes upstream with its actual length.
			s.body, s.buffered, s.isBuffered = nil, data, true
			s.req.set("content-length", strconv.Itoa(len(data)))
		case modeStreamed:
			// Chunks go to the processor as they arrive; the length may change, so the
			// body goes upstream chunked.
			s.body = &procBody{p: p, src: s.body, request: true}
			s.req.del("content-length")
		}
	}
	if p.mode.GetResponseHeaderMode() == modeSkip && p.mode.GetResponseBodyMode() == modeNone && !p.streamingRequest() {
		p.close() // nothing more to ask
	}
	return nil
}

func (p *procFilter) streamingRequest() bool {
	_, ok := p.s.body.(*procBody)
	return ok && p.s.body.(*procBody).p == p
}

// encode is encodeHeaders and encodeData: response headers, then the response body per
// response_body_mode, as possibly overridden by the response headers reply.
func (p *procFilter) encode(resp *response) (*response, *localReply) {
	if p.closed || p.failed {
		return resp, nil
	}
	discard := func() {
		if c, ok := resp.body.(io.Closer); ok {
			_ = c.Close()
		}
	}
	if p.mode.GetResponseHeaderMode() != modeSkip {
		h := &headerMap{h: append([]kv{{":status", strconv.Itoa(resp.status)}}, resp.h.h...)}
		r, err := p.exchange(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
			ResponseHeaders: &extprocv3.HttpHeaders{Headers: protoHeaders(h), EndOfStream: resp.body == nil}}})
		if err != nil {
			if lr := p.fail(err); lr != nil {
				discard()
				return nil, lr
			}
			return resp, nil
		}
		if ir := r.GetImmediateResponse(); ir != nil {
			discard()
			return nil, p.immediateReply(ir)
		}
		c := r.GetResponseHeaders().GetResponse()
		applyHeaderMutation(c.GetHeaderMutation(), resp.h)
		p.override(r)
		if c.GetStatus() == extprocv3.CommonResponse_CONTINUE_AND_REPLACE {
			discard()
			b := bodyMutation(c.GetBodyMutation(), nil)
			resp.body, resp.length = bytes.NewReader(b), int64(len(b))
			resp.h.set("content-length", strconv.Itoa(len(b)))
			p.close()
			return resp, nil
		}
	}
	if resp.body != nil {
		switch p.mode.GetResponseBodyMode() {
		case modeBuffered:
			// Over the buffer limit a buffered response becomes a 500 local reply
			// (filter_manager.cc responseDataTooLarge, headers not yet sent).
			data, err := readLimited(resp.body, uint64(p.s.l.bufferLimit))
			discard()
			if err != nil {
				p.close()
				return nil, &localReply{status: http.StatusInternalServerError, body: []byte("Internal Server Error"), details: "response_payload_too_large"}
			}
			r, err := p.exchange(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{
				ResponseBody: &extprocv3.HttpBody{Body: data, EndOfStream: true}}})
			if err != nil {
				if lr := p.fail(err); lr != nil {
					return nil, lr
				}
			} else if ir := r.GetImmediateResponse(); ir != nil {
				return nil, p.immediateReply(ir)
			} else {
				c := r.GetResponseBody().GetResponse()
				applyHeaderMutation(c.GetHeaderMutation(), resp.h)
				data = bodyMutation(c.GetBodyMutation(), data)
			}
			resp.body, resp.length = bytes.NewReader(data), int64(len(data))
			resp.h.set("content-length", strconv.Itoa(len(data)))
		case modeStreamed:
			// Headers go downstream now; chunks follow as the processor answers them,
			// so the length is unknown (ext_proc.cc encodeData, STREAMED).
			resp.body, resp.length = &procBody{p: p, src: resp.body}, -1
			resp.h.del("content-length")
			return resp, nil
		}
	}
	p.close()
	return resp, nil
}

// procBody sends a body to the processor chunk by chunk (STREAMED) and yields the
// mutated chunks; an empty chunk with end_of_stream true ends a body whose last data
// did not carry it (ext_proc.cc encodeData/decodeData with end_stream).
type procBody struct {
	p       *procFilter
	src     io.Reader
	request bool
	buf     []byte
	out     []byte
	eos     bool
}

func (b *procBody) Read(dst []byte) (int, error) {
	for spins := 0; len(b.out) == 0; spins++ {
		if b.eos {
			return 0, io.EOF
		}
		if spins > 1000 {
			return 0, io.ErrNoProgress
		}
		if b.buf == nil {
			b.buf = make([]byte, 32<<10)
		}
		n, err := b.src.Read(b.buf)
		eof := errors.Is(err, io.EOF)
		if err != nil && !eof {
			return 0, err
		}
		if n == 0 && !eof {
			continue
		}
		chunk := bytes.Clone(b.buf[:n])
		out, err := b.p.streamChunk(chunk, eof, b.request)
		if err != nil {
			return 0, err
		}
		b.out, b.eos = out, eof
	}
	n := copy(dst, b.out)
	b.out = b.out[n:]
	return n, nil
}

func (b *procBody) Close() error {
	if c, ok := b.src.(io.Closer); ok {
		return c.Close()
	}
	return nil
}

func (p *procFilter) streamChunk(chunk []byte, eos, request bool) ([]byte, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.failed || p.closed {
		return chunk, nil
	}
	body := &extprocv3.HttpBody{Body: chunk, EndOfStream: eos}
	req := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: body}}
	if request {
		req = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: body}}
	}
	r, err := p.exchange(req)
	if err != nil {
		if lr := p.fail(err); lr != nil {
			p.immediate = lr
			return nil, err
		}
		return chunk, nil
	}
	if ir := r.GetImmediateResponse(); ir != nil {
		// After the response headers went downstream an immediate response can only
		// reset the stream (ext_proc.cc sendImmediateResponse when headers were sent).
		p.immediate = p.immediateReply(ir)
		return nil, errImmediate
	}
	c := r.GetResponseBody().GetResponse()
	if request {
		c = r.GetRequestBody().GetResponse()
	}
	out := bodyMutation(c.GetBodyMutation(), chunk)
	if eos {
		p.close()
	}
	return out, nil
}
