package policy

import (
	"sync"
	"sync/atomic"
	"time"
)

// Store publishes the current Snapshot to readers on the request path. Readers call
// Current (one atomic load, no lock); a reload calls Set with a new snapshot or SetError
// with the reason it was refused, which keeps the last good snapshot serving.
//
// There is one writer (the watcher, or serve's first load); readers may be many.
type Store struct {
	cur atomic.Pointer[Snapshot]

	mu        sync.Mutex
	loadedAt  time.Time
	lastErr   error
	lastErrAt time.Time
	subs      []chan struct{}
}

// NewStore returns a store holding snap (which may be nil: not ready).
func NewStore(snap *Snapshot) *Store {
	s := &Store{}
	if snap != nil {
		s.Set(snap)
	}
	return s
}

// Current returns the snapshot in force, or nil before the first good load.
func (s *Store) Current() *Snapshot { return s.cur.Load() }

// Set publishes snap and clears the last error: the files on disk are good again.
func (s *Store) Set(snap *Snapshot) {
	if snap == nil {
		return // readers rely on a published snapshot never going away
	}
	s.mu.Lock()
	s.cur.Store(snap)
	s.loadedAt = time.Now()
	s.lastErr, s.lastErrAt = nil, time.Time{}
	subs := s.subs
	s.mu.Unlock()
	for _, c := range subs {
		select {
		case c <- struct{}{}:
		default: // a notification is already pending; subscribers read Current anyway
		}
	}
}

// SetError records why the files on disk were refused; the snapshot in force stays.
// SetError(nil) clears it (the files were put back as they were).
func (s *Store) SetError(err error) {
	s.mu.Lock()
	s.lastErr, s.lastErrAt = err, time.Now()
	if err == nil {
		s.lastErrAt = time.Time{}
	}
	s.mu.Unlock()
}

// Subscribe returns a channel that receives a value after every Set (coalesced: a slow
// reader sees one pending notification, then reads Current), and a cancel func that
// removes it. Cancel does not close the channel, so a reader selecting on it never sees a
// spurious wake-up; it is idempotent and safe from any goroutine. For xDS and tests.
func (s *Store) Subscribe() (ch <-chan struct{}, cancel func()) {
	c := make(chan struct{}, 1)
	s.mu.Lock()
	s.subs = append(s.subs, c)
	s.mu.Unlock()
	var once sync.Once
	return c, func() {
		once.Do(func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			// A new slice, not an in-place delete: Set ranges over a copy of the old
			// header outside the lock.
			subs := make([]chan struct{}, 0, len(s.subs))
			for _, sc := range s.subs {
				if sc != c {
					subs = append(subs, sc)
				}
			}
			s.subs = subs
		})
	}
}

// Status is what /readyz and /debug/snapshot show about the policy.
type Status struct {
	Version     string    `json:"version,omitempty"`
	LoadedAt    time.Time `json:"loaded_at,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
}

// Status reports the version in force and the last refused reload since it.
func (s *Store) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{LoadedAt: s.loadedAt, LastErrorAt: s.lastErrAt}
	if snap := s.cur.Load(); snap != nil {
		st.Version = snap.Version
	}
	if s.lastErr != nil {
		st.LastError = s.lastErr.Error()
	}
	return st
}
