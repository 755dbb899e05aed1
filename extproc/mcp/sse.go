package mcp

import (
	"bytes"
	"fmt"
)

// Server-sent events framing, following the WHATWG HTML Living Standard, section 9.2.6
// "Interpreting an event stream" (https://html.spec.whatwg.org/multipage/server-sent-events.html):
// lines end in CRLF, LF or CR; an empty line dispatches the event; "data" lines append
// their value and LF to the data buffer (the last LF is dropped at dispatch); "event" sets
// the type; "id" sets the id unless it holds NUL; lines starting with ':' are comments; a
// single space after the colon is dropped; one leading BOM of the stream is ignored.

// ErrEventTooLarge is returned when one event (or the incomplete tail being held) exceeds
// the Framer's limit. It wraps ErrTooLarge.
var ErrEventTooLarge = fmt.Errorf("%w: server-sent event", ErrTooLarge)

// Event is one server-sent event. Raw and Data may alias the chunk passed to Feed (or memory
// the Framer never writes again): copy them if the chunk's memory is reused.
type Event struct {
	// Raw is the event's bytes exactly as received, through its terminating empty line.
	// The concatenation of all events' Raw is the stream.
	Raw []byte
	// Data is the data buffer as dispatched: data lines joined with LF.
	Data []byte
	// Name is the value of the last "event" field (the event type); "" means "message".
	Name string
	// ID is the value of the last valid "id" field of this event, if any.
	ID string
	// HasData is true when the event has at least one data line (Data may still be empty,
	// e.g. the priming event "id: 1\ndata:\n\n" of MCP 2025-11-25).
	HasData bool
	// Incomplete marks the bytes after the last complete event at the end of the stream.
	// WHATWG clients discard them; fields are filled as a lenient client would read them,
	// including an unterminated last line.
	Incomplete bool

	// leadLF: Raw starts with the LF of a CRLF whose CR ended the previous event at the end
	// of a chunk (see Framer). leadBOM: Raw starts with the stream's byte order mark.
	leadLF, leadBOM bool
}

// lead is the number of bytes at the start of Raw that belong to no line of the event.
func (e *Event) lead() int {
	switch {
	case e.leadLF:
		return 1
	case e.leadBOM:
		return 3
	}
	return 0
}

var bom = []byte{0xEF, 0xBB, 0xBF}

// Framer splits a byte stream, fed in arbitrary chunks, into complete server-sent events.
// It holds only the incomplete tail of the stream, at most MaxEventBytes (error past it).
// The zero Framer is ready to use, with the default limit DefaultMaxBytes.
//
// An event is complete at its empty line. When that line ends in CR at the very end of a
// chunk, the Framer cannot know whether LF follows; it dispatches at once rather than hold
// a complete event back, and an LF that does follow is delivered at the start of the next
// event's Raw (leading bytes of no line). So Raw boundaries may depend on chunking by that
// one byte, but the concatenated bytes and the sequence of event fields never do.
type Framer struct {
	MaxEventBytes int

	buf     []byte // the incomplete event, from its first byte; owned by the Framer
	scanned int    // bytes of buf already searched for line ends
	started bool   // a line of the stream has been read (the BOM can only come first)
	skipLF  bool   // the last byte was a CR ending a line: an LF now belongs to it
	err     error

	// The event being read. Offsets are relative to its first byte.
	lineStart int
	leadLF    bool
	leadBOM   bool
	name, id  span
	dataLines int
	data      span   // the only data line's value, while dataLines == 1
	joined    []byte // the data buffer, once dataLines > 1
}

func (f *Framer) limit() int {
	if f.MaxEventBytes > 0 {
		return f.MaxEventBytes
	}
	return DefaultMaxBytes
}

// Feed consumes the next chunk of the stream and returns the events it completes, in
// order. With endOfStream, bytes after the last complete event come back as one Event
// marked Incomplete, and the Framer is reset for a new stream. After an error the Framer
// returns that error forever; events completed before it in the same call are returned
// with it.
//
// The empty line of an event that ends in CR exactly at the end of a chunk dispatches the
// event at once; a following LF (the rest of a CRLF) then leads the next event's Raw.
func (f *Framer) Feed(chunk []byte, endOfStream bool) ([]Event, error) {
	var evs []Event
	err := f.feed(chunk, endOfStream, func(_ []byte, _, _ int, ev *Event) error {
		evs = append(evs, *ev)
		return nil
	})
	return evs, err
}

