package extproc

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/mcpgate/mcpgate/extproc/mcp"
)

// MCP tasks (2025-11-25): a task-augmented tools/call is answered with a handle, and the
// task's status and result are fetched later with tasks/get and tasks/result (tasks/list
// lists them, tasks/cancel ends one). Those requests name no tool, so mcpgate remembers
// every task it saw created: which app, which caller (App ID, namespace, subject) and
// which tool, with the redactions of the call that created it.
//
//   - tasks/get, tasks/result and tasks/cancel are allowed, like protocol methods, when
//     the task is one this caller created through this mcpgate and the caller may still
//     use its tool (the list-time decision under the current policy); otherwise they are
//     denied as an unknown task, whoever created it. A rule that names these methods still
//     decides them first (a deny there wins; an allow never skips the ownership check).
//   - tasks/result gets the redactions of the tool's results: responses.redact as the
//     current policy says, and what the creating call's Rego decision redacted.
//   - tasks/list is filtered to the caller's own tasks.
//
// Tasks are remembered in memory, until their ttl (capped at maxTaskTTL, maxTaskTTL when
// the server gives none) and at most maxTasks at a time, and, when the Mesh names a Redis
// (spec.rateLimits.redis), in Redis too, so that a task created through one replica can be
// polled through another. A task mcpgate does not know (created through a replica
// without the shared store, before a restart without it, when the table was full, or
// while Redis does not answer) is denied, failing closed.

const (
	maxTasks   = 100000
	maxTaskTTL = 24 * time.Hour
)

// taskMethods are the requests about an existing task.
var taskMethods = map[string]bool{"tasks/get": true, "tasks/result": true, "tasks/cancel": true}

type taskKey struct{ app, id string }

// taskOwner is who created a task: they alone may use it. As a session is, it is bound
// to the token's issuer too: the same sub from another issuer the app trusts is another
// user.
type taskOwner struct{ appID, namespace, issuer, subject string }

type taskRecord struct {
	owner   taskOwner
	tool    string
	redact  [][]string // the creating call's Rego redactions
	expires time.Time
}

type taskTable struct {
	mu sync.Mutex
	m  map[taskKey]*taskRecord
}

func (st *stream) ownerOf(r *Request) taskOwner {
	return taskOwner{appID: r.Caller.AppID, namespace: r.Caller.Namespace, issuer: st.ident.Issuer, subject: r.Subject}
}

// add remembers a task a server created; it reports false when it could not (the table
// is full, or the id is another caller's: a server must not hand out one id twice).
func (t *taskTable) add(k taskKey, rec *taskRecord, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil {
		t.m = make(map[taskKey]*taskRecord)
	}
	if old, ok := t.m[k]; ok && old.owner != rec.owner && now.Before(old.expires) {
		return false
	}
	if len(t.m) >= maxTasks {
		for key, r := range t.m {
			if !now.Before(r.expires) {
				delete(t.m, key)
			}
		}
		if len(t.m) >= maxTasks {
			return false
		}
	}
	t.m[k] = rec
	return true
}

// get returns the task if it is the owner's and has not expired.
func (t *taskTable) get(k taskKey, owner taskOwner, now time.Time) (*taskRecord, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	rec, ok := t.m[k]
	if !ok || rec.owner != owner {
		return nil, false
	}
	if !now.Before(rec.expires) {
		delete(t.m, k)
		return nil, false
	}
	return rec, true
}

func (t *taskTable) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}

const unknownTask = "unknown task: not one this caller created through mcpgate, or expired"

// lookupTask returns the task a request names if it is the caller's: this replica's
// table first, then the shared store.
func (st *stream) lookupTask(ctx context.Context, r *Request, taskID string) *taskRecord {
	k, owner, now := taskKey{st.app.ID, taskID}, st.ownerOf(r), st.s.now()
	if rec, ok := st.s.tasks.get(k, owner, now); ok {
		return rec
	}
	if rec, ok := st.sharedTask(ctx, k, owner, now); ok {
		return rec
	}
	return nil
}

