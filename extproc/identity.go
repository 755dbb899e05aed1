package extproc

import (
	"fmt"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/extauthz"
	"github.com/mcpgate/mcpgate/policy"
)

// identity is what ext_authz established, read from the dynamic metadata Envoy forwards
// (metadata_options.forwarding_namespaces: envoy.filters.http.ext_authz).
type identity struct {
	target          string
	caller          policy.Caller
	spiffeID        string
	subject         string
	scopes          []string
	claimsJSON      string
	authzDecisionID string
}

// identityFrom reads the ext_authz namespace. Its absence means ext_authz did not run (or
// Envoy is misconfigured): ext_proc never guesses who is calling.
func identityFrom(md *corev3.Metadata) (identity, error) {
	ns := md.GetFilterMetadata()[extauthz.MetadataNamespace]
	if ns == nil {
		return identity{}, fmt.Errorf("no %s metadata: ext_authz must run before ext_proc and its namespace be forwarded", extauthz.MetadataNamespace)
	}
	f := ns.GetFields()
	str := func(k string) string { return f[k].GetStringValue() }
	id := identity{
		target:          str(extauthz.MetaTarget),
		spiffeID:        str(extauthz.MetaSpiffeID),
		subject:         str(extauthz.MetaSubject),
		claimsJSON:      str(extauthz.MetaClaimsJSON),
		authzDecisionID: str(extauthz.MetaDecisionID),
		caller: policy.Caller{
			AppID:     str(extauthz.MetaCallerAppID),
			Namespace: str(extauthz.MetaCallerNamespace),
		},
	}
	if id.target == "" {
		return identity{}, fmt.Errorf("%s metadata names no target app", extauthz.MetadataNamespace)
	}
	if l := f[extauthz.MetaScopes].GetListValue(); l != nil {
		for _, v := range l.GetValues() {
			if s, ok := v.GetKind().(*structpb.Value_StringValue); ok {
				id.scopes = append(id.scopes, s.StringValue)
			}
		}
	}
	return id, nil
}
