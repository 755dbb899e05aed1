package envoy

import (
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	credinjv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/credential_injector/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	genericv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/injected_credentials/generic/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// Outbound credentials without a Check per call: mcpgate holds an HTTPEndpoint's client
// credentials and its token cache, and gives the current access token — never the client
// secret — to the sidecars that may spend it as an SDS generic secret. Envoy's
// credential_injector filter (source/extensions/filters/http/credential_injector/
// credential_injector_filter.cc) with the generic injected credential (source/extensions/
// http/injected_credentials/generic/generic_impl.cc) sets Authorization from it.
//
// The filter is on the listener for every such endpoint whatever the token's state, and
// disabled (HttpFilter.disabled); the endpoint's route enables it (FilterConfig) while
// mcpgate has a token, and asks ext_authz otherwise. So a token arriving, being renewed or
// expiring changes routes (RDS) and secrets (SDS), never the listener, which Envoy would
// drain and rebuild.

// CredentialInjectorFilter is the filter of one endpoint's token: it injects
// "Authorization: Bearer <secret>" from the named SDS secret (over ADS), replacing any
// Authorization the agent sent (overwrite), and answers 401 itself when the secret is
// empty (allow_request_without_credential false: fail closed). Disabled unless a route
// enables it with CredentialInjectorEnabled.
func CredentialInjectorFilter(name, secret string) (*hcmv3.HttpFilter, error) {
	generic, err := Any(&genericv3.Generic{
		Credential:        SecretRef(secret, ADSConfigSource()),
		Header:            "Authorization",
		HeaderValuePrefix: "Bearer ",
	})
	if err != nil {
		return nil, err
	}
	f, err := httpFilter(name, &credinjv3.CredentialInjector{
		Overwrite:                     true,
		AllowRequestWithoutCredential: false,
		Credential:                    &corev3.TypedExtensionConfig{Name: "envoy.http.injected_credentials.generic", TypedConfig: generic},
	})
	if err != nil {
		return nil, err
	}
	f.Disabled = true
	return f, nil
}

// CredentialInjectorEnabled is the per-route config turning a disabled filter on
// (route_components.proto FilterConfig: "disabled: false" with no config).
func CredentialInjectorEnabled() (*anypb.Any, error) {
	return Any(&routev3.FilterConfig{})
}

// TokenSecret is an SDS generic secret holding an access token ("" while there is none:
// the injector then fails closed, though no route enables it then).
func TokenSecret(name, token string) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_GenericSecret{GenericSecret: &tlsv3.GenericSecret{
		Secret: &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: token}},
	}}}
}
