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
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
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

// side is one direction of an ext_proc filter. Envoy keeps one processor state for
// decoding (the request) and one for encoding (the response), each with its own
// outstanding message and message timer, so that on a bidirectional stream request body
// chunks and response headers are processed concurrently on the one gRPC stream
// (source/extensions/filters/http/ext_proc/processor_state.h, DecodingProcessorState and
// EncodingProcessorState; ext_proc.cc encodeHeaders does not wait for decoding to end).
type side int

const (
	decoding side = iota
	encoding
)

var (
	// errComplete: processing ended with a local reply (an immediate response, or
	// failing closed), which the stream now owns; the caller stops.
	errComplete = errors.New("ext_proc processing complete")
	// errPassThrough: processing ended without a reply (failure_mode_allow, or the
	// processor closed its stream with OK); the request goes on unprocessed.
	errPassThrough = errors.New("ext_proc bypassed")
)

// procFilter is one ext_proc filter instance on one request: at most one gRPC stream,
// opened on the first message (source/extensions/filters/http/ext_proc/ext_proc.cc).
// Its two sides run on different goroutines once a streamed request body flows while the
// response arrives (the transport's request body writer and the handler).
type procFilter struct {
	s       *stream
	span    *span // the gRPC client's span of the stream (tracing.go)
	f       *filterCfg
	cfg     *extprocfilterv3.ExternalProcessor
	timeout time.Duration
	// failOpen is failure_mode_allow, and namespaces metadata_options
	// .forwarding_namespaces.untyped, each as the route may override it.
	failOpen   bool
	namespaces []string

	sendMu sync.Mutex // one Send at a time: both sides share the stream

	mu      sync.Mutex // guards the fields below
	mode    *extprocfilterv3.ProcessingMode
	ctx     context.Context
	cancel  context.CancelFunc
	client  extprocv3.ExternalProcessor_ProcessClient
	waiting [2]*outstanding // the message each side awaits a reply to
	// sideDone: that side sends nothing more; when both are, the stream is half-closed.
	sideDone   [2]bool
	halfClosed bool
	// complete is processing_complete_ (ext_proc.cc): nothing more goes to the
	// processor and its messages are ignored; passed tells a bypass from a local reply.
	complete, passed bool
	done             chan struct{} // closed when complete
}

type outstanding struct {
	kind string
	ch   chan *extprocv3.ProcessingResponse
}

// newProc starts the filter on the stream with its per-route configuration merged as
// Envoy merges it: from the virtual host to the route, the more specific level's
// processing_mode replaces the filter's (unless that level is disabled), as do
// failure_mode_allow and the forwarding namespaces (ext_proc.cc mergePerRouteConfig,
// FilterConfigPerRoute, mergeProcessingMode). Disabled is the most specific level's,
// applied by stream.enabled.
func (s *stream) newProc(f *filterCfg) *procFilter {
	p := &procFilter{s: s, f: f, cfg: f.proc, timeout: defaultMessageTimeout, done: make(chan struct{}),
		failOpen: f.proc.GetFailureModeAllow(), namespaces: f.proc.GetMetadataOptions().GetForwardingNamespaces().GetUntyped()}
	p.mode = &extprocfilterv3.ProcessingMode{}
	if m := f.proc.GetProcessingMode(); m != nil {
		p.mode = proto.Clone(m).(*extprocfilterv3.ProcessingMode)
	}
	for _, pr := range s.route.extProcLevels(f.name) {
		if pr.GetDisabled() {
			continue
		}
		o := pr.GetOverrides()
		if m := o.GetProcessingMode(); m != nil {
			p.mode = proto.Clone(m).(*extprocfilterv3.ProcessingMode)
		}
		if v := o.GetFailureModeAllow(); v != nil {
			p.failOpen = v.GetValue()
		}
		if ns := o.GetMetadataOptions().GetForwardingNamespaces(); ns != nil {
			p.namespaces = ns.GetUntyped()
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

func (p *procFilter) getMode() *extprocfilterv3.ProcessingMode {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mode
}

// outcome is what a caller gets once processing completed.
func (p *procFilter) outcome() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.passed {
		return errPassThrough
	}
	return errComplete
}

// exchange sends one message for a side and waits for its reply, bounded by
// message_timeout (ext_proc.cc onMessageTimeout). The error is errComplete or
// errPassThrough once processing is over, whatever ended it.
func (p *procFilter) exchange(sd side, req *extprocv3.ProcessingRequest) (*extprocv3.ProcessingResponse, error) {
	p.mu.Lock()
	if p.complete {
		p.mu.Unlock()
		return nil, p.outcome()
	}
	if p.halfClosed {
		p.mu.Unlock()
		return nil, p.fail(errors.New("ext_proc stream already closed"))
	}
	if p.client == nil {
		if err := p.openLocked(req); err != nil {
			p.mu.Unlock()
			return nil, p.fail(err)
		}
	}
	// Namespaces of dynamic metadata named by forwarding_namespaces go with every message
	// (ext_proc.cc addDynamicMetadata).
	if len(p.namespaces) > 0 {
		md := &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{}}
		for _, n := range p.namespaces {
			if v := p.s.dynMeta[n]; v != nil {
				md.FilterMetadata[n] = cloneStruct(v)
			}
		}
		req.MetadataContext = md
	}
	o := &outstanding{kind: reqKind(req), ch: make(chan *extprocv3.ProcessingResponse, 1)}
	p.waiting[sd] = o
	client := p.client
	p.mu.Unlock()

	p.sendMu.Lock()
	err := client.Send(req)
	p.sendMu.Unlock()
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, p.fail(fmt.Errorf("send %s: %w", o.kind, err))
	}
	// io.EOF: the stream has ended; how (a clean close or an error status) is for the
	// receiving side to find out, and the wait below ends with its verdict.
	t := time.NewTimer(p.timeout)
	defer t.Stop()
	select {
	case r := <-o.ch:
		return r, nil
	case <-t.C:
		return nil, p.timedOut(o.kind)
	case <-p.done:
		return nil, p.outcome()
	}
}

