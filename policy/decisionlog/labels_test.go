package decisionlog

import (
	"strconv"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/attribute"
)

func TestLabelsBoundCallerChosenValues(t *testing.T) {
	l := NewLabels(3, 8)
	for i := range 3 {
		if got := l.Get("inventory", "t"+strconv.Itoa(i)); got != "t"+strconv.Itoa(i) {
			t.Fatalf("value %d: got %q, want it admitted", i, got)
		}
	}
	if got := l.Get("inventory", "t3"); got != Other {
		t.Errorf("fourth distinct value: got %q, want %q", got, Other)
	}
	if got := l.Get("inventory", "t1"); got != "t1" {
		t.Errorf("admitted value after the cap: got %q, want it kept", got)
	}
	if got := l.Get("billing", "t3"); got != "t3" {
		t.Errorf("another scope: got %q, want its own budget", got)
	}
	if got := l.Get("billing", strings.Repeat("x", 9)); got != Other {
		t.Errorf("over-long value: got %q, want %q", got, Other)
	}
	if got := l.Get("billing", ""); got != "" {
		t.Errorf("empty value: got %q, want empty", got)
	}
}

func TestAttrSetsCachesUpToTheCap(t *testing.T) {
	builds := 0
	c := NewAttrSets(2, func(k string) attribute.Set {
		builds++
		return attribute.NewSet(attribute.String("k", k))
	})
	for range 3 {
		c.Get("a")
		c.Get("b")
	}
	if builds != 2 {
		t.Errorf("built %d sets for 2 keys asked 3 times each, want 2", builds)
	}
	c.Get("c")
	c.Get("c")
	if builds != 4 {
		t.Errorf("past the cap: built %d sets in all, want 4 (c built per call, not remembered)", builds)
	}
	if n := c.n.Load(); n != 2 {
		t.Errorf("cache holds %d sets, want the cap 2", n)
	}
}
