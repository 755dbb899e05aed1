package mcp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"strconv"
	"strings"
	"testing"
)

// evFields is what an event means, independent of how the stream was chunked.
type evFields struct {
	Data       string
	Name, ID   string
	HasData    bool
	Incomplete bool
}

func fieldsOf(evs []Event) []evFields {
	var out []evFields
	for _, e := range evs {
		if e.Incomplete && len(e.Raw) == e.lead() && e.leadLF {
			// The second half of a CRLF split off the last event by chunking: bytes, no event.
			continue
		}
		out = append(out, evFields{string(e.Data), e.Name, e.ID, e.HasData, e.Incomplete})
	}
	return out
}

// feedChunks cuts stream at cuts and hands feed each piece, a fresh copy, and whether it
// is the last, up to the first error, which it returns. With scrub, each piece is then
// overwritten with 'X', as a caller that reuses its buffer would.
func feedChunks(stream []byte, cuts []int, scrub bool, feed func(chunk []byte, last bool) error) error {
	prev := 0
	for k := 0; k <= len(cuts); k++ {
		end := len(stream)
		if k < len(cuts) {
			end = cuts[k]
		}
		chunk := append([]byte(nil), stream[prev:end]...)
		err := feed(chunk, k == len(cuts))
		if scrub {
			for i := range chunk {
				chunk[i] = 'X'
			}
		}
		if err != nil {
			return err
		}
		prev = end
	}
	return nil
}

// frame feeds stream to a new Framer in the given chunks and returns the events and the
// concatenation of their Raw.
func frame(t *testing.T, stream []byte, cuts []int, max int) ([]Event, []byte, error) {
	t.Helper()
	f := &Framer{MaxEventBytes: max}
	var evs []Event
	var raw []byte
	// A fresh, scrubbed copy per chunk proves no event aliases a chunk the caller
	// reuses... except documented aliasing, which we then must copy.
	err := feedChunks(stream, cuts, true, func(chunk []byte, last bool) error {
		got, err := f.Feed(chunk, last)
		for _, e := range got {
			raw = append(raw, e.Raw...)
			e.Raw = append([]byte(nil), e.Raw...)
			e.Data = append([]byte(nil), e.Data...)
			evs = append(evs, e)
		}
		return err
	})
	return evs, raw, err
}

func TestFramerFields(t *testing.T) {
	stream := "data: a\n\n" +
		"data: a\ndata:b\ndata:  c\ndata\n\n" +
		"event: message\r\nid: 5\r\nretry: 1000\r\n: comment\r\ndata: x\r\n\r\n" +
		"event:custom\rid:\x00bad\rdata:y\r\r" +
		": just a comment\n\n" +
		"id: 9\ndata:\n\n" +
		"unknown: field\ndata:z: with colon\nDATA: not data\n\n" +
		"data: partial\ndata: more"
	evs, raw, err := frame(t, []byte(stream), nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	if string(raw) != stream {
		t.Fatalf("raw concatenation differs:\n%q", raw)
	}
	want := []evFields{
		{Data: "a", HasData: true},
		{Data: "a\nb\n c\n", HasData: true},
		{Data: "x", Name: "message", ID: "5", HasData: true},
		{Data: "y", Name: "custom", HasData: true},
		{},
		{Data: "", ID: "9", HasData: true},
		{Data: "z: with colon", HasData: true},
		{Data: "partial\nmore", HasData: true, Incomplete: true},
	}
	if got := fieldsOf(evs); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("events:\n got %+v\nwant %+v", got, want)
	}
	if string(evs[2].Raw) != "event: message\r\nid: 5\r\nretry: 1000\r\n: comment\r\ndata: x\r\n\r\n" {
		t.Fatalf("raw 2 = %q", evs[2].Raw)
	}
}

func TestFramerBOM(t *testing.T) {
	stream := "\xEF\xBB\xBFdata: a\n\n\xEF\xBB\xBFdata: b\n\n"
	for _, cuts := range [][]int{nil, {1}, {2}, {3}, {4}} {
		evs, raw, err := frame(t, []byte(stream), cuts, 0)
		if err != nil || string(raw) != stream {
			t.Fatalf("cuts %v: %v %q", cuts, err, raw)
		}
		// Only the stream's first BOM is ignored; the second one is part of a field name.
		if got := fieldsOf(evs); len(got) != 2 || got[0].Data != "a" || got[1].HasData {
			t.Fatalf("cuts %v: %+v", cuts, got)
		}
	}
}

