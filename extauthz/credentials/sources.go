package credentials

import (
	"encoding/json"
	"sync"

	"github.com/mcpgate/mcpgate/policy"
)

// Sources hold one token source per HTTPEndpoint, kept across policy reloads while the
// endpoint's auth is unchanged (its cached token with it), replaced when it changes.
// ext_authz asks them for the token of each outbound call it sees; the xDS server asks
// them for the tokens sidecars inject themselves (Token), which keeps those fresh. One
// Sources is shared by both when they run in one process. Safe for concurrent use.
type Sources struct {
	mu   sync.Mutex
	m    map[string]*Source
	subs map[chan struct{}]struct{}
}

// Source is one endpoint's grant: Client for client credentials, Exchange for token
// exchange (at most one is set).
type Source struct {
	auth     *policy.HTTPEndpointAuthSpec // the snapshot's, compared by pointer first
	key      string                       // the auth's JSON, compared when the pointer differs
	Client   *ClientCredentials
	Exchange *TokenExchange
}

// NewSources returns an empty set.
func NewSources() *Sources {
	return &Sources{m: map[string]*Source{}, subs: map[chan struct{}]struct{}{}}
}

// Get is the source of ep's auth, created on first use.
func (s *Sources) Get(ep *policy.HTTPEndpoint) *Source {
	s.mu.Lock()
	cs, replaced := s.getLocked(ep)
	s.mu.Unlock()
	if replaced {
		s.notify()
	}
	return cs
}

func (s *Sources) getLocked(ep *policy.HTTPEndpoint) (cs *Source, replaced bool) {
	old := s.m[ep.Name]
	if old != nil && old.auth == ep.Auth {
		return old, false
	}
	b, _ := json.Marshal(ep.Auth)
	if old != nil && old.key == string(b) {
		old.auth = ep.Auth
		return old, false
	}
	cs = &Source{auth: ep.Auth, key: string(b)}
	if cfg, ok := ConfigOf(ep); ok {
		cs.Client = NewClientCredentials(cfg)
	} else if cfg, ok := ExchangeConfigOf(ep); ok {
		cs.Exchange = NewTokenExchange(cfg)
	}
	if old != nil && old.Client != nil {
		old.Client.Close()
	}
	s.m[ep.Name] = cs
	return cs, old != nil
}

// Token is the current access token of an endpoint with client credentials, "" while
// there is none (yet, or the token endpoint fails). It never waits: the first call starts
// the source keeping a token (Keep), and Changes fires when the answer changes.
func (s *Sources) Token(ep *policy.HTTPEndpoint) string {
	cs := s.Get(ep)
	if cs.Client == nil {
		return ""
	}
	cs.Client.Keep(s.notify)
	tok, _ := cs.Client.Current()
	return tok
}

// Retain drops the sources of endpoints no longer in snap, ending their renewals.
func (s *Sources) Retain(snap *policy.Snapshot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, cs := range s.m {
		if snap.Endpoints[name] == nil {
			if cs.Client != nil {
				cs.Client.Close()
			}
			delete(s.m, name)
		}
	}
}

// Changes signals (coalesced) when a token Token returned may have changed; stop
// unsubscribes.
func (s *Sources) Changes() (ch <-chan struct{}, stop func()) {
	c := make(chan struct{}, 1)
	s.mu.Lock()
	s.subs[c] = struct{}{}
	s.mu.Unlock()
	return c, func() {
		s.mu.Lock()
		delete(s.subs, c)
		s.mu.Unlock()
	}
}

func (s *Sources) notify() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.subs {
		select {
		case c <- struct{}{}:
		default:
		}
	}
}
