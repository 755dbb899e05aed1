// Package grafana reads mcpgate's Grafana dashboard (mcpgate.json, next to this file) the
// way its tests need it: every PromQL query it holds, and the series and labels each query
// names. It is not linked into mcpgate; deploy/grafana_test.go checks the names against
// what mcpgate's source exports, integration/dashboard_test.go the labels against a real
// mcpgate's /metrics.
//
// The PromQL reading is a tokenizer, not a parser: it knows string literals, label
// matchers, ranges, grouping clauses, functions, aggregation operators, keywords, numbers,
// durations and Grafana's $variables, and takes every other identifier for a series name.
// An identifier it cannot place is therefore reported as a series, which the tests then
// fail to find: it errs towards failing.
package grafana

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
)

// Dashboard is the part of a Grafana dashboard model the tests read.
type Dashboard struct {
	UID        string  `json:"uid"`
	Title      string  `json:"title"`
	Panels     []Panel `json:"panels"`
	Templating struct {
		List []Variable `json:"list"`
	} `json:"templating"`
}

// Panel is a dashboard panel; a row's collapsed panels are in Panels.
type Panel struct {
	ID      int      `json:"id"`
	Title   string   `json:"title"`
	Type    string   `json:"type"`
	Targets []Target `json:"targets"`
	Panels  []Panel  `json:"panels"`
}

// Target is one query of a panel.
type Target struct {
	RefID string `json:"refId"`
	Expr  string `json:"expr"`
}

// Variable is a templating variable; only query variables hold PromQL.
type Variable struct {
	Name  string `json:"name"`
	Type  string `json:"type"`
	Query any    `json:"query"` // a string, or {"query": "...", ...} in newer schemas
}

// Query is one PromQL expression of the dashboard and where it is.
type Query struct {
	Where string // "panel 3 (Check latency) A", "variable caller"
	Expr  string
	// Label is the label a label_values(series, label) variable lists, or "".
	Label string
}

// Load reads and decodes a dashboard file.
func Load(path string) (*Dashboard, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var d Dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &d, nil
}

// labelValues is Grafana's Prometheus variable function label_values(series, label).
var labelValues = regexp.MustCompile(`^\s*label_values\(\s*(.*?)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$`)