func TestFramerCRLFSplitAtDispatch(t *testing.T) {
	stream := []byte("data: a\r\n\r\ndata: b\r\n\r\n")
	// Split between the CR and LF of the empty line: the first event is complete at the CR
	// and must come out of the first Feed, not wait for the next chunk.
	f := &Framer{}
	evs, err := f.Feed(stream[:10], false)
	if err != nil || len(evs) != 1 || string(evs[0].Raw) != "data: a\r\n\r" || string(evs[0].Data) != "a" {
		t.Fatalf("first feed: %+v %v", evs, err)
	}
	evs, err = f.Feed(stream[10:], true)
	if err != nil || len(evs) != 1 || string(evs[0].Raw) != "\ndata: b\r\n\r\n" || string(evs[0].Data) != "b" || evs[0].Incomplete {
		t.Fatalf("second feed: %+v %v", evs, err)
	}
	// Split between the CR and LF of a field line: the LF is not an empty line.
	evs, _, err = frame(t, []byte("data: a\r\ndata: b\r\n\r\n"), []int{8}, 0)
	if err != nil || len(evs) != 1 || string(evs[0].Data) != "a\nb" {
		t.Fatalf("field line split: %+v %v", fieldsOf(evs), err)
	}
	// CR then CR is two line ends, whatever the chunking.
	for _, cuts := range [][]int{nil, {8}, {9}} {
		evs, _, err = frame(t, []byte("data: a\r\rdata: b\r\r"), cuts, 0)
		if got := fieldsOf(evs); err != nil || len(got) != 2 || got[0].Data != "a" || got[1].Data != "b" {
			t.Fatalf("cuts %v: %+v %v", cuts, got, err)
		}
	}
}

func TestFramerLimit(t *testing.T) {
	ev := "data: " + strings.Repeat("x", 100) + "\n\n" // 108 bytes
	for _, max := range []int{107, 108} {
		for _, cuts := range [][]int{nil, {50}, {107}, {1, 2, 3}} {
			stream := "data: ok\n\n" + ev + "data: after\n\n"
			var c []int
			for _, x := range cuts {
				c = append(c, x+10)
			}
			evs, _, err := frame(t, []byte(stream), c, max)
			if max == 107 {
				if !errors.Is(err, ErrEventTooLarge) || !errors.Is(err, ErrTooLarge) {
					t.Fatalf("max %d cuts %v: err = %v", max, cuts, err)
				}
				if got := fieldsOf(evs); len(got) != 1 || got[0].Data != "ok" {
					t.Fatalf("events before the error: %+v", got)
				}
			} else if err != nil || len(evs) != 3 {
				t.Fatalf("max %d cuts %v: %d events, err %v", max, cuts, len(evs), err)
			}
		}
	}
	// An endless line with no terminator must not be held past the limit.
	f := &Framer{MaxEventBytes: 1000}
	var err error
	for i := 0; i < 100 && err == nil; i++ {
		_, err = f.Feed(bytes.Repeat([]byte("a"), 100), false)
	}
	if !errors.Is(err, ErrEventTooLarge) || len(f.buf) > 1100 {
		t.Fatalf("err %v, holding %d bytes", err, len(f.buf))
	}
	if _, err2 := f.Feed([]byte("\n\n"), true); err2 != err {
		t.Fatal("the error is not sticky")
	}
}

func TestFramerHoldsOnlyTheTail(t *testing.T) {
	f := &Framer{}
	for i := 0; i < 10000; i++ {
		if _, err := f.Feed([]byte("data: {\"n\":"+strconv.Itoa(i)+"}\n\ndata: par"), false); err != nil {
			t.Fatal(err)
		}
		if _, err := f.Feed([]byte("tial\n\n"), false); err != nil {
			t.Fatal(err)
		}
		if len(f.buf) != 0 {
			t.Fatalf("holding %d bytes after complete events", len(f.buf))
		}
	}
}

