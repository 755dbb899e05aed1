package contract

import (
	"fmt"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/structpb"
)

// Identity is what ext_authz established about a request, as ext_proc reads it from the
// dynamic metadata Envoy forwards ([MetadataNamespace]). Empty fields were not set.
type Identity struct {
	DecisionID      string
	Target          string
	CallerAppID     string
	CallerNamespace string
	SpiffeID        string
	Gateway         string
	Subject         string
	Issuer          string
	Scopes          []string
	// TokenExpiry is the token's exp in Unix seconds; 0 without a token.
	TokenExpiry int64
	ClaimsJSON  string
}

// FromMetadata reads the ext_authz namespace of a request's metadata. Its absence means
// ext_authz did not run or Envoy does not forward the namespace: the caller must then
// refuse the request, never guess who is calling. A value of the wrong type counts as
// absent.
func FromMetadata(md *corev3.Metadata) (Identity, error) {
	ns := md.GetFilterMetadata()[MetadataNamespace]
	if ns == nil {
		return Identity{}, fmt.Errorf("no %s metadata: ext_authz must run before ext_proc and its namespace be forwarded", MetadataNamespace)
	}
	f := ns.GetFields()
	str := func(k string) string { return f[k].GetStringValue() }
	id := Identity{
		DecisionID:      str(MetaDecisionID),
		Target:          str(MetaTarget),
		CallerAppID:     str(MetaCallerAppID),
		CallerNamespace: str(MetaCallerNamespace),
		SpiffeID:        str(MetaSpiffeID),
		Gateway:         str(MetaGateway),
		Subject:         str(MetaSubject),
		Issuer:          str(MetaIssuer),
		TokenExpiry:     int64(f[MetaTokenExpiry].GetNumberValue()),
		ClaimsJSON:      str(MetaClaimsJSON),
	}
	if id.Target == "" {
		return Identity{}, fmt.Errorf("%s metadata names no target app", MetadataNamespace)
	}
	if l := f[MetaScopes].GetListValue(); l != nil {
		for _, v := range l.GetValues() {
			if s, ok := v.GetKind().(*structpb.Value_StringValue); ok {
				id.Scopes = append(id.Scopes, s.StringValue)
			}
		}
	}
	return id, nil
}

// HeaderValue reads a header as Envoy sends it to ext_authz and ext_proc: raw_value (bytes)
// since Envoy 1.29 (and always with encode_raw_headers), value before.
func HeaderValue(h *corev3.HeaderValue) string {
	if rv := h.GetRawValue(); len(rv) > 0 {
		return string(rv)
	}
	return h.GetValue()
}
