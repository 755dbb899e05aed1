package mcp

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// JSON-RPC 2.0 error codes (JSON-RPC 2.0 section 5.1).
const (
	CodeParseError     = -32700
	CodeInvalidRequest = -32600
	CodeMethodNotFound = -32601
	CodeInvalidParams  = -32602
	CodeInternalError  = -32603
)

// Defaults for the zero Limits, and the most nesting any Limits can allow (parsing
// recurses once per level).
const (
	DefaultMaxBytes = 1 << 20
	DefaultMaxDepth = 64
	DefaultMaxBatch = 100
	MaxDepthCeiling = 10000
)

// ErrTooLarge is returned (unwrapped) when a body or an event exceeds Limits.MaxBytes; the
// caller answers HTTP 413 for requests, or aborts a response stream.
var ErrTooLarge = errors.New("mcp: message larger than the limit")

// Limits bound parsing. Zero values mean defaults: MaxBytes 1 MiB, MaxDepth 64, MaxBatch
// 100.
type Limits struct {
	// MaxBytes bounds a request body, a JSON response body, or one server-sent event.
	MaxBytes int
	// MaxDepth bounds the nesting of arrays and objects; the top-level object is depth 1.
	// Values above MaxDepthCeiling are lowered to it.
	MaxDepth int
	// AllowBatch accepts JSON-RPC batches (arrays of messages). MCP 2025-03-26 allows them
	// in POST bodies; 2025-06-18 removed them.
	AllowBatch bool
	// MaxBatch bounds the messages of a batch (default DefaultMaxBatch): every message
	// costs a decision, and possibly a Rego evaluation and a patch.
	MaxBatch int
}

func (l Limits) withDefaults() Limits {
	if l.MaxBytes <= 0 {
		l.MaxBytes = DefaultMaxBytes
	}
	if l.MaxDepth <= 0 {
		l.MaxDepth = DefaultMaxDepth
	}
	if l.MaxBatch <= 0 {
		l.MaxBatch = DefaultMaxBatch
	}
	l.MaxDepth = min(l.MaxDepth, MaxDepthCeiling)
	return l
}

// Error is a JSON-RPC error about a message: the caller answers it as a JSON-RPC error
// response (see ErrorResponse) without forwarding the message.
type Error struct {
	Code    int
	Message string
	// ID is the raw id of the offending message when it could be read, so the answer can
	// carry it; nil otherwise (answer with a null id).
	ID json.RawMessage
}

func (e *Error) Error() string { return fmt.Sprintf("jsonrpc error %d: %s", e.Code, e.Message) }

func newError(code int, id json.RawMessage, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...), ID: id}
}

// AppendJSONString appends s to dst as a JSON string. Invalid UTF-8 becomes U+FFFD;
// control characters, quotes, backslashes, U+2028 and U+2029 are escaped, so the result
// is read alike by every JSON and JavaScript parser.
func AppendJSONString(dst []byte, s string) []byte {
	return appendQuoted(dst, []byte(strings.ToValidUTF8(s, "\uFFFD")))
}

// ErrorResponse returns the JSON-RPC error response {"jsonrpc":"2.0","id":id,"error":{...}};
// a nil id is written as null (JSON-RPC 2.0 section 5).
func ErrorResponse(id json.RawMessage, code int, message string) []byte {
	b := make([]byte, 0, 64+len(id)+len(message))
	b = append(b, `{"jsonrpc":"2.0","id":`...)
	if len(id) == 0 {
		b = append(b, "null"...)
	} else {
		b = append(b, id...)
	}
	b = append(b, `,"error":{"code":`...)
	b = strconv.AppendInt(b, int64(code), 10)
	b = append(b, `,"message":`...)
	b = AppendJSONString(b, message)
	return append(b, "}}"...)
}

// Kind classifies a JSON-RPC message.
type Kind uint8

const (
	// KindRequest has a method and an id and expects a response.
	KindRequest Kind = iota + 1
	// KindNotification has a method and no id.
	KindNotification
	// KindResponse is a client's answer (result or error) to a request the server sent it,
	// e.g. sampling/createMessage or elicitation/create.
	KindResponse
)