// decideTask decides a request about a task that the rules and Rego allowed (d): the
// task must be the caller's (rec, from lookupTask), and its tool still allowed to them.
func (st *stream) decideTask(ctx context.Context, r *Request, rec *taskRecord, d Decision) Decision {
	if rec == nil {
		return Decision{Rule: ruleTask, Reason: unknownTask}
	}
	lr := *r
	lr.Method, lr.Tool, lr.Arguments, lr.ID, lr.Listing = "tools/call", rec.tool, nil, nil, true
	if ld := Decide(ctx, st.app.MCP, &lr); !ld.Allow {
		return Decision{Rule: ruleTask, Reason: "the task's tool " + strconvQuote(rec.tool) + " is not allowed"}
	}
	return Decision{Allow: true, Rule: ruleTask, Redact: d.Redact}
}

// taskRecorder returns what remembers the task a task-augmented tools/call of tool was
// answered with.
func (st *stream) taskRecorder(r *Request, tool string, redact [][]string) func(resp []byte) {
	s, app, owner, cfg := st.s, st.app.ID, st.ownerOf(r), st.snap.Mesh.RateLimits
	return func(resp []byte) {
		id, ttl, ok, err := mcp.TaskHandle(resp)
		if err != nil || !ok {
			return // a plain result (the server ran the call at once), or an error
		}
		now := s.now()
		life := maxTaskTTL
		if ttl > 0 && time.Duration(ttl)*time.Millisecond < life {
			life = time.Duration(ttl) * time.Millisecond
		}
		k, rec := taskKey{app, id}, &taskRecord{owner: owner, tool: tool, redact: redact, expires: now.Add(life)}
		if store := s.shared.get(cfg); store != nil && store.r != nil {
			// Shared first: if another caller holds the id in Redis, this replica must not
			// hand it to this one either.
			val, _ := json.Marshal(sharedTaskRecord{Tool: tool, Redact: redact})
			claimed, err := store.r.Claim(context.Background(), k.shared(), owner.String(), val, life)
			if err != nil {
				s.shared.log.Warn("a task is remembered by this replica only: redis did not answer",
					zap.String("target", app), zap.String("tool", tool), zap.Error(err))
			} else if !claimed {
				s.shared.log.Warn("a server answered with the id of another caller's task: not remembered",
					zap.String("target", app), zap.String("tool", tool))
				return
			}
		}
		if !s.tasks.add(k, rec, now) {
			s.shared.log.Warn("a task is not remembered: its requests will be denied",
				zap.String("target", app), zap.String("tool", tool), zap.Int("tasks", s.tasks.len()))
		}
	}
}

// sharedTaskRecord is a task as the replicas share it in Redis, keyed by app and task id
// and owned by its creator.
type sharedTaskRecord struct {
	Tool   string     `json:"tool"`
	Redact [][]string `json:"redact,omitempty"`
}

// shared is the task's key in the shared store: hashed, since task ids are the server's
// and of any length.
func (k taskKey) shared() string {
	sum := sha256.Sum256([]byte(lengthPrefixed(k.app, k.id)))
	return "task:" + hex.EncodeToString(sum[:])
}

// String is the owner as the shared store compares it.
func (o taskOwner) String() string {
	return lengthPrefixed(o.appID, o.namespace, o.issuer, o.subject)
}

// sharedTask looks a task this replica does not know up in the shared store, if the
// Mesh names one, and remembers it here when it is the owner's.
func (st *stream) sharedTask(ctx context.Context, k taskKey, owner taskOwner, now time.Time) (*taskRecord, bool) {
	store := st.s.shared.get(st.snap.Mesh.RateLimits)
	if store == nil || store.r == nil {
		return nil, false
	}
	val, left, ok, err := store.r.Owned(ctx, k.shared(), owner.String())
	if err != nil {
		st.s.shared.log.Warn("a task could not be looked up: redis did not answer", zap.String("target", k.app), zap.Error(err))
		return nil, false
	}
	var sr sharedTaskRecord
	if !ok || json.Unmarshal(val, &sr) != nil || sr.Tool == "" {
		return nil, false
	}
	rec := &taskRecord{owner: owner, tool: sr.Tool, redact: sr.Redact, expires: now.Add(left)}
	st.s.tasks.add(k, rec, now)
	return rec, true
}

// taskListFilter keeps the caller's own tasks in a tasks/list result.
func (st *stream) taskListFilter(r *Request) func([]string) []bool {
	s, app, owner := st.s, st.app.ID, st.ownerOf(r)
	return func(ids []string) []bool {
		keep := make([]bool, len(ids))
		now := s.now()
		for i, id := range ids {
			_, keep[i] = s.tasks.get(taskKey{app, id}, owner, now)
		}
		return keep
	}
}