// openLocked opens the stream with the first message, which says which body modes it
// uses (ext_proc.cc: protocol_config is sent once per stream), and starts receiving.
func (p *procFilter) openLocked(first *extprocv3.ProcessingRequest) error {
	conn, err := p.s.e.grpcConn(p.s.c, p.cfg.GetGrpcService().GetEnvoyGrpc().GetClusterName())
	if err != nil {
		return err
	}
	p.ctx, p.cancel = context.WithCancel(p.s.r.Context())
	p.span = p.s.asyncSpan("envoy.service.ext_proc.v3.ExternalProcessor.Process", p.cfg.GetGrpcService().GetEnvoyGrpc().GetClusterName())
	c, err := extprocv3.NewExternalProcessorClient(conn).Process(p.span.inject(p.ctx))
	if err != nil {
		return err
	}
	p.client = c
	first.ProtocolConfig = &extprocv3.ProtocolConfiguration{
		RequestBodyMode:                         p.mode.GetRequestBodyMode(),
		ResponseBodyMode:                        p.mode.GetResponseBodyMode(),
		SendBodyWithoutWaitingForHeaderResponse: p.cfg.GetSendBodyWithoutWaitingForHeaderResponse(),
	}
	go p.receive(c)
	return nil
}

// receive hands each reply to the side awaiting it (ext_proc.cc onReceiveMessage): a
// reply no side awaits is spurious; an immediate response ends processing whichever side
// is waiting; after processing completed, replies are ignored.
func (p *procFilter) receive(c extprocv3.ExternalProcessor_ProcessClient) {
	for {
		r, err := c.Recv()
		if err != nil {
			p.streamEnded(err)
			return
		}
		kind := respKind(r)
		p.mu.Lock()
		if p.complete {
			p.mu.Unlock()
			continue
		}
		if ir := r.GetImmediateResponse(); ir != nil {
			p.mu.Unlock()
			p.finishWith(p.immediateReply(ir))
			continue
		}
		var target *outstanding
		for sd, o := range p.waiting {
			if o != nil && o.kind == kind {
				target, p.waiting[sd] = o, nil
			}
		}
		p.mu.Unlock()
		if target == nil {
			// processor_state.cc: a reply to no outstanding message is spurious;
			// fail closed unless failure_mode_allow (ext_proc.cc onReceiveMessage,
			// ext_proc_fail_close_spurious_resp).
			_ = p.fail(fmt.Errorf("spurious ext_proc response %s", kind))
			continue
		}
		target.ch <- r
	}
}

