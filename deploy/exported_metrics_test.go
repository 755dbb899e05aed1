package deploy

import (
	"context"
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.opentelemetry.io/otel/attribute"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
)

// This file answers "which Prometheus series can mcpgate's /metrics show?" from the
// source, never from a list kept by hand: the OpenTelemetry instruments created in the
// non-test files of the packages linked into cmd/mcpgate are found with go/ast and then
// created again through the real Prometheus exporter, configured as cmd/mcpgate/admin.go
// configures it (otelprom.WithoutScopeInfo), so that the names (unit suffixes, _total,
// _bucket) are the exporter's own. Labels are not derived here: which labels a series
// carries is checked against a real mcpgate's scrape (integration/dashboard_test.go).

// mcpgateMain is the package whose binary serves /metrics.
const mcpgateMain = "github.com/mcpgate/mcpgate/cmd/mcpgate"

// sourceInstrument is one instrument constructor call found in the source.
type sourceInstrument struct {
	pos  string // file:line of the constructor call
	kind string // the constructor: Int64Counter, Float64Histogram, ...
	name string // the OpenTelemetry name: mcpgate.mcp.decisions
	unit string // metric.WithUnit's argument, or ""
}

// instrumentKinds are the metric.Meter methods that create an instrument.
var instrumentKinds = map[string]bool{
	"Int64Counter": true, "Float64Counter": true,
	"Int64UpDownCounter": true, "Float64UpDownCounter": true,
	"Int64Histogram": true, "Float64Histogram": true,
	"Int64Gauge": true, "Float64Gauge": true,
	"Int64ObservableCounter": true, "Float64ObservableCounter": true,
	"Int64ObservableUpDownCounter": true, "Float64ObservableUpDownCounter": true,
	"Int64ObservableGauge": true, "Float64ObservableGauge": true,
}

// goPackage is what `go list -json` says of a package.
type goPackage struct {
	ImportPath string
	Dir        string
	GoFiles    []string
	Module     *struct{ Path string }
}

// mcpgatePackages lists this module's packages linked into cmd/mcpgate, with the non-test
// files the build uses (build constraints applied).
func mcpgatePackages(t *testing.T) []goPackage {
	t.Helper()
	cmd := exec.Command("go", "list", "-deps", "-json=ImportPath,Dir,GoFiles,Module", mcpgateMain)
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("go list -deps %s: %v\n%s", mcpgateMain, err, stderr)
	}
	var own []goPackage
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var p goPackage
		if err := dec.Decode(&p); err != nil {
			t.Fatalf("go list output: %v", err)
		}
		if p.Module != nil && p.Module.Path == "github.com/mcpgate/mcpgate" {
			own = append(own, p)
		}
	}
	if len(own) == 0 {
		t.Fatalf("go list -deps %s: none of the module's packages", mcpgateMain)
	}
	return own
}

// lastName is x for x and a.b.x.
func lastName(e ast.Expr) string {
	switch e := e.(type) {
	case *ast.Ident:
		return e.Name
	case *ast.SelectorExpr:
		return e.Sel.Name
	}
	return ""
}

func stringLit(e ast.Expr) (string, bool) {
	lit, ok := e.(*ast.BasicLit)
	if !ok || lit.Kind != token.STRING {
		return "", false
	}
	s, err := strconv.Unquote(lit.Value)
	return s, err == nil
}

// sourceInstruments finds every instrument mcpgate creates, with its unit.
func sourceInstruments(t *testing.T) []sourceInstrument {
	t.Helper()
	fset := token.NewFileSet()
	var found []sourceInstrument
	for _, p := range mcpgatePackages(t) {
		for _, file := range p.GoFiles {
			f, err := parser.ParseFile(fset, filepath.Join(p.Dir, file), nil, parser.SkipObjectResolution)
			if err != nil {
				t.Fatal(err)
			}
			ast.Inspect(f, func(n ast.Node) bool {
				c, ok := n.(*ast.CallExpr)
				if !ok {
					return true
				}
				sel, ok := c.Fun.(*ast.SelectorExpr)
				if !ok || !instrumentKinds[sel.Sel.Name] || len(c.Args) == 0 {
					return true
				}
				pos := fset.Position(c.Pos())
				where := filepath.Base(pos.Filename) + ":" + strconv.Itoa(pos.Line)
				name, ok := stringLit(c.Args[0])
				if !ok {
					t.Errorf("%s: %s with a name that is not a string literal: the dashboard test cannot know it", where, sel.Sel.Name)
					return true
				}
				in := sourceInstrument{pos: where, kind: sel.Sel.Name, name: name}
				for _, opt := range c.Args[1:] {
					if oc, ok := opt.(*ast.CallExpr); ok && lastName(oc.Fun) == "WithUnit" && len(oc.Args) == 1 {
						if u, ok := stringLit(oc.Args[0]); ok {
							in.unit = u
						} else {
							t.Errorf("%s: %s's unit is not a string literal", where, name)
						}
					}
				}
				found = append(found, in)
				return true
			})
		}
	}
	if len(found) == 0 {
		t.Fatalf("no metric instrument found in the packages of %s", mcpgateMain)
	}
	return found
}

// exportedSeries is the set of Prometheus series names mcpgate's /metrics can show:
// histograms as name_bucket, name_sum and name_count.
type exportedSeries map[string]bool

