package grpcframe

import (
	"bytes"
	"compress/gzip"
	"errors"
	"testing"
)

func stream(msgs ...string) []byte {
	var b []byte
	for _, m := range msgs {
		b = Append(b, []byte(m))
	}
	return b
}

// feedAll feeds b in chunks of n bytes and returns the messages.
func feedAll(t *testing.T, f *Framer, b []byte, n int) ([]string, error) {
	t.Helper()
	var got []string
	for i := 0; ; i += n {
		end := min(i+n, len(b))
		ms, err := f.Feed(b[i:end], end == len(b))
		for _, m := range ms {
			got = append(got, string(m.Data))
		}
		if err != nil || end == len(b) {
			return got, err
		}
	}
}

func TestFramesAcrossChunks(t *testing.T) {
	msgs := []string{"one", "", "a longer third message", string(make([]byte, 300))}
	b := stream(msgs...)
	for n := 1; n <= len(b); n++ {
		got, err := feedAll(t, &Framer{}, b, n)
		if err != nil {
			t.Fatalf("chunks of %d: %v", n, err)
		}
		if len(got) != len(msgs) {
			t.Fatalf("chunks of %d: %d messages, want %d", n, len(got), len(msgs))
		}
		for i := range msgs {
			if got[i] != msgs[i] {
				t.Fatalf("chunks of %d: message %d = %q", n, i, got[i])
			}
		}
	}
}

func TestFailClosed(t *testing.T) {
	for name, c := range map[string]struct {
		b    []byte
		f    Framer
		want error
	}{
		"reserved flag":        {append([]byte{2, 0, 0, 0, 1}, 'x'), Framer{}, ErrReservedFlag},
		"too large":            {[]byte{0, 0, 0, 1, 0}, Framer{MaxMessageBytes: 255}, ErrTooLarge},
		"compressed, no codec": {append([]byte{1, 0, 0, 0, 1}, 'x'), Framer{}, ErrCompressed},
		"truncated header":     {[]byte{0, 0, 0}, Framer{}, ErrTruncated},
		"truncated message":    {[]byte{0, 0, 0, 0, 4, 'a'}, Framer{}, ErrTruncated},
		"bad gzip":             {append([]byte{1, 0, 0, 0, 1}, 'x'), Framer{Decompress: Gzip(100)}, ErrCompressed},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := c.f.Feed(c.b, true); !errors.Is(err, c.want) {
				t.Fatalf("err %v, want %v", err, c.want)
			}
		})
	}
}

func TestGzipMessages(t *testing.T) {
	var z bytes.Buffer
	w := gzip.NewWriter(&z)
	_, _ = w.Write(bytes.Repeat([]byte("a"), 1000))
	_ = w.Close()
	frame := append([]byte{1, 0, 0, 0, byte(z.Len())}, z.Bytes()...)
	ms, err := (&Framer{Decompress: Gzip(1000)}).Feed(frame, true)
	if err != nil || len(ms) != 1 || !ms[0].Compressed || len(ms[0].Data) != 1000 {
		t.Fatalf("messages %v, err %v", ms, err)
	}
	// A message that inflates past the limit is refused.
	if _, err := (&Framer{Decompress: Gzip(999)}).Feed(frame, true); !errors.Is(err, ErrCompressed) {
		t.Fatalf("err %v, want ErrCompressed", err)
	}
}

func TestHeldBytesAreCopies(t *testing.T) {
	b := stream("hello", "world")
	chunk := append([]byte(nil), b[:8]...)
	f := &Framer{}
	if ms, err := f.Feed(chunk, false); err != nil || len(ms) != 0 {
		t.Fatal(ms, err)
	}
	for i := range chunk {
		chunk[i] = 0xff // the caller reuses its buffer
	}
	ms, err := f.Feed(b[8:], true)
	if err != nil || len(ms) != 2 || string(ms[0].Data) != "hello" || string(ms[1].Data) != "world" {
		t.Fatalf("messages %v, err %v", ms, err)
	}
}

// FuzzGRPCFramer: any input, in any chunking, frames the same or fails the same, and never
// panics.
func FuzzGRPCFramer(f *testing.F) {
	f.Add(stream("a", "bc"), uint8(1))
	f.Add([]byte{0, 0, 0, 0, 0}, uint8(3))
	f.Add([]byte{1, 0, 0, 0, 1, 9}, uint8(2))
	f.Add([]byte{0, 255, 255, 255, 255}, uint8(1))
	f.Fuzz(func(t *testing.T, b []byte, n uint8) {
		whole, errWhole := feedAll(t, &Framer{MaxMessageBytes: 1 << 16}, b, max(len(b), 1))
		parts, errParts := feedAll(t, &Framer{MaxMessageBytes: 1 << 16}, b, int(n)+1)
		if (errWhole == nil) != (errParts == nil) {
			t.Fatalf("whole: %v; in chunks of %d: %v", errWhole, int(n)+1, errParts)
		}
		if errWhole == nil && len(whole) != len(parts) {
			t.Fatalf("%d messages whole, %d in chunks", len(whole), len(parts))
		}
		for i := range min(len(whole), len(parts)) {
			if whole[i] != parts[i] {
				t.Fatalf("message %d differs", i)
			}
		}
	})
}

// BenchmarkFeed: 1,000 messages of 200 bytes in 16 KiB chunks, as Envoy streams them.
func BenchmarkFeed(b *testing.B) {
	var s []byte
	for range 1000 {
		s = Append(s, bytes.Repeat([]byte("m"), 200))
	}
	b.SetBytes(int64(len(s)))
	b.ReportAllocs()
	for b.Loop() {
		f := &Framer{}
		for i := 0; i < len(s); i += 16 << 10 {
			end := min(i+16<<10, len(s))
			if _, err := f.Feed(s[i:end], end == len(s)); err != nil {
				b.Fatal(err)
			}
		}
	}
}