func (k Kind) String() string {
	switch k {
	case KindRequest:
		return "request"
	case KindNotification:
		return "notification"
	case KindResponse:
		return "response"
	}
	return "unknown"
}

// Message is one JSON-RPC message of a POST body. Raw fields alias the parsed body.
type Message struct {
	Kind Kind
	// ID is the raw id (a string or an integer) exactly as sent; nil for notifications.
	ID     json.RawMessage
	Method string
	// Params is the raw params object, or nil.
	Params json.RawMessage

	// Extracted for decisions; empty when not applicable.

	// Tool is params.name of tools/call.
	Tool string
	// Arguments is params.arguments of tools/call, decoded as encoding/json would with
	// UseNumber (numbers are json.Number, so they round-trip exactly); nil when absent.
	Arguments map[string]any
	// Prompt is params.name of prompts/get.
	Prompt string
	// URI is params.uri of resources/read, resources/subscribe and resources/unsubscribe.
	URI string
	// ProgressToken is params._meta.progressToken, raw, if any.
	ProgressToken json.RawMessage
	// Task is true when params has a "task" member: the request is task-augmented (MCP
	// 2025-11-25 tasks), answered with a task handle, its result fetched later with
	// tasks/result.
	Task bool
	// TaskID is params.taskId of tasks/get, tasks/result and tasks/cancel.
	TaskID string

	start, end int // the message object in the body
	params     span
	args       span
}

// span is a half-open byte range of the body; start < 0 means absent.
type span struct{ start, end int }

var absent = span{-1, -1}

func (s span) ok() bool { return s.start >= 0 }

// Body is a parsed POST body.
type Body struct {
	Messages []*Message
	// Batch is true when the body was a JSON array of messages.
	Batch bool

	size int // len of the parsed body, to catch PatchArguments on other bytes
}

// ParseBody parses a POST body strictly. It returns ErrTooLarge for bodies over
// lim.MaxBytes and *Error otherwise: CodeParseError when the bytes are not JSON every parser
// reads alike (syntax, UTF-8, lone surrogates, duplicate keys, depth), CodeInvalidRequest
// for JSON that is not valid JSON-RPC as MCP uses it, CodeInvalidParams for MCP methods
// whose params lack what the method needs. A batch is refused as a whole if any message is.
func ParseBody(body []byte, lim Limits) (*Body, error) {
	lim = lim.withDefaults()
	if len(body) > lim.MaxBytes {
		return nil, ErrTooLarge
	}
	// Index containers down to the members of params (batch 1, message 2, params 3,
	// arguments and _meta 4) so that extraction jumps over them instead of rescanning.
	v, err := validateIndexed(body, lim.MaxDepth, 4)
	defer v.release()
	if err != nil {
		return nil, newError(CodeParseError, nil, "parse error: %v", err)
	}
	x := v.index()
	b := &Body{size: len(body)}
	i := skipWS(body, 0)
	switch body[i] {
	case '{':
		m, err := parseMessage(body, i, x)
		if err != nil {
			return nil, err
		}
		b.Messages = []*Message{m}
	case '[':
		if !lim.AllowBatch {
			return nil, newError(CodeInvalidRequest, nil, "JSON-RPC batches are not allowed")
		}
		b.Batch = true
		for it := newElements(body, i, x); ; {
			start, _, ok := it.next()
			if !ok {
				break
			}
			n := len(b.Messages)
			if n == lim.MaxBatch {
				return nil, newError(CodeInvalidRequest, nil, "a JSON-RPC batch may hold at most %d messages", lim.MaxBatch)
			}
			if body[start] != '{' {
				return nil, newError(CodeInvalidRequest, nil, "batch element %d is not an object", n)
			}
			m, err := parseMessage(body, start, x)
			if err != nil {
				err.Message = fmt.Sprintf("batch element %d: %s", n, err.Message)
				return nil, err
			}
			if m.Kind == KindRequest {
				// Two requests with one id get answers the client cannot tell apart, and
				// that a filter matching responses to requests by id could mistake.
				for _, o := range b.Messages {
					if o.Kind == KindRequest && SameID(o.ID, m.ID) {
						return nil, newError(CodeInvalidRequest, nil, "batch element %d: id %s is the id of an earlier request of the batch", n, clip(m.ID))
					}
				}
			}
			b.Messages = append(b.Messages, m)
		}
		if len(b.Messages) == 0 {
			return nil, newError(CodeInvalidRequest, nil, "empty JSON-RPC batch")
		}
	default:
		return nil, newError(CodeInvalidRequest, nil, "a JSON-RPC message must be an object")
	}
	return b, nil
}

