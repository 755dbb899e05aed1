package extproc

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"strings"

	"github.com/mcpgate/mcpgate/envoy/contract"
)

// Session binding. An MCP server names a session with the Mcp-Session-Id header of its
// answer to initialize, and trusts whoever presents that id afterwards. Through mcpgate
// the client never sees the server's id S but S.tag, where tag is an HMAC of S and the
// identity that opened the session (target app, caller App ID and namespace, token
// issuer and subject). A request presenting an id is forwarded with S only if the tag
// matches the identity of this request: a session id that leaks (logs, a shared proxy, a
// malicious tool result) is useless to any other caller. It needs no state, so it works
// across replicas given the same key.
//
// A request whose id is not bound to its caller is answered 404, as a server answers an
// unknown session (MCP Streamable HTTP): clients then open a new session. That is also
// what happens to sessions opened before binding was turned on, or under another key.

// SessionKeyBytes is the size of a session binding key.
const SessionKeyBytes = 32

// sessionTagBytes is the HMAC-SHA256 prefix kept: 128 bits.
const sessionTagBytes = 16

// NewSessionKey returns a random session binding key.
func NewSessionKey() ([]byte, error) {
	k := make([]byte, SessionKeyBytes)
	if _, err := rand.Read(k); err != nil {
		return nil, err
	}
	return k, nil
}

// errSessionNotBound is why a presented session id is refused.
var errSessionNotBound = errors.New("session not found: its id was not issued through mcpgate to this caller")

// sessionTag is the binding of server session id sid to identity.
func (s *Server) sessionTag(sid string, id sessionIdentity) string {
	m := hmac.New(sha256.New, s.sessionKey)
	m.Write([]byte(lengthPrefixed(sid, id.target, id.appID, id.namespace, id.issuer, id.subject)))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil)[:sessionTagBytes])
}

// sessionIdentity is what a session is bound to.
type sessionIdentity struct{ target, appID, namespace, issuer, subject string }

func identityOf(id contract.Identity) sessionIdentity {
	return sessionIdentity{id.Target, id.CallerAppID, id.CallerNamespace, id.Issuer, id.Subject}
}

// bindSession returns the id the client gets for the server's session id sid.
func (s *Server) bindSession(sid string, id sessionIdentity) string {
	return sid + "." + s.sessionTag(sid, id)
}

// unbindSession returns the server's session id from the one a client presented, if it
// was bound to id.
func (s *Server) unbindSession(presented string, id sessionIdentity) (string, error) {
	i := strings.LastIndexByte(presented, '.')
	if i < 0 {
		return "", errSessionNotBound
	}
	sid, tag := presented[:i], presented[i+1:]
	if !hmac.Equal([]byte(tag), []byte(s.sessionTag(sid, id))) {
		return "", errSessionNotBound
	}
	return sid, nil
}
