package extauthz

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extauthz/bearer"
	outbound "github.com/mcpgate/mcpgate/extauthz/credentials"
	"github.com/mcpgate/mcpgate/policy"
)

// Reasons of outbound decisions (an agent's call to an HTTPEndpoint with auth).
const (
	ReasonCredentials       = "credentials_supplied"
	ReasonUnknownEndpoint   = "unknown_endpoint"
	ReasonNoCredentials     = "endpoint_without_auth"
	ReasonUnknownSource     = "unknown_source_app"
	ReasonSourceMismatch    = "source_identity_mismatch"
	ReasonNotEndpointCaller = "endpoint_access_denied"
	ReasonTokenUnavailable  = "credentials_unavailable"
)

// The outbound path: an App calls an HTTPEndpoint whose auth mcpgate holds, through its
// sidecar's outbound listener (xds puts ContextEndpoint and ContextSourceAppID on those
// routes). mcpgate does not decide access to an MCP server here (the remote server
// does); it supplies the upstream's credentials. Its OK answer sets Authorization to the
// token it acquired (client credentials) or exchanged for the agent's verified token
// (token exchange), which replaces whatever the agent sent, so the agent holds no secret
// and its own token never leaves the sidecar.
//
// Who may receive a token is checked twice: the route names the App, and the App must
// be among the endpoint's spec.callers; when Envoy reaches mcpgate over mTLS (the Mesh's
// authz.spiffeId), the connection's SPIFFE ID must be that App's, so that a workload
// able to reach mcpgate's port cannot ask for another App's tokens by writing its own
// CheckRequest. Plaintext is refused beyond loopback by mcpgate serve.
func (s *Server) outbound(ctx context.Context, snap *policy.Snapshot, r *request, d *Decision) *Decision {
	d.Error = "access_denied"
	ep := snap.Endpoints[r.endpoint]
	if ep == nil {
		return d.deny(http.StatusForbidden, ReasonUnknownEndpoint, fmt.Sprintf("no HTTPEndpoint %q in the policy", r.endpoint))
	}
	d.Target = ep.Name
	if ep.Auth == nil {
		return d.deny(http.StatusForbidden, ReasonNoCredentials, fmt.Sprintf("HTTPEndpoint %q has no auth for mcpgate to supply", ep.Name))
	}
	src := snap.App(r.sourceApp)
	if src == nil {
		return d.deny(http.StatusForbidden, ReasonUnknownSource, fmt.Sprintf("the route names no App of the policy as its source (%s=%q)", contract.ContextSourceAppID, r.sourceApp))
	}
	d.Caller = policy.Caller{AppID: src.ID, Namespace: src.Namespace, TrustDomain: snap.Mesh.TrustDomain}
	if id, ok := connectionSpiffeID(ctx); ok {
		d.SpiffeID = id
		if id != src.SpiffeID {
			return d.deny(http.StatusForbidden, ReasonSourceMismatch, fmt.Sprintf("the Envoy asking for App %s's credentials connected as %s, not %s", src.ID, id, src.SpiffeID))
		}
	}
	if !ep.MayUseCredentials(src.ID) {
		return d.deny(http.StatusForbidden, ReasonNotEndpointCaller, fmt.Sprintf("App %s may not call HTTPEndpoint %s (spec.callers)", src.ID, ep.Name))
	}
	source := s.sources.Get(ep)
	if source.Client == nil && source.Exchange == nil {
		return d.deny(http.StatusForbidden, ReasonNoCredentials, fmt.Sprintf("HTTPEndpoint %q has no grant mcpgate knows", ep.Name))
	}
	var token string
	var err error
	if source.Exchange != nil {
		subject, present, ok := bearerToken(r.auth)
		switch {
		case !present:
			return d.upstreamChallenge(ep, "", ReasonTokenMissing, fmt.Sprintf("HTTPEndpoint %s exchanges the caller's token (auth.tokenExchange): send the signed-in user's token as Authorization: Bearer", ep.Name))
		case !ok:
			return d.upstreamChallenge(ep, "invalid_request", ReasonTokenMalformed, "the Authorization header is not a single Bearer token")
		}
		p, verr := s.verifier.Verify(ctx, subject, ep.SubjectIssuers)
		if verr != nil {
			return d.upstreamChallenge(ep, "invalid_token", "token_"+bearer.Reason(verr), "the token to exchange is not valid: "+verr.Error())
		}
		d.Principal = p
		token, err = source.Exchange.Token(ctx, subject)
	} else {
		token, err = s.sources.ClientToken(ctx, source)
	}
	if err != nil {
		d.Error = "temporarily_unavailable"
		var oe *outbound.Error
		if errors.As(err, &oe) {
			d.oauthError = oe.Code
		}
		return d.deny(http.StatusServiceUnavailable, ReasonTokenUnavailable, "mcpgate could not get a token for the call: "+err.Error())
	}
	d.Allowed, d.Status, d.Error, d.Reason, d.Detail = true, http.StatusOK, "", ReasonCredentials, "credentials of HTTPEndpoint "+ep.Name
	d.upstreamToken = token
	return d
}

