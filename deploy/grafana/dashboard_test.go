package grafana

import (
	"reflect"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	for _, c := range []struct {
		expr     string
		want     []Selector
		grouping []string
	}{
		{`mcpgate_xds_nacks_total`, []Selector{{"mcpgate_xds_nacks_total", []string{}}}, nil},
		{`sum by (caller, target) (rate(mcpgate_mcp_decisions_total{target=~"$target", decision!="allow"}[$__rate_interval]))`,
			[]Selector{{"mcpgate_mcp_decisions_total", []string{"target", "decision"}}}, []string{"caller", "target"}},
		{`histogram_quantile(0.99, sum without (caller) (rate(a_bucket{x="a,b}c"}[5m]))) / on (le) group_left (y) b offset 1h`,
			[]Selector{{"a_bucket", []string{"x"}}, {"b", []string{}}}, []string{"caller", "le", "y"}},
		{`sum(increase(r_total{result="rejected"}[${__range}])) or vector(0)`,
			[]Selector{{"r_total", []string{"result"}}}, nil},
		{`topk(5, sum by (tool) (x{a='q"uo\'te'})) > bool 1e3`,
			[]Selector{{"x", []string{"a"}}}, []string{"tool"}},
	} {
		got, err := Parse(c.expr)
		if err != nil {
			t.Errorf("Parse(%q): %v", c.expr, err)
			continue
		}
		if !reflect.DeepEqual(got.Selectors, c.want) || !reflect.DeepEqual(got.Grouping, c.grouping) {
			t.Errorf("Parse(%q) = %+v, want selectors %+v grouping %v", c.expr, got, c.want, c.grouping)
		}
	}
}

// TestParseRefuses: what the tokenizer cannot read is an error, never a silent pass.
func TestParseRefuses(t *testing.T) {
	for _, expr := range []string{
		`{__name__="mcpgate_xds_nacks_total"}`, // no series name to check
		`sum(x{a="b"`,                          // unterminated matchers
		`rate(x[5m)`,                           // unterminated range
		`x{a="b}`,                              // unterminated string
		`mystery_fn(x)`,                        // a function PromQL does not have
		`sum by (a (x)`,                        // a broken label list
	} {
		if n, err := Parse(expr); err == nil {
			t.Errorf("Parse(%q) = %+v, want an error", expr, n)
		}
	}
}

func TestQueries(t *testing.T) {
	d := &Dashboard{Panels: []Panel{
		{ID: 1, Title: "top", Targets: []Target{{RefID: "A", Expr: "a"}}},
		{ID: 2, Type: "row", Panels: []Panel{{ID: 3, Title: "nested", Targets: []Target{{RefID: "B", Expr: "b"}}}}},
	}}
	d.Templating.List = []Variable{
		{Name: "caller", Type: "query", Query: map[string]any{"query": "label_values(c_total{x=\"y\"}, caller)"}},
		{Name: "ds", Type: "datasource", Query: "prometheus"},
		{Name: "q", Type: "query", Query: "query_result(sum(d))"},
	}
	qs, err := d.Queries()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, q := range qs {
		got = append(got, q.Where+"|"+q.Expr+"|"+q.Label)
	}
	want := []string{"panel 1 (top) A|a|", "panel 3 (nested) B|b|", `variable caller|c_total{x="y"}|caller`, "variable q|sum(d)|"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Queries() =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	d.Templating.List = []Variable{{Name: "v", Type: "query", Query: "label_values(caller)"}}
	if _, err := d.Queries(); err == nil {
		t.Error("label_values(label) without a series: want an error")
	}
}
