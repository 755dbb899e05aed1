package deploy

import (
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// TestComposeObservability: Prometheus scrapes the mcpgate service's admin port, and
// Grafana provisions that Prometheus and deploy/grafana/mcpgate.json; nothing is
// published beyond the host's loopback.
func TestComposeObservability(t *testing.T) {
	c := loadCompose(t)
	gate := c.Services["mcpgate"]
	adminPort := listenPort(t, gate.Command, "admin-addr")

	prom, ok := c.Services["prometheus"]
	if !ok {
		t.Fatal("no prometheus service")
	}
	cfgPath, ok := flagValue(prom.Command, "config.file")
	if !ok {
		t.Fatalf("prometheus command %q has no --config.file", prom.Command)
	}
	m, ok := prom.mountAt(cfgPath)
	if !ok || m.mode != "ro" {
		t.Fatalf("prometheus must mount its --config.file %s read-only, has %v", cfgPath, prom.Volumes)
	}
	cfg := yamlDocs(t, filepath.Join(root, m.source))[0]
	var targets []string
	for _, sc := range get(cfg, "scrape_configs").([]any) {
		if p := str(get(sc, "metrics_path")); p != "" && p != "/metrics" {
			t.Errorf("scrape job %s reads %s, mcpgate serves /metrics", str(get(sc, "job_name")), p)
		}
		for _, s := range get(sc, "static_configs").([]any) {
			targets = append(targets, strs(get(s, "targets"))...)
		}
	}
	if want := "mcpgate:" + strconv.Itoa(adminPort); !slices.Contains(targets, want) {
		t.Errorf("prometheus scrapes %v, want %s (mcpgate's --admin-addr)", targets, want)
	}

	graf, ok := c.Services["grafana"]
	if !ok {
		t.Fatal("no grafana service")
	}
	prov, ok := graf.mountAt("/etc/grafana/provisioning")
	if !ok {
		t.Fatalf("grafana mounts no provisioning directory: %v", graf.Volumes)
	}
	provDir := filepath.Join(root, prov.source)
	ds := yamlDocs(t, filepath.Join(provDir, "datasources", "prometheus.yaml"))[0]
	promPort := 9090
	if u := str(get(ds, "datasources", 0, "url")); u != "http://prometheus:"+strconv.Itoa(promPort) || !prom.exposes(promPort) {
		t.Errorf("grafana's datasource is %q; prometheus exposes %v", u, prom.Expose)
	}
	if str(get(ds, "datasources", 0, "type")) != "prometheus" || get(ds, "datasources", 0, "isDefault") != true {
		t.Errorf("grafana's datasource must be the default, of type prometheus: %v", ds)
	}
	dp := yamlDocs(t, filepath.Join(provDir, "dashboards", "mcpgate.yaml"))[0]
	dir := str(get(dp, "providers", 0, "options", "path"))
	dm, ok := graf.mountAt(path.Join(dir, "mcpgate.json"))
	if dir == "" || !ok || path.Clean(dm.source) != "./deploy/grafana/mcpgate.json" && path.Clean(dm.source) != "deploy/grafana/mcpgate.json" {
		t.Errorf("grafana must mount deploy/grafana/mcpgate.json into its provider's path %q: %v", dir, graf.Volumes)
	}
	if home := graf.Environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]; home != path.Join(dir, "mcpgate.json") {
		t.Errorf("grafana's home dashboard is %q, want the mounted mcpgate.json", home)
	}
	for name, s := range c.Services {
		for _, p := range s.Ports {
			if !strings.HasPrefix(p, "127.0.0.1:") {
				t.Errorf("service %s publishes %q beyond the host's loopback", name, p)
			}
		}
	}
}

// TestKubernetesObservability: the dashboard ConfigMap is what Grafana's sidecar loads,
// the pod annotations name the admin port, and the ServiceMonitor selects the mcpgate
// Service's admin port.
func TestKubernetesObservability(t *testing.T) {
	docs := k8sDocs(t)
	cm := find(t, docs, "ConfigMap", dashboardCMName)
	if str(get(cm.doc, "metadata", "labels", dashboardCMLabel)) != "1" {
		t.Errorf("ConfigMap %s lacks the label %s: \"1\" Grafana's sidecar selects", dashboardCMName, dashboardCMLabel)
	}
	if got := str(get(cm.doc, "data", "mcpgate.json")); got != string(readFile(t, dashboardPath)) {
		t.Errorf("ConfigMap %s does not hold deploy/grafana/mcpgate.json: run make bootstraps", dashboardCMName)
	}

	dep := find(t, docs, "Deployment", "mcpgate")
	args := strs(get(container(t, dep, "mcpgate"), "args"))
	admin := listenPort(t, args, "admin-addr")
	ann := get(dep.doc, "spec", "template", "metadata", "annotations")
	if str(get(ann, "prometheus.io/scrape")) != "true" || str(get(ann, "prometheus.io/port")) != strconv.Itoa(admin) || str(get(ann, "prometheus.io/path")) != "/metrics" {
		t.Errorf("mcpgate pod annotations %v, want prometheus.io scrape of :%d/metrics", ann, admin)
	}

	sm := find(t, docs, "ServiceMonitor", "mcpgate")
	svc := find(t, docs, "Service", "mcpgate")
	for k, v := range get(sm.doc, "spec", "selector", "matchLabels").(map[string]any) {
		if str(get(svc.doc, "metadata", "labels", k)) != str(v) {
			t.Errorf("the ServiceMonitor selects %s=%v, the mcpgate Service's labels are %v", k, v, get(svc.doc, "metadata", "labels"))
		}
	}
	port := str(get(sm.doc, "spec", "endpoints", 0, "port"))
	found := false
	for _, p := range get(svc.doc, "spec", "ports").([]any) {
		if str(get(p, "name")) == port {
			found = true
			if str(get(p, "targetPort")) != strconv.Itoa(admin) {
				t.Errorf("Service port %s targets %v, the admin server listens on %d", port, get(p, "targetPort"), admin)
			}
		}
	}
	if !found || str(get(sm.doc, "spec", "endpoints", 0, "path")) != "/metrics" {
		t.Errorf("the ServiceMonitor scrapes port %q path %v: want a Service port of the admin server, /metrics", port, get(sm.doc, "spec", "endpoints", 0, "path"))
	}
}