// upstreamChallenge is a 401 for a token-exchange endpoint called without a usable
// token. There is no resource metadata to point at: the agent, not an MCP client of
// mcpgate's, is expected to hold the user's token.
func (d *Decision) upstreamChallenge(ep *policy.HTTPEndpoint, oauthErr, reason, detail string) *Decision {
	d.WWWAuthenticate = "Bearer"
	if oauthErr != "" {
		d.WWWAuthenticate += ` error="` + oauthErr + `"`
	}
	d.Error = oauthErr
	if d.Error == "" {
		d.Error = "invalid_token"
	}
	d.endpointDenial = true
	return d.deny(http.StatusUnauthorized, reason, detail)
}

// credentialsResponse is the OK answer of an outbound decision: the upstream token as
// Authorization (replacing the agent's, Envoy's OVERWRITE_IF_EXISTS_OR_ADD), internal
// headers the agent sent removed, and the decision id on the response to the agent, not
// on the request to the remote server. No dynamic metadata: no ext_proc runs here.
func (d *Decision) credentialsResponse() *authv3.CheckResponse {
	ok := &authv3.OkHttpResponse{
		Headers:              []*corev3.HeaderValueOption{header("authorization", "Bearer "+d.upstreamToken)},
		HeadersToRemove:      d.Strip,
		ResponseHeadersToAdd: []*corev3.HeaderValueOption{header(contract.HeaderDecisionID, d.ID)},
	}
	return &authv3.CheckResponse{
		Status:       &status.Status{Code: int32(codes.OK)},
		HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: ok},
	}
}

// endpointDenialBody is the body of a refused outbound call: the denial body, plus the
// endpoint and, when the token endpoint gave one, its OAuth error code.
type endpointDenialBody struct {
	denialBody
	Endpoint   string `json:"endpoint"`
	OAuthError string `json:"oauth_error,omitempty"`
}

func (d *Decision) endpointBody() string {
	b, _ := json.Marshal(endpointDenialBody{
		denialBody: denialBody{Error: d.Error, Reason: d.Detail, DecisionID: d.ID},
		Endpoint:   d.Target, OAuthError: d.oauthError,
	})
	return string(b)
}

// connectionSpiffeID is the SPIFFE ID of the Envoy on the gRPC connection, when it
// connected with a client certificate (mcpgate serve --spiffe-socket).
func connectionSpiffeID(ctx context.Context) (string, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "", false
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.PeerCertificates) == 0 {
		return "", false
	}
	return certSpiffeID(ti.State.PeerCertificates[0])
}

func certSpiffeID(c *x509.Certificate) (string, bool) {
	for _, u := range c.URIs {
		if u.Scheme == "spiffe" {
			return u.String(), true
		}
	}
	return "", false
}
