package ratelimit

import (
	"bytes"
	"context"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/integration/redistest"
)

// TestClusterDecisions checks decisions on a real three-node Redis Cluster reached
// through one node's address: every node's slots are used (keys of one {tag} on the node
// of its slot), two stores — two replicas — share each bucket, and all-or-nothing holds
// per call.
func TestClusterDecisions(t *testing.T) {
	t.Parallel() // a cluster serves 2s after its start (Redis's writable delay): overlap them
	c := redistest.StartCluster(t, 3)
	a := newStore(t, Options{Address: c.Addr(), Cluster: true})
	b := newStore(t, Options{Address: c.Nodes[2].Addr(), Cluster: true})
	l := Limit{N: 2, Per: time.Hour}

	nodes := map[int]bool{}
	for i := 0; len(nodes) < 3; i++ {
		if i == 100 {
			t.Fatalf("100 tags reached nodes %v, want all 3", nodes)
		}
		tag := "{app" + strconv.Itoa(i) + "}"
		node := c.NodeOf(t, DefaultKeyPrefix+tag+":caller")
		if nodes[node] {
			continue
		}
		nodes[node] = true
		reqs := []Request{{Key: tag + ":caller", Limit: l}, {Key: tag + ":tool", Limit: Limit{N: 1, Per: time.Hour}}}
		if res := requireAllowN(t, a, reqs...); !res[0].Allowed || !res[1].Allowed {
			t.Fatalf("%s on node %d: first call refused: %+v", tag, node, res)
		}
		// The other replica sees the same buckets: the tool bucket is spent, so the call
		// is refused and the caller bucket keeps its last request.
		if res := requireAllowN(t, b, reqs...); res[0].Allowed == false || res[1].Allowed {
			t.Fatalf("%s: second call through the other store: %+v, want refused by the tool bucket only", tag, res)
		}
		if res := requireAllow(t, b, tag+":caller", l); !res.Allowed || res.Remaining != 0 {
			t.Fatalf("%s: caller bucket after a refused call: %+v, want its second request allowed", tag, res)
		}
		for _, k := range []string{tag + ":caller", tag + ":tool"} {
			if v, err := redistest.Do(c.Nodes[node].Addr(), "GET", DefaultKeyPrefix+k); err != nil || v == "" {
				t.Fatalf("key %s on node %d: %q, %v", k, node, v, err)
			}
		}
	}
}

// TestClusterCrossSlot checks that a call whose keys span slots is an error naming
// CROSSSLOT, not a partial decision.
func TestClusterCrossSlot(t *testing.T) {
	t.Parallel() // a cluster serves 2s after its start (Redis's writable delay): overlap them
	c := redistest.StartCluster(t, 3)
	r := newStore(t, Options{Address: c.Addr(), Cluster: true})
	var x, y string
	for i := 0; ; i++ {
		x, y = "{a}:k", "{b"+strconv.Itoa(i)+"}:k"
		if c.KeySlot(t, DefaultKeyPrefix+x) != c.KeySlot(t, DefaultKeyPrefix+y) {
			break
		}
	}
	l := Limit{N: 5, Per: time.Hour}
	_, err := r.AllowN(context.Background(), []Request{{Key: x, Limit: l}, {Key: y, Limit: l}})
	if err == nil || !strings.Contains(err.Error(), "CROSSSLOT") {
		t.Fatalf("AllowN over two slots: %v, want CROSSSLOT", err)
	}
	if res := requireAllow(t, r, x, l); res.Remaining != 4 {
		t.Fatalf("the refused call spent from %s: %+v", x, res)
	}
}

// TestClusterResharding checks that a decision follows its slot when a resharding moves
// it to another node (MOVED from the node the client knew), spending exactly once, with
// the bucket moved along.
func TestClusterResharding(t *testing.T) {
	t.Parallel() // a cluster serves 2s after its start (Redis's writable delay): overlap them
	c := redistest.StartCluster(t, 3)
	r := newStore(t, Options{Address: c.Addr(), Cluster: true})
	l := Limit{N: 10, Per: time.Hour}
	key := "{inventory}:caller"
	for want := 9; want >= 8; want-- {
		if res := requireAllow(t, r, key, l); res.Remaining != want {
			t.Fatalf("before the move: %+v, want %d remaining", res, want)
		}
	}
	from := c.NodeOf(t, DefaultKeyPrefix+key)
	to := (from + 1) % 3
	c.MoveSlot(t, c.KeySlot(t, DefaultKeyPrefix+key), from, to)
	for want := 7; want >= 6; want-- {
		if res := requireAllow(t, r, key, l); res.Remaining != want {
			t.Fatalf("after the move to node %d: %+v, want %d remaining (one spent per call)", to, res, want)
		}
	}
	if v, err := redistest.Do(c.Nodes[to].Addr(), "GET", DefaultKeyPrefix+key); err != nil || v == "" {
		t.Fatalf("bucket on the new node: %q, %v", v, err)
	}
}

