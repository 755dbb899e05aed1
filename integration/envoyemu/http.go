package envoyemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/structpb"
)

// defaultRouteTimeout applies when a route sets no timeout
// (api/envoy/config/route/v3/route_components.proto RouteAction.timeout: 15s).
const defaultRouteTimeout = 15 * time.Second

// stream is one downstream request going through a listener's HTTP filter chain
// (source/common/http/filter_manager.cc: decoder filters in order, then the router,
// then encoder filters in reverse order).
type stream struct {
	e  *Emulator
	c  *config
	l  *listenerCfg
	id uint64
	r  *http.Request

	req        *headerMap // request headers, pseudo-headers included
	route      *routeEntry
	clearRoute bool
	body       io.Reader // request body still to forward (nil: none)
	buffered   []byte    // the whole request body once a filter buffered it
	isBuffered bool
	// isGRPC: the request as received is gRPC, so local replies are gRPC trailers-only
	// responses (filter_manager.cc decodeHeaders: is_grpc_request_ from
	// Grpc::Common::isGrpcRequestHeaders).
	isGRPC bool
	// dynMeta is the stream's dynamic metadata by filter namespace (StreamInfo).
	dynMeta map[string]*structpb.Struct
	// respAdd are response headers ext_authz asked for (OkHttpResponse.response_headers_to_add).
	respAdd []*corev3.HeaderValueOption
	procs   []*procFilter // ext_proc filters that took part in decoding
	cors    *corsState    // set when the CORS filter took a request as a CORS request

	// The response state, shared with the goroutine that streams the request body
	// upstream (a streamed body's processor may end the stream at any time).
	mu       sync.Mutex
	pending  *localReply        // a local reply to send instead of the response
	sent     bool               // response headers went downstream
	reset    bool               // the stream is to be reset
	ended    bool               // the handler returned
	cancelUp context.CancelFunc // resets the upstream request
	upBody   io.Closer          // the upstream response body, once its headers came
	idle     *time.Timer        // the route's idle_timeout, reset on stream activity
	idleFor  time.Duration
	// reqEnded: the downstream request body was read to its end (remote decode complete).
	reqEnded bool

	span   *span // the HCM's span of the request; nil: not traced (tracing.go)
	status int   // the response status sent downstream
}

// startIdle arms the route's idle_timeout: each request or response headers or data
// event on the stream resets it; when it fires the stream ends with a local reply,
// "stream timeout", 408 while the request is still arriving, 504 once it is complete
// (source/common/http/conn_manager_impl.cc onIdleTimeout, Utility::maybeRequestTimeoutCode),
// or a reset once response headers went downstream (sendLocalReply).
// api/envoy/config/route/v3/route_components.proto RouteAction.idle_timeout.
func (s *stream) startIdle(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.idleFor = d
	s.idle = time.AfterFunc(d, func() {
		s.mu.Lock()
		code := http.StatusRequestTimeout
		if s.reqEnded {
			code = http.StatusGatewayTimeout
		}
		s.mu.Unlock()
		s.e.opts.Logf("envoyemu: %s idle for %s", s, d)
		s.sendLocalReply(&localReply{status: code, body: []byte("stream timeout"), details: "stream_idle_timeout"})
	})
}

// touch records activity on the stream (ActiveStream::resetIdleTimer).
func (s *stream) touch() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.idle != nil && !s.ended {
		s.idle.Reset(s.idleFor)
	}
}

// downstreamBody is the downstream request body: reading it is stream activity, and its
// end is the end of the request.
type downstreamBody struct {
	s *stream
	r io.ReadCloser
}

func (b *downstreamBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if n > 0 || err != nil {
		b.s.touch()
	}
	if errors.Is(err, io.EOF) {
		b.s.mu.Lock()
		b.s.reqEnded = true
		b.s.mu.Unlock()
	}
	return n, err
}

func (b *downstreamBody) Close() error { return b.r.Close() }

// requestTrailers are the downstream request's trailers (complete once its body was
// read to the end; Go's server keeps those the request declared).
func (s *stream) requestTrailers() http.Header { return s.r.Trailer }

