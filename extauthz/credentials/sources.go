package credentials

import (
	"context"
	"encoding/json"
	"sync"

	"github.com/mcpgate/mcpgate/policy"
)

// Sources hold one token source per HTTPEndpoint, kept across policy reloads while the
// endpoint's auth is unchanged (its cached token with it), replaced when it changes.
// ext_authz asks them for the token of each outbound call it sees (ClientToken), which
// keeps that token fresh from then on; the xDS server asks them for the tokens sidecars
// inject themselves (Token). One
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

// ClientToken is the token of a client-credentials source for a call (waiting for the
// fetch when there is none), and from then on the source is kept (Keep): renewed before
// expiry without calls, and published through Token. Nothing is fetched for an endpoint
// nobody calls.
func (s *Sources) ClientToken(ctx context.Context, src *Source) (string, error) {
	src.Client.Keep(s.notify)
	return src.Client.Token(ctx)
}

// Token is the current access token of an endpoint with client credentials that calls
// have used (ClientToken), "" otherwise or while there is none (the token endpoint
// fails). It never waits and never starts a fetch; Changes fires when its answer may
// have changed.
func (s *Sources) Token(ep *policy.HTTPEndpoint) string {
	s.mu.Lock()
	if s.m[ep.Name] == nil {
		s.mu.Unlock()
		return ""
	}
	cs, replaced := s.getLocked(ep) // a changed auth: a new source, not used yet
	s.mu.Unlock()
	if replaced {
		s.notify()
	}
	if cs.Client == nil {
		return ""
	}
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