// parseMessage reads the validated message object at body[i].
func parseMessage(body []byte, i int, x spanIndex) (*Message, *Error) {
	var version, id, method, params, result, errv = absent, absent, absent, absent, absent, absent
	m := &Message{start: i, params: absent, args: absent}
	var mb member
	it := newMembers(body, i, x)
	for it.next(&mb) {
		s := span{mb.start, mb.end}
		switch {
		case mb.is("jsonrpc"):
			version = s
		case mb.is("id"):
			id = s
		case mb.is("method"):
			method = s
		case mb.is("params"):
			params = s
		case mb.is("result"):
			result = s
		case mb.is("error"):
			errv = s
		}
		// Other members are ignored, as JSON-RPC servers do.
	}
	m.end = it.end
	if id.ok() {
		if err := checkID(body[id.start:id.end]); err != nil {
			return nil, newError(CodeInvalidRequest, nil, "%v", err)
		}
		m.ID = raw(body, id)
	}
	if !version.ok() || body[version.start] != '"' || stringValue(body, version.start, version.end) != "2.0" {
		return nil, newError(CodeInvalidRequest, m.ID, `"jsonrpc" must be "2.0"`)
	}
	if params.ok() {
		if body[params.start] != '{' {
			return nil, newError(CodeInvalidRequest, m.ID, `"params" must be an object`)
		}
		m.params, m.Params = params, raw(body, params)
	}
	if !method.ok() {
		switch {
		case result.ok() && errv.ok():
			return nil, newError(CodeInvalidRequest, m.ID, `a response has "result" or "error", not both`)
		case !result.ok() && !errv.ok():
			return nil, newError(CodeInvalidRequest, m.ID, `"method" is missing`)
		case !id.ok():
			return nil, newError(CodeInvalidRequest, nil, `a response must have an "id"`)
		case result.ok() && body[result.start] != '{':
			return nil, newError(CodeInvalidRequest, m.ID, `"result" must be an object`)
		case errv.ok() && body[errv.start] != '{':
			return nil, newError(CodeInvalidRequest, m.ID, `"error" must be an object`)
		}
		m.Kind = KindResponse
		return m, nil
	}
	if result.ok() || errv.ok() {
		return nil, newError(CodeInvalidRequest, m.ID, `a request cannot have "result" or "error"`)
	}
	if body[method.start] != '"' {
		return nil, newError(CodeInvalidRequest, m.ID, `"method" must be a string`)
	}
	m.Method = stringValue(body, method.start, method.end)
	if m.Kind = KindNotification; id.ok() {
		m.Kind = KindRequest
	}
	if err := m.extract(body, x); err != nil {
		return nil, err
	}
	return m, nil
}

// MaxSafeID is the largest integer id mcpgate accepts, 2^53-1: every JSON-RPC peer reads
// integers up to it exactly, JavaScript's doubles included. Above it, SDKs that convert ids
// through float64 (or int64, past 2^63) answer with a different id than the one asked.
const MaxSafeID = 1<<53 - 1

const maxSafeIDText = "9007199254740991"

