package envoyemu

import (
	"context"
	"net"
	"net/http"
	"strconv"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// defaultAuthzTimeout is the Check timeout when grpc_service.timeout is unset
// (docs: configuration/http/http_filters/ext_authz_filter, 200ms).
const defaultAuthzTimeout = 200 * time.Millisecond

// extAuthz runs the ext_authz filter's decodeHeaders: one Check over gRPC, then either
// the request continues with the OK response's header mutations, or a local reply.
// source/extensions/filters/http/ext_authz/ext_authz.cc.
func (s *stream) extAuthz(f *filterCfg) *localReply {
	cfg := f.authz
	var ext map[string]string
	if s.route != nil {
		if pr, ok := s.route.perFilter[f.name].(*extauthzv3.ExtAuthzPerRoute); ok {
			ext = pr.GetCheckSettings().GetContextExtensions()
		}
	}
	req := s.checkRequest(ext)
	timeout := defaultAuthzTimeout
	if t := cfg.GetGrpcService().GetTimeout(); t != nil {
		timeout = t.AsDuration()
	}
	resp, err := s.check(cfg.GetGrpcService().GetEnvoyGrpc().GetClusterName(), req, timeout)
	if err != nil {
		// Error or timeout: failure_mode_allow decides; otherwise status_on_error,
		// 403 by default (ext_authz.cc onComplete, CheckStatus::Error).
		s.e.opts.Logf("envoyemu: %s ext_authz error: %v", s, err)
		if cfg.GetFailureModeAllow() {
			if cfg.GetFailureModeAllowHeaderAdd() {
				s.req.set("x-envoy-auth-failure-mode-allowed", "true")
			}
			return nil
		}
		code := http.StatusForbidden
		if c := cfg.GetStatusOnError().GetCode(); c != 0 {
			code = int(c)
		}
		return &localReply{status: code, details: "ext_authz_error"}
	}
	// Dynamic metadata is kept for later filters under the filter's namespace, on OK and
	// on denial alike (ext_authz.cc onComplete: setDynamicMetadata).
	if md := resp.GetDynamicMetadata(); md != nil {
		ns := s.dynMeta[f.name]
		if ns == nil {
			ns = &structpb.Struct{Fields: map[string]*structpb.Value{}}
			s.dynMeta[f.name] = ns
		}
		for k, v := range md.GetFields() {
			ns.Fields[k] = v
		}
	}
	if codes.Code(resp.GetStatus().GetCode()) == codes.OK {
		ok := resp.GetOkResponse()
		for _, h := range ok.GetHeaders() {
			if modifiable(h.GetHeader().GetKey()) {
				s.req.apply(h)
			}
		}
		for _, k := range ok.GetHeadersToRemove() {
			if modifiable(k) {
				s.req.del(k)
			}
		}
		s.respAdd = append(s.respAdd, ok.GetResponseHeadersToAdd()...)
		if cfg.GetClearRouteCache() && (len(ok.GetHeaders()) > 0 || len(ok.GetHeadersToRemove()) > 0) {
			s.clearRoute = true
		}
		return nil
	}
	// Denied: the DeniedHttpResponse's status (403 when unset), headers and body
	// (ext_authz.cc onComplete, CheckStatus::Denied).
	d := resp.GetDeniedResponse()
	lr := &localReply{status: http.StatusForbidden, h: &headerMap{}, body: []byte(d.GetBody()), details: "ext_authz_denied"}
	if c := d.GetStatus().GetCode(); c != 0 {
		lr.status = int(c)
	}
	for _, h := range d.GetHeaders() {
		lr.h.apply(h)
	}
	return lr
}

func (s *stream) check(cluster string, req *authv3.CheckRequest, timeout time.Duration) (*authv3.CheckResponse, error) {
	conn, err := s.e.grpcConn(s.c, cluster)
	if err != nil {
		return nil, err
	}
	sp := s.asyncSpan("envoy.service.auth.v3.Authorization.Check", cluster)
	ctx, cancel := context.WithTimeout(sp.inject(s.r.Context()), timeout)
	defer cancel()
	resp, err := authv3.NewAuthorizationClient(conn).Check(ctx, req)
	sp.setTag("grpc.status_code", strconv.Itoa(int(status.Code(err))))
	if err != nil {
		sp.setTag("error", "true")
	}
	sp.finish()
	return resp, err
}

// checkRequest builds the CheckRequest as Envoy does: headers as a map with lower-case
// keys and pseudo-headers, repeated values joined with ","; the stream id; source and
// destination addresses; source.principal is the peer certificate's URI SAN, so empty
// on plaintext; context_extensions from the route
// (source/extensions/filters/common/ext_authz/check_request_utils.cc).
func (s *stream) checkRequest(ext map[string]string) *authv3.CheckRequest {
	headers := map[string]string{}
	for _, e := range s.req.h {
		if v, ok := headers[e.k]; ok {
			headers[e.k] = v + "," + e.v
		} else {
			headers[e.k] = e.v
		}
	}
	size := int64(-1)
	if cl, err := strconv.ParseInt(s.req.value("content-length"), 10, 64); err == nil {
		size = cl
	} else if s.body == nil {
		size = 0
	}
	proto := "HTTP/1.1"
	if s.r.ProtoMajor == 2 {
		proto = "HTTP/2"
	}
	var local net.Addr
	if a, ok := s.r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
		local = a
	}
	var srcPrincipal, dstPrincipal string
	if s.r.TLS != nil {
		if pc := s.r.TLS.PeerCertificates; len(pc) > 0 {
			srcPrincipal = principal(pc[0])
		}
		dstPrincipal = s.e.localPrincipal(s.c, s.l)
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source:      &authv3.AttributeContext_Peer{Address: addrProto(s.r.RemoteAddr), Principal: srcPrincipal},
		Destination: &authv3.AttributeContext_Peer{Address: addrProto(addrString(local)), Principal: dstPrincipal},
		Request: &authv3.AttributeContext_Request{
			Time: timestamppb.Now(),
			Http: &authv3.AttributeContext_HttpRequest{
				Id:       strconv.FormatUint(s.id, 10),
				Method:   s.req.value(":method"),
				Headers:  headers,
				Path:     s.req.value(":path"),
				Host:     s.req.value(":authority"),
				Scheme:   s.req.value(":scheme"),
				Protocol: proto,
				Size:     size,
			},
		},
		ContextExtensions: ext,
		MetadataContext:   &corev3.Metadata{},
	}}
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

func addrProto(hostport string) *corev3.Address {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return nil
	}
	p, _ := strconv.Atoi(port)
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(p)},
	}}}
}

// cloneStruct copies metadata handed to another filter, so later edits do not leak.
func cloneStruct(s *structpb.Struct) *structpb.Struct { return proto.Clone(s).(*structpb.Struct) }