// streamEnded handles the end of the gRPC stream: a clean close (status OK) ends
// processing and the request goes on unprocessed (ext_proc.cc onGrpcClose,
// clearAsyncState); any other status is an error (onGrpcError).
func (p *procFilter) streamEnded(err error) {
	code := codes.OK
	if !errors.Is(err, io.EOF) {
		code = status.Code(err)
	}
	p.span.setTag("grpc.status_code", strconv.Itoa(int(code)))
	if code != codes.OK {
		p.span.setTag("error", "true")
	}
	p.span.finish()
	p.mu.Lock()
	complete := p.complete
	p.mu.Unlock()
	switch {
	case complete:
	case errors.Is(err, io.EOF):
		p.s.e.opts.Logf("envoyemu: %s ext_proc stream closed by the processor: processing ends", p.s)
		p.finishPass()
	default:
		_ = p.fail(fmt.Errorf("ext_proc stream: %w", err))
	}
}

// fail handles an error on the stream: failure_mode_allow lets the request go on without
// processing; otherwise a local reply with status_on_error, 500 by default (ext_proc.cc
// onGrpcError, handleErrorResponse). It returns what the caller gets.
func (p *procFilter) fail(err error) error {
	if p.failOpen {
		p.s.e.opts.Logf("envoyemu: %s ext_proc error (failure_mode_allow: going on): %v", p.s, err)
		p.finishPass()
		return errPassThrough
	}
	p.s.e.opts.Logf("envoyemu: %s ext_proc error: %v", p.s, err)
	code := http.StatusInternalServerError
	if c := p.cfg.GetStatusOnError().GetCode(); c != 0 {
		code = int(c)
	}
	details := "ext_proc_error"
	if st, ok := status.FromError(err); ok && st.Code() != codes.OK {
		details = fmt.Sprintf("ext_proc_error_gRPC_error_%d", st.Code())
	}
	p.finishWith(&localReply{status: code, details: details})
	return errComplete
}

// timedOut is onMessageTimeout: with failure_mode_allow processing ends and the request
// goes on; otherwise a 504 local reply, not status_on_error (ext_proc.cc onMessageTimeout:
// StatusCode::GatewayTimeout, the ext_proc_timeout_error runtime guard being on by default
// in Envoy 1.36).
func (p *procFilter) timedOut(kind string) error {
	err := fmt.Errorf("ext_proc message timeout (%s) awaiting %s", p.timeout, kind)
	if p.failOpen {
		p.s.e.opts.Logf("envoyemu: %s %v (failure_mode_allow: going on)", p.s, err)
		p.finishPass()
		return errPassThrough
	}
	p.s.e.opts.Logf("envoyemu: %s %v", p.s, err)
	p.finishWith(&localReply{status: http.StatusGatewayTimeout, details: "ext_proc_error_per-message_timeout_exceeded"})
	return errComplete
}

// finishWith completes processing with a local reply (once): the stream half-closes and
// the reply goes to the HTTP stream, which sends it or resets (sendLocalReply).
func (p *procFilter) finishWith(lr *localReply) {
	if !p.claimComplete(false) {
		return
	}
	// The reply is pending before anyone waiting on the filter wakes: the transport
	// reading a streamed body that ends here must find it, not take the cut body for an
	// upstream failure (a 503 instead of the processor's answer).
	p.s.sendLocalReply(lr)
	p.releaseComplete()
}

// finishPass completes processing without a reply.
func (p *procFilter) finishPass() { p.markComplete(true) }

func (p *procFilter) markComplete(passed bool) bool {
	if !p.claimComplete(passed) {
		return false
	}
	p.releaseComplete()
	return true
}

// claimComplete marks processing complete (once; it reports whether this call did);
// releaseComplete then wakes the waiters and half-closes the stream.
func (p *procFilter) claimComplete(passed bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.complete {
		return false
	}
	p.complete, p.passed = true, passed
	return true
}

// settle waits, if processing is complete, until the completing side has delivered its
// local reply (finishWith claims, replies, then releases).
func (p *procFilter) settle() {
	p.mu.Lock()
	complete := p.complete
	p.mu.Unlock()
	if complete {
		<-p.done
	}
}

func (p *procFilter) releaseComplete() {
	p.mu.Lock()
	defer p.mu.Unlock()
	close(p.done)
	p.halfCloseLocked()
}

// sideFinished records that a side sends nothing more; once both are done the stream is
// half-closed and the server sees end of stream (ext_proc.cc closeStream).
func (p *procFilter) sideFinished(sd side) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.sideDone[sd] = true
	if p.sideDone[decoding] && p.sideDone[encoding] {
		p.halfCloseLocked()
	}
}

