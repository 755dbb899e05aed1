package redistest

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// StartReplica starts a server replicating primary (--replicaof), and returns once its
// link to the primary is up and the initial sync done.
func StartReplica(t testing.TB, primary *Server) *Server {
	t.Helper()
	s := startServer(t, false, func(s *Server) {
		s.extra = []string{"--replicaof", "127.0.0.1", strconv.Itoa(primary.port)}
	})
	waitFor(t, "replica "+s.Addr()+" in sync with "+primary.Addr(), func() error {
		info, err := Do(s.Addr(), "INFO", "replication")
		if err != nil {
			return err
		}
		if !strings.Contains(info, "master_link_status:up\r\n") {
			return fmt.Errorf("no master_link_status:up in INFO replication")
		}
		return nil
	})
	return s
}

// WaitReplicated returns once replica holds key with the value it has on primary
// (replication is asynchronous: a test that kills the primary waits for it first).
func WaitReplicated(t testing.TB, primary, replica *Server, key string) {
	t.Helper()
	want, err := Do(primary.Addr(), "GET", key)
	if err != nil || want == "" {
		t.Fatalf("redistest: GET %s on the primary: %q, %v", key, want, err)
	}
	waitFor(t, "replica "+replica.Addr()+" holding "+key, func() error {
		got, err := Do(replica.Addr(), "GET", key)
		if err == nil && got != want {
			err = fmt.Errorf("it holds %q, the primary %q", got, want)
		}
		return err
	})
}

// Sentinel is a Redis Sentinel (redis-server --sentinel) that a test started, watching
// one primary under a name. It fails over quickly: the primary is down after 500ms
// without an answer, and one sentinel is a quorum.
type Sentinel struct {
	*Server
	Name string
}

// StartSentinel starts a sentinel monitoring primary as name and returns once it
// answers. Sentinel rewrites its config file, which lives in the sentinel's directory.
func StartSentinel(t testing.TB, name string, primary *Server) *Sentinel {
	t.Helper()
	s := startServer(t, false, func(s *Server) {
		s.conf = filepath.Join(s.dir, "sentinel.conf")
		conf := fmt.Sprintf("sentinel monitor %[1]s 127.0.0.1 %[2]d 1\n"+
			"sentinel down-after-milliseconds %[1]s 500\n"+
			"sentinel failover-timeout %[1]s 3000\n", name, primary.port)
		if err := os.WriteFile(s.conf, []byte(conf), 0o600); err != nil {
			t.Fatalf("redistest: %v", err)
		}
	})
	return &Sentinel{Server: s, Name: name}
}

// Primary is the primary's address as the sentinel announces it now.
func (s *Sentinel) Primary(t testing.TB) string {
	t.Helper()
	r := mustDo(t, s.Addr(), "SENTINEL", "GET-MASTER-ADDR-BY-NAME", s.Name)
	host, port, ok := strings.Cut(r, "\n")
	if !ok {
		t.Fatalf("redistest: SENTINEL GET-MASTER-ADDR-BY-NAME %s answered %q", s.Name, r)
	}
	return net.JoinHostPort(host, port)
}

// WaitReplicas returns once the sentinel knows n replicas of its primary, which it must
// before it can fail over to one (it learns them from the primary's INFO).
func (s *Sentinel) WaitReplicas(t testing.TB, n int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("sentinel %s knowing %d replicas", s.Addr(), n), func() error {
		r, err := Do(s.Addr(), "SENTINEL", "REPLICAS", s.Name)
		if err != nil {
			return err
		}
		// Each replica is a flat list of field/value pairs, one "name" field each.
		if got := strings.Count("\n"+r+"\n", "\nname\n"); got != n {
			return fmt.Errorf("it knows %d", got)
		}
		return nil
	})
}

// waitFor polls ok until it returns nil, failing the test after readyTimeout.
func waitFor(t testing.TB, what string, ok func() error) {
	t.Helper()
	deadline := time.Now().Add(readyTimeout)
	for {
		err := ok()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("redistest: %s: not within %s: %v", what, readyTimeout, err)
		}
		time.Sleep(pollInterval)
	}
}