// sendLocalReply is DownstreamFilterManager::sendLocalReply for a reply that arises off
// the handler's straight path (a processor answering a streamed body chunk, a processor
// failing): while no response headers went downstream the reply replaces the response
// (through the filter chain, or straight to the codec when the upstream's headers are in
// the chain already: both leave the encoder filters out here); once they went, all that
// is left is to reset the stream ("Resetting stream due to ... Prior headers have
// already been sent"). Either way the upstream request is reset (the router's
// onDestroy). Only the first reply counts.
func (s *stream) sendLocalReply(lr *localReply) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended || s.reset || s.pending != nil {
		return
	}
	if s.sent {
		s.e.opts.Logf("envoyemu: %s reset (%s): prior headers have already been sent", s, lr.details)
		s.reset = true
	} else {
		s.pending = lr
	}
	// Reset the upstream request, and unblock whoever waits on it: the handler reading
	// the upstream's body, the transport reading the downstream's (the HTTP/2 transport
	// does not watch the request's context while it waits for request body data).
	if s.cancelUp != nil {
		s.cancelUp()
	}
	if s.upBody != nil {
		go s.upBody.Close()
	}
	if s.r.Body != nil {
		go s.r.Body.Close()
	}
}

func (s *stream) hasLocalReply() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pending != nil || s.reset
}

// response is what travels through the encoder filters to the client.
type response struct {
	status int
	h      *headerMap // without :status
	body   io.Reader  // nil: no body
	length int64      // -1: unknown
	// trailers, if set, are the trailers that ended the body, known once it was read to
	// its end (HTTP/2 trailers: grpc-status, grpc-message).
	trailers func() http.Header
}

// localReply is a response Envoy generates itself (source/common/http/utility.cc
// sendLocalReply).
type localReply struct {
	status  int
	h       *headerMap // the headers the filter sets (modify_headers)
	body    []byte
	details string
	// grpcStatus, if set, is the gRPC status of the reply to a gRPC request
	// (ImmediateResponse.grpc_status); else it follows from the HTTP status.
	grpcStatus *uint32
	// modify adds the route's response headers (sendLocalReplyViaFilterChain:
	// finalizeResponseHeaders before modify_headers).
	modify func(*headerMap)
}

// localResponse encodes a local reply as Utility::sendLocalReply does
// (source/common/http/utility.cc). The headers are the filter's; a non-empty body is
// text/plain unless they say otherwise. To a gRPC request the reply is trailers-only:
// :status 200, content-type application/grpc, grpc-status (ImmediateResponse.grpc_status,
// else from the HTTP status by Grpc::Utility::httpToGrpcStatus, unless the headers set
// one), the body as grpc-message, percent-encoded, and no body.
func (s *stream) localResponse(lr *localReply) *response {
	h := &headerMap{}
	if lr.modify != nil {
		lr.modify(h)
	}
	if lr.h != nil {
		for _, e := range lr.h.h {
			h.set(e.k, e.v)
		}
	}
	if s.isGRPC {
		h.set("content-type", "application/grpc")
		if _, ok := h.get("grpc-status"); !ok {
			code := httpToGRPCStatus(lr.status)
			if lr.grpcStatus != nil {
				code = *lr.grpcStatus
			}
			h.set("grpc-status", strconv.FormatUint(uint64(code), 10))
		}
		if len(lr.body) > 0 && s.req.value(":method") != http.MethodHead {
			h.set("grpc-message", percentEncode(lr.body))
		}
		h.del("content-length")
		return &response{status: http.StatusOK, h: h, length: 0}
	}
	if _, ok := h.get("content-type"); !ok && len(lr.body) > 0 {
		h.set("content-type", "text/plain")
	}
	h.set("content-length", strconv.Itoa(len(lr.body)))
	var body io.Reader
	if len(lr.body) > 0 {
		body = bytes.NewReader(lr.body)
	}
	return &response{status: lr.status, h: h, body: body, length: int64(len(lr.body))}
}

// httpToGRPCStatus maps the HTTP status of a local reply to a gRPC status
// (source/common/grpc/status.cc Grpc::Utility::httpToGrpcStatus).
func httpToGRPCStatus(code int) uint32 {
	switch code {
	case 400:
		return uint32(codes.Internal)
	case 401:
		return uint32(codes.Unauthenticated)
	case 403:
		return uint32(codes.PermissionDenied)
	case 404:
		return uint32(codes.Unimplemented)
	case 429, 502, 503, 504:
		return uint32(codes.Unavailable)
	}
	return uint32(codes.Unknown)
}

// percentEncode is the gRPC message encoding of Utility::PercentEncoding::encode
// (source/common/http/utility.cc): '%', bytes below ' ' and from '~' up become %XX.
func percentEncode(b []byte) string {
	var sb strings.Builder
	for _, c := range b {
		if c < ' ' || c >= '~' || c == '%' {
			fmt.Fprintf(&sb, "%%%02X", c)
			continue
		}
		sb.WriteByte(c)
	}
	return sb.String()
}

