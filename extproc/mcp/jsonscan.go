package mcp

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
)

// This file holds the strict JSON validator (one pass: syntax, UTF-8, surrogates, duplicate
// keys, depth) and small walkers that navigate JSON already accepted by the validator.
// The walkers do no checking of their own: they must only ever see validated bytes.

// scanErrKind says why the validator refused its input. Callers branch on it: a syntax error
// in an event's data can mean "not JSON at all", the other kinds always mean "hostile".
type scanErrKind uint8

const (
	errSyntax scanErrKind = iota
	errUTF8
	errSurrogate
	errDuplicate
	errDepth
)

type scanError struct {
	kind scanErrKind
	off  int
	msg  string
}

func (e *scanError) Error() string { return fmt.Sprintf("%s at offset %d", e.msg, e.off) }

// keyRef names one object key seen by the validator: bytes of the input (an unescaped key)
// or of the arena (a key with escapes, decoded). Offsets rather than slices keep pooled
// validators from pinning the bodies they once read.
type keyRef struct {
	off, n  int32
	inArena bool
}

// keySet holds the keys of the object being validated at one depth. Objects are small in
// practice, so a linear scan over a slice wins; past linearKeys keys it switches to a map so
// that hostile objects with 100k keys stay O(n).
type keySet struct {
	list   []keyRef
	m      map[string]string // folded key (foldKey) → the key as written
	useMap bool
}

const linearKeys = 16

type validator struct {
	data     []byte
	maxDepth int
	levels   []*keySet
	arena    []byte

	// With spanDepth > 0, the validator records the span of every container at depth <=
	// spanDepth, in document order, so that callers can jump over them (see spanIndex).
	spanDepth int
	spans     []span
}

var validatorPool = sync.Pool{New: func() any { return new(validator) }}

// validate checks that data is exactly one JSON value (surrounded by optional whitespace)
// that every JSON parser reads the same way. It returns a *scanError.
func validate(data []byte, maxDepth int) error {
	v, err := validateIndexed(data, maxDepth, 0)
	v.release()
	return err
}

// validateIndexed is validate that also records the spans of the containers at depth <=
// spanDepth (the top-level value is depth 1) in v.index(), for walking data without
// rescanning it. The caller must release v when done with the index.
func validateIndexed(data []byte, maxDepth, spanDepth int) (*validator, error) {
	v := validatorPool.Get().(*validator)
	v.data, v.maxDepth, v.arena = data, maxDepth, v.arena[:0]
	v.spanDepth, v.spans = spanDepth, v.spans[:0]
	return v, v.document()
}

// index returns the recorded container spans; valid until v is released.
func (v *validator) index() spanIndex { return spanIndex(v.spans) }

// spanIndex holds container spans in document order, so sorted by start.
type spanIndex []span

// end returns the end of the container starting at i, if it was recorded.
func (x spanIndex) end(i int) (int, bool) {
	lo, hi := 0, len(x)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if x[m].start < i {
			lo = m + 1
		} else {
			hi = m
		}
	}
	if lo < len(x) && x[lo].start == i {
		return x[lo].end, true
	}
	return 0, false
}

// skip returns the offset after the validated value at d[i], in O(log n) for an indexed
// container.
func (x spanIndex) skip(d []byte, i int) int {
	if d[i] == '{' || d[i] == '[' {
		if end, ok := x.end(i); ok {
			return end
		}
	}
	return skipValue(d, i)
}

func (v *validator) release() {
	v.data = nil
	if cap(v.arena) > 64<<10 {
		v.arena = nil
	}
	if cap(v.spans) > 4096 {
		v.spans = nil
	}
	for _, ks := range v.levels {
		if len(ks.m) > 1024 {
			ks.m = nil
		}
		if cap(ks.list) > 1024 {
			ks.list = nil
		}
	}
	validatorPool.Put(v)
}

func (v *validator) fail(kind scanErrKind, off int, format string, args ...any) error {
	return &scanError{kind: kind, off: off, msg: fmt.Sprintf(format, args...)}
}