// feed is Feed with a callback, which also learns where Raw sits in buf (events of one call
// are contiguous in buf, which lets a Rewriter pass runs of them through without copying).
func (f *Framer) feed(chunk []byte, eos bool, emit func(buf []byte, start, end int, ev *Event) error) error {
	if f.err != nil {
		return f.err
	}
	var buf []byte
	pos := 0
	owned := len(f.buf) > 0
	if owned {
		f.buf = append(f.buf, chunk...)
		buf, pos = f.buf, f.scanned
	} else {
		buf = chunk
	}
	ev := 0 // start of the current event in buf
	// Next LF and CR at or after the scan position (len(buf) when none): cached so that a
	// stream of CR-only lines with no LF in sight does not rescan the chunk per line.
	nextLF, nextCR := -1, -1
	for pos < len(buf) {
		if f.skipLF {
			f.skipLF = false
			if buf[pos] == '\n' {
				pos++
				if f.lineStart == 0 && pos-1 == ev {
					f.leadLF = true // the LF of a CRLF that ended the previous event
				}
				f.lineStart = pos - ev
				continue
			}
		}
		if nextLF < pos {
			if nextLF = bytes.IndexByte(buf[pos:], '\n'); nextLF < 0 {
				nextLF = len(buf)
			} else {
				nextLF += pos
			}
		}
		if nextCR < pos {
			if nextCR = bytes.IndexByte(buf[pos:], '\r'); nextCR < 0 {
				nextCR = len(buf)
			} else {
				nextCR += pos
			}
		}
		eol := min(nextLF, nextCR)
		if eol == len(buf) {
			break // no line end in sight: the rest is an incomplete line, kept below
		}
		next := eol + 1
		if buf[eol] == '\r' {
			switch {
			case next < len(buf) && buf[next] == '\n':
				next++
			case next == len(buf):
				f.skipLF = true
			}
		}
		ls := ev + f.lineStart
		if !f.started {
			f.started = true
			if bytes.HasPrefix(buf[ls:eol], bom) {
				f.leadBOM = true
				ls += len(bom)
			}
		}
		if ls == eol { // empty line: dispatch
			if size := eol + 1 - ev - f.leadBytes(); size > f.limit() {
				f.err = ErrEventTooLarge
				return f.err
			}
			e := f.event(buf[ev:next:next], false)
			if err := emit(buf, ev, next, &e); err != nil {
				f.err = err
				return err
			}
			f.reset()
			ev, pos = next, next
			continue
		}
		f.field(buf[ev:], ls-ev, eol-ev)
		f.lineStart = next - ev
		pos = next
	}
	tail := buf[ev:]
	lead := f.leadBytes()
	if !f.started && bytes.HasPrefix(tail, bom) {
		lead = len(bom) // not yet recorded: the first line is not complete
	}
	if len(tail)-lead > f.limit() {
		f.err = ErrEventTooLarge
		return f.err
	}
	if eos {
		var err error
		if len(tail) > 0 {
			if ls := f.lineStart; ls < len(tail) {
				if !f.started && bytes.HasPrefix(tail[ls:], bom) {
					f.leadBOM = true
					ls += len(bom)
				}
				if ls < len(tail) {
					f.field(tail, ls, len(tail)) // the unterminated last line, read leniently
				}
			}
			e := f.event(tail[:len(tail):len(tail)], true)
			err = emit(buf, ev, len(buf), &e)
		}
		*f = Framer{MaxEventBytes: f.MaxEventBytes, err: err}
		return err
	}
	// Keep the tail. Bytes before it were handed out in events and are never written again:
	// appending to f.buf only writes past its length.
	switch {
	case len(tail) == 0:
		f.buf = nil // hold nothing between events
	case owned:
		f.buf = tail
	default:
		f.buf = append(make([]byte, 0, max(2*len(tail), 512)), tail...)
	}
	f.scanned = len(tail)
	return nil
}

func (f *Framer) leadBytes() int {
	switch {
	case f.leadLF:
		return 1
	case f.leadBOM:
		return len(bom)
	}
	return 0
}

// field interprets the line e[ls:le] (relative to the event's first byte).
func (f *Framer) field(e []byte, ls, le int) {
	line := e[ls:le]
	if line[0] == ':' {
		return // comment
	}
	name, vs := line, le
	if c := bytes.IndexByte(line, ':'); c >= 0 {
		name, vs = line[:c], ls+c+1
		if vs < le && e[vs] == ' ' {
			vs++
		}
	}
	switch string(name) {
	case "data":
		f.dataLines++
		switch f.dataLines {
		case 1:
			f.data = span{vs, le}
		case 2:
			f.joined = append(append(append(make([]byte, 0, 2*(le-vs)+f.data.end-f.data.start+1),
				e[f.data.start:f.data.end]...), '\n'), e[vs:le]...)
		default:
			f.joined = append(append(f.joined, '\n'), e[vs:le]...)
		}
	case "event":
		f.name = span{vs, le}
	case "id":
		if bytes.IndexByte(e[vs:le], 0) < 0 {
			f.id = span{vs, le}
		}
	}
	// "retry" and unknown fields change nothing an event carries.
}

// event builds the Event for raw, which starts at the event's first byte.
func (f *Framer) event(raw []byte, incomplete bool) Event {
	e := Event{Raw: raw, HasData: f.dataLines > 0, Incomplete: incomplete, leadLF: f.leadLF, leadBOM: f.leadBOM}
	switch {
	case f.dataLines == 1:
		e.Data = raw[f.data.start:f.data.end:f.data.end]
	case f.dataLines > 1:
		e.Data = f.joined
	}
	if f.name.end > 0 {
		e.Name = string(raw[f.name.start:f.name.end])
	}
	if f.id.end > 0 {
		e.ID = string(raw[f.id.start:f.id.end])
	}
	return e
}

// reset clears the per-event state after a dispatch.
func (f *Framer) reset() {
	f.lineStart, f.leadLF, f.leadBOM = 0, false, false
	f.name, f.id, f.data = span{}, span{}, span{}
	f.dataLines, f.joined = 0, nil
}

// eachLine calls fn with every line of a complete or incomplete event's Raw, without its
// terminator, skipping the event's leading bytes, up to (not including) the empty line.
func eachLine(ev *Event, fn func(line []byte)) {
	b := ev.Raw[ev.lead():]
	for len(b) > 0 {
		i := bytes.IndexAny(b, "\r\n")
		if i < 0 {
			fn(b) // unterminated last line of an incomplete event
			return
		}
		if i == 0 {
			return // the empty line
		}
		fn(b[:i])
		if b[i] == '\r' && i+1 < len(b) && b[i+1] == '\n' {
			i++
		}
		b = b[i+1:]
	}
}

// isDataLine reports whether a line is a "data" field.
func isDataLine(line []byte) bool {
	return bytes.HasPrefix(line, []byte("data")) && (len(line) == 4 || line[4] == ':')
}