// isGRPCRequest is Grpc::Common::isGrpcRequestHeaders: a path and a content-type of
// exactly application/grpc or application/grpc+<codec> (source/common/grpc/common.cc
// hasGrpcContentType; case-sensitive, so application/grpc-web is not gRPC).
func isGRPCRequest(h *headerMap) bool {
	if h.value(":path") == "" {
		return false
	}
	ct := h.value("content-type")
	return ct == "application/grpc" || strings.HasPrefix(ct, "application/grpc+")
}

func (e *Emulator) newServer(listener string, tls bool) *http.Server {
	p := new(http.Protocols)
	p.SetHTTP1(true)
	if tls {
		p.SetHTTP2(true) // HCM codec_type AUTO over TLS: by ALPN (alpn_protocols)
	} else {
		p.SetUnencryptedHTTP2(true) // HCM codec_type AUTO on plaintext: HTTP/1.1 or h2c prior knowledge
	}
	return &http.Server{
		Handler:           http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { e.serve(listener, w, r) }),
		Protocols:         p,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          newLogger(e.opts.Logf),
	}
}

func (e *Emulator) serve(listener string, w http.ResponseWriter, r *http.Request) {
	c := e.cfg.Load()
	l := c.listeners[listener]
	if l == nil {
		http.Error(w, "listener removed", http.StatusServiceUnavailable)
		return
	}
	s := &stream{e: e, c: c, l: l, id: e.streamID.Add(1), r: r, dynMeta: map[string]*structpb.Struct{}}
	defer func() {
		s.mu.Lock()
		s.ended = true
		if s.idle != nil {
			s.idle.Stop()
		}
		s.mu.Unlock()
		for _, p := range s.procs {
			p.finish()
		}
		s.finishRequestSpan(s.status)
	}()
	s.req = requestHeaders(r)
	s.isGRPC = isGRPCRequest(s.req)
	if !s.underscores(w) {
		return
	}
	if r.ContentLength != 0 || len(r.TransferEncoding) > 0 {
		s.body = &downstreamBody{s: s, r: r.Body}
	} else {
		s.reqEnded = true
	}
	// Path normalization happens before routing and filters, and may refuse the request
	// (source/common/http/conn_manager_utility.cc maybeNormalizePath, path_utility.cc).
	path, ok := maybeNormalizePath(s.req.value(":path"), l.escapedSlashes, l.normalize, l.merge)
	if !ok {
		s.rejectPath(w)
		return
	}
	s.req.set(":path", path)
	// Then the HCM sanitizes the request headers and adds x-request-id and
	// x-forwarded-proto (conn_manager_utility.cc mutateRequestHeaders).
	s.sanitize()
	if _, ok := s.req.get("x-request-id"); !ok {
		s.req.add("x-request-id", newRequestID())
	}
	if _, ok := s.req.get("x-forwarded-proto"); !ok {
		s.req.add("x-forwarded-proto", s.req.value(":scheme"))
	}
	s.span = s.startRequestSpan()
	s.route = s.match()
	s.write(w, s.decode())
}

// underscores applies the HCM's headers_with_underscores_action to the request header
// names, as Envoy's server codecs do while parsing, before path normalization and any
// filter (source/common/http/http1/codec_impl.cc and source/common/http/http2/
// codec_impl.cc, ServerConnectionImpl::checkHeaderNameForUnderscores, with
// HeaderUtility::headerNameContainsUnderscore). ALLOW passes them; DROP_HEADER removes
// them; REJECT_REQUEST answers HTTP/1 with 400 "Bad Request" (details
// http1.unexpected_underscore) and closes the connection, as after every codec error
// (source/common/http/conn_manager_impl.cc ActiveStream::onLocalReply: a 400 on HTTP/1
// sets connection: close), and resets an HTTP/2 stream
// (NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE). No filter sees the request, so neither does
// its local reply. It reports whether the request goes on.
func (s *stream) underscores(w http.ResponseWriter) bool {
	if s.l.underscores == corev3.HttpProtocolOptions_ALLOW {
		return true
	}
	var bad []string
	for _, e := range s.req.h {
		if e.k[0] != ':' && strings.Contains(e.k, "_") {
			bad = append(bad, e.k)
		}
	}
	if len(bad) == 0 {
		return true
	}
	if s.l.underscores == corev3.HttpProtocolOptions_DROP_HEADER {
		for _, k := range bad {
			s.req.del(k)
		}
		return true
	}
	s.e.opts.Logf("envoyemu: %s rejected: header name with underscores %q", s, bad[0])
	if s.r.ProtoMajor >= 2 {
		panic(http.ErrAbortHandler) // RST_STREAM
	}
	w.Header().Set("connection", "close")
	s.write(w, s.localResponse(&localReply{status: http.StatusBadRequest, body: []byte("Bad Request"), details: "http1.unexpected_underscore"}))
	return false
}