func TestFramerManyCROnlyLines(t *testing.T) {
	// One chunk of many CR-terminated lines without any LF: linear, not quadratic.
	stream := bytes.Repeat([]byte(":k\r"), 300000)
	stream = append(stream, "data: x\r\r"...)
	evs, err := (&Framer{MaxEventBytes: 2 << 20}).Feed(stream, true)
	if err != nil || len(evs) != 1 || string(evs[0].Data) != "x" {
		t.Fatalf("%d events, err %v", len(evs), err)
	}
}

// ---- the rewriter ----

const targetID = `7`

// rewriteFn is the test's callback: its output depends only on its input, and is spread over
// lines with every kind of line end to exercise re-splitting into data lines.
func rewriteFn(resp []byte) ([]byte, error) {
	return []byte(`{"jsonrpc":"2.0",` + "\n" + `"id":7,` + "\r\n" + `"result":{"len":` + strconv.Itoa(len(resp)) + "}\r}"), nil
}

// expectRewritten is the independent expectation for a rewritten event: its non-data lines
// with LF, then rewritten (the new data) as data lines at the place of the first data line.
func expectRewritten(lines []string, rewritten string, complete bool) string {
	repl := strings.NewReplacer("\r\n", "\n", "\r", "\n").Replace(rewritten)
	var sb strings.Builder
	wrote := false
	for _, l := range lines {
		if strings.HasPrefix(l, "data:") || l == "data" {
			if !wrote {
				for _, dl := range strings.Split(repl, "\n") {
					sb.WriteString("data: " + dl + "\n")
				}
				wrote = true
			}
			continue
		}
		sb.WriteString(l + "\n")
	}
	if complete {
		sb.WriteString("\n")
	}
	return sb.String()
}

type streamGen struct {
	r        *rand.Rand
	sb       strings.Builder
	want     strings.Builder
	lastCR   bool // the last byte written is a CR ending a line
	rewrites int
	bom      bool // the stream starts with a BOM not yet accounted for in want
	noLoneCR bool // lines end with LF or CRLF only
}

func (g *streamGen) term(blank bool) string {
	ends := []string{"\n", "\r\n", "\r"}
	if g.noLoneCR {
		ends = ends[:2]
	}
	for {
		t := ends[g.r.Intn(len(ends))]
		// A CR line end followed by an LF empty line would read as one CRLF.
		if blank && g.lastCR && t == "\n" {
			continue
		}
		g.lastCR = t == "\r"
		return t
	}
}

// jsonLines spreads a JSON text over lines at token boundaries (a client joins data lines
// with LF, which is JSON whitespace).
func (g *streamGen) jsonLines(tokens []string) []string {
	var lines []string
	cur := ""
	for _, tok := range tokens {
		cur += tok
		if g.r.Intn(4) == 0 {
			lines = append(lines, cur)
			cur = ""
		}
	}
	if cur != "" || len(lines) == 0 {
		lines = append(lines, cur)
	}
	return lines
}

