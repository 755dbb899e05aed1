package mcp

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"unicode"
)

// Rewriter rewrites the response to one request inside a text/event-stream body that
// arrives in arbitrary chunks (Envoy ext_proc STREAMED body mode). Every event passes
// through byte for byte as soon as it is complete (progress notifications, server requests,
// priming events, comments), except events whose data is a JSON-RPC response with the
// given id: that response goes through the callback and the event is re-emitted well
// formed, keeping its other lines ("event", "id", "retry", comments) in order and
// re-splitting the new data into "data:" lines. Only the incomplete tail of the stream is
// ever held.
//
// Lines end with LF or CRLF: an event with a lone CR is an error (see rewriteEvent).
//
// Fail closed: an event whose data starts like JSON ('{' or '[' after any Unicode white
// space, see clientSpace) must be strict JSON (no duplicate keys, valid UTF-8, no lone
// surrogates, within MaxDepth, only JSON white space around it), or Feed returns an error,
// because a client's parser could read a response out of it that this one did not. The
// event name is not consulted: some clients hand every event's data to the JSON-RPC layer
// whatever its type.
//
// At the end of the stream, a trailing incomplete event with data is dropped; one without
// data (a comment, an unterminated "id" line) passes through as is.
type Rewriter struct {
	f             Framer
	id            json.RawMessage
	answering     []json.RawMessage // with strict: the ids a response may have
	strict        bool
	maxDepth      int
	fn            func(resp []byte) ([]byte, error)
	prevRewritten bool
	prevCR        bool // the previous event's bytes end with a CR
	rewritten     int
	events        int
}

// NewRewriter returns a Rewriter of the responses with id (a raw JSON-RPC id, compared as
// SameID does) through fn, which gets the response object and returns its replacement.
// lim.MaxBytes bounds one event, lim.MaxDepth the data of JSON events.
func NewRewriter(id json.RawMessage, lim Limits, fn func(resp []byte) ([]byte, error)) *Rewriter {
	lim = lim.withDefaults()
	return &Rewriter{f: Framer{MaxEventBytes: lim.MaxBytes}, id: id, maxDepth: lim.MaxDepth, fn: fn}
}

// OnlyAnswering makes the Rewriter fail on any response whose id is not one of ids (as
// SameID compares them), and returns it. An exchange whose responses must be rewritten
// fails closed when the server answers with an id nobody asked for: that response would
// otherwise pass unrewritten to a client that may match it to a request anyway. With no
// ids, every response is an error (a stream that must carry none).
func (r *Rewriter) OnlyAnswering(ids []json.RawMessage) *Rewriter {
	r.answering, r.strict = ids, true
	return r
}

// Rewritten returns how many responses the Rewriter has passed through its callback.
func (r *Rewriter) Rewritten() int { return r.rewritten }

// Feed consumes the next chunk of the stream and returns the bytes to send on. The result
// may alias chunk. On error, the bytes of the events completed before it are returned with
// it; the caller should abort the stream (its response is not safe to pass on).
func (r *Rewriter) Feed(chunk []byte, endOfStream bool) ([]byte, error) {
	var out, run []byte
	var runStart, runEnd = -1, -1
	err := r.f.feed(chunk, endOfStream, func(buf []byte, start, end int, ev *Event) error {
		r.events++
		repl, err := r.rewriteEvent(ev)
		if err != nil {
			return err
		}
		// A leading LF is the second half of the previous event's CRLF terminator (see
		// Framer): it goes out exactly when that event went out as it came in.
		if repl == nil {
			if ev.leadLF && r.prevRewritten {
				start++
			}
			r.prevRewritten = false
			if runStart >= 0 && runEnd == start {
				runEnd = end
				return nil
			}
			if runStart >= 0 {
				out = append(out, run[runStart:runEnd]...)
			}
			run, runStart, runEnd = buf, start, end
			return nil
		}
		if runStart >= 0 {
			out = append(out, run[runStart:runEnd]...)
			runStart = -1
		}
		if ev.leadLF && !r.prevRewritten {
			out = append(out, '\n')
		}
		out = append(out, repl...)
		r.prevRewritten = true
		return nil
	})
	if runStart >= 0 {
		if out == nil {
			out = run[runStart:runEnd:runEnd] // nothing rewritten: no copy
		} else {
			out = append(out, run[runStart:runEnd]...)
		}
	}
	return out, err
}

