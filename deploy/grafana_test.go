package deploy

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/mcpgate/mcpgate/deploy/grafana"
)

// dashboardPath is the dashboard compose provisions and the Kubernetes ConfigMap carries.
var dashboardPath = filepath.Join(root, "deploy", "grafana", "mcpgate.json")

// dashboardProblems lists the queries of d naming a series not in series, and the mcpgate_
// series no query reads (a metric added without a panel). A histogram is read when any
// of its _bucket, _sum or _count is.
func dashboardProblems(d *grafana.Dashboard, series exportedSeries) []string {
	qs, err := d.Queries()
	if err != nil {
		return []string{err.Error()}
	}
	var problems []string
	read := map[string]bool{}
	for _, q := range qs {
		n, err := grafana.Parse(q.Expr)
		if err != nil {
			problems = append(problems, q.Where+": "+err.Error())
			continue
		}
		if len(n.Selectors) == 0 {
			problems = append(problems, q.Where+": reads no series: "+q.Expr)
		}
		for _, s := range n.Selectors {
			if !series[s.Series] {
				problems = append(problems, q.Where+": "+s.Series+" is not a series mcpgate exports")
			}
			read[strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(s.Series, "_bucket"), "_sum"), "_count")] = true
			read[s.Series] = true
		}
	}
	for _, s := range series.names() {
		base := s
		for _, suf := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(s, suf); ok && series[b+"_bucket"] {
				base = b
			}
		}
		// target_info is the exporter's resource description, not a measurement.
		if !read[s] && !read[base] && strings.HasPrefix(s, "mcpgate_") {
			problems = append(problems, "no panel reads "+s)
		}
	}
	return problems
}

// TestDashboardQueriesNameExportedSeries: every query of deploy/grafana/mcpgate.json names
// series mcpgate's source really exports (derived in exported_metrics_test.go, through the
// real Prometheus exporter), and every exported series has a panel.
func TestDashboardQueriesNameExportedSeries(t *testing.T) {
	d, err := grafana.Load(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	series, _ := exportedMetrics(t)
	for _, p := range dashboardProblems(d, series) {
		t.Error(p)
	}

	// The check bites: a misspelt series, a unit suffix the exporter does not add, and a
	// query the tokenizer cannot read are all reported.
	for _, bad := range []string{
		`sum(rate(mcpgate_mcp_decision_total[5m]))`,
		`histogram_quantile(0.5, sum by (le) (rate(mcpgate_authz_duration_bucket[5m])))`,
		`sum(rate({__name__="mcpgate_xds_nacks_total"}[5m]))`,
	} {
		broken := *d
		broken.Panels = append([]grafana.Panel{{ID: 999, Title: "bad", Targets: []grafana.Target{{RefID: "A", Expr: bad}}}}, d.Panels...)
		if ps := dashboardProblems(&broken, series); len(ps) == 0 {
			t.Errorf("a panel querying %s: no problem reported", bad)
		}
	}
	extra := exportedSeries{"mcpgate_new_thing_total": true}
	for s := range series {
		extra[s] = true
	}
	if ps := dashboardProblems(d, extra); len(ps) != 1 || !strings.Contains(ps[0], "mcpgate_new_thing_total") {
		t.Errorf("a series without a panel: problems %v, want one naming it", ps)
	}
}

// TestDashboardModel: what Grafana needs to import and provision the dashboard.
func TestDashboardModel(t *testing.T) {
	d, err := grafana.Load(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	if d.UID != "mcpgate" || d.Title == "" {
		t.Errorf("uid %q title %q: want uid mcpgate and a title (provisioning and links key on the uid)", d.UID, d.Title)
	}
	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
	}
	for name, typ := range map[string]string{"datasource": "datasource", "target": "query", "caller": "query"} {
		if vars[name] != typ {
			t.Errorf("variable %s is %q, want a %s variable", name, vars[name], typ)
		}
	}
	ids := map[int]bool{}
	var walk func([]grafana.Panel)
	walk = func(ps []grafana.Panel) {
		for _, p := range ps {
			if ids[p.ID] {
				t.Errorf("panel id %d twice", p.ID)
			}
			ids[p.ID] = true
			if p.Type != "row" && len(p.Targets) == 0 {
				t.Errorf("panel %d (%s) has no query", p.ID, p.Title)
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	if len(ids) < 10 {
		t.Errorf("%d panels: the dashboard lost its content", len(ids))
	}
}