func (p *procFilter) isSideDone(sd side) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sideDone[sd] || p.complete
}

func (p *procFilter) halfCloseLocked() {
	if p.halfClosed {
		return
	}
	p.halfClosed = true
	if p.client != nil {
		c := p.client
		go func() {
			p.sendMu.Lock()
			defer p.sendMu.Unlock()
			_ = c.CloseSend()
		}()
	}
}

// finish ends the filter when the request is done (ext_proc.cc onDestroy): whatever
// arrives later is ignored, the gRPC stream is cancelled, and a body still streaming
// (the transport may still read the request's) stops rather than going on unprocessed.
func (p *procFilter) finish() {
	// A stream still open is closed by the filter: its span ends canceled
	// (async_client_impl.cc closeStream).
	p.span.setTag("status", "canceled")
	p.span.finish()
	p.markComplete(false)
	p.mu.Lock()
	cancel := p.cancel
	p.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// immediateReply turns an ImmediateResponse into a local reply: its status (200 when
// unset or invalid), header mutations, body and grpc_status (ext_proc.cc
// sendImmediateResponse; the gRPC status is used when the request is gRPC).
func (p *procFilter) immediateReply(ir *extprocv3.ImmediateResponse) *localReply {
	lr := &localReply{status: http.StatusOK, h: &headerMap{}, body: ir.GetBody(), details: ir.GetDetails()}
	if c := int(ir.GetStatus().GetCode()); c >= 200 && c < 600 { // MutationUtils::isValidHttpStatus
		lr.status = c
	}
	if gs := ir.GetGrpcStatus(); gs != nil {
		code := gs.GetStatus()
		lr.grpcStatus = &code
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

// override applies mode_override from a headers reply when allow_mode_override is set
// and the mode is one of allowed_override_modes (if any, compared without
// request_header_mode); it replaces the mode of both sides for the rest of the stream.
// DEFAULT header and trailer modes in the override leave the current ones
// (ext_proc.cc onReceiveMessage, effectiveModeOverride).
func (p *procFilter) override(r *extprocv3.ProcessingResponse) {
	mo := r.GetModeOverride()
	if mo == nil || !p.cfg.GetAllowModeOverride() || p.cfg.GetSendBodyWithoutWaitingForHeaderResponse() {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	eff := proto.Clone(p.mode).(*extprocfilterv3.ProcessingMode)
	if mo.GetRequestHeaderMode() != extprocfilterv3.ProcessingMode_DEFAULT {
		eff.RequestHeaderMode = mo.GetRequestHeaderMode()
	}
	if mo.GetResponseHeaderMode() != extprocfilterv3.ProcessingMode_DEFAULT {
		eff.ResponseHeaderMode = mo.GetResponseHeaderMode()
	}
	if mo.GetRequestTrailerMode() != extprocfilterv3.ProcessingMode_DEFAULT {
		eff.RequestTrailerMode = mo.GetRequestTrailerMode()
	}
	if mo.GetResponseTrailerMode() != extprocfilterv3.ProcessingMode_DEFAULT {
		eff.ResponseTrailerMode = mo.GetResponseTrailerMode()
	}
	eff.RequestBodyMode, eff.ResponseBodyMode = mo.GetRequestBodyMode(), mo.GetResponseBodyMode()
	if allowed := p.cfg.GetAllowedOverrideModes(); len(allowed) > 0 {
		ok := false
		for _, a := range allowed {
			ok = ok || (a.GetRequestBodyMode() == eff.GetRequestBodyMode() && a.GetRequestTrailerMode() == eff.GetRequestTrailerMode() &&
				a.GetResponseHeaderMode() == eff.GetResponseHeaderMode() && a.GetResponseBodyMode() == eff.GetResponseBodyMode() &&
				a.GetResponseTrailerMode() == eff.GetResponseTrailerMode())
		}
		if !ok {
			return
		}
	}
	p.mode = eff
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

// hasTrailers reports whether a body ended with trailers (known once it was read to
// its end).
func hasTrailers(t func() http.Header) bool {
	if t == nil {
		return false
	}
	for _, vs := range t() {
		if len(vs) > 0 {
			return true
		}
	}
	return false
}

// decode is the filter's decodeHeaders and decodeData: request headers, then the request
// body per request_body_mode. Envoy sends each phase only after the reply to the previous
// one (processor_state.cc; test/extensions/filters/http/ext_proc/ordering_test.cc). A
// local reply it causes is left with the stream (stream.sendLocalReply).
func (p *procFilter) decode() {
	s := p.s
	hasBody := s.body != nil
	if p.getMode().GetRequestHeaderMode() != modeSkip { // DEFAULT means SEND
		r, err := p.exchange(decoding, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{
			RequestHeaders: &extprocv3.HttpHeaders{Headers: protoHeaders(s.req), EndOfStream: !hasBody}}})
		if err != nil {
			return // a local reply, or processing bypassed for the rest of the request
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
	mode := p.getMode()
	if mode.GetResponseHeaderMode() == modeSkip && mode.GetResponseBodyMode() == modeNone {
		p.sideFinished(encoding) // nothing to ask about the response
	}
	if hasBody {
		switch mode.GetRequestBodyMode() {
		case modeBuffered:
			// The whole body, end_of_stream true unless trailers end it; over the buffer
			// limit the request gets 413 (source/common/http/filter_manager.cc
			// requestDataTooLarge).
			data, err := readLimited(s.body, s.bufferLimit())
			if errors.Is(err, errTooLarge) {
				p.finishWith(&localReply{status: http.StatusRequestEntityTooLarge, body: []byte("Payload Too Large"), details: "request_payload_too_large"})
				return
			}
			if err != nil {
				p.finishWith(&localReply{status: http.StatusBadRequest, details: "downstream_read_error"})
				return
			}
			r, err := p.exchange(decoding, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
				RequestBody: &extprocv3.HttpBody{Body: data, EndOfStream: !hasTrailers(s.requestTrailers)}}})
			switch {
			case errors.Is(err, errPassThrough):
			case err != nil:
				return
			default:
				c := r.GetRequestBody().GetResponse()
				applyHeaderMutation(c.GetHeaderMutation(), s.req)
				data = bodyMutation(c.GetBodyMutation(), data)
			}
			// The buffered body goes upstream with its actual length.
			s.body, s.buffered, s.isBuffered = nil, data, true
			s.req.set("content-length", strconv.Itoa(len(data)))
		case modeStreamed:
			// Chunks go to the processor as they arrive and upstream as it answers each
			// (the request headers went upstream already); the length may change, so the
			// body goes upstream without content-length (ext_proc.cc onData, STREAMED;
			// processor_state.cc handleBodyResponse).
			s.body = &procBody{p: p, src: s.body, side: decoding, trailers: s.requestTrailers}
			s.req.del("content-length")
			return
		}
	}
	p.sideFinished(decoding)
}

// encode is encodeHeaders and encodeData: response headers, then the response body per
// response_body_mode, as possibly overridden by the response headers reply. It returns
// nil when processing ended with a local reply (the stream has it).
func (p *procFilter) encode(resp *response) *response {
	if p.isSideDone(encoding) {
		return resp
	}
	discard := func() {
		if c, ok := resp.body.(io.Closer); ok {
			_ = c.Close()
		}
	}
	if p.getMode().GetResponseHeaderMode() != modeSkip {
		h := &headerMap{h: append([]kv{{":status", strconv.Itoa(resp.status)}}, resp.h.h...)}
		r, err := p.exchange(encoding, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
			ResponseHeaders: &extprocv3.HttpHeaders{Headers: protoHeaders(h), EndOfStream: resp.body == nil}}})
		switch {
		case errors.Is(err, errPassThrough):
			return resp
		case err != nil:
			discard()
			return nil
		}
		c := r.GetResponseHeaders().GetResponse()
		applyHeaderMutation(c.GetHeaderMutation(), resp.h)
		p.override(r)
		if c.GetStatus() == extprocv3.CommonResponse_CONTINUE_AND_REPLACE {
			discard()
			b := bodyMutation(c.GetBodyMutation(), nil)
			resp.body, resp.length, resp.trailers = bytes.NewReader(b), int64(len(b)), nil
			resp.h.set("content-length", strconv.Itoa(len(b)))
			p.sideFinished(encoding)
			return resp
		}
	}
	if resp.body != nil {
		switch p.getMode().GetResponseBodyMode() {
		case modeBuffered:
			// Over the buffer limit a buffered response becomes a 500 local reply
			// (filter_manager.cc responseDataTooLarge, headers not yet sent).
			data, err := readLimited(resp.body, uint64(p.s.l.bufferLimit))
			trailed := hasTrailers(resp.trailers)
			discard()
			if err != nil {
				p.finishWith(&localReply{status: http.StatusInternalServerError, body: []byte("Internal Server Error"), details: "response_payload_too_large"})
				return nil
			}
			r, err := p.exchange(encoding, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{
				ResponseBody: &extprocv3.HttpBody{Body: data, EndOfStream: !trailed}}})
			switch {
			case errors.Is(err, errPassThrough):
			case err != nil:
				return nil
			default:
				c := r.GetResponseBody().GetResponse()
				applyHeaderMutation(c.GetHeaderMutation(), resp.h)
				data = bodyMutation(c.GetBodyMutation(), data)
			}
			resp.body, resp.length = bytes.NewReader(data), int64(len(data))
			resp.h.set("content-length", strconv.Itoa(len(data)))
		case modeStreamed:
			// Headers go downstream now; chunks follow as the processor answers them,
			// so the length is unknown (ext_proc.cc encodeData, STREAMED).
			resp.body, resp.length = &procBody{p: p, src: resp.body, side: encoding, trailers: resp.trailers}, -1
			resp.h.del("content-length")
			return resp
		}
	}
	p.sideFinished(encoding)
	return resp
}

// procBody sends a body to the processor chunk by chunk (STREAMED) and yields the
// mutated chunks. An empty chunk with end_of_stream true ends a body whose last data did
// not carry it; a body ended by trailers gets no such chunk, as trailers (skipped by
// trailer mode SKIP) end the stream instead (ext_proc.cc onData, onTrailers).
type procBody struct {
	p        *procFilter
	src      io.Reader
	side     side
	trailers func() http.Header
	buf      []byte
	out      []byte
	eos      bool
	err      error
}

func (b *procBody) Read(dst []byte) (int, error) {
	for spins := 0; len(b.out) == 0; spins++ {
		switch {
		case b.err != nil:
			return 0, b.err
		case b.eos:
			return 0, io.EOF
		case spins > 1000:
			return 0, io.ErrNoProgress
		}
		if b.buf == nil {
			b.buf = make([]byte, 32<<10)
		}
		n, err := b.src.Read(b.buf)
		eof := errors.Is(err, io.EOF)
		if err != nil && !eof {
			b.err = err
			return 0, err
		}
		if n == 0 && !eof {
			continue
		}
		end := eof && !hasTrailers(b.trailers)
		if eof && n == 0 && !end {
			b.eos = true
			b.p.sideFinished(b.side)
			continue
		}
		out, err := b.p.streamChunk(b.side, bytes.Clone(b.buf[:n]), end)
		if err != nil {
			b.err = err
			return 0, err
		}
		b.out, b.eos = out, eof
		if eof && !end {
			b.p.sideFinished(b.side)
		}
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

// errStreamAborted is what a streamed body's reader returns once processing ended with a
// local reply: the upstream request is reset (router.cc onDestroy → upstream reset).
var errStreamAborted = errors.New("ext_proc ended the stream")

func (p *procFilter) streamChunk(sd side, chunk []byte, eos bool) ([]byte, error) {
	// The mode is read per chunk: a mode_override on the response headers replaces both
	// sides' modes, and a request body mode of NONE from then on lets the rest of a
	// streaming request through unprocessed (ext_proc.cc onReceiveMessage sets the mode
	// of decoding_state_ and encoding_state_; onData switches on state.bodyMode(), NONE
	// continuing).
	mode := p.getMode().GetResponseBodyMode()
	if sd == decoding {
		mode = p.getMode().GetRequestBodyMode()
	}
	if mode == modeNone {
		if eos {
			p.sideFinished(sd)
		}
		return chunk, nil
	}
	body := &extprocv3.HttpBody{Body: chunk, EndOfStream: eos}
	req := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: body}}
	if sd == decoding {
		req = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: body}}
	}
	r, err := p.exchange(sd, req)
	switch {
	case errors.Is(err, errPassThrough):
		return chunk, nil
	case err != nil:
		return nil, errStreamAborted
	}
	c := r.GetResponseBody().GetResponse()
	if sd == decoding {
		c = r.GetRequestBody().GetResponse()
	}
	// Header mutations in a STREAMED body reply are not applied: the headers went on
	// with the headers reply (processor_state.cc handleHeadersResponse clears headers_).
	// The body mutation replaces or clears this chunk only (handleBodyResponse).
	out := bodyMutation(c.GetBodyMutation(), chunk)
	if eos {
		p.sideFinished(sd)
	}
	return out, nil
}
