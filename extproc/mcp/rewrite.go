package mcp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
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
// Fail closed: an event whose data starts like JSON ('{' or '[' after whitespace) must be
// strict JSON (no duplicate keys, valid UTF-8, no lone surrogates, within MaxDepth), or
// Feed returns an error, because a client's parser could read a response out of it that
// this one did not. The event name is not consulted: some clients hand every event's data
// to the JSON-RPC layer whatever its type.
//
// At the end of the stream, a trailing incomplete event is passed through as is, unless its
// data (read as a lenient client would) is the matching response: WHATWG clients discard
// it, but a lenient client may not, so it is rewritten too (still without its empty line).
// Its data may be truncated JSON, which is passed through.
type Rewriter struct {
	f             Framer
	id            json.RawMessage
	answering     []json.RawMessage // with strict: the ids a response may have
	strict        bool
	maxDepth      int
	fn            func(resp []byte) ([]byte, error)
	prevRewritten bool
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
		r.rewritten++
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

// rewriteEvent returns the replacement of ev, or nil to pass it through.
func (r *Rewriter) rewriteEvent(ev *Event) ([]byte, error) {
	if !ev.HasData {
		return nil, nil
	}
	d := ev.Data
	j := skipWS(d, 0)
	if j == len(d) || (d[j] != '{' && d[j] != '[') {
		return nil, nil // not JSON-RPC: a priming event, a keep-alive
	}
	if err := validate(d, r.maxDepth); err != nil {
		var se *scanError
		if ev.Incomplete && errors.As(err, &se) && se.kind == errSyntax {
			return nil, nil // the stream was cut inside the event's JSON
		}
		return nil, fmt.Errorf("mcp: server-sent event %d: data is not strict JSON: %w", r.events, err)
	}
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
	return buildEvent(ev, data), nil
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