// TestLostReplyNotResent checks that a decision whose reply is lost after Redis ran it
// (the connection drops between the two) fails, and is not sent again — which would take
// a second request from the bucket — whether the store is standalone or a cluster (whose
// client would otherwise retry a command after EOF).
func TestLostReplyNotResent(t *testing.T) {
	t.Parallel() // a cluster serves 2s after its start (Redis's writable delay): overlap them
	for _, cluster := range []bool{false, true} {
		t.Run("cluster="+strconv.FormatBool(cluster), func(t *testing.T) {
			var addr string
			if cluster {
				c := redistest.StartCluster(t, 1)
				addr = c.Addr()
			} else {
				addr = redistest.Start(t).Addr()
			}
			p := startCutter(t, addr)
			if cluster {
				// The node announces the proxy, so that the client's slot map routes through it.
				_, port, _ := net.SplitHostPort(p.addr())
				if _, err := redistest.Do(addr, "CONFIG", "SET", "cluster-announce-port", port); err != nil {
					t.Fatal(err)
				}
			}
			r := newStore(t, Options{Address: p.addr(), Cluster: cluster})
			l := Limit{N: 10, Per: time.Hour}
			if res := requireAllow(t, r, "{lost}", l); res.Remaining != 9 {
				t.Fatalf("first call: %+v", res)
			}
			p.cutNextScript.Store(true)
			if _, err := r.Allow(context.Background(), "{lost}", l); err == nil {
				t.Fatal("Allow succeeded though its reply was lost: it was sent again")
			}
			if p.cut.Load() != 1 {
				t.Fatalf("%d replies cut, want 1", p.cut.Load())
			}
			// The lost call ran once: one request spent, not two.
			if res := requireAllow(t, r, "{lost}", l); res.Remaining != 7 {
				t.Fatalf("after the lost reply: %+v, want 7 remaining (the lost call spent once)", res)
			}
		})
	}
}

// cutter is a TCP proxy to a Redis that, when armed, lets the next script command
// through, discards Redis's reply and drops the client's connection: a reply lost after
// the script ran.
type cutter struct {
	ln            net.Listener
	target        string
	cutNextScript atomic.Bool
	cut           atomic.Int32
}

func startCutter(t *testing.T, target string) *cutter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutter{ln: ln, target: target}
	var wg sync.WaitGroup
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			cl, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); p.serve(cl) }()
		}
	}()
	return p
}

func (p *cutter) addr() string { return p.ln.Addr().String() }

func (p *cutter) serve(cl net.Conn) {
	defer cl.Close()
	srv, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer srv.Close()
	var drop atomic.Bool
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := cl.Read(buf)
			if n > 0 {
				if bytes.Contains(bytes.ToLower(buf[:n]), []byte("evalsha")) && p.cutNextScript.CompareAndSwap(true, false) {
					drop.Store(true)
				}
				if _, werr := srv.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				_ = srv.Close()
				return
			}
		}
	}()
	buf := make([]byte, 64<<10)
	for {
		n, err := srv.Read(buf)
		if n > 0 {
			if drop.Load() {
				p.cut.Add(1)
				return // the reply is discarded; the deferred Close drops the client
			}
			if _, werr := cl.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// TestSentinelFailover checks a store that finds its primary through Redis Sentinel:
// two stores share the buckets, and when the primary dies and the sentinel promotes its
// replica, decisions resume on the new primary, on their own (no restart, no reload),
// with the buckets as replicated.
func TestSentinelFailover(t *testing.T) {
	t.Parallel()
	primary := redistest.Start(t)
	replica := redistest.StartReplica(t, primary)
	sentinel := redistest.StartSentinel(t, "limits", primary)
	sentinel.WaitReplicas(t, 1)
	o := Options{Sentinel: &Sentinel{MasterName: "limits", Addrs: []string{sentinel.Addr()}}, Timeout: 200 * time.Millisecond}
	a, b := newStore(t, o), newStore(t, o)
	l := Limit{N: 10, Per: time.Hour}
	for want := 9; want >= 7; want-- {
		if res := requireAllow(t, a, "{app}:caller", l); res.Remaining != want {
			t.Fatalf("through the sentinel: %+v, want %d remaining", res, want)
		}
	}
	if res := requireAllow(t, b, "{app}:caller", l); res.Remaining != 6 {
		t.Fatalf("the other store: %+v, want 6 remaining (shared)", res)
	}
	key := DefaultKeyPrefix + "{app}:caller"
	redistest.WaitReplicated(t, primary, replica, key)

	primary.Kill()
	deadline := time.Now().Add(15 * time.Second)
	var errs int
	for {
		res, err := a.Allow(context.Background(), "{app}:caller", l)
		if err == nil {
			if res.Remaining != 5 {
				t.Fatalf("first decision after the failover: %+v, want 5 remaining (the replicated bucket, one spent)", res)
			}
			break
		}
		errs++
		if !strings.Contains(err.Error(), "limits (sentinel "+sentinel.Addr()+")") {
			t.Fatalf("error does not name the store: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no decision 15s after the primary died (%d errors): %v", errs, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("%d decisions failed during the failover", errs)
	if got := sentinel.Primary(t); got != replica.Addr() {
		t.Fatalf("the sentinel announces %s, want the promoted replica %s", got, replica.Addr())
	}
	if res := requireAllow(t, b, "{app}:caller", l); res.Remaining != 4 {
		t.Fatalf("the other store after the failover: %+v, want 4 remaining", res)
	}
}
