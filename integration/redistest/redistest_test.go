package redistest

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/integration/testpki"
)

func TestStartKillRestart(t *testing.T) {
	s := Start(t)
	addr := s.Addr()
	if host, _, err := net.SplitHostPort(addr); err != nil || host != "127.0.0.1" {
		t.Fatalf("Addr() = %q: want 127.0.0.1:port", addr)
	}
	requirePing(t, addr)

	s.Kill()
	if err := ping(addr); err == nil {
		t.Fatal("PING answered after Kill")
	}
	s.Kill() // a second Kill is a no-op

	s.Restart(t)
	if s.Addr() != addr {
		t.Fatalf("Restart moved the server from %s to %s", addr, s.Addr())
	}
	requirePing(t, addr)
}

// TestStartTwo checks that two servers get two ports and both serve.
func TestStartTwo(t *testing.T) {
	a, b := Start(t), Start(t)
	if a.Addr() == b.Addr() {
		t.Fatalf("two servers on %s", a.Addr())
	}
	requirePing(t, a.Addr())
	requirePing(t, b.Addr())
}

// TestCleanupStops checks that t.Cleanup stops the server: its port refuses afterwards.
func TestCleanupStops(t *testing.T) {
	var addr string
	t.Run("inner", func(t *testing.T) {
		addr = Start(t).Addr()
		requirePing(t, addr)
	})
	if err := ping(addr); err == nil {
		t.Fatalf("redis-server on %s still answers after its test's cleanup", addr)
	}
}

// TestMissingBinaryFails checks that without redis-server Start fails the test (never
// skips it) and says to run make redis.
func TestMissingBinaryFails(t *testing.T) {
	saved := binaries
	binaries = []string{"/nonexistent/redis-server"}
	t.Cleanup(func() { binaries = saved })

	f := &fatalRecorder{TB: t}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // Fatal ends the goroutine that calls it, as testing's does.
		defer wg.Done()
		Start(f)
		t.Error("Start returned without redis-server")
	}()
	wg.Wait()
	if !f.failed {
		t.Fatal("Start did not fail the test")
	}
	if !strings.Contains(f.msg, "make redis") {
		t.Fatalf("Start failed with %q: want it to say to run `make redis`", f.msg)
	}
	if f.skipped {
		t.Fatal("Start skipped the test")
	}
}

// fatalRecorder is a testing.TB whose Fatal and Skip record instead of ending the test.
type fatalRecorder struct {
	testing.TB
	msg             string
	failed, skipped bool
}

func (f *fatalRecorder) Fatalf(format string, args ...any) {
	f.msg, f.failed = fmt.Sprintf(format, args...), true
	runtime.Goexit()
}
func (f *fatalRecorder) Fatal(args ...any)    { f.Fatalf("%s", fmt.Sprint(args...)) }
func (f *fatalRecorder) Skip(args ...any)     { f.skipped = true; runtime.Goexit() }
func (f *fatalRecorder) Skipf(string, ...any) { f.skipped = true; runtime.Goexit() }
func (f *fatalRecorder) SkipNow()             { f.skipped = true; runtime.Goexit() }

// requirePing checks that addr answers PING now: Start and Restart return only once it
// does, so there is nothing to wait for.
func requirePing(t *testing.T, addr string) {
	t.Helper()
	if err := ping(addr); err != nil {
		t.Fatalf("PING %s: %v", addr, err)
	}
}

// TestCluster checks that StartCluster serves every slot across its nodes, that NodeOf
// names the node holding a key, and that MoveSlot moves a slot with its keys.
func TestCluster(t *testing.T) {
	c := StartCluster(t, 3)
	key := "{moved}:k"
	from := c.NodeOf(t, key)
	if _, err := Do(c.Nodes[from].Addr(), "SET", key, "v"); err != nil {
		t.Fatalf("SET on the slot's node: %v", err)
	}
	other := (from + 1) % 3
	if _, err := Do(c.Nodes[other].Addr(), "GET", key); err == nil || !strings.HasPrefix(err.Error(), "MOVED") {
		t.Fatalf("GET on node %d that does not serve the slot: err %v, want MOVED", other, err)
	}
	// Three nodes serve three slot ranges: keys with other tags reach the other nodes.
	seen := map[int]bool{}
	for i := 0; i < 100 && len(seen) < 3; i++ {
		seen[c.NodeOf(t, fmt.Sprintf("{%d}", i))] = true
	}
	if len(seen) != 3 {
		t.Fatalf("100 tags reached nodes %v, want all 3", seen)
	}

	c.MoveSlot(t, c.KeySlot(t, key), from, other)
	if got := c.NodeOf(t, key); got != other {
		t.Fatalf("after MoveSlot the key is on node %d, want %d", got, other)
	}
	if v, err := Do(c.Nodes[other].Addr(), "GET", key); err != nil || v != "v" {
		t.Fatalf("GET after MoveSlot = %q, %v: want the key moved with its slot", v, err)
	}
	if _, err := Do(c.Nodes[from].Addr(), "GET", key); err == nil || !strings.HasPrefix(err.Error(), "MOVED") {
		t.Fatalf("GET on the old node: err %v, want MOVED", err)
	}
}

// TestSentinelFailover checks that a replica follows its primary, and that when the
// primary dies the sentinel promotes the replica and announces it.
func TestSentinelFailover(t *testing.T) {
	primary := Start(t)
	replica := StartReplica(t, primary)
	if _, err := Do(primary.Addr(), "SET", "k", "v"); err != nil {
		t.Fatal(err)
	}
	sentinel := StartSentinel(t, "mymaster", primary)
	if got := sentinel.Primary(t); got != primary.Addr() {
		t.Fatalf("sentinel announces %s, want %s", got, primary.Addr())
	}
	t0 := time.Now()
	sentinel.WaitReplicas(t, 1)
	t.Logf("replica known after %s", time.Since(t0))
	WaitReplicated(t, primary, replica, "k")
	primary.Kill()
	t0 = time.Now()
	waitFor(t, "failover to the replica", func() error {
		if got := sentinel.Primary(t); got != replica.Addr() {
			return fmt.Errorf("the sentinel announces %s", got)
		}
		return nil
	})
	t.Logf("failover after %s", time.Since(t0))
	if v, err := Do(replica.Addr(), "GET", "k"); err != nil || v != "v" {
		t.Fatalf("the promoted replica has k = %q, %v", v, err)
	}
	if _, err := Do(replica.Addr(), "SET", "k2", "v"); err != nil {
		t.Fatalf("the promoted replica refuses writes: %v", err)
	}
}

// TestStartTLS checks that a TLS server answers PING over TLS with its certificate, and
// not in plaintext on its TLS port.
func TestStartTLS(t *testing.T) {
	ca := testpki.NewCA(t, "example.org")
	cert, key := ca.IssuePEM(t, "", testpki.WithIP("127.0.0.1"))
	s := StartTLS(t, cert, key, ca.PEM)
	c, err := tls.Dial("tcp", s.TLSAddr(), &tls.Config{RootCAs: ca.Pool, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatalf("TLS to %s: %v", s.TLSAddr(), err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		t.Fatal(err)
	}
	if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || line != "+PONG\r\n" {
		t.Fatalf("PING over TLS: %q, %v", line, err)
	}
	if err := ping(s.TLSAddr()); err == nil {
		t.Fatal("the TLS port answers plaintext PING")
	}
}
