package decisionlog

import (
	"sync"
	"sync/atomic"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// AttrSets keeps one OpenTelemetry attribute set per label combination K. Building a set
// sorts and copies its attributes, which profiling showed as the largest cost of recording
// a decision after gRPC itself. The labels in K must already be bounded (values from
// policy, verified identities, constants, or [Labels]); the cache is capped all the same,
// and past the cap a set is built per call instead of remembered.
type AttrSets[K comparable] struct {
	build func(K) attribute.Set
	max   int64
	m     sync.Map // K → metric.MeasurementOption
	n     atomic.Int64
}

// NewAttrSets returns a cache of at most max sets, each built by build.
func NewAttrSets[K comparable](max int, build func(K) attribute.Set) *AttrSets[K] {
	return &AttrSets[K]{build: build, max: int64(max)}
}

// Get returns the measurement option carrying k's attribute set.
func (c *AttrSets[K]) Get(k K) metric.MeasurementOption {
	if v, ok := c.m.Load(k); ok {
		return v.(metric.MeasurementOption)
	}
	set := c.build(k)
	opt := metric.WithAttributeSet(set)
	if c.n.Load() < c.max {
		if _, loaded := c.m.LoadOrStore(k, opt); !loaded {
			c.n.Add(1)
		}
	}
	return opt
}

// Other is the label value for everything a bounded label does not admit.
const Other = "other"

// Labels bounds a label whose values callers choose (tool names, for one): per scope
// (e.g. a target app), only the first perScope distinct values of at most maxLen bytes
// become label values; every other value is [Other]. Callers cannot then grow a metric's
// series without bound.
type Labels struct {
	perScope, maxLen int

	mu   sync.Mutex
	seen map[string]map[string]struct{}
}

// NewLabels returns a Labels admitting perScope values of at most maxLen bytes per scope.
func NewLabels(perScope, maxLen int) *Labels {
	return &Labels{perScope: perScope, maxLen: maxLen, seen: map[string]map[string]struct{}{}}
}

// Get returns v if it is, or may become, one of scope's label values, else [Other]. The
// empty value stays empty.
func (l *Labels) Get(scope, v string) string {
	if v == "" {
		return ""
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	m := l.seen[scope]
	if m == nil {
		m = map[string]struct{}{}
		l.seen[scope] = m
	}
	if _, ok := m[v]; ok {
		return v
	}
	if len(m) >= l.perScope || len(v) > l.maxLen {
		return Other
	}
	m[v] = struct{}{}
	return v
}