// decode runs the decoder filters and the router, then the encoder filters on the
// router's response (from the upstream or a direct response). A local reply from a
// decoder filter is encoded through the filters that took part in decoding only;
// ext_proc instances that have not processed it are skipped (they never saw the
// request). It returns nil when a local reply is pending with the stream
// (sendLocalReply), which write sends instead.
func (s *stream) decode() *response {
	for _, f := range s.l.filters {
		if f.router {
			break
		}
		if !s.enabled(f) {
			continue
		}
		switch {
		case f.cors:
			if resp := s.corsDecode(f); resp != nil {
				return resp
			}
		case f.authz != nil:
			if lr := s.extAuthz(f); lr != nil {
				return s.localResponse(lr)
			}
		case f.inject != nil:
			// A local reply, encoded like the router's response through the filters
			// that decoded the request (sendLocalReply via the filter chain).
			if lr := s.injectCredential(f); lr != nil {
				return s.encode(s.localResponse(lr))
			}
		case f.proc != nil:
			p := s.newProc(f)
			s.procs = append(s.procs, p)
			p.decode()
			if s.hasLocalReply() {
				return nil
			}
		}
		if s.clearRoute {
			// A filter that changed headers and cleared the route cache gets a new
			// route match (source/common/http/filter_manager.cc clearRouteCache).
			s.route, s.clearRoute = s.match(), false
		}
	}
	resp := s.router()
	if resp == nil {
		return nil
	}
	return s.encode(resp)
}

// encode runs the encoder filters that took part in decoding on a response, in reverse
// order (filter_manager.cc encodeHeaders); CORS, always first, is left to write. It
// returns nil when a local reply is pending instead.
func (s *stream) encode(resp *response) *response {
	for i := len(s.procs) - 1; i >= 0; i-- {
		if resp = s.procs[i].encode(resp); resp == nil {
			return nil
		}
	}
	// ext_authz adds the OK response's response_headers_to_add when encoding
	// (source/extensions/filters/http/ext_authz/ext_authz.cc encodeHeaders).
	for _, o := range s.respAdd {
		resp.h.apply(o)
	}
	return resp
}

// enabled applies per-route filter config: ExtAuthzPerRoute.disabled,
// ExtProcPerRoute.disabled and the generic FilterConfig (source/common/http/
// filter_manager.cc, api/envoy/config/route/v3/route_components.proto FilterConfig).
func (s *stream) enabled(f *filterCfg) bool {
	var pf any
	if s.route != nil {
		pf = s.route.perFilter[f.name]
	}
	switch m := pf.(type) {
	case *extauthzv3.ExtAuthzPerRoute:
		return !m.GetDisabled()
	case *extprocfilterv3.ExtProcPerRoute:
		return !m.GetDisabled()
	case *routev3.FilterConfig:
		return !m.GetDisabled()
	}
	return !f.disabled
}

func requestHeaders(r *http.Request) *headerMap {
	h := &headerMap{}
	path := r.URL.RequestURI()
	if r.RequestURI != "" && r.ProtoMajor == 1 {
		path = r.RequestURI
	}
	h.add(":authority", r.Host)
	h.add(":path", path)
	h.add(":method", r.Method)
	// :scheme follows the downstream connection (source/common/http/conn_manager_impl.cc:
	// https on a TLS connection).
	if r.TLS != nil {
		h.add(":scheme", "https")
	} else {
		h.add(":scheme", "http")
	}
	for k, vs := range r.Header {
		lk := strings.ToLower(k)
		if hopByHop[lk] || lk == "host" {
			continue
		}
		if lk == "te" {
			// TE is kept only as "trailers", which gRPC needs end to end
			// (source/common/http/conn_manager_utility.cc sanitizeTEHeader).
			for _, v := range vs {
				for _, tok := range strings.Split(v, ",") {
					if strings.EqualFold(strings.TrimSpace(tok), "trailers") {
						h.set("te", "trailers")
					}
				}
			}
			continue
		}
		for _, v := range vs {
			h.add(lk, v)
		}
	}
	return h
}