// Queries lists every PromQL expression of the dashboard: panel targets (rows' nested
// panels included) and query variables.
func (d *Dashboard) Queries() ([]Query, error) {
	var out []Query
	var walk func([]Panel)
	walk = func(ps []Panel) {
		for _, p := range ps {
			for _, t := range p.Targets {
				out = append(out, Query{Where: fmt.Sprintf("panel %d (%s) %s", p.ID, p.Title, t.RefID), Expr: t.Expr})
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		q := ""
		switch x := v.Query.(type) {
		case string:
			q = x
		case map[string]any:
			q, _ = x["query"].(string)
		}
		where := "variable " + v.Name
		if m := labelValues.FindStringSubmatch(q); m != nil {
			out = append(out, Query{Where: where, Expr: m[1], Label: m[2]})
			continue
		}
		if strings.HasPrefix(strings.TrimSpace(q), "label_values(") {
			return nil, fmt.Errorf("%s: label_values without a series (%q): it would list every series' values", where, q)
		}
		if rest, ok := strings.CutPrefix(strings.TrimSpace(q), "query_result("); ok {
			q = strings.TrimSuffix(strings.TrimSpace(rest), ")")
		}
		out = append(out, Query{Where: where, Expr: q})
	}
	return out, nil
}

// Selector is one series a query reads, with the labels its matchers name.
type Selector struct {
	Series string
	Labels []string
}

// Names is what one PromQL expression refers to.
type Names struct {
	Selectors []Selector
	// Grouping are the labels of by/without/on/ignoring/group_left/group_right clauses.
	Grouping []string
}

// functions are PromQL's functions (a name followed by "(").
var functions = map[string]bool{}

func init() {
	for _, f := range strings.Fields(`abs absent absent_over_time ceil changes clamp clamp_max
		clamp_min day_of_month day_of_week day_of_year days_in_month delta deriv exp floor
		histogram_avg histogram_count histogram_fraction histogram_quantile histogram_stddev
		histogram_stdvar histogram_sum holt_winters double_exponential_smoothing hour idelta
		increase irate label_join label_replace ln log2 log10 minute month predict_linear rate
		resets round scalar sgn sort sort_desc sort_by_label sort_by_label_desc sqrt time
		timestamp vector year avg_over_time min_over_time max_over_time sum_over_time
		count_over_time quantile_over_time stddev_over_time stdvar_over_time last_over_time
		present_over_time mad_over_time acos acosh asin asinh atan atanh cos cosh sin sinh tan
		tanh deg rad pi info`) {
		functions[f] = true
	}
}

// aggregations are PromQL's aggregation operators: "sum by (x) (...)" or "sum(...)".
var aggregations = map[string]bool{"sum": true, "min": true, "max": true, "avg": true,
	"group": true, "stddev": true, "stdvar": true, "count": true, "count_values": true,
	"bottomk": true, "topk": true, "quantile": true, "limitk": true, "limit_ratio": true}

// keywords are PromQL's other reserved words; the grouping ones take a label list.
var keywords = map[string]bool{"and": true, "or": true, "unless": true, "bool": true,
	"offset": true, "inf": true, "nan": true, "atan2": true,
	"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true}

var grouping = map[string]bool{"by": true, "without": true, "on": true, "ignoring": true,
	"group_left": true, "group_right": true}

func identStart(c byte) bool {
	return c == '_' || c == ':' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
}

func identPart(c byte) bool { return identStart(c) || (c >= '0' && c <= '9') }

// Parse reads the series and labels a PromQL expression names.
func Parse(expr string) (Names, error) {
	var n Names
	i := 0
	skipSpace := func() {
		for i < len(expr) && strings.ContainsRune(" \t\r\n", rune(expr[i])) {
			i++
		}
	}
	ident := func() string {
		j := i
		for i < len(expr) && identPart(expr[i]) {
			i++
		}
		return expr[j:i]
	}
	// str skips a string literal starting at i.
	str := func() error {
		q := expr[i]
		for i++; i < len(expr); i++ {
			if expr[i] == '\\' && q != '`' {
				i++
				continue
			}
			if expr[i] == q {
				i++
				return nil
			}
		}
		return fmt.Errorf("unterminated string in %q", expr)
	}
	// labelList reads "(a, b)" after a grouping keyword.
	labelList := func() ([]string, error) {
		skipSpace()
		if i >= len(expr) || expr[i] != '(' {
			return nil, nil // group_left without labels
		}
		i++
		var ls []string
		for {
			skipSpace()
			if i < len(expr) && expr[i] == ')' {
				i++
				return ls, nil
			}
			if i >= len(expr) || !identStart(expr[i]) {
				return nil, fmt.Errorf("bad label list at %d in %q", i, expr)
			}
			ls = append(ls, ident())
			skipSpace()
			if i < len(expr) && expr[i] == ',' {
				i++
			}
		}
	}
	// matchers reads "{a="x", b=~"y"}" and returns the label names.
	matchers := func() ([]string, error) {
		i++ // {
		var ls []string
		for {
			skipSpace()
			if i >= len(expr) {
				return nil, fmt.Errorf("unterminated matchers in %q", expr)
			}
			switch c := expr[i]; {
			case c == '}':
				i++
				return ls, nil
			case c == ',':
				i++
			case c == '"' || c == '\'' || c == '`':
				if err := str(); err != nil {
					return nil, err
				}
			case c == '=' || c == '!' || c == '~':
				i++
			case identStart(c):
				ls = append(ls, ident())
			default:
				return nil, fmt.Errorf("unexpected %q in matchers of %q", c, expr)
			}
		}
	}
	for i < len(expr) {
		c := expr[i]
		switch {
		case strings.ContainsRune(" \t\r\n", rune(c)):
			i++
		case c == '"' || c == '\'' || c == '`':
			if err := str(); err != nil {
				return n, err
			}
		case c == '[':
			j := strings.IndexByte(expr[i:], ']')
			if j < 0 {
				return n, fmt.Errorf("unterminated range in %q", expr)
			}
			i += j + 1
		case c == '{':
			ls, err := matchers()
			if err != nil {
				return n, err
			}
			if len(n.Selectors) == 0 || n.Selectors[len(n.Selectors)-1].Labels != nil {
				return n, fmt.Errorf("matchers without a series name in %q (name the series: the check reads names)", expr)
			}
			n.Selectors[len(n.Selectors)-1].Labels = ls
		case c == '$':
			i++
			if i < len(expr) && expr[i] == '{' {
				j := strings.IndexByte(expr[i:], '}')
				if j < 0 {
					return n, fmt.Errorf("unterminated ${ in %q", expr)
				}
				i += j + 1
			} else {
				ident()
			}
		case c >= '0' && c <= '9' || c == '.':
			for i < len(expr) && (identPart(expr[i]) || expr[i] == '.') {
				i++ // 0.99, 5m, 1e3, 0x1f
			}
		case identStart(c):
			id := ident()
			j := i
			skipSpace()
			next := byte(0)
			if i < len(expr) {
				next = expr[i]
			}
			switch {
			case grouping[id]:
				ls, err := labelList()
				if err != nil {
					return n, err
				}
				n.Grouping = append(n.Grouping, ls...)
			case keywords[id] || aggregations[id]:
			case functions[id] && next == '(':
			case next == '(':
				return n, fmt.Errorf("unknown function %s in %q", id, expr)
			default:
				i = j
				// An empty, non-nil Labels marks matchers as read; nil means none yet.
				n.Selectors = append(n.Selectors, Selector{Series: id})
				if i < len(expr) && expr[i] != '{' {
					n.Selectors[len(n.Selectors)-1].Labels = []string{}
				}
			}
		default:
			i++ // operators, parentheses, commas
		}
	}
	for k := range n.Selectors {
		if n.Selectors[k].Labels == nil {
			n.Selectors[k].Labels = []string{}
		}
	}
	return n, nil
}