// event appends one random event to the stream and its expected output to want.
func (g *streamGen) event(last bool) {
	var lines []string
	var data []string // data line values
	rewrite := false
	addMeta := func() {
		switch g.r.Intn(6) {
		case 0:
			lines = append(lines, "event: message")
		case 1:
			lines = append(lines, "id: "+strconv.Itoa(g.r.Intn(100)))
		case 2:
			lines = append(lines, ": keep-alive "+strconv.Itoa(g.r.Intn(10)))
		case 3:
			lines = append(lines, "retry: 500")
		}
	}
	addMeta()
	var tokens []string
	switch k := g.r.Intn(9); k {
	case 0, 1: // the response to rewrite
		tokens = []string{`{`, `"jsonrpc":"2.0"`, `,`, `"id":` + []string{"7", " 7", "7.0"}[g.r.Intn(3)], `,`, `"result":{`, `"content":[{"type":"text","text":"ssn 1"}]`, `,"structuredContent":{"ssn":1}`, `}`, `}`}
		rewrite = true
	case 2: // a response to another request
		tokens = []string{`{"jsonrpc":"2.0",`, `"id":` + []string{`"7"`, "8", `"x"`, "-7"}[g.r.Intn(4)], `,"result":{}}`}
	case 3: // progress
		tokens = []string{`{"jsonrpc":"2.0",`, `"method":"notifications/progress",`, `"params":{"progressToken":7,"progress":` + strconv.Itoa(g.r.Intn(100)) + `}}`}
	case 4: // a server request with our id number (a different id space)
		tokens = []string{`{"jsonrpc":"2.0","id":"srv-7","method":"sampling/createMessage","params":{}}`}
	case 5: // a batch holding our response
		tokens = []string{`[{"jsonrpc":"2.0","id":7,"result":{}},{"jsonrpc":"2.0","method":"notifications/message","params":{}}]`}
		rewrite = true
	case 6: // priming event
		lines = append(lines, "id: prime-"+strconv.Itoa(g.r.Intn(9)))
		data = []string{""}
	case 7: // not JSON
		data = []string{"hello", "world"}[:1+g.r.Intn(2)]
	case 8: // no data at all
		lines = append(lines, ": only a comment")
	}
	if tokens != nil {
		data = g.jsonLines(tokens)
	}
	for i, d := range data {
		if g.r.Intn(3) == 0 && !strings.HasPrefix(d, " ") {
			lines = append(lines, "data:"+d)
		} else {
			lines = append(lines, "data: "+d)
		}
		if i == 0 {
			addMeta()
		}
	}
	addMeta()
	complete := !last || g.r.Intn(2) == 0
	var raw strings.Builder
	for i, l := range lines {
		raw.WriteString(l)
		if complete || i < len(lines)-1 || g.r.Intn(2) == 0 {
			raw.WriteString(g.term(false))
		}
	}
	if complete {
		raw.WriteString(g.term(true))
	}
	g.sb.WriteString(raw.String())
	dropped := !complete && data != nil // an unterminated last event with data never goes out
	if g.bom {
		// A re-emitted or dropped event drops the stream's BOM; a passed-through one keeps it.
		if !rewrite && !dropped {
			g.want.WriteString("\xEF\xBB\xBF")
		}
		g.bom = false
	}
	if dropped {
		return
	}
	if !rewrite {
		g.want.WriteString(raw.String())
		return
	}
	g.rewrites++
	joined := strings.Join(data, "\n")
	var rewritten string
	if strings.HasPrefix(joined, "[") {
		// Batch: only the matching element is replaced.
		elem := `{"jsonrpc":"2.0","id":7,"result":{}}`
		out, _ := rewriteFn([]byte(elem))
		rewritten = strings.Replace(joined, elem, string(out), 1)
	} else {
		out, _ := rewriteFn([]byte(joined))
		rewritten = string(out)
	}
	g.want.WriteString(expectRewritten(lines, rewritten, complete))
}

// rewriteChunks runs a new Rewriter over stream cut at cuts.
func rewriteChunks(stream []byte, cuts []int, fn func([]byte) ([]byte, error)) ([]byte, int, error) {
	r := NewRewriter(json.RawMessage(targetID), Limits{}, fn)
	var out []byte
	err := feedChunks(stream, cuts, true, func(chunk []byte, last bool) error { // the caller reuses its buffer
		got, err := r.Feed(chunk, last)
		out = append(out, got...)
		return err
	})
	return out, r.Rewritten(), err
}

// chunkings returns cut lists for stream: 1-byte chunks, cuts right after every CR (inside
// every CRLF), and random cuts.
func chunkings(r *rand.Rand, stream []byte) [][]int {
	var ones, crs, random []int
	for i := 1; i < len(stream); i++ {
		ones = append(ones, i)
		if stream[i-1] == '\r' {
			crs = append(crs, i)
		}
	}
	for i := 0; i < len(stream); {
		i += 1 + r.Intn(40)
		if i < len(stream) {
			random = append(random, i)
		}
	}
	return [][]int{nil, ones, crs, random, {len(stream) / 2}}
}