// match selects the virtual host by :authority and the first matching route
// (source/common/router/config_impl.cc RouteMatcher::findVirtualHost, route()).
func (s *stream) match() *routeEntry {
	rc := s.routeConfig()
	if rc == nil {
		return nil
	}
	vh := findVirtualHost(rc, strings.ToLower(s.req.value(":authority")))
	if vh == nil {
		return nil
	}
	path, _, _ := strings.Cut(s.req.value(":path"), "?")
	for _, r := range vh.routes {
		if routeMatches(r.r.GetMatch(), path, s.req) {
			return r
		}
	}
	return nil
}

// routeConfig is the listener's route configuration, inline or from RDS; nil while RDS
// has not delivered it.
func (s *stream) routeConfig() *routeCfg {
	if s.l.inline != nil {
		return s.l.inline
	}
	return s.c.routes[s.l.routeName]
}

// findVirtualHost: exact domain, then the longest suffix wildcard ("*.x"), then the
// longest prefix wildcard ("x*"), then "*" (config_impl.cc findWildcardVirtualHost).
func findVirtualHost(rc *routeCfg, host string) *vhostCfg {
	var best *vhostCfg
	bestRank, bestLen := 0, -1
	for _, vh := range rc.vhosts {
		for _, d := range vh.v.GetDomains() {
			d = strings.ToLower(d)
			rank, n := 0, len(d)
			switch {
			case d == host:
				return vh
			case d == "*":
				rank = 1
			case strings.HasPrefix(d, "*") && strings.HasSuffix(host, d[1:]) && len(host) > len(d)-1:
				rank = 3
			case strings.HasSuffix(d, "*") && strings.HasPrefix(host, d[:len(d)-1]) && len(host) > len(d)-1:
				rank = 2
			default:
				continue
			}
			if rank > bestRank || (rank == bestRank && n > bestLen) {
				best, bestRank, bestLen = vh, rank, n
			}
		}
	}
	return best
}

func routeMatches(m *routev3.RouteMatch, path string, h *headerMap) bool {
	cs := m.GetCaseSensitive() == nil || m.GetCaseSensitive().GetValue()
	eq := func(a, b string) bool { return a == b || (!cs && strings.EqualFold(a, b)) }
	hasPrefix := func(s, p string) bool { return len(s) >= len(p) && eq(s[:len(p)], p) }
	switch ps := m.GetPathSpecifier().(type) {
	case *routev3.RouteMatch_Prefix:
		if !hasPrefix(path, ps.Prefix) {
			return false
		}
	case *routev3.RouteMatch_Path:
		if !eq(path, ps.Path) {
			return false
		}
	case *routev3.RouteMatch_PathSeparatedPrefix:
		p := ps.PathSeparatedPrefix
		if !(eq(path, p) || hasPrefix(path, p+"/")) {
			return false
		}
	default:
		return false
	}
	for _, hm := range m.GetHeaders() {
		if !headerMatches(hm, h) {
			return false
		}
	}
	return true
}

// headerMatches follows source/common/http/header_utility.cc matchHeaders.
func headerMatches(hm *routev3.HeaderMatcher, h *headerMap) bool {
	v, present := h.joined(hm.GetName())
	if !present && hm.GetTreatMissingHeaderAsEmpty() {
		v, present = "", true
	}
	var ok bool
	switch spec := hm.GetHeaderMatchSpecifier().(type) {
	case *routev3.HeaderMatcher_PresentMatch:
		ok = present == spec.PresentMatch
		if hm.GetInvertMatch() {
			ok = !ok
		}
		return ok
	case *routev3.HeaderMatcher_StringMatch:
		if !present {
			return false
		}
		ok = stringMatches(spec.StringMatch, v)
	default: // no specifier: presence
		ok = present
	}
	if hm.GetInvertMatch() {
		return !ok
	}
	return ok
}

func stringMatches(sm *matcherv3.StringMatcher, v string) bool {
	pat, val := "", v
	if sm.GetIgnoreCase() {
		val = strings.ToLower(v)
	}
	low := func(s string) string {
		if sm.GetIgnoreCase() {
			return strings.ToLower(s)
		}
		return s
	}
	switch p := sm.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		pat = low(p.Exact)
		return val == pat
	case *matcherv3.StringMatcher_Prefix:
		return strings.HasPrefix(val, low(p.Prefix))
	case *matcherv3.StringMatcher_Suffix:
		return strings.HasSuffix(val, low(p.Suffix))
	case *matcherv3.StringMatcher_Contains:
		return strings.Contains(val, low(p.Contains))
	}
	return false
}