// checkID accepts the ids MCP allows: a string or an integer. MCP forbids null ids (unlike
// plain JSON-RPC); fractions and exponents are refused so that every client and server
// reads the same integer, and so are integers beyond ±MaxSafeID: a server that answers
// with another id than the one decided on would have its response skip filtering and
// redaction.
func checkID(id []byte) error {
	switch c := id[0]; {
	case c == '"':
		return nil
	case c == '-' || isDigit(c):
		digits := id
		if c == '-' {
			digits = id[1:]
		}
		for _, c := range digits {
			if !isDigit(c) {
				return errors.New(`"id" must be a string or an integer`)
			}
		}
		if len(digits) > len(maxSafeIDText) || len(digits) == len(maxSafeIDText) && string(digits) > maxSafeIDText {
			return fmt.Errorf(`"id" %s is outside the integers every peer reads exactly (-%d to %d): use a smaller integer or a string`, clipID(id), MaxSafeID, MaxSafeID)
		}
		return nil
	default:
		return errors.New(`"id" must be a string or an integer`)
	}
}

// clipID shortens a long numeric id for an error message.
func clipID(id []byte) string {
	if len(id) == 0 {
		return "(none)"
	}
	if len(id) > 24 {
		return string(id[:20]) + "..."
	}
	return string(id)
}

func raw(body []byte, s span) json.RawMessage { return json.RawMessage(body[s.start:s.end:s.end]) }

// extract reads what decisions need from params. It runs for notifications too: a server
// that wrongly acts on a tools/call sent without an id must not act on an unchecked one.
func (m *Message) extract(body []byte, x spanIndex) *Error {
	var name, uri, args, meta, taskID = absent, absent, absent, absent, absent
	if m.params.ok() {
		var mb member
		for it := newMembers(body, m.params.start, x); it.next(&mb); {
			s := span{mb.start, mb.end}
			switch {
			case mb.is("name"):
				name = s
			case mb.is("uri"):
				uri = s
			case mb.is("arguments"):
				args = s
			case mb.is("_meta"):
				meta = s
			case mb.is("taskId"):
				taskID = s
			case mb.is("task"):
				m.Task = true // whatever its value: a server may take any as a request for a task
			}
		}
	}
	if meta.ok() {
		if body[meta.start] != '{' {
			return newError(CodeInvalidParams, m.ID, `"params._meta" must be an object`)
		}
		if t := findMember(body, meta.start, "progressToken", x); t.ok() {
			m.ProgressToken = raw(body, t)
		}
	}
	switch m.Method {
	case "tools/call":
		tool, err := nameParam(body, name, m, "tools/call", "name")
		if err != nil {
			return err
		}
		m.Tool = tool
		if args.ok() {
			if body[args.start] != '{' {
				return newError(CodeInvalidParams, m.ID, `tools/call "arguments" must be an object`)
			}
			v, _ := decodeValue(body, args.start)
			m.Arguments, m.args = v.(map[string]any), args
		}
	case "prompts/get":
		p, err := nameParam(body, name, m, "prompts/get", "name")
		if err != nil {
			return err
		}
		m.Prompt = p
	case "resources/read", "resources/subscribe", "resources/unsubscribe":
		u, err := nameParam(body, uri, m, m.Method, "uri")
		if err != nil {
			return err
		}
		m.URI = u
	case "tasks/get", "tasks/result", "tasks/cancel":
		id, err := nameParam(body, taskID, m, m.Method, "taskId")
		if err != nil {
			return err
		}
		m.TaskID = id
	}
	return nil
}

// nameParam reads a required string parameter that names what a policy decides on. Control
// characters are refused: a NUL truncates the name for C-based servers, and names are
// compared, logged and used as metric labels.
func nameParam(body []byte, s span, m *Message, method, param string) (string, *Error) {
	if !s.ok() || body[s.start] != '"' {
		return "", newError(CodeInvalidParams, m.ID, "%s needs a string %q parameter", method, param)
	}
	v := stringValue(body, s.start, s.end)
	if v == "" {
		return "", newError(CodeInvalidParams, m.ID, "%s %q parameter is empty", method, param)
	}
	for i := 0; i < len(v); i++ {
		if v[i] < 0x20 || v[i] == 0x7f {
			return "", newError(CodeInvalidParams, m.ID, "%s %q parameter holds a control character", method, param)
		}
	}
	return v, nil
}