func TestRewriterProperty(t *testing.T) {
	r := rand.New(rand.NewSource(20250618))
	for iter := 0; iter < 400; iter++ {
		// Most streams end lines as servers do; the others have CR line ends too, which
		// the Framer reads as SSE says and the Rewriter refuses.
		g := &streamGen{r: r, noLoneCR: iter%4 != 0}
		if r.Intn(10) == 0 {
			g.sb.WriteString("\xEF\xBB\xBF")
			g.bom = true
		}
		n := 1 + r.Intn(12)
		for i := 0; i < n; i++ {
			g.event(i == n-1)
		}
		stream, want := []byte(g.sb.String()), g.want.String()
		var whole []byte
		// A CR that no LF follows (but the stream's last byte) is a line end the Framer
		// splits and LF-only clients do not: the Rewriter refuses the stream.
		lone := false
		for i := 0; i+1 < len(stream); i++ {
			lone = lone || stream[i] == '\r' && stream[i+1] != '\n'
		}
		for ci, cuts := range chunkings(r, stream) {
			out, n, err := rewriteChunks(stream, cuts, rewriteFn)
			switch {
			case lone && (err == nil || !strings.Contains(err.Error(), "lone CR")):
				t.Fatalf("iter %d chunking %d: a stream with a lone CR was not refused (%v)\nstream %q", iter, ci, err, stream)
			case !lone && err != nil:
				t.Fatalf("iter %d chunking %d: %v\nstream %q", iter, ci, err, stream)
			case lone:
			case ci == 0:
				whole = out
				if string(out) != want {
					t.Fatalf("iter %d: output differs from expectation\nstream %q\n got %q\nwant %q", iter, stream, out, want)
				}
				if n != g.rewrites {
					t.Fatalf("iter %d: rewrote %d, want %d", iter, n, g.rewrites)
				}
			case !bytes.Equal(out, whole):
				t.Fatalf("iter %d chunking %d (%v): output differs from one-chunk output\nstream %q\n got %q\nwant %q", iter, ci, cuts, stream, out, whole)
			}
			// The framer alone: bytes and meaning independent of chunking.
			evs, raw, err := frame(t, stream, cuts, 0)
			if err != nil || !bytes.Equal(raw, stream) {
				t.Fatalf("iter %d chunking %d: framer raw differs (%v)", iter, ci, err)
			}
			wholeEvs, _, _ := frame(t, stream, nil, 0)
			if fmt.Sprint(fieldsOf(evs)) != fmt.Sprint(fieldsOf(wholeEvs)) {
				t.Fatalf("iter %d chunking %d: framer fields differ\n got %+v\nwant %+v", iter, ci, fieldsOf(evs), fieldsOf(wholeEvs))
			}
		}
	}
}

func TestRewriterPassesEventsAsSoonAsComplete(t *testing.T) {
	r := NewRewriter(json.RawMessage(`1`), Limits{}, func([]byte) ([]byte, error) { return []byte(`{"id":1,"result":{}}`), nil })
	progress := "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progressToken\":1,\"progress\":1}}\n\n"
	out, err := r.Feed([]byte(progress+"data: {\"jsonrpc\":\"2.0\",\"id\":1,"), false)
	if err != nil || string(out) != progress {
		t.Fatalf("out %q err %v", out, err)
	}
	out, err = r.Feed([]byte("\"result\":{\"secret\":1}}\n"), false)
	if err != nil || len(out) != 0 {
		t.Fatalf("incomplete event leaked: %q %v", out, err)
	}
	out, err = r.Feed([]byte("\n: after\n\n"), true)
	if err != nil || string(out) != "data: {\"id\":1,\"result\":{}}\n\n: after\n\n" || r.Rewritten() != 1 {
		t.Fatalf("out %q err %v", out, err)
	}
}

func TestRewriterFailsClosed(t *testing.T) {
	fn := func([]byte) ([]byte, error) { return []byte(`{}`), nil }
	for _, stream := range []string{
		"data: {\"jsonrpc\":\"2.0\",\"id\":2,\"id\":1,\"result\":{\"ssn\":1}}\n\n",  // duplicate id
		"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"ssn\":1},\"x\":NaN}\n\n", // lenient parsers read this
		"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"s\":\"\xff\"}}\n\n",      // invalid UTF-8
		"data: [{\"id\":1,\"result\":{}}\n\n",                                       // truncated in a complete event
		// A lone CR: SSE (and the Framer) read an empty data line, the Go SDK, splitting
		// on LF only, one data line holding the response.
		"event: message\ndata:\r{\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"ssn\":1}}\n\n",
		"data: 1\n\r" + "data: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"ssn\":1}}\n\n", // a CR empty line, then more
	} {
		if _, _, err := rewriteChunks([]byte(stream), nil, fn); err == nil {
			t.Errorf("accepted %q", stream)
		}
	}
	// The callback's errors and invalid output stop the stream.
	boom := errors.New("boom")
	match := []byte("data: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{}}\n\n")
	if _, _, err := rewriteChunks(match, nil, func([]byte) ([]byte, error) { return nil, boom }); !errors.Is(err, boom) {
		t.Fatalf("err = %v", err)
	}
	if _, _, err := rewriteChunks(match, nil, func([]byte) ([]byte, error) { return []byte(`{"a":1,"a":2}`), nil }); err == nil {
		t.Fatal("invalid callback output emitted")
	}
	// Event names do not exempt an event.
	named := "event: notmessage\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\"error\":{\"code\":1,\"message\":\"ssn\"}}\n\n"
	if out, n, err := rewriteChunks([]byte(named), nil, fn); err != nil || n != 1 || string(out) != "event: notmessage\ndata: {}\n\n" {
		t.Fatalf("named event: %q %v", out, err)
	}
}