// router forwards the request to the route's cluster, or answers a direct response or
// 404 when no route matched (source/common/router/router.cc Filter::decodeHeaders; both
// are local replies, so gRPC requests get them trailers-only).
func (s *stream) router() *response {
	if s.route == nil {
		return s.localResponse(&localReply{status: http.StatusNotFound, details: "route_not_found"})
	}
	r := s.route.r
	if dr := r.GetDirectResponse(); dr != nil {
		body := dr.GetBody().GetInlineString()
		if b := dr.GetBody().GetInlineBytes(); len(b) > 0 {
			body = string(b)
		}
		return s.localResponse(&localReply{status: int(dr.GetStatus()), body: []byte(body), details: "direct_response",
			modify: s.addResponseHeaders})
	}
	return s.forward(r.GetRoute())
}

// addResponseHeaders applies response_headers_to_add and response_headers_to_remove of
// the route, then the virtual host (source/common/router/config_impl.cc
// finalizeResponseHeaders: the less specific level is applied last by default).
func (s *stream) addResponseHeaders(h *headerMap) {
	for _, level := range []interface {
		GetResponseHeadersToAdd() []*corev3.HeaderValueOption
		GetResponseHeadersToRemove() []string
	}{s.route.r, s.route.vh.v} {
		for _, o := range level.GetResponseHeadersToAdd() {
			h.apply(o)
		}
		for _, k := range level.GetResponseHeadersToRemove() {
			h.del(k)
		}
	}
}