// rewriteEvent returns the replacement of ev (empty to drop it), or nil to pass it through.
func (r *Rewriter) rewriteEvent(ev *Event) ([]byte, error) {
	lone := r.prevCR && !ev.leadLF || loneCR(ev.Raw)
	r.prevCR = len(ev.Raw) > 0 && ev.Raw[len(ev.Raw)-1] == '\r'
	if lone {
		// SSE ends a line at CR, LF or CRLF, and so does the Framer; clients that split
		// on LF alone (the Go SDK's) read "data:\r{...}" as one data line holding a
		// response, where the Framer reads an empty data line and a field it ignores.
		// Servers end lines with LF or CRLF.
		return nil, fmt.Errorf("mcp: server-sent event %d: a line ends with a lone CR, which clients split differently", r.events)
	}
	if !ev.HasData {
		return nil, nil
	}
	if ev.Incomplete {
		// The stream ended inside this event. A WHATWG client discards it (HTML 9.2.6: "the
		// incomplete event is not dispatched"); a lenient one dispatches it and reads the
		// data its own way: the Go SDK decodes the first JSON value and ignores what
		// follows, so a response with junk after it, a syntax error here, is a response
		// there. Dropping it gives every client what a WHATWG client gets.
		return []byte{}, nil
	}
	d := ev.Data
	if t := bytes.TrimLeftFunc(d, clientSpace); len(t) == 0 || (t[0] != '{' && t[0] != '[') {
		return nil, nil // not JSON-RPC: a priming event, a keep-alive
	}
	// From here the data is JSON-RPC to some client: it passes only if it is strict JSON
	// with nothing but JSON white space around it, so that every client reads what we read.
	if err := validate(d, r.maxDepth); err != nil {
		return nil, fmt.Errorf("mcp: server-sent event %d: data is not strict JSON: %w", r.events, err)
	}
	j := skipWS(d, 0)
	var data []byte
	if d[j] == '{' {
		if ok, err := r.matches(d, j); err != nil || !ok {
			return nil, err
		}
		var err error
		if data, err = r.call(d[j:skipValue(d, j)]); err != nil {
			return nil, err
		}
	} else {
		// A batch of messages in one event (MCP 2025-03-26 allowed batching responses).
		prev := 0
		for it := newElements(d, j, nil); ; {
			start, end, ok := it.next()
			if !ok {
				break
			}
			if d[start] != '{' {
				continue
			}
			if ok, err := r.matches(d, start); err != nil {
				return nil, err
			} else if !ok {
				continue
			}
			repl, err := r.call(d[start:end])
			if err != nil {
				return nil, err
			}
			data = append(append(data, d[prev:start]...), repl...)
			prev = end
		}
		if data == nil {
			return nil, nil
		}
		data = append(data, d[prev:]...)
	}
	r.rewritten++
	return buildEvent(ev, data), nil
}

// loneCR reports whether raw holds a CR that no LF follows, other than its last byte: that
// one is the first half of a CRLF when the next event starts with the LF (Event.leadLF),
// and lone otherwise (Rewriter.prevCR).
func loneCR(raw []byte) bool {
	for i := bytes.IndexByte(raw, '\r'); i >= 0 && i < len(raw)-1; {
		if raw[i+1] != '\n' {
			return true
		}
		j := bytes.IndexByte(raw[i+1:], '\r')
		if j < 0 {
			return false
		}
		i += 1 + j
	}
	return false
}

// clientSpace reports whether clients may trim c before they decode JSON: Unicode white
// space (the Go SDK bytes.TrimSpace()s event data, mcp/event.go), U+FEFF
// (JavaScript's String.prototype.trim) and U+001C to U+001F (Python's str.strip). Data
// that starts with '{' or '[' after such characters must be treated as JSON: fail closed.
func clientSpace(c rune) bool {
	return unicode.IsSpace(c) || c == '\uFEFF' || (c >= 0x1C && c <= 0x1F)
}

// matches reports whether the validated object at d[i] is a response (result or error)
// with the Rewriter's id. A "method" member does not exempt it: fail closed. With
// OnlyAnswering, a response with any other id is an error.
func (r *Rewriter) matches(d []byte, i int) (bool, error) {
	var id []byte
	resp := false
	var mb member
	for it := newMembers(d, i, nil); it.next(&mb); {
		switch {
		case mb.is("id"):
			id = d[mb.start:mb.end]
		case mb.is("result"), mb.is("error"):
			resp = true
		}
	}
	if !resp {
		return false, nil
	}
	if r.strict && !slices.ContainsFunc(r.answering, func(a json.RawMessage) bool { return SameID(id, a) }) {
		return false, fmt.Errorf("mcp: server-sent event %d: a response with id %s answers no request of this exchange", r.events, clipID(id))
	}
	return id != nil && SameID(id, r.id), nil
}

func (r *Rewriter) call(resp []byte) ([]byte, error) {
	out, err := r.fn(resp)
	if err != nil {
		return nil, err
	}
	// The callback's output goes to the client as is: refuse to emit what we would refuse
	// to read.
	if err := validate(out, r.maxDepth); err != nil {
		return nil, fmt.Errorf("mcp: rewritten response is not strict JSON: %w", err)
	}
	return out, nil
}

// buildEvent re-emits ev with data as its data: other lines in order, the data lines where
// the first data line was, LF line ends, and the empty line (unless ev is incomplete).
func buildEvent(ev *Event, data []byte) []byte {
	out := make([]byte, 0, len(data)+len(ev.Raw)-len(ev.Data)+16)
	wrote := false
	eachLine(ev, func(line []byte) {
		if !isDataLine(line) {
			out = append(append(out, line...), '\n')
			return
		}
		if !wrote {
			out = appendDataLines(out, data)
			wrote = true
		}
	})
	if !ev.Incomplete {
		out = append(out, '\n')
	}
	return out
}

// appendDataLines writes data as "data: " lines, splitting it at CRLF, CR and LF (a client
// joins data lines with LF, which is whitespace wherever JSON may break a line).
func appendDataLines(out, data []byte) []byte {
	for {
		i := bytes.IndexAny(data, "\r\n")
		if i < 0 {
			out = append(append(append(out, "data: "...), data...), '\n')
			return out
		}
		out = append(append(append(out, "data: "...), data[:i]...), '\n')
		if data[i] == '\r' && i+1 < len(data) && data[i+1] == '\n' {
			i++
		}
		data = data[i+1:]
	}
}