func (v *validator) document() error {
	i := skipWS(v.data, 0)
	if i >= len(v.data) {
		return v.fail(errSyntax, i, "empty JSON document")
	}
	end, err := v.value(i, 0)
	if err != nil {
		return err
	}
	if end = skipWS(v.data, end); end != len(v.data) {
		return v.fail(errSyntax, end, "trailing data after the JSON value")
	}
	return nil
}

// value validates the value starting at data[i]; depth is the number of enclosing containers.
func (v *validator) value(i, depth int) (int, error) {
	d := v.data
	if i >= len(d) {
		return i, v.fail(errSyntax, i, "unexpected end of JSON input")
	}
	switch c := d[i]; c {
	case '{', '[':
		return v.container(i, depth+1)
	case '"':
		end, _, err := v.str(i)
		return end, err
	case 't':
		return v.literal(i, "true")
	case 'f':
		return v.literal(i, "false")
	case 'n':
		return v.literal(i, "null")
	default:
		if c == '-' || (c >= '0' && c <= '9') {
			return v.number(i)
		}
		return i, v.fail(errSyntax, i, "invalid character %q looking for a JSON value", c)
	}
}

func (v *validator) literal(i int, lit string) (int, error) {
	if len(v.data)-i < len(lit) || string(v.data[i:i+len(lit)]) != lit {
		return i, v.fail(errSyntax, i, "invalid literal (expected %s)", lit)
	}
	return i + len(lit), nil
}

