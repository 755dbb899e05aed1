// Package decisionlog is what the ext_authz and ext_proc servers share about recording
// decisions: a queue that hands decision records from request goroutines to one
// background writer, and bounded caches for the metric attributes the writer records.
// It sits beside the policy model because both servers depend on it and neither may
// depend on the other.
package decisionlog

import (
	"sync"
	"time"
)

// Queue collects records and writes them in batches on one goroutine, without waking it
// for each record. A channel send per decision made the writer runnable on the request's
// P (the runtime puts a readied goroutine in runnext), so encoding the log line and
// updating metrics often ran before gRPC's loopy writer sent the response. Records are
// appended to a slice instead; the writer drains it on a timer armed by the first record
// of a batch, when a batch reaches wakeAt records, on Flush and on Close.
//
// No record is ever dropped and memory stays bounded: when the writer has fallen
// maxPending records behind, Add writes the record itself (see Add).
type Queue[T any] struct {
	write func([]T)

	mu      sync.Mutex
	pending []T
	waiters []chan struct{} // Flush callers, released after the next drain
	closed  bool

	timer *time.Timer
	wake  chan struct{} // capacity 1: batch full, Flush or Close
	done  chan struct{} // closed when the writer has drained and exited
}

// Batching limits. At ~17k decisions/s a batch is ~170 records. Log timestamps are taken
// when a line is written, so lines lag their decision by about interval at most
// (latency fields are measured on the request path and stay exact).
const (
	interval   = 10 * time.Millisecond
	wakeAt     = 512
	maxPending = 4096
)

// New starts the writer goroutine. write receives batches in the order records were
// added; it is called by one goroutine at a time, except for records Add writes inline,
// so it must be safe for concurrent use.
func New[T any](write func([]T)) *Queue[T] {
	q := &Queue[T]{write: write, timer: time.NewTimer(time.Hour), wake: make(chan struct{}, 1), done: make(chan struct{})}
	q.timer.Stop()
	go q.run()
	return q
}

// Add queues one record. It never waits for the writer: when maxPending records are
// already waiting (or the queue is closed) it writes the record inline. That keeps every
// audit line and bounds memory, and costs the request the write only when logging cannot
// keep up, where a blocking queue would make it wait for the whole backlog instead.
func (q *Queue[T]) Add(r T) {
	q.mu.Lock()
	if q.closed || len(q.pending) >= maxPending {
		q.mu.Unlock()
		q.write([]T{r})
		return
	}
	q.pending = append(q.pending, r)
	n := len(q.pending)
	q.mu.Unlock()
	switch n {
	case 1:
		// Arming a timer wakes no goroutine now; the writer runs interval later.
		q.timer.Reset(interval)
	case wakeAt:
		q.signal()
	}
}

func (q *Queue[T]) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// Flush returns once every record added before it has been written.
func (q *Queue[T]) Flush() {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		<-q.done
		return
	}
	ch := make(chan struct{})
	q.waiters = append(q.waiters, ch)
	q.mu.Unlock()
	q.signal()
	<-ch
}

// Close writes everything pending and stops the writer. Records added afterwards are
// written inline. Close may be called more than once.
func (q *Queue[T]) Close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.signal()
	<-q.done
}

func (q *Queue[T]) run() {
	defer close(q.done)
	var batch []T
	for {
		select {
		case <-q.timer.C:
		case <-q.wake:
		}
		q.mu.Lock()
		// Swapping slices keeps the lock short; the drained slice is reused next time.
		batch, q.pending = q.pending, batch[:0]
		waiters, closed := q.waiters, q.closed
		q.waiters = nil
		q.mu.Unlock()
		if len(batch) > 0 {
			q.write(batch)
		}
		clear(batch) // drop references to records already written
		// Everything added before a waiter registered was in this batch or an earlier one.
		for _, w := range waiters {
			close(w)
		}
		if closed {
			q.timer.Stop()
			return
		}
	}
}
