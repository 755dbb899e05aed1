package redistest

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
)

// Slots is the number of hash slots of a Redis Cluster.
const Slots = 16384

// Cluster is a Redis Cluster of primaries (no replicas) that a test started, each node a
// Server on its own free loopback port and bus port, the slots split evenly between
// them in node order.
type Cluster struct {
	Nodes []*Server
}

// StartCluster starts n cluster nodes, assigns the slots, joins the nodes and returns
// once every node sees the whole cluster serving (cluster_state:ok, all slots, n nodes).
// t.Cleanup stops the nodes.
func StartCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	if n < 1 {
		t.Fatalf("redistest: a cluster needs a node, got %d", n)
	}
	c := &Cluster{}
	for range n {
		c.Nodes = append(c.Nodes, startServer(t, true))
	}
	for i, s := range c.Nodes {
		from, to := i*Slots/n, (i+1)*Slots/n-1
		mustDo(t, s.Addr(), "CLUSTER", "ADDSLOTSRANGE", strconv.Itoa(from), strconv.Itoa(to))
		if i > 0 {
			mustDo(t, c.Nodes[0].Addr(), "CLUSTER", "MEET", "127.0.0.1", strconv.Itoa(s.port), strconv.Itoa(s.bus))
		}
	}
	c.waitServing(t)
	return c
}

// Addr is the first node's address: the one address a client needs to learn the rest.
func (c *Cluster) Addr() string { return c.Nodes[0].Addr() }

// waitServing polls CLUSTER INFO on every node until each reports the cluster ok with
// every slot served by the nodes it knows, all of them.
func (c *Cluster) waitServing(t testing.TB) {
	t.Helper()
	want := []string{"cluster_state:ok", "cluster_slots_ok:" + strconv.Itoa(Slots), "cluster_known_nodes:" + strconv.Itoa(len(c.Nodes))}
	waitFor(t, "cluster serving", func() error {
		for _, s := range c.Nodes {
			info, err := Do(s.Addr(), "CLUSTER", "INFO")
			if err != nil {
				return fmt.Errorf("%s: %w", s.Addr(), err)
			}
			for _, w := range want {
				if !strings.Contains(info, w+"\r\n") {
					return fmt.Errorf("%s: no %q in CLUSTER INFO", s.Addr(), w)
				}
			}
		}
		return nil
	})
}

// NodeOf returns the index of the node that serves key's slot, in that node's own view.
func (c *Cluster) NodeOf(t testing.TB, key string) int {
	t.Helper()
	slot := c.KeySlot(t, key)
	for i, n := range c.Nodes {
		id := mustDo(t, n.Addr(), "CLUSTER", "MYID")
		if holds(mustDo(t, n.Addr(), "CLUSTER", "NODES"), id, slot) {
			return i
		}
	}
	t.Fatalf("redistest: no node serves slot %d", slot)
	return -1
}

// holds reports whether CLUSTER NODES output nodes gives slot to the node id.
func holds(nodes, id string, slot int) bool {
	for _, line := range strings.Split(nodes, "\n") {
		f := strings.Fields(line)
		if len(f) < 8 || f[0] != id {
			continue
		}
		for _, r := range f[8:] {
			lo, hi, ok := strings.Cut(r, "-")
			if !ok {
				hi = lo
			}
			a, err1 := strconv.Atoi(lo)
			b, err2 := strconv.Atoi(hi)
			if err1 == nil && err2 == nil && slot >= a && slot <= b {
				return true
			}
		}
	}
	return false
}

// KeySlot is key's hash slot (CLUSTER KEYSLOT: the {hash tag} when it has one).
func (c *Cluster) KeySlot(t testing.TB, key string) int {
	t.Helper()
	n, err := strconv.Atoi(mustDo(t, c.Addr(), "CLUSTER", "KEYSLOT", key))
	if err != nil {
		t.Fatalf("redistest: CLUSTER KEYSLOT %q: %v", key, err)
	}
	return n
}

// MoveSlot moves slot, with its keys, from node from to node to, as a resharding does
// (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE on every node). Clients that cached the
// old owner get MOVED from it afterwards.
func (c *Cluster) MoveSlot(t testing.TB, slot, from, to int) {
	t.Helper()
	src, dst := c.Nodes[from], c.Nodes[to]
	srcID := mustDo(t, src.Addr(), "CLUSTER", "MYID")
	dstID := mustDo(t, dst.Addr(), "CLUSTER", "MYID")
	s := strconv.Itoa(slot)
	mustDo(t, dst.Addr(), "CLUSTER", "SETSLOT", s, "IMPORTING", srcID)
	mustDo(t, src.Addr(), "CLUSTER", "SETSLOT", s, "MIGRATING", dstID)
	for {
		keys := mustDo(t, src.Addr(), "CLUSTER", "GETKEYSINSLOT", s, "100")
		if keys == "" {
			break
		}
		args := []string{"MIGRATE", "127.0.0.1", strconv.Itoa(dst.port), "", "0", "5000", "KEYS"}
		mustDo(t, src.Addr(), append(args, strings.Split(keys, "\n")...)...)
	}
	for _, n := range c.Nodes {
		mustDo(t, n.Addr(), "CLUSTER", "SETSLOT", s, "NODE", dstID)
	}
	waitFor(t, fmt.Sprintf("slot %d on node %d everywhere", slot, to), func() error {
		if !c.everyoneAgrees(t, slot, to) {
			return errors.New("a node still gives it to another")
		}
		return nil
	})
}

// everyoneAgrees reports whether every node's view gives slot to node owner.
func (c *Cluster) everyoneAgrees(t testing.TB, slot, owner int) bool {
	t.Helper()
	id := mustDo(t, c.Nodes[owner].Addr(), "CLUSTER", "MYID")
	for _, n := range c.Nodes {
		if !holds(mustDo(t, n.Addr(), "CLUSTER", "NODES"), id, slot) {
			return false
		}
	}
	return true
}
