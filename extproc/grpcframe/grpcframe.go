// Package grpcframe reads the message framing of gRPC over HTTP/2 ("Length-Prefixed-
// Message" in gRPC's PROTOCOL-HTTP2.md) from a body that arrives in arbitrary chunks, as
// Envoy's ext_proc filter hands a streamed body over: a message may be split over many
// chunks, and one chunk may hold many messages.
//
// Each message is a 1-byte flag (0: not compressed, 1: compressed with the stream's
// grpc-encoding; the other bits are reserved), a 4-byte big-endian length, then the
// message. Fail closed: a reserved flag bit, a message over the limit, a compressed
// message without a decompressor for the stream's encoding, or a stream ending inside a
// message is an error, and the caller ends the stream.
package grpcframe

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// HeaderLen is the size of a message's prefix.
const HeaderLen = 5

// DefaultMaxMessageBytes is the limit of the zero Framer: grpc-go's default receive limit.
const DefaultMaxMessageBytes = 4 << 20

// Errors of Feed, wrapped with detail.
var (
	ErrReservedFlag = errors.New("grpc message flag has reserved bits set")
	ErrTooLarge     = errors.New("grpc message larger than the limit")
	ErrCompressed   = errors.New("compressed grpc message with no decompressor for the stream's encoding")
	ErrTruncated    = errors.New("grpc stream ended inside a message")
)

// Message is one message of the stream.
type Message struct {
	// Data is the message, decompressed if it was compressed.
	Data []byte
	// Compressed says the message came compressed.
	Compressed bool
}

// Framer splits one direction of a gRPC stream into messages.
type Framer struct {
	// MaxMessageBytes bounds a message, compressed or not (0: DefaultMaxMessageBytes).
	MaxMessageBytes int
	// Decompress, if set, decompresses compressed messages (see Gzip); without it they
	// are an error.
	Decompress func([]byte) ([]byte, error)

	buf []byte // an incomplete message held from earlier chunks
	n   int    // messages read
}

// Feed consumes the next chunk and returns the messages it completes, in order; their
// Data may alias chunk. At the end of the stream nothing may be left incomplete.
func (f *Framer) Feed(chunk []byte, endOfStream bool) ([]Message, error) {
	limit := f.MaxMessageBytes
	if limit <= 0 {
		limit = DefaultMaxMessageBytes
	}
	data := chunk
	if len(f.buf) > 0 {
		f.buf = append(f.buf, chunk...)
		data = f.buf
	}
	var out []Message
	i := 0
	for len(data)-i >= HeaderLen {
		flag := data[i]
		n := binary.BigEndian.Uint32(data[i+1 : i+HeaderLen])
		if flag&^1 != 0 {
			return out, fmt.Errorf("message %d: %w (0x%02x)", f.n, ErrReservedFlag, flag)
		}
		if uint64(n) > uint64(limit) {
			return out, fmt.Errorf("message %d: %w: %d bytes, limit %d", f.n, ErrTooLarge, n, limit)
		}
		end := i + HeaderLen + int(n)
		if end > len(data) {
			break
		}
		m := Message{Data: data[i+HeaderLen : end : end], Compressed: flag == 1}
		if m.Compressed {
			if f.Decompress == nil {
				return out, fmt.Errorf("message %d: %w", f.n, ErrCompressed)
			}
			d, err := f.Decompress(m.Data)
			if err != nil {
				return out, fmt.Errorf("message %d: %w: %v", f.n, ErrCompressed, err)
			}
			if len(d) > limit {
				return out, fmt.Errorf("message %d: %w: %d bytes decompressed, limit %d", f.n, ErrTooLarge, len(d), limit)
			}
			m.Data = d
		}
		out = append(out, m)
		f.n++
		i = end
	}
	rest := data[i:]
	if endOfStream && len(rest) > 0 {
		return out, fmt.Errorf("%w: %d bytes of message %d", ErrTruncated, len(rest), f.n)
	}
	// Keep the incomplete tail in a new array: chunk belongs to the caller, and the
	// messages returned may alias the old buffer.
	f.buf = nil
	if len(rest) > 0 {
		f.buf = append([]byte(nil), rest...)
	}
	return out, nil
}

// Append appends data as one uncompressed message to dst.
func Append(dst, data []byte) []byte {
	var h [HeaderLen]byte
	binary.BigEndian.PutUint32(h[1:], uint32(len(data)))
	return append(append(dst, h[:]...), data...)
}

// Gzip returns a decompressor for grpc-encoding gzip that refuses output over limit
// bytes (a small message must not inflate into gigabytes).
func Gzip(limit int) func([]byte) ([]byte, error) {
	return func(b []byte) ([]byte, error) {
		r, err := gzip.NewReader(bytes.NewReader(b))
		if err != nil {
			return nil, err
		}
		out, err := io.ReadAll(io.LimitReader(r, int64(limit)+1))
		if err != nil {
			return nil, err
		}
		if len(out) > limit {
			return nil, fmt.Errorf("decompresses to more than %d bytes", limit)
		}
		return out, nil
	}
}
