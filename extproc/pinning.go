package extproc

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.uber.org/zap"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/policy"
	mcpv1 "github.com/mcpgate/mcpgate/proto/mcpgate/mcp/v1"
)

// Tool-definition pinning (policy tools.pinning): every tools/list response of a pinning
// app is fingerprinted (policy.FingerprintTool). In record mode the definitions are
// learned (Pins, for `mcpgate pins export`) and nothing changes; in enforce mode a tool
// whose definition differs from its pin, or that has no pin, is removed from the list,
// and calls to it are refused naming what changed. What a list showed is remembered per
// app and tool, per replica: a call to a pinned tool no list has shown yet is decided by
// the rules alone (the server's definition is checked at the next list).

// maxPinnedTools bounds what is remembered per app (servers choose tool names), and
// maxPinnedDef the definition kept of each for review.
const (
	maxPinnedTools = 1000
	maxPinnedDef   = 8 << 10
)

// ruleDrift is the rule of calls refused because a tool drifted from its pin.
const ruleDrift = "pinning"

type pinKey struct{ app, tool string }

// pinState is what the lists of pinning apps showed.
type pinState struct {
	mu       sync.Mutex
	observed map[string]map[string]policy.ToolPin // app → tool → the definition last listed
	defs     map[pinKey]string                    // its canonical JSON, for review (cut at maxPinnedDef)
	drift    map[pinKey][]string                  // enforce: why a listed tool was hidden
	count    metric.Int64Counter
	log      *zap.Logger
}

func newPinState(meter metric.Meter, log *zap.Logger) (*pinState, error) {
	p := &pinState{observed: map[string]map[string]policy.ToolPin{}, defs: map[pinKey]string{}, drift: map[pinKey][]string{}, log: log}
	var err error
	p.count, err = meter.Int64Counter("mcpgate.mcp.pin.drifts",
		metric.WithDescription("tools/list entries hidden because the tool's definition differs from its pin or has none (tools.pinning enforce), by target"))
	return p, err
}

// Pins returns the definitions the lists of app have shown, by tool: what `mcpgate pins
// export` writes. Nil if none.
func (s *Server) Pins(app string) map[string]policy.ToolPin {
	s.pins.mu.Lock()
	defer s.pins.mu.Unlock()
	if o := s.pins.observed[app]; len(o) > 0 {
		return maps.Clone(o)
	}
	return nil
}

// PinDefinitions returns the canonical definitions the lists of app have shown, by tool
// (each cut at 8 KiB): what an operator reviews before committing the pins.
func (s *Server) PinDefinitions(app string) map[string]string {
	s.pins.mu.Lock()
	defer s.pins.mu.Unlock()
	out := map[string]string{}
	for k, d := range s.pins.defs {
		if k.app == app {
			out[k.tool] = d
		}
	}
	return out
}

// Drift returns the tools of app hidden for drift and why, by tool.
func (s *Server) Drift(app string) map[string][]string {
	s.pins.mu.Lock()
	defer s.pins.mu.Unlock()
	out := map[string][]string{}
	for k, why := range s.pins.drift {
		if k.app == app {
			out[k.tool] = slices.Clone(why)
		}
	}
	return out
}

// pinFilter is the pinning decision of a tools/list response's entries: it records what
// each entry's definition is and, in enforce mode, keeps only those matching their pin.
func (st *stream) pinFilter() func(names []string, entries [][]byte) []bool {
	pinning := st.app.MCP.Tools.Pinning
	app := st.app.ID
	p := st.s.pins
	return func(names []string, entries [][]byte) []bool {
		keep := make([]bool, len(names))
		p.mu.Lock()
		defer p.mu.Unlock()
		obs := p.observed[app]
		if obs == nil {
			obs = map[string]policy.ToolPin{}
			p.observed[app] = obs
		}
		hidden := 0
		for i, raw := range entries {
			name, fp, canonical, err := policy.FingerprintToolCanonical(raw)
			if err != nil || name != names[i] {
				// An entry mcpgate cannot fingerprint is not what any pin approved.
				keep[i] = pinning.Mode == policy.PinRecord
				continue
			}
			if _, known := obs[name]; known || len(obs) < maxPinnedTools {
				obs[name] = fp
				p.defs[pinKey{app, name}] = clip(string(canonical), maxPinnedDef)
			}
			if pinning.Mode == policy.PinRecord {
				keep[i] = true
				continue
			}
			why := []string{"no pin"}
			if pin, ok := pinning.Pins[name]; ok {
				why = pin.Drift(fp)
			}
			k := pinKey{app, name}
			if len(why) == 0 {
				keep[i] = true
				delete(p.drift, k)
				continue
			}
			hidden++
			if prev, seen := p.drift[k]; !seen || !slices.Equal(prev, why) {
				p.log.Warn("tool definition differs from its pin: hidden from tools/list, calls refused",
					zap.String("target", app), zap.String("tool", clip(name, maxLogField)), zap.Strings("changes", why), zap.String("pin_file", pinning.File))
			}
			if _, seen := p.drift[k]; seen || len(p.drift) < maxPinnedTools*4 {
				p.drift[k] = why
			}
		}
		if hidden > 0 {
			p.count.Add(context.Background(), int64(hidden), metric.WithAttributes(attribute.String("target", app)))
		}
		return keep
	}
}

// pinDecision refuses, in enforce mode, a tools/call of a tool without a pin or one a
// list showed drifted; ok is false when pinning has nothing to say.
func (st *stream) pinDecision(tool string) (Decision, bool) {
	pinning := st.app.MCP.Tools.Pinning
	if pinning.Mode != policy.PinEnforce || tool == "" {
		return Decision{}, false
	}
	if _, ok := pinning.Pins[tool]; !ok {
		return Decision{Rule: ruleDrift, Reason: fmt.Sprintf("tool %q has no pin in %s (tools.pinning: enforce)", tool, pinning.File)}, true
	}
	// Against the pins in force now (a reload may have approved the new definition).
	st.s.pins.mu.Lock()
	fp, seen := st.s.pins.observed[st.app.ID][tool]
	st.s.pins.mu.Unlock()
	if !seen {
		return Decision{}, false
	}
	if why := pinning.Pins[tool].Drift(fp); len(why) > 0 {
		return Decision{Rule: ruleDrift, Reason: fmt.Sprintf("tool %q differs from its pin: %s", tool, strings.Join(why, "; "))}, true
	}
	return Decision{}, false
}

// grpcToolJSON is a gRPC MCP Tool as the tools/list entry it stands for, so that one
// definition pins the same over both transports (nil if it cannot be written).
func grpcToolJSON(t *mcpv1.Tool) []byte {
	m := map[string]json.RawMessage{}
	str := func(k, v string) {
		if v != "" {
			m[k], _ = json.Marshal(v)
		}
	}
	str("name", t.GetName())
	str("title", t.GetTitle())
	str("description", t.GetDescription())
	for k, v := range map[string]*structpb.Struct{"inputSchema": t.GetInputSchema(), "outputSchema": t.GetOutputSchema(), "annotations": t.GetAnnotations()} {
		if v == nil {
			continue
		}
		b, err := protojson.Marshal(v)
		if err != nil {
			return nil
		}
		m[k] = b
	}
	b, _ := json.Marshal(m)
	return b
}
