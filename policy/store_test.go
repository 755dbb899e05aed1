package policy

import (
	"errors"
	"sync"
	"testing"
)

func TestStoreNotReady(t *testing.T) {
	s := NewStore(nil)
	if s.Current() != nil {
		t.Fatal("a store built from nil has a snapshot")
	}
	if st := s.Status(); st != (Status{}) {
		t.Fatalf("status of an empty store %+v, want zero", st)
	}
	// Set(nil) is ignored: readers rely on a published snapshot never going away.
	s.Set(nil)
	if s.Current() != nil || !s.Status().LoadedAt.IsZero() {
		t.Fatal("Set(nil) published something")
	}
}

func TestStoreSetAndErrors(t *testing.T) {
	a, b := &Snapshot{Version: "a"}, &Snapshot{Version: "b"}
	s := NewStore(a)
	if s.Current() != a {
		t.Fatal("NewStore(a) does not serve a")
	}
	st := s.Status()
	if st.Version != "a" || st.LoadedAt.IsZero() || st.LastError != "" || !st.LastErrorAt.IsZero() {
		t.Fatalf("status after NewStore(a): %+v", st)
	}
	loadedA := st.LoadedAt

	// A refused reload keeps the snapshot in force and reports why.
	s.SetError(errors.New("app.yaml:3: bad"))
	st = s.Status()
	if s.Current() != a || st.Version != "a" || st.LoadedAt != loadedA {
		t.Fatalf("SetError changed the snapshot in force: %+v", st)
	}
	if st.LastError != "app.yaml:3: bad" || st.LastErrorAt.IsZero() {
		t.Fatalf("status after SetError: %+v", st)
	}

	// SetError(nil) clears it: the files were put back as they were.
	s.SetError(nil)
	if st = s.Status(); st.LastError != "" || !st.LastErrorAt.IsZero() || st.Version != "a" {
		t.Fatalf("status after SetError(nil): %+v", st)
	}

	// Set clears the error: the files on disk are good again.
	s.SetError(errors.New("still bad"))
	s.Set(b)
	st = s.Status()
	if s.Current() != b || st.Version != "b" || st.LastError != "" || !st.LastErrorAt.IsZero() {
		t.Fatalf("status after Set(b) following an error: %+v", st)
	}
	if st.LoadedAt.Before(loadedA) {
		t.Fatalf("LoadedAt went back: %s < %s", st.LoadedAt, loadedA)
	}

	// Set(nil) is ignored and clears nothing.
	s.SetError(errors.New("bad again"))
	s.Set(nil)
	if st = s.Status(); s.Current() != b || st.LastError != "bad again" {
		t.Fatalf("Set(nil) changed the store: %+v", st)
	}
}

func TestStoreSubscribeCoalesces(t *testing.T) {
	s := NewStore(nil)
	ch, cancel := s.Subscribe()
	defer cancel()
	requireNoNotification(t, ch, "before any Set")

	// Neither SetError nor an ignored Set(nil) notifies.
	s.SetError(errors.New("bad"))
	s.Set(nil)
	requireNoNotification(t, ch, "after SetError and Set(nil)")

	// Three Sets with no reader in between: one pending notification, and Current is
	// the last of them.
	last := &Snapshot{Version: "3"}
	s.Set(&Snapshot{Version: "1"})
	s.Set(&Snapshot{Version: "2"})
	s.Set(last)
	requireNotification(t, ch)
	requireNoNotification(t, ch, "after draining three coalesced Sets")
	if s.Current() != last {
		t.Fatalf("Current %q, want the last Set", s.Current().Version)
	}

	// A second subscriber is notified independently.
	ch2, cancel2 := s.Subscribe()
	defer cancel2()
	s.Set(&Snapshot{Version: "4"})
	requireNotification(t, ch)
	requireNotification(t, ch2)
}

func TestStoreUnsubscribe(t *testing.T) {
	s := NewStore(&Snapshot{Version: "a"})
	ch1, cancel1 := s.Subscribe()
	ch2, cancel2 := s.Subscribe()
	ch3, cancel3 := s.Subscribe()
	defer cancel1()
	defer cancel3()

	cancel2()
	cancel2() // idempotent
	if n := subscribers(s); n != 2 {
		t.Fatalf("%d subscribers after one cancel, want 2", n)
	}
	s.Set(&Snapshot{Version: "b"})
	requireNotification(t, ch1)
	requireNotification(t, ch3)
	requireNoNotification(t, ch2, "after its cancel")

	// Cancel does not close the channel: a reader selecting on it is not woken.
	select {
	case _, ok := <-ch2:
		t.Fatalf("a cancelled channel delivered (open=%v)", ok)
	default:
	}

	cancel1()
	cancel3()
	if n := subscribers(s); n != 0 {
		t.Fatalf("%d subscribers after cancelling all, want 0", n)
	}
	s.Set(&Snapshot{Version: "c"}) // nobody to notify; must not block
}

// Subscribing, cancelling and publishing race freely (run with -race).
func TestStoreSubscribeConcurrent(t *testing.T) {
	s := NewStore(&Snapshot{Version: "0"})
	stop, writerDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(writerDone)
		for {
			select {
			case <-stop:
				return
			default:
				s.Set(&Snapshot{Version: "x"})
			}
		}
	}()
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 200 {
				ch, cancel := s.Subscribe()
				select {
				case <-ch:
				default:
				}
				cancel()
			}
		})
	}
	wg.Wait()
	close(stop)
	<-writerDone
	if n := subscribers(s); n != 0 {
		t.Fatalf("%d subscribers left, want 0", n)
	}
}

func subscribers(s *Store) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.subs)
}

func requireNotification(t *testing.T, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	default:
		t.Fatal("no notification pending")
	}
}

func requireNoNotification(t *testing.T, ch <-chan struct{}, when string) {
	t.Helper()
	select {
	case <-ch:
		t.Fatalf("a notification is pending %s", when)
	default:
	}
}