func (s *stream) forward(a *routev3.RouteAction) *response {
	req := s.req.clone()
	// prefix_rewrite replaces the matched prefix, or the whole path of a path match
	// (source/common/router/config_impl.cc RouteEntryImplBase::finalizePathHeader).
	if pr := a.GetPrefixRewrite(); pr != "" {
		full := req.value(":path")
		path, query, hasQuery := strings.Cut(full, "?")
		m := s.route.r.GetMatch()
		matched := m.GetPrefix()
		if m.GetPath() != "" {
			matched = path
		} else if m.GetPathSeparatedPrefix() != "" {
			matched = m.GetPathSeparatedPrefix()
		}
		path = pr + path[len(matched):]
		if hasQuery {
			path += "?" + query
		}
		req.set("x-envoy-original-path", full)
		req.set(":path", path)
	}
	if h := a.GetHostRewriteLiteral(); h != "" {
		req.set(":authority", h)
	}
	for _, level := range []interface {
		GetRequestHeadersToAdd() []*corev3.HeaderValueOption
		GetRequestHeadersToRemove() []string
	}{s.route.r, s.route.vh.v} {
		for _, o := range level.GetRequestHeadersToAdd() {
			req.apply(o)
		}
		for _, k := range level.GetRequestHeadersToRemove() {
			req.del(k)
		}
	}
	if s.span != nil {
		// The upstream gets the request span's context (upstream_request.cc injectContext).
		req.set("traceparent", s.span.traceparent())
	}
	timeout := defaultRouteTimeout
	if a.GetTimeout() != nil {
		timeout = a.GetTimeout().AsDuration()
	}
	if timeout > 0 {
		// The router tells the upstream its deadline (router.cc setTimeoutHeaders).
		req.set("x-envoy-expected-rq-timeout-ms", strconv.FormatInt(timeout.Milliseconds(), 10))
	}
	cluster := s.c.clusters[a.GetCluster()]
	addr, err := s.e.endpoint(s.c, a.GetCluster())
	if err != nil {
		// No cluster or no endpoint: 503 "no healthy upstream" (router.cc
		// Filter::decodeHeaders, onNoHealthyHost).
		return s.routerReply(http.StatusServiceUnavailable, "no healthy upstream")
	}
	ctx, cancel := context.WithCancel(s.r.Context())
	if timeout > 0 {
		// The route timeout spans until the response is complete, so it also bounds the
		// body (router.cc onResponseTimeout; route_components.proto RouteAction.timeout).
		// Zero disables it, as for long-lived gRPC streams.
		var c2 context.CancelFunc
		ctx, c2 = context.WithTimeout(ctx, timeout)
		cancelBoth := cancel
		cancel = func() { c2(); cancelBoth() }
	}
	if it := a.GetIdleTimeout(); it != nil && it.AsDuration() > 0 {
		s.startIdle(it.AsDuration())
	}
	// A local reply from a filter still processing the request body (a streamed body's
	// processor) resets the upstream request.
	s.mu.Lock()
	s.cancelUp = cancel
	pending := s.pending != nil
	s.mu.Unlock()
	if pending {
		cancel()
		return nil
	}
	retries := 0
	retryOn := ""
	if rp := a.GetRetryPolicy(); rp != nil {
		retries, retryOn = 1, rp.GetRetryOn() // num_retries defaults to 1
		if rp.GetNumRetries() != nil {
			retries = int(rp.GetNumRetries().GetValue())
		}
	}
	replayable := s.body == nil || s.isBuffered
	start := time.Now()
	var up *http.Response
	for attempt := 0; ; attempt++ {
		var body io.Reader
		switch {
		case s.isBuffered:
			body = bytes.NewReader(s.buffered)
		case s.body != nil:
			body = s.body
		}
		hreq, herr := s.upstreamRequest(ctx, req, cluster != nil && cluster.tls != nil, addr, body)
		if herr != nil {
			cancel()
			return s.routerReply(http.StatusBadRequest, herr.Error())
		}
		up, err = s.e.transport(a.GetCluster(), cluster).RoundTrip(hreq)
		if err == nil {
			break
		}
		// Retries happen only for failures before the request reached the upstream, and
		// only when the body can be sent again (source/common/router/retry_state_impl.cc
		// connect-failure, refused-stream, reset-before-request).
		// A failed TLS handshake is a connect failure too (the transport socket's
		// connection never becomes usable: source/common/tls/ssl_socket.cc
		// onFailure → ConnectionEvent::RemoteClose before connected).
		var op *net.OpError
		connectFailure := (errors.As(err, &op) && op.Op == "dial") || isTLSFailure(err)
		if attempt < retries && replayable && connectFailure && strings.Contains(retryOn, "connect-failure") && ctx.Err() == nil {
			t := time.NewTimer(time.Duration(attempt+1) * 25 * time.Millisecond) // retry back-off base 25ms
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
			}
			continue
		}
		break
	}
	if err != nil {
		defer cancel()
		for _, p := range s.procs {
			p.settle() // a processor that cut the body off may still be delivering its reply
		}
		if s.hasLocalReply() { // a filter answered in the middle of a streamed body
			return nil
		}
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return s.routerReply(http.StatusGatewayTimeout, "upstream request timeout")
		}
		if isTLSFailure(err) {
			// router.cc: the transport failure reason is appended to the local reply.
			return s.routerReply(http.StatusServiceUnavailable, "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: "+err.Error())
		}
		return s.routerReply(http.StatusServiceUnavailable, "upstream connect error or disconnect/reset before headers. reset reason: connection failure")
	}
	h := &headerMap{}
	for k, vs := range up.Header {
		lk := strings.ToLower(k)
		if hopByHop[lk] || lk == "te" {
			continue
		}
		for _, v := range vs {
			h.add(lk, v)
		}
	}
	s.touch()
	s.mu.Lock()
	s.upBody = up.Body
	s.mu.Unlock()
	// router.cc onUpstreamHeaders: x-envoy-upstream-service-time.
	h.set("x-envoy-upstream-service-time", strconv.FormatInt(time.Since(start).Milliseconds(), 10))
	resp := &response{status: up.StatusCode, h: h, length: up.ContentLength,
		body: &cancelOnClose{ReadCloser: up.Body, cancel: cancel}, trailers: func() http.Header { return up.Trailer }}
	if up.ContentLength == 0 {
		// Headers with end of stream: a gRPC trailers-only response stays one.
		resp.body, resp.trailers = nil, nil
		_ = up.Body.Close()
		cancel()
	}
	s.addResponseHeaders(resp.h)
	return resp
}

// routerReply is a local reply from the router; it goes through the encoder filters.
func (s *stream) routerReply(code int, body string) *response {
	return s.localResponse(&localReply{status: code, body: []byte(body), modify: s.addResponseHeaders})
}

type cancelOnClose struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (c *cancelOnClose) Close() error { err := c.ReadCloser.Close(); c.cancel(); return err }

func (s *stream) upstreamRequest(ctx context.Context, h *headerMap, tls bool, addr string, body io.Reader) (*http.Request, error) {
	scheme := "http://"
	if tls {
		scheme = "https://"
	}
	u := scheme + addr + h.value(":path")
	r, err := http.NewRequestWithContext(ctx, h.value(":method"), u, body)
	if err != nil {
		return nil, err
	}
	r.Host = h.value(":authority")
	switch {
	case s.isBuffered:
		r.ContentLength = int64(len(s.buffered))
	case body == nil:
		r.ContentLength = 0
		r.Body = nil
	default:
		r.ContentLength = -1
		if cl, err := strconv.ParseInt(h.value("content-length"), 10, 64); err == nil {
			r.ContentLength = cl
		}
	}
	// Request trailers pass (request_trailer_mode SKIP): the transport sends what the
	// downstream's trailers hold once the body ended, and declares them itself.
	trailers := body != nil && len(s.r.Trailer) > 0
	if trailers {
		r.Trailer = s.r.Trailer
	}
	for _, e := range h.h {
		if e.k[0] == ':' || e.k == "content-length" || hopByHop[e.k] || (trailers && e.k == "trailer") {
			continue
		}
		r.Header[e.k] = append(r.Header[e.k], e.v)
	}
	return r, nil
}

