//go:build integration

package integration

import (
	"path/filepath"
	"sort"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/mcpgate/mcpgate/deploy/grafana"
)

// scrapedLabels maps each series of a /metrics scrape to the label names it carries
// (histograms as name_bucket with le, name_sum, name_count).
func scrapedLabels(t *testing.T, metrics string) map[string]map[string]bool {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(strings.NewReader(metrics))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	out := map[string]map[string]bool{}
	for name, mf := range families {
		labels := map[string]bool{}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = true
			}
		}
		if mf.GetType() == dto.MetricType_HISTOGRAM {
			bucket := map[string]bool{"le": true}
			for l := range labels {
				bucket[l] = true
			}
			out[name+"_bucket"], out[name+"_sum"], out[name+"_count"] = bucket, labels, labels
			continue
		}
		out[name] = labels
	}
	return out
}

// dashboardLabelProblems checks the labels deploy/grafana/mcpgate.json's queries use
// against a real scrape: a matcher's label must be one its series carries, and a grouping
// label (by, without, on, ...) one that some series of the query carries. Only series
// the scrape shows can be checked; checked lists them. (The series names themselves are
// checked against the source in deploy/grafana_test.go.)
func dashboardLabelProblems(d *grafana.Dashboard, scraped map[string]map[string]bool) (problems []string, checked map[string]bool) {
	checked = map[string]bool{}
	qs, err := d.Queries()
	if err != nil {
		return []string{err.Error()}, checked
	}
	for _, q := range qs {
		n, err := grafana.Parse(q.Expr)
		if err != nil {
			problems = append(problems, q.Where+": "+err.Error())
			continue
		}
		union := map[string]bool{}
		present := false
		for _, s := range n.Selectors {
			labels, ok := scraped[s.Series]
			if !ok {
				continue
			}
			present, checked[s.Series] = true, true
			for l := range labels {
				union[l] = true
			}
			for _, l := range s.Labels {
				if !labels[l] {
					problems = append(problems, q.Where+": "+s.Series+" has no label "+l+" (it has "+strings.Join(sortedSet(labels), ", ")+")")
				}
			}
		}
		if q.Label != "" {
			n.Grouping = append(n.Grouping, q.Label)
		}
		for _, l := range n.Grouping {
			if present && !union[l] {
				problems = append(problems, q.Where+": groups by "+l+", which none of its series carries: "+q.Expr)
			}
		}
	}
	return problems, checked
}

// checkDashboardLabels runs dashboardLabelProblems on a scrape and requires that the
// series in want were among those checked (so that the check cannot pass by finding
// nothing it knows).
func checkDashboardLabels(t *testing.T, metrics string, want ...string) {
	t.Helper()
	d, err := grafana.Load(filepath.Join("..", "deploy", "grafana", "mcpgate.json"))
	if err != nil {
		t.Fatal(err)
	}
	scraped := scrapedLabels(t, metrics)
	problems, checked := dashboardLabelProblems(d, scraped)
	for _, p := range problems {
		t.Errorf("dashboard: %s", p)
	}
	for _, s := range want {
		if !checked[s] {
			t.Errorf("dashboard: %s was not checked: not in the scrape or on no panel (checked: %v)", s, sortedSet(checked))
		}
	}
	// The check bites: a label nobody sets, and a grouping by one, are reported.
	bad := *d
	bad.Panels = []grafana.Panel{{ID: 1, Title: "bad", Targets: []grafana.Target{
		{RefID: "A", Expr: `sum(rate(mcpgate_authz_decisions_total{tenant="x"}[5m]))`},
		{RefID: "B", Expr: `sum by (subject) (rate(mcpgate_authz_decisions_total[5m]))`},
	}}}
	bad.Templating.List = nil
	if ps, _ := dashboardLabelProblems(&bad, scraped); len(ps) != 2 {
		t.Errorf("dashboard label check on two bad queries: %v, want 2 problems", ps)
	}
}

func sortedSet(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
