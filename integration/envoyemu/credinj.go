package envoyemu

import (
	"errors"
	"fmt"
	"net/http"
	"strings"

	credinjv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/credential_injector/v3"
	genericv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/injected_credentials/generic/v3"
	oauth2v3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/injected_credentials/oauth2/v3"
)

// The credential_injector filter (envoy.filters.http.credential_injector) with the
// generic injected credential (envoy.http.injected_credentials.generic), as
// source/extensions/filters/http/credential_injector/credential_injector_filter.cc and
// source/extensions/http/injected_credentials/generic/generic_impl.cc implement them:
// a request header set from a generic secret that SDS delivers over ADS.

// injectorCfg is one credential_injector filter with the generic credential.
type injectorCfg struct {
	secret       string // Generic.credential: the SDS secret (a generic_secret), over ADS
	header       string // Generic.header, lower case
	prefix       string // Generic.header_value_prefix
	overwrite    bool
	allowWithout bool // allow_request_without_credential
}

// defaultCredentialHeader is Generic.header when unset (generic/config.cc
// createCredentialInjectorFromProtoTyped).
const defaultCredentialHeader = "Authorization"

// parseCredentialInjector builds the filter as credential_injector/config.cc
// createFilterFactoryFromProtoHelper does: the credential extension is looked up by the
// type of its typed_config (Config::Utility::getFactory; extension names are not used for
// lookup), and only the generic one is emulated. Both configs are validated as Envoy
// validates every typed config it translates (PGV rules: credential is required, header
// must be a valid header name).
func parseCredentialInjector(m *credinjv3.CredentialInjector) (*injectorCfg, error) {
	if err := m.ValidateAll(); err != nil {
		return nil, err
	}
	tc := m.GetCredential().GetTypedConfig()
	switch {
	case tc.MessageIs(&genericv3.Generic{}):
	case tc.MessageIs(&oauth2v3.OAuth2{}):
		return nil, fmt.Errorf("injected credential %q (%s) is not emulated: only envoy.http.injected_credentials.generic is",
			m.GetCredential().GetName(), tc.GetTypeUrl())
	default:
		// credential_injector/config.cc: no factory registered for the type.
		return nil, fmt.Errorf("didn't find a registered implementation for '%s' with type URL: '%s'",
			m.GetCredential().GetName(), tc.GetTypeUrl())
	}
	var g genericv3.Generic
	if err := tc.UnmarshalTo(&g); err != nil {
		return nil, fmt.Errorf("injected credential %q: %w", m.GetCredential().GetName(), err)
	}
	if err := g.ValidateAll(); err != nil {
		return nil, fmt.Errorf("injected credential %q: %w", m.GetCredential().GetName(), err)
	}
	sds := g.GetCredential()
	if sds.GetName() == "" {
		return nil, fmt.Errorf("injected credential %q: SDS secret config without a name", m.GetCredential().GetName())
	}
	// generic/config.cc secretsProvider: with sds_config a dynamic generic secret
	// provider (an SDS subscription that warms the listener: the factory registers it
	// with the listener's init manager); without, a static secret of the bootstrap.
	if sds.GetSdsConfig() == nil {
		return nil, fmt.Errorf("injected credential %q: secret %q without sds_config (a static bootstrap secret) is not emulated",
			m.GetCredential().GetName(), sds.GetName())
	}
	if sds.GetSdsConfig().GetAds() == nil {
		return nil, fmt.Errorf("injected credential %q: secret %q: only sds_config.ads is emulated",
			m.GetCredential().GetName(), sds.GetName())
	}
	header := g.GetHeader()
	if header == "" {
		header = defaultCredentialHeader
	}
	return &injectorCfg{secret: sds.GetName(), header: strings.ToLower(header), prefix: g.GetHeaderValuePrefix(),
		overwrite: m.GetOverwrite(), allowWithout: m.GetAllowRequestWithoutCredential()}, nil
}

// errNoCredential is the generic injector's failure: the secret holds no credential
// (generic_impl.cc inject: NotFoundError "Failed to get credential from secret").
var errNoCredential = errors.New("failed to get credential from secret")

// injectCredential is CredentialInjectorFilter::decodeHeaders with the generic
// injector, whose requestCredential succeeds at once, so the credential is injected in
// onSuccess within decodeHeaders (FilterConfig::injectCredential). An existing header
// without overwrite is kept (already_exists; the request goes on); a failed injection
// continues without the credential if allow_request_without_credential, and otherwise
// ends the stream with a local reply, 401 "Failed to inject credential.".
func (s *stream) injectCredential(f *filterCfg) *localReply {
	err := f.inject.inject(s.req, s.c.credential(f.inject.secret))
	switch {
	case err == nil:
		return nil
	case f.inject.allowWithout:
		s.e.opts.Logf("envoyemu: %s %s: %v; continuing without a credential", s, f.name, err)
		return nil
	}
	s.e.opts.Logf("envoyemu: %s %s: failed to inject credential: %v", s, f.name, err)
	return &localReply{status: http.StatusUnauthorized, body: []byte("Failed to inject credential."),
		details: "failed_to_inject_credential"}
}

// inject is GenericCredentialInjector::inject (generic_impl.cc): without overwrite a
// header already present stays (nil: the filter counts already_exists and goes on);
// otherwise the secret's value, less trailing CR and LF (secret files often end with
// a newline, which a header value cannot hold), replaces the header's values with the
// prefix prepended. An empty value is a failure.
func (ic *injectorCfg) inject(h *headerMap, credential string) error {
	if _, ok := h.get(ic.header); ok && !ic.overwrite {
		return nil
	}
	credential = strings.TrimRight(credential, "\r\n")
	if credential == "" {
		return errNoCredential
	}
	h.set(ic.header, ic.prefix+credential)
	return nil
}

// credential is the current value of a generic secret: what parseSecret read when the
// secret arrived (secret_provider_impl.cc ThreadLocalGenericSecretProvider::update reads
// the data source on each SDS update, not per request). A secret not received, or of
// another type, holds none: the provider's secret() is null or its generic_secret empty.
func (c *config) credential(name string) string {
	return string(c.secrets[name].GetGenericSecret().GetSecret().GetInlineBytes())
}