// transport is the connection pool of a cluster: HTTP/1.1, or h2c for clusters with
// explicit http2_protocol_options; over TLS (one pool per cluster, as its TLS context is
// its own) HTTP/1.1, h2, or either by ALPN for auto_config. Compression is left to the
// endpoints.
func (e *Emulator) transport(name string, cl *clusterCfg) http.RoundTripper {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.transports == nil {
		e.transports = map[string]*http.Transport{}
	}
	h2 := cl != nil && cl.h2
	secure := cl != nil && cl.tls != nil
	key := "h1"
	switch {
	case secure:
		key = "tls|" + name
	case h2:
		key = "h2c"
	}
	if t := e.transports[key]; t != nil {
		return t
	}
	t := &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 16, IdleConnTimeout: time.Minute}
	p := new(http.Protocols)
	switch {
	case secure:
		t.TLSClientConfig = e.clientTLS(name)
		if h2 || cl.auto {
			p.SetHTTP2(true)
		}
		if !h2 || cl.auto {
			p.SetHTTP1(true)
		}
	case h2:
		p.SetUnencryptedHTTP2(true)
	default:
		p.SetHTTP1(true)
	}
	t.Protocols = p
	e.transports[key] = t
	return t
}

// write sends the response downstream, or the pending local reply instead (it replaces
// the upstream's response while no headers went downstream: sendLocalReply), flushing
// every chunk as it arrives, so that an SSE stream or a gRPC stream flows message by
// message (Envoy forwards data frames as they arrive unless a filter buffers), then the
// response trailers. A body error after the headers were sent resets the stream, as
// Envoy does (router.cc onUpstreamReset after headers → stream reset), as does a local
// reply that comes too late to replace the response (filter_manager.cc sendLocalReply).
// Go's HTTP/2 server resets with RST_STREAM INTERNAL_ERROR where Envoy sends NO_ERROR;
// gRPC clients map both to INTERNAL.
func (s *stream) write(w http.ResponseWriter, resp *response) {
	s.mu.Lock()
	if lr := s.pending; lr != nil {
		s.pending = nil
		if resp != nil {
			if c, ok := resp.body.(io.Closer); ok {
				_ = c.Close()
			}
		}
		resp = s.localResponse(lr)
	}
	if resp == nil { // cannot happen: every nil response comes with a pending reply
		resp = s.localResponse(&localReply{status: http.StatusInternalServerError, details: "no_response"})
	}
	// The CORS filter, when it took part in decoding, is the first filter and so the
	// last encoder of every response: the upstream's, a direct response, a local reply
	// of a later filter, and its own preflight answer (decoder_callbacks_->encodeHeaders
	// starts at the first encoder filter, filter_manager.cc encodeHeaders(nullptr, ...);
	// a browser ignores Access-Control-Expose-Headers on a preflight).
	s.corsEncode(resp)
	s.sent = true
	s.status = resp.status
	s.mu.Unlock()
	if c, ok := resp.body.(io.Closer); ok {
		defer c.Close()
	}
	wh := w.Header()
	for _, e := range resp.h.h {
		if e.k[0] == ':' || hopByHop[e.k] || e.k == "te" {
			continue
		}
		wh.Add(e.k, e.v) // canonical keys: net/http reads Content-Length etc. by them
	}
	if resp.length < 0 || resp.body == nil && resp.length != 0 {
		wh.Del("content-length")
	}
	w.WriteHeader(resp.status)
	if resp.body == nil {
		// Headers with end of stream (a gRPC trailers-only reply): nothing is flushed
		// before the handler returns, so they go in one HEADERS frame.
		return
	}
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.body.Read(buf)
		if n > 0 {
			s.touch()
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
			_ = rc.Flush()
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			s.e.opts.Logf("envoyemu: %s reset after headers: %v", s, err)
			panic(http.ErrAbortHandler)
		}
	}
	if resp.trailers != nil {
		for k, vs := range resp.trailers() {
			for _, v := range vs {
				wh.Add(http.TrailerPrefix+k, v)
			}
		}
	}
}

func (s *stream) String() string { return fmt.Sprintf("stream %d", s.id) }