// number follows RFC 8259 section 6: -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?
func (v *validator) number(i int) (int, error) {
	d, start := v.data, i
	if d[i] == '-' {
		i++
	}
	switch {
	case i < len(d) && d[i] == '0':
		i++
	case i < len(d) && d[i] >= '1' && d[i] <= '9':
		for i++; i < len(d) && isDigit(d[i]); i++ {
		}
	default:
		return i, v.fail(errSyntax, start, "invalid number")
	}
	if i < len(d) && d[i] == '.' {
		i++
		if i >= len(d) || !isDigit(d[i]) {
			return i, v.fail(errSyntax, start, "invalid number")
		}
		for ; i < len(d) && isDigit(d[i]); i++ {
		}
	}
	if i < len(d) && (d[i] == 'e' || d[i] == 'E') {
		i++
		if i < len(d) && (d[i] == '+' || d[i] == '-') {
			i++
		}
		if i >= len(d) || !isDigit(d[i]) {
			return i, v.fail(errSyntax, start, "invalid number")
		}
		for ; i < len(d) && isDigit(d[i]); i++ {
		}
	}
	return i, nil
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// strPlain marks the bytes a string may hold without a closer look: printable ASCII other
// than '"' and '\\'.
var strPlain = func() (t [256]bool) {
	for c := 0x20; c < 0x80; c++ {
		t[c] = c != '"' && c != '\\'
	}
	return t
}()

// SWAR ("SIMD within a register") tests over 8 bytes at a time; both are exact as
// booleans (Hacker's Delight 6-1; hasLess needs n <= 128).
const (
	swarLo = 0x0101010101010101
	swarHi = 0x8080808080808080
)

func hasZero(x uint64) uint64         { return (x - swarLo) &^ x & swarHi }
func hasLess(x uint64, n byte) uint64 { return (x - swarLo*uint64(n)) &^ x & swarHi }

// plainRun returns the offset of the first byte at or after i that is not plain printable
// ASCII string content (a control character, '"', '\\' or a non-ASCII byte).
func plainRun(d []byte, i int) int {
	for ; i+8 <= len(d); i += 8 {
		x := binary.LittleEndian.Uint64(d[i:])
		if (x&swarHi)|hasLess(x, 0x20)|hasZero(x^(swarLo*'"'))|hasZero(x^(swarLo*'\\')) != 0 {
			break
		}
	}
	for i < len(d) && strPlain[d[i]] {
		i++
	}
	return i
}

// str validates the string starting at data[i] == '"' and returns the offset after its
// closing quote and whether it holds escapes.
func (v *validator) str(i int) (end int, escaped bool, err error) {
	d, start := v.data, i
	i++
	for {
		i = plainRun(d, i)
		if i >= len(d) {
			return i, escaped, v.fail(errSyntax, start, "unterminated string")
		}
		switch c := d[i]; {
		case c == '"':
			return i + 1, escaped, nil
		case c == '\\':
			escaped = true
			if i+1 >= len(d) {
				return i, escaped, v.fail(errSyntax, i, "unterminated string")
			}
			switch d[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				r, ok := hex4(d, i+2)
				if !ok {
					return i, escaped, v.fail(errSyntax, i, "invalid \\u escape")
				}
				switch {
				case r >= 0xD800 && r < 0xDC00:
					// A high surrogate must be followed by an escaped low surrogate. Lone
					// surrogates are decoded differently by different parsers (U+FFFD in Go,
					// kept as-is in JavaScript and Python), which makes "\ud800" and "\udc00"
					// the same key for one parser and different keys for another (RFC 7493 2.1).
					lo, ok := rune(0), false
					if i+7 < len(d) && d[i+6] == '\\' && d[i+7] == 'u' {
						lo, ok = hex4(d, i+8)
					}
					if !ok || lo < 0xDC00 || lo >= 0xE000 {
						return i, escaped, v.fail(errSurrogate, i, "lone UTF-16 surrogate escape")
					}
					i += 12
				case r >= 0xDC00 && r < 0xE000:
					return i, escaped, v.fail(errSurrogate, i, "lone UTF-16 surrogate escape")
				default:
					i += 6
				}
			default:
				return i, escaped, v.fail(errSyntax, i, "invalid escape %q", d[i+1])
			}
		case c < 0x20:
			return i, escaped, v.fail(errSyntax, i, "control character %#02x in string", c)
		default:
			r, size := utf8.DecodeRune(d[i:])
			if r == utf8.RuneError && size == 1 {
				return i, escaped, v.fail(errUTF8, i, "invalid UTF-8 in string")
			}
			i += size
		}
	}
}

func hex4(d []byte, i int) (rune, bool) {
	if i+4 > len(d) {
		return 0, false
	}
	var r rune
	for _, c := range d[i : i+4] {
		switch {
		case c >= '0' && c <= '9':
			r = r<<4 | rune(c-'0')
		case c >= 'a' && c <= 'f':
			r = r<<4 | rune(c-'a'+10)
		case c >= 'A' && c <= 'F':
			r = r<<4 | rune(c-'A'+10)
		default:
			return 0, false
		}
	}
	return r, true
}

// container validates the object or array at data[i], at depth, and records its span when
// it is shallow enough for the span index.
func (v *validator) container(i, depth int) (int, error) {
	if depth > v.maxDepth {
		return i, v.fail(errDepth, i, "nesting deeper than %d", v.maxDepth)
	}
	k := -1
	if depth <= v.spanDepth {
		k = len(v.spans)
		v.spans = append(v.spans, span{i, -1})
	}
	var end int
	var err error
	if v.data[i] == '{' {
		end, err = v.objectBody(i, depth)
	} else {
		end, err = v.arrayBody(i, depth)
	}
	if k >= 0 {
		v.spans[k].end = end
	}
	return end, err
}

// arrayBody and objectBody keep the comma-or-close step after each element inline rather
// than sharing a helper: the helper does not inline, and cost about 8% of validation time.
func (v *validator) arrayBody(i, depth int) (int, error) {
	d := v.data
	i = skipWS(d, i+1)
	if i < len(d) && d[i] == ']' {
		return i + 1, nil
	}
	for {
		var err error
		if i, err = v.value(i, depth); err != nil {
			return i, err
		}
		i = skipWS(d, i)
		if i >= len(d) {
			return i, v.fail(errSyntax, i, "unexpected end of JSON input")
		}
		switch d[i] {
		case ',':
			i = skipWS(d, i+1)
		case ']':
			return i + 1, nil
		default:
			return i, v.fail(errSyntax, i, "invalid character %q after array element", d[i])
		}
	}
}

func (v *validator) objectBody(i, depth int) (int, error) {
	for len(v.levels) <= depth {
		v.levels = append(v.levels, new(keySet))
	}
	ks := v.levels[depth]
	ks.list, ks.useMap = ks.list[:0], false
	d := v.data
	i = skipWS(d, i+1)
	if i < len(d) && d[i] == '}' {
		return i + 1, nil
	}
	for {
		if i >= len(d) || d[i] != '"' {
			return i, v.fail(errSyntax, i, "expected a string object key")
		}
		kEnd, esc, err := v.str(i)
		if err != nil {
			return i, err
		}
		if err := v.addKey(ks, i, kEnd, esc); err != nil {
			return i, err
		}
		i = skipWS(d, kEnd)
		if i >= len(d) || d[i] != ':' {
			return i, v.fail(errSyntax, i, "expected ':' after object key")
		}
		if i, err = v.value(skipWS(d, i+1), depth); err != nil {
			return i, err
		}
		i = skipWS(d, i)
		if i >= len(d) {
			return i, v.fail(errSyntax, i, "unexpected end of JSON input")
		}
		switch d[i] {
		case ',':
			i = skipWS(d, i+1)
		case '}':
			return i + 1, nil
		default:
			return i, v.fail(errSyntax, i, "invalid character %q after object member", d[i])
		}
	}
}

// addKey records the key data[start:end] (quotes included) in ks; keys are compared after
// unescaping, so "name" and "n\u0061me" are the same key, and without case: Go's
// encoding/json matches struct fields case-insensitively (Unicode simple folding, so
// "argumentſ" is "arguments") and keeps the last, so {"name":"get_inventory",
// "Name":"delete_product"} would be a call of delete_product to a server that decodes so,
// and one of get_inventory to mcpgate.
func (v *validator) addKey(ks *keySet, start, end int, escaped bool) error {
	var key []byte
	ref := keyRef{off: int32(start + 1), n: int32(end - start - 2)}
	if escaped {
		off := len(v.arena)
		v.arena = appendUnescaped(v.arena, v.data[start+1:end-1])
		key = v.arena[off:]
		ref = keyRef{off: int32(off), n: int32(len(key)), inArena: true}
	} else {
		key = v.data[start+1 : end-1]
	}
	if ks.useMap {
		folded := foldKey(key)
		if other, dup := ks.m[folded]; dup {
			return v.duplicate(start, []byte(other), key)
		}
		ks.m[folded] = string(key)
		return nil
	}
	for _, r := range ks.list {
		if other := v.keyBytes(r); bytes.EqualFold(other, key) {
			return v.duplicate(start, other, key)
		}
	}
	ks.list = append(ks.list, ref)
	if len(ks.list) > linearKeys {
		if ks.m == nil {
			ks.m = make(map[string]string, 2*linearKeys)
		} else {
			clear(ks.m)
		}
		for _, r := range ks.list {
			k := v.keyBytes(r)
			ks.m[foldKey(k)] = string(k)
		}
		ks.useMap = true
	}
	return nil
}

// duplicate is the error for key, a second key equal to other (as bytes.EqualFold).
func (v *validator) duplicate(off int, other, key []byte) error {
	if bytes.Equal(other, key) {
		return v.fail(errDuplicate, off, "duplicate object key %q", clip(key))
	}
	return v.fail(errDuplicate, off, "object keys %q and %q differ only in case (a server matching keys case-insensitively would read the other)", clip(other), clip(key))
}

// foldKey maps every key that bytes.EqualFold holds equal to one string: each rune
// becomes the smallest of its simple case-folding orbit (k, K and the Kelvin sign K are
// all K).
func foldKey(key []byte) string {
	var b strings.Builder
	b.Grow(len(key))
	for _, r := range string(key) {
		least := r
		for f := unicode.SimpleFold(r); f != r; f = unicode.SimpleFold(f) {
			least = min(least, f)
		}
		b.WriteRune(least)
	}
	return b.String()
}

// clip shortens a key quoted in an error message: messages go back to clients and into
// logs, and a key can be a megabyte long.
func clip(key []byte) []byte {
	const n = 64
	if len(key) <= n {
		return key
	}
	k := n
	for k > 0 && !utf8.RuneStart(key[k]) {
		k--
	}
	return append(key[:k:k], "..."...)
}

func (v *validator) keyBytes(r keyRef) []byte {
	if r.inArena {
		return v.arena[r.off : r.off+r.n]
	}
	return v.data[r.off : r.off+r.n]
}

// ---- walkers over validated JSON ----

func skipWS(d []byte, i int) int {
	for i < len(d) {
		switch d[i] {
		case ' ', '\t', '\n', '\r':
			i++
		default:
			return i
		}
	}
	return i
}

// skipString returns the offset after the validated string starting at d[i] == '"'.
func skipString(d []byte, i int) int {
	i++
	for {
		for ; i+8 <= len(d); i += 8 {
			x := binary.LittleEndian.Uint64(d[i:])
			if hasZero(x^(swarLo*'"'))|hasZero(x^(swarLo*'\\')) != 0 {
				break
			}
		}
		for i < len(d) && d[i] != '"' && d[i] != '\\' {
			i++
		}
		if i >= len(d) {
			return len(d) // unreachable on validated input
		}
		if d[i] == '"' {
			return i + 1
		}
		i += 2 // an escape: the escaped byte cannot end the string
	}
}

// skipValue returns the offset after the value starting at d[i].
func skipValue(d []byte, i int) int {
	switch d[i] {
	case '"':
		return skipString(d, i)
	case '{', '[':
		depth := 0
		for i < len(d) {
			switch d[i] {
			case '"':
				i = skipString(d, i)
				continue
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
			i++
		}
		return i
	default: // number or literal: runs to the next delimiter
		for i < len(d) {
			switch d[i] {
			case ',', '}', ']', ' ', '\t', '\n', '\r':
				return i
			}
			i++
		}
		return i
	}
}

// member is one object member of validated JSON: the raw key (without quotes, escapes not
// decoded) and the span of its value.
type member struct {
	key        []byte
	escaped    bool
	keyStart   int // offset of the key's opening quote
	start, end int // the value
}

// is reports whether the member's key, decoded, equals name.
func (m *member) is(name string) bool {
	if !m.escaped {
		return string(m.key) == name
	}
	return string(appendUnescaped(nil, m.key)) == name
}

// members iterates over the members of a validated object. It is a value the caller keeps
// on its stack (a callback would make every member escape to the heap):
//
//	it := newMembers(d, i, x)
//	for it.next(&m) { ... }
type members struct {
	d []byte
	i int
	x spanIndex
	// end is the offset after the object once next has returned false.
	end int
}

// newMembers starts iterating over the object at d[i] == '{'; x (may be nil) lets the
// iterator jump over indexed containers.
func newMembers(d []byte, i int, x spanIndex) members {
	return members{d: d, i: skipWS(d, i+1), x: x}
}

func (it *members) next(m *member) bool {
	d, i := it.d, it.i
	if d[i] == '}' {
		it.end = i + 1
		return false
	}
	m.keyStart = i
	ke := skipString(d, i)
	m.key = d[i+1 : ke-1]
	m.escaped = bytes.IndexByte(m.key, '\\') >= 0
	m.start = skipWS(d, skipWS(d, ke)+1)
	m.end = it.x.skip(d, m.start)
	if i = skipWS(d, m.end); d[i] == ',' {
		i = skipWS(d, i+1)
	}
	it.i = i
	return true
}

// findMember returns the span of the value of member name in the validated object at
// d[i] == '{', or absent. It stops at the member; x (may be nil) skips indexed containers.
func findMember(d []byte, i int, name string, x spanIndex) span {
	var m member
	for it := newMembers(d, i, x); it.next(&m); {
		if m.is(name) {
			return span{m.start, m.end}
		}
	}
	return absent
}

// elements iterates over the elements of a validated array, like members.
type elements struct {
	d   []byte
	i   int
	x   spanIndex
	end int
}

func newElements(d []byte, i int, x spanIndex) elements {
	return elements{d: d, i: skipWS(d, i+1), x: x}
}

func (it *elements) next() (start, end int, ok bool) {
	d, i := it.d, it.i
	if d[i] == ']' {
		it.end = i + 1
		return 0, 0, false
	}
	start, end = i, it.x.skip(d, i)
	if i = skipWS(d, end); d[i] == ',' {
		i = skipWS(d, i+1)
	}
	it.i = i
	return start, end, true
}

// appendUnescaped appends the decoded contents of a validated JSON string body (without
// quotes) to dst.
func appendUnescaped(dst, s []byte) []byte {
	for len(s) > 0 {
		j := bytes.IndexByte(s, '\\')
		if j < 0 {
			return append(dst, s...)
		}
		dst = append(dst, s[:j]...)
		s = s[j:]
		switch s[1] {
		case 'b':
			dst = append(dst, '\b')
		case 'f':
			dst = append(dst, '\f')
		case 'n':
			dst = append(dst, '\n')
		case 'r':
			dst = append(dst, '\r')
		case 't':
			dst = append(dst, '\t')
		case 'u':
			r, _ := hex4(s, 2)
			if utf16.IsSurrogate(r) {
				lo, _ := hex4(s, 8)
				dst = utf8.AppendRune(dst, utf16.DecodeRune(r, lo))
				s = s[12:]
				continue
			}
			dst = utf8.AppendRune(dst, r)
			s = s[6:]
			continue
		default: // '"', '\\', '/'
			dst = append(dst, s[1])
		}
		s = s[2:]
	}
	return dst
}

// stringValue decodes the validated JSON string d[start:end] (quotes included).
func stringValue(d []byte, start, end int) string {
	body := d[start+1 : end-1]
	if bytes.IndexByte(body, '\\') < 0 {
		return string(body)
	}
	return string(appendUnescaped(make([]byte, 0, len(body)), body))
}

// decodeValue decodes the validated JSON value at d[i] into the shapes encoding/json
// produces with UseNumber: map[string]any, []any, string, json.Number, bool, nil. It
// returns the offset after the value. One pass, no callbacks: it is on the tools/call path.
func decodeValue(d []byte, i int) (any, int) {
	switch d[i] {
	case '{':
		m := make(map[string]any)
		if i = skipWS(d, i+1); d[i] == '}' {
			return m, i + 1
		}
		for {
			ke := skipString(d, i)
			key := stringValue(d, i, ke)
			var v any
			v, i = decodeValue(d, skipWS(d, skipWS(d, ke)+1))
			m[key] = v
			if i = skipWS(d, i); d[i] == '}' {
				return m, i + 1
			}
			i = skipWS(d, i+1)
		}
	case '[':
		a := []any{}
		if i = skipWS(d, i+1); d[i] == ']' {
			return a, i + 1
		}
		for {
			var v any
			v, i = decodeValue(d, i)
			a = append(a, v)
			if i = skipWS(d, i); d[i] == ']' {
				return a, i + 1
			}
			i = skipWS(d, i+1)
		}
	case '"':
		end := skipString(d, i)
		return stringValue(d, i, end), end
	case 't':
		return true, i + 4
	case 'f':
		return false, i + 5
	case 'n':
		return nil, i + 4
	default:
		end := skipValue(d, i)
		return json.Number(d[i:end]), end
	}
}

// appendQuoted appends s as a JSON string. Only what JSON requires is escaped (plus U+2028
// and U+2029, which some JavaScript consumers still choke on); s must be valid UTF-8.
func appendQuoted(dst []byte, s []byte) []byte {
	const hex = "0123456789abcdef"
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRune(s[i:])
		if r == '\u2028' || r == '\u2029' {
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hex[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}
