package envoyemu

import (
	"crypto/rand"
	"fmt"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
)

// headerMap is an ordered header list with lower-case keys, pseudo-headers included,
// as Envoy's HeaderMap (envoy/http/header_map.h): keys are case-insensitive and stored
// lower case; a key may repeat.
type headerMap struct{ h []kv }

type kv struct{ k, v string }

func (m *headerMap) get(k string) (string, bool) {
	k = strings.ToLower(k)
	for _, e := range m.h {
		if e.k == k {
			return e.v, true
		}
	}
	return "", false
}

func (m *headerMap) value(k string) string { v, _ := m.get(k); return v }

// joined is every value of k joined with ",", as Envoy presents a repeated header to
// route matching and ext_authz (source/common/http/header_utility.cc getAllOfHeader).
func (m *headerMap) joined(k string) (string, bool) {
	k = strings.ToLower(k)
	var vs []string
	for _, e := range m.h {
		if e.k == k {
			vs = append(vs, e.v)
		}
	}
	return strings.Join(vs, ","), len(vs) > 0
}

func (m *headerMap) add(k, v string) { m.h = append(m.h, kv{strings.ToLower(k), v}) }

func (m *headerMap) del(k string) {
	k = strings.ToLower(k)
	out := m.h[:0]
	for _, e := range m.h {
		if e.k != k {
			out = append(out, e)
		}
	}
	m.h = out
}

// set replaces every value of k with v, keeping the position of the first one.
func (m *headerMap) set(k, v string) {
	k = strings.ToLower(k)
	for i, e := range m.h {
		if e.k == k {
			m.h[i].v = v
			rest := m.h[i+1:]
			m.h = m.h[:i+1]
			for _, r := range rest {
				if r.k != k {
					m.h = append(m.h, r)
				}
			}
			return
		}
	}
	m.add(k, v)
}

func (m *headerMap) clone() *headerMap { return &headerMap{h: append([]kv(nil), m.h...)} }

// hvValue is a HeaderValue's value: raw_value wins when set (ext_proc sends and expects
// raw_value; api/envoy/config/core/v3/base.proto HeaderValue).
func hvValue(h *corev3.HeaderValue) string {
	if len(h.GetRawValue()) > 0 {
		return string(h.GetRawValue())
	}
	return h.GetValue()
}

// apply applies one HeaderValueOption: the deprecated append flag, when present, wins
// over append_action (source/common/router/header_parser.cc, HeaderValueOption in
// api/envoy/config/core/v3/base.proto).
func (m *headerMap) apply(o *corev3.HeaderValueOption) {
	k, v := strings.ToLower(o.GetHeader().GetKey()), hvValue(o.GetHeader())
	action := o.GetAppendAction()
	//lint:ignore SA1019 Envoy still honours the deprecated append field, so must we
	if app := o.GetAppend(); app != nil {
		action = corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD
		if app.GetValue() {
			action = corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD
		}
	}
	_, exists := m.get(k)
	switch action {
	case corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD:
		m.add(k, v)
	case corev3.HeaderValueOption_ADD_IF_ABSENT:
		if !exists {
			m.add(k, v)
		}
	case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS:
		if exists {
			m.set(k, v)
		}
	default: // OVERWRITE_IF_EXISTS_OR_ADD
		m.set(k, v)
	}
}

// modifiable reports whether a filter may set or remove header k: never pseudo-headers
// nor host (source/common/http/header_utility.cc isModifiableHeader).
func modifiable(k string) bool {
	return k != "" && k[0] != ':' && !strings.EqualFold(k, "host")
}

// hopByHop are the connection-specific headers the codecs strip
// (source/common/http/conn_manager_utility.cc, HTTP/1 and HTTP/2 codecs). TE is
// sanitized instead: kept as "trailers" (requestHeaders).
var hopByHop = map[string]bool{"connection": true, "keep-alive": true, "proxy-connection": true,
	"transfer-encoding": true, "upgrade": true}

// newRequestID is a random UUIDv4, as Envoy's default request ID extension generates
// (source/extensions/request_id/uuid/config.cc).
func newRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