// exportedMetrics creates every instrument of the source through the real OpenTelemetry
// Prometheus exporter, as cmd/mcpgate/admin.go does, records one measurement on each, and
// reads what a scrape would show.
func exportedMetrics(t *testing.T) (exportedSeries, []sourceInstrument) {
	t.Helper()
	ins := sourceInstruments(t)
	reg := prometheus.NewRegistry()
	exp, err := otelprom.New(otelprom.WithRegisterer(reg), otelprom.WithoutScopeInfo())
	if err != nil {
		t.Fatal(err)
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp))
	defer func() { _ = mp.Shutdown(context.Background()) }()
	meter := mp.Meter(mcpgateMain)
	ctx := context.Background()
	for _, in := range ins {
		attrs := metric.WithAttributes(attribute.String("a", "x"))
		unit := metric.WithUnit(in.unit)
		var err error
		switch in.kind {
		case "Int64Counter":
			var c metric.Int64Counter
			if c, err = meter.Int64Counter(in.name, unit); err == nil {
				c.Add(ctx, 1, attrs)
			}
		case "Float64Counter":
			var c metric.Float64Counter
			if c, err = meter.Float64Counter(in.name, unit); err == nil {
				c.Add(ctx, 1, attrs)
			}
		case "Int64UpDownCounter":
			var c metric.Int64UpDownCounter
			if c, err = meter.Int64UpDownCounter(in.name, unit); err == nil {
				c.Add(ctx, 1, attrs)
			}
		case "Float64UpDownCounter":
			var c metric.Float64UpDownCounter
			if c, err = meter.Float64UpDownCounter(in.name, unit); err == nil {
				c.Add(ctx, 1, attrs)
			}
		case "Int64Histogram":
			var h metric.Int64Histogram
			if h, err = meter.Int64Histogram(in.name, unit); err == nil {
				h.Record(ctx, 1, attrs)
			}
		case "Float64Histogram":
			var h metric.Float64Histogram
			if h, err = meter.Float64Histogram(in.name, unit); err == nil {
				h.Record(ctx, 1, attrs)
			}
		case "Int64Gauge":
			var g metric.Int64Gauge
			if g, err = meter.Int64Gauge(in.name, unit); err == nil {
				g.Record(ctx, 1, attrs)
			}
		case "Float64Gauge":
			var g metric.Float64Gauge
			if g, err = meter.Float64Gauge(in.name, unit); err == nil {
				g.Record(ctx, 1, attrs)
			}
		case "Int64ObservableCounter":
			_, err = meter.Int64ObservableCounter(in.name, unit, metric.WithInt64Callback(observeInt(attrs)))
		case "Int64ObservableUpDownCounter":
			_, err = meter.Int64ObservableUpDownCounter(in.name, unit, metric.WithInt64Callback(observeInt(attrs)))
		case "Int64ObservableGauge":
			_, err = meter.Int64ObservableGauge(in.name, unit, metric.WithInt64Callback(observeInt(attrs)))
		case "Float64ObservableCounter":
			_, err = meter.Float64ObservableCounter(in.name, unit, metric.WithFloat64Callback(observeFloat(attrs)))
		case "Float64ObservableUpDownCounter":
			_, err = meter.Float64ObservableUpDownCounter(in.name, unit, metric.WithFloat64Callback(observeFloat(attrs)))
		case "Float64ObservableGauge":
			_, err = meter.Float64ObservableGauge(in.name, unit, metric.WithFloat64Callback(observeFloat(attrs)))
		default:
			t.Fatalf("%s: instrument kind %s unknown to this test", in.pos, in.kind)
		}
		if err != nil {
			t.Fatalf("%s: %s %q: %v", in.pos, in.kind, in.name, err)
		}
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := exportedSeries{}
	for _, mf := range families {
		name := mf.GetName()
		switch mf.GetType() {
		case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
			out[name+"_bucket"], out[name+"_sum"], out[name+"_count"] = true, true, true
		case dto.MetricType_SUMMARY:
			out[name], out[name+"_sum"], out[name+"_count"] = true, true, true
		default:
			out[name] = true
		}
	}
	if len(out) < len(ins) {
		t.Fatalf("the exporter shows %d families for %d instruments: %v", len(out), len(ins), out.names())
	}
	return out, ins
}

func observeInt(attrs metric.MeasurementOption) metric.Int64Callback {
	return func(_ context.Context, o metric.Int64Observer) error {
		o.Observe(1, attrs)
		return nil
	}
}

func observeFloat(attrs metric.MeasurementOption) metric.Float64Callback {
	return func(_ context.Context, o metric.Float64Observer) error {
		o.Observe(1, attrs)
		return nil
	}
}

// names lists s's series, sorted, for error messages.
func (s exportedSeries) names() []string {
	out := make([]string, 0, len(s))
	for n := range s {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// TestExportedMetricsFromSource guards the derivation itself: the series the README
// documents must come out of it under their documented names (a scanner that found
// nothing would make every dashboard check vacuous).
func TestExportedMetricsFromSource(t *testing.T) {
	series, ins := exportedMetrics(t)
	for _, in := range ins {
		t.Logf("%s: %s %s unit=%q", in.pos, in.kind, in.name, in.unit)
	}
	for _, want := range []string{
		"mcpgate_authz_decisions_total",
		"mcpgate_authz_duration_seconds_bucket",
		"mcpgate_mcp_decisions_total",
		"mcpgate_mcp_decision_duration_seconds_bucket",
		"mcpgate_ratelimit_decisions_total",
		"mcpgate_ratelimit_store_duration_seconds_bucket",
		"mcpgate_mcp_cache_entries",
		"mcpgate_policy_reloads_total",
		"mcpgate_xds_nacks_total",
		"mcpgate_trace_spans_dropped_total",
	} {
		if !series[want] {
			t.Errorf("derived series lack %s; they are %v", want, series.names())
		}
	}
	if series["mcpgate_mcp_decisions"] || series["mcpgate_authz_duration_bucket"] {
		t.Errorf("derived series hold names the exporter does not use: %v", series.names())
	}
}
