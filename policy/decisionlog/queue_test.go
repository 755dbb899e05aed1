package decisionlog

import (
	"sync"
	"testing"
)

// collector records what the writer was given, in order.
type collector struct {
	mu  sync.Mutex
	got []int
}

func (c *collector) write(batch []int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.got = append(c.got, batch...)
}

func (c *collector) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.got)
}

func TestFlushWritesEverythingAddedBefore(t *testing.T) {
	c := &collector{}
	q := New(c.write)
	defer q.Close()
	for i := range 10 {
		q.Add(i)
	}
	q.Flush()
	if c.len() != 10 {
		t.Fatalf("after Flush %d records written, want 10", c.len())
	}
	for i, v := range c.got {
		if v != i {
			t.Fatalf("record %d is %d: order not kept", i, v)
		}
	}
}

func TestCloseDrainsAndLaterAddsAreWritten(t *testing.T) {
	c := &collector{}
	q := New(c.write)
	for i := range 100 {
		q.Add(i)
	}
	q.Close()
	if c.len() != 100 {
		t.Fatalf("after Close %d records written, want 100", c.len())
	}
	q.Close() // idempotent
	q.Add(100)
	q.Flush()
	if c.len() != 101 {
		t.Fatalf("an Add after Close was not written")
	}
}

// TestFullQueueWritesInline: a writer that cannot keep up loses nothing and does not make
// Add wait for it.
func TestFullQueueWritesInline(t *testing.T) {
	c := &collector{}
	started, release := make(chan struct{}), make(chan struct{})
	q := New(func(b []int) {
		if b[0] == -1 { // the batch holding -1 stalls the writer until released
			close(started)
			<-release
		}
		c.write(b)
	})
	defer q.Close()
	q.Add(-1)
	flushed := make(chan struct{})
	go func() { q.Flush(); close(flushed) }()
	<-started
	for i := range maxPending {
		q.Add(i)
	}
	q.Add(maxPending) // the queue is full: written before Add returns
	if c.len() != 1 || c.got[0] != maxPending {
		t.Fatalf("with a full queue, Add did not write inline: %d written", c.len())
	}
	close(release)
	<-flushed
	q.Flush()
	if n := c.len(); n != maxPending+2 {
		t.Fatalf("%d records written, want %d", n, maxPending+2)
	}
}

// TestConcurrentAddAndFlush runs under -race in make test.
func TestConcurrentAddAndFlush(t *testing.T) {
	c := &collector{}
	q := New(c.write)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 1000 {
				q.Add(g*1000 + i)
				if i%100 == 0 {
					q.Flush()
				}
			}
		}()
	}
	wg.Wait()
	q.Close()
	if n := c.len(); n != 8000 {
		t.Fatalf("%d records written, want 8000", n)
	}
}