// Data that a client reads as JSON after trimming white space JSON does not know (the Go
// SDK bytes.TrimSpace()s it) is JSON-RPC: strict, or the stream fails.
func TestRewriterTrimmedDataIsJSON(t *testing.T) {
	fn := func([]byte) ([]byte, error) { return []byte(`{}`), nil }
	resp := `{"jsonrpc":"2.0","id":7,"result":{"ssn":1}}`
	for _, lead := range []string{"\v", "\f", "\u00a0", "\u0085", "\u2028", "\u3000", "\ufeff", "\x1c", " \v "} {
		for _, data := range []string{lead + resp, lead + "[" + resp + "]", resp + lead} {
			stream := "event: message\ndata: " + data + "\n\n"
			if out, _, err := rewriteChunks([]byte(stream), nil, fn); err == nil {
				t.Errorf("%q passed as %q", stream, out)
			}
		}
	}
	// Data that does not start like JSON, however trimmed, still passes.
	for _, stream := range []string{"data: \u00a0hello {\n\n", "data: \v\n\n", "data: \u00a0\n\n"} {
		if out, n, err := rewriteChunks([]byte(stream), nil, fn); err != nil || n != 0 || string(out) != stream {
			t.Errorf("%q: %q %d %v", stream, out, n, err)
		}
	}
}

// An unterminated last event with data is dropped, as a WHATWG client drops it: a lenient
// client that dispatches it reads the data its own way (the Go SDK decodes the first JSON
// value and ignores what follows).
func TestRewriterDropsIncompleteTail(t *testing.T) {
	fn := func([]byte) ([]byte, error) { return []byte(`{}`), nil }
	head := "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}}\r\n\r\n"
	for _, tail := range []string{
		"data: {\"jsonrpc\":\"2.0\",\"id\":7,\"res",                            // truncated
		"data: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"ssn\":1}} x",        // junk after the response
		"id: 3\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"ssn\":1}}\n", // complete JSON, no empty line
		"data: [{\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"ssn\":1}}]\r",      // batch
		"data: {\"jsonrpc\":\"2.0\",\"id\":8,\"result\":{}}",                   // a response to nobody
		"data: hello",    // not JSON
		"id: 1\ndata:\n", // priming, empty data
	} {
		for _, cuts := range [][]int{nil, {len(head) - 1}, {len(head) + 3}} {
			out, n, err := rewriteChunks([]byte(head+tail), cuts, fn)
			if err != nil || n != 0 || string(out) != head {
				t.Errorf("%q cut at %v: %q %d %v", tail, cuts, out, n, err)
			}
		}
	}
	// Without data, the tail passes as it came.
	for _, tail := range []string{": a comment", "id: 5\nevent: message\n", "retry: 1"} {
		if out, _, err := rewriteChunks([]byte(head+tail), nil, fn); err != nil || string(out) != head+tail {
			t.Errorf("%q: %q %v", tail, out, err)
		}
	}
}
func TestRewriterNoCopyWhenNothingChanges(t *testing.T) {
	r := NewRewriter(json.RawMessage(`1`), Limits{}, rewriteFn)
	chunk := []byte("data: {\"jsonrpc\":\"2.0\",\"method\":\"x\"}\n\n: ping\n\n")
	out, err := r.Feed(chunk, false)
	if err != nil || &out[0] != &chunk[0] || len(out) != len(chunk) || cap(out) != len(chunk) {
		t.Fatalf("out %q err %v", out, err)
	}
}
