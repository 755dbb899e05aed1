package credentials

import (
	"context"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/policy"
)

// TestSourcesToken: Token never waits nor fetches; the first call's ClientToken makes the
// source kept and published. An auth change replaces the source (its renewals end), and
// Retain forgets endpoints that left the policy.
func TestSourcesToken(t *testing.T) {
	e := newTokenEndpoint(t, "s1", 3600)
	ep := &policy.HTTPEndpoint{Name: "github-mcp", Auth: &policy.HTTPEndpointAuthSpec{ClientCredentials: &policy.ClientCredentialsSpec{
		TokenURL: e.URL, ClientID: "agent", ClientSecretFile: secretFile(t, "s1")}}}
	s := NewSources()
	changes, stop := s.Changes()
	defer stop()
	if tok := s.Token(ep); tok != "" || e.calls.Load() != 0 {
		t.Fatalf("Token for an endpoint nobody called: %q, %d fetches", tok, e.calls.Load())
	}
	if tok, err := s.ClientToken(context.Background(), s.Get(ep)); err != nil || tok != "tok-1" {
		t.Fatalf("ClientToken %q %v", tok, err)
	}
	select {
	case <-changes:
	case <-time.After(10 * time.Second):
		t.Fatal("no change signalled when the token arrived")
	}
	if tok := s.Token(ep); tok != "tok-1" {
		t.Fatalf("token %q", tok)
	}
	old := s.Get(ep).Client

	changed := *ep.Auth.ClientCredentials
	changed.Scopes = []string{"repo:write"}
	ep2 := &policy.HTTPEndpoint{Name: ep.Name, Auth: &policy.HTTPEndpointAuthSpec{ClientCredentials: &changed}}
	if s.Get(ep2).Client == old {
		t.Fatal("a changed auth kept the old source")
	}
	old.mu.Lock()
	closed := old.closed
	old.mu.Unlock()
	if !closed {
		t.Error("the replaced source still renews")
	}
	s.Retain(&policy.Snapshot{Endpoints: map[string]*policy.HTTPEndpoint{}})
	s.mu.Lock()
	n := len(s.m)
	s.mu.Unlock()
	if n != 0 {
		t.Errorf("%d sources kept for endpoints gone from the policy", n)
	}
}
