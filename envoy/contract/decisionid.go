package contract

import (
	"encoding/hex"
	"math/rand/v2"
)

// DecisionIDLen is the length of a decision id: 32 lowercase hex digits (128 bits).
const DecisionIDLen = 32

// NewDecisionID returns a new decision id: 128 random bits as 32 lowercase hex digits.
// extauthz makes one per Check, extproc one per HTTP request; they appear in
// [HeaderDecisionID], [MetaDecisionID] and the decision logs. math/rand/v2's generator is
// ChaCha8-based: unpredictable enough for correlation ids and far cheaper per request than
// crypto/rand. The ids are not secrets and grant nothing.
func NewDecisionID() string {
	var b [DecisionIDLen / 2]byte
	v1, v2 := rand.Uint64(), rand.Uint64()
	for j := range 8 {
		b[j], b[8+j] = byte(v1>>(8*j)), byte(v2>>(8*j))
	}
	return hex.EncodeToString(b[:])
}

// IsDecisionID reports whether s has the format of [NewDecisionID].
func IsDecisionID(s string) bool {
	if len(s) != DecisionIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
