package deploy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// The Kubernetes demo overlay (deploy/kubernetes/demo): the base plus the compose demo's
// development-only pieces, under the compose policy (deploy/compose/policy).
const (
	k8sDemoDir       = "kubernetes/demo"
	k8sBaseKust      = "kubernetes/kustomization.yaml"
	k8sDemoKust      = "kubernetes/demo/kustomization.yaml"
	demoImage        = "mcpgate-demo:dev" // docker build --target demo -t mcpgate-demo:dev .
	k8sIssuerService = "issuer"           // the Service of the issuer's token endpoint
	mcpgateContainer = "mcpgate"          // the base Deployment's container
	appIDPodLabel    = "mcpgate.dev/app-id"
	defaultContainer = "kubectl.kubernetes.io/default-container"
	spiffeCSIDriver  = "csi.spiffe.io"
	clusterSPIFFEID  = "kubernetes/spire/clusterspiffeid.yaml"
)

// kustomization is the part of a Kustomization the manifests use; decoding with known
// fields only, so a misspelt key fails here rather than being ignored by kustomize.
type kustomization struct {
	APIVersion         string          `yaml:"apiVersion"`
	Kind               string          `yaml:"kind"`
	Namespace          string          `yaml:"namespace"`
	Resources          []string        `yaml:"resources"`
	Patches            []kustPatch     `yaml:"patches"`
	ConfigMapGenerator []kustGenerator `yaml:"configMapGenerator"`
	// Images is what `kustomize edit set image` writes, as deploy/README.md tells users to.
	Images []struct {
		Name    string `yaml:"name"`
		NewName string `yaml:"newName"`
		NewTag  string `yaml:"newTag"`
		Digest  string `yaml:"digest"`
	} `yaml:"images"`
}

type kustPatch struct {
	Path   string `yaml:"path"`
	Patch  string `yaml:"patch"`
	Target any    `yaml:"target"`
}

type kustGenerator struct {
	Name     string   `yaml:"name"`
	Behavior string   `yaml:"behavior"`
	Files    []string `yaml:"files"`
	Literals []string `yaml:"literals"`
	Envs     []string `yaml:"envs"`
	Options  struct {
		DisableNameSuffixHash bool `yaml:"disableNameSuffixHash"`
	} `yaml:"options"`
}

func loadKustomization(t *testing.T, p string) kustomization {
	t.Helper()
	var k kustomization
	dec := yaml.NewDecoder(bytes.NewReader(readFile(t, p)))
	dec.KnownFields(true)
	if err := dec.Decode(&k); err != nil {
		t.Fatalf("%s: %v", p, err)
	}
	if k.Kind != "Kustomization" {
		t.Fatalf("%s: kind %q", p, k.Kind)
	}
	return k
}

// sources maps a generator's keys to their files, relative to this package's directory
// ("key=path" or "path", whose key is its base name).
func (g kustGenerator) sources(dir string) map[string]string {
	out := map[string]string{}
	for _, f := range g.Files {
		k, p, ok := strings.Cut(f, "=")
		if !ok {
			k, p = path.Base(f), f
		}
		out[k] = filepath.ToSlash(filepath.Join(filepath.FromSlash(dir), filepath.FromSlash(p)))
	}
	return out
}

// demoOverlay is the overlay as kustomize would read it: its own manifests, its patches,
// and the base manifests it lists.
type demoOverlay struct {
	k         kustomization
	own, base []k8sDoc
	patches   []k8sDoc
}

func docsOf(t *testing.T, p string) []k8sDoc {
	t.Helper()
	var out []k8sDoc
	for i, d := range yamlDocs(t, p) {
		if str(d["apiVersion"]) == "" || str(d["kind"]) == "" || str(get(d, "metadata", "name")) == "" {
			t.Errorf("%s document %d: apiVersion, kind and metadata.name are required", p, i+1)
		}
		out = append(out, k8sDoc{p, d})
	}
	return out
}

func loadOverlay(t *testing.T) demoOverlay {
	t.Helper()
	o := demoOverlay{k: loadKustomization(t, k8sDemoKust)}
	for _, r := range o.k.Resources {
		p := filepath.Join(filepath.FromSlash(k8sDemoDir), filepath.FromSlash(r))
		st, err := os.Stat(p)
		if err != nil {
			t.Errorf("kustomization resource %s: %v", r, err)
			continue
		}
		if st.IsDir() {
			// kustomize refuses a base that contains the overlay ("cycle detected").
			t.Errorf("kustomization resource %s is a directory: list the base's files", r)
			continue
		}
		switch filepath.Dir(p) {
		case filepath.FromSlash(k8sDemoDir):
			o.own = append(o.own, docsOf(t, p)...)
		case filepath.FromSlash(k8sDir):
			o.base = append(o.base, docsOf(t, p)...)
		default:
			t.Errorf("kustomization resource %s is neither the overlay's nor the base's", r)
		}
	}
	for _, pt := range o.k.Patches {
		if pt.Path == "" || pt.Patch != "" || pt.Target != nil {
			t.Errorf("patch %+v: want a strategic merge patch file (path only), which these tests read", pt)
			continue
		}
		p := filepath.Join(filepath.FromSlash(k8sDemoDir), filepath.FromSlash(pt.Path))
		if filepath.Dir(p) != filepath.FromSlash(k8sDemoDir) {
			t.Errorf("patch %s is not in %s", pt.Path, k8sDemoDir)
			continue
		}
		if _, err := os.Stat(p); err != nil {
			t.Errorf("patch %s: %v", pt.Path, err)
			continue
		}
		o.patches = append(o.patches, docsOf(t, p)...)
	}
	return o
}

func (o demoOverlay) generator(t *testing.T, name string) kustGenerator {
	t.Helper()
	var found []kustGenerator
	for _, g := range o.k.ConfigMapGenerator {
		if g.Name == name {
			found = append(found, g)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%s: %d configMapGenerators named %s, want 1", k8sDemoKust, len(found), name)
	}
	return found[0]
}

// findIn is find over some documents, with a message naming where it looked.
func findIn(t *testing.T, docs []k8sDoc, where, kind, name string) k8sDoc {
	t.Helper()
	for _, d := range docs {
		if d.kind() == kind && d.name() == name {
			return d
		}
	}
	t.Fatalf("no %s %q in %s", kind, name, where)
	return k8sDoc{}
}

// demoContainer checks that a container runs `mcpgate-demo <sub>` from the demo image and
// returns its flags.
func demoContainer(t *testing.T, d k8sDoc, c map[string]any, sub string) []string {
	t.Helper()
	where := d.file + " " + d.name() + "/" + str(c["name"])
	if img := str(c["image"]); img != demoImage {
		t.Errorf("%s: image %q, want %s (the Dockerfile's %s target)", where, img, demoImage, demoTarget)
	}
	if cmd, ok := c["command"]; ok && cmd != nil {
		t.Errorf("%s: command %v overrides the image's entrypoint %s", where, cmd, demoEntrypoint)
	}
	args := strs(c["args"])
	if len(args) == 0 || args[0] != sub {
		t.Fatalf("%s: args %q, want %s ...", where, args, sub)
	}
	if u := str(get(c, "securityContext", "runAsUser")); u != "" {
		if want, _, _ := strings.Cut(parseDockerfile(t).stage(demoTarget).user, ":"); u != want {
			t.Errorf("%s: runAsUser %s, the demo image's USER is %s", where, u, want)
		}
	}
	return args[1:]
}

// composeCommand is a compose service's command, which the Kubernetes demo mirrors.
func composeCommand(t *testing.T, name string) []string {
	t.Helper()
	s, ok := loadCompose(t).Services[name]
	if !ok {
		t.Fatalf("no compose service %s", name)
	}
	return s.Command
}

func TestKubernetesDemoKustomization(t *testing.T) {
	o := loadOverlay(t)
	base := loadKustomization(t, k8sBaseKust)
	if o.k.Namespace != base.Namespace {
		t.Errorf("overlay namespace %q, base %q", o.k.Namespace, base.Namespace)
	}
	// Every base manifest but the policy ConfigMap (the overlay generates its own).
	var want, got []string
	for _, r := range base.Resources {
		if filepath.Join(filepath.FromSlash(k8sDir), r) != filepath.FromSlash(policyCMFile) {
			want = append(want, filepath.Join(filepath.FromSlash(k8sDir), r))
		}
	}
	for _, r := range o.k.Resources {
		if p := filepath.Join(filepath.FromSlash(k8sDemoDir), filepath.FromSlash(r)); filepath.Dir(p) == filepath.FromSlash(k8sDir) {
			got = append(got, p)
		}
	}
	sort.Strings(want)
	sort.Strings(got)
	if !slices.Equal(got, want) {
		t.Errorf("the overlay lists the base manifests %v, want all of the base's but %s: %v", got, policyCMFile, want)
	}
	// Every file of the overlay is used.
	used := map[string]bool{filepath.FromSlash(k8sDemoKust): true}
	for _, r := range o.k.Resources {
		used[filepath.Join(filepath.FromSlash(k8sDemoDir), filepath.FromSlash(r))] = true
	}
	for _, p := range o.k.Patches {
		used[filepath.Join(filepath.FromSlash(k8sDemoDir), filepath.FromSlash(p.Path))] = true
	}
	entries, err := os.ReadDir(k8sDemoDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if p := filepath.Join(filepath.FromSlash(k8sDemoDir), e.Name()); !used[p] {
			t.Errorf("%s is neither a resource nor a patch of %s", p, k8sDemoKust)
		}
	}
	// Patches modify base objects; new objects do not clash with the base's.
	for _, p := range o.patches {
		findIn(t, o.base, "the base manifests the overlay lists", p.kind(), p.name())
	}
	for _, d := range o.own {
		for _, b := range o.base {
			if d.kind() == b.kind() && d.name() == b.name() {
				t.Errorf("%s: %s %s is already in %s (patch it instead)", d.file, d.kind(), d.name(), b.file)
			}
		}
	}
	for _, d := range slices.Concat(o.own, o.patches) {
		for _, c := range podContainers(d) {
			checkPinned(t, d.file+" "+str(c["name"]), str(c["image"]))
		}
	}
}

// The policy ConfigMap is generated from deploy/compose/policy, key for key as the base
// Deployment's volume items expect.
func TestKubernetesDemoPolicyConfigMap(t *testing.T) {
	o := loadOverlay(t)
	g := o.generator(t, policyCMName)
	if !g.Options.DisableNameSuffixHash {
		t.Errorf("configMapGenerator %s needs options.disableNameSuffixHash: a hash suffix turns every policy edit into a rollout instead of a live reload", policyCMName)
	}
	if g.Behavior != "" && g.Behavior != "create" {
		t.Errorf("configMapGenerator %s behavior %q: the overlay does not include the base's ConfigMap, it creates its own", policyCMName, g.Behavior)
	}
	if len(g.Literals) > 0 || len(g.Envs) > 0 {
		t.Errorf("configMapGenerator %s: only files of %s, no literals or envs", policyCMName, composePolicyDir)
	}
	files, err := filesUnder(t, composePolicyDir) // relative path -> content
	if err != nil {
		t.Fatal(err)
	}
	generated := map[string]string{} // relative path -> key
	for key, src := range g.sources(k8sDemoDir) {
		rel, err := filepath.Rel(composePolicyDir, filepath.FromSlash(src))
		rel = filepath.ToSlash(rel)
		if err != nil || strings.HasPrefix(rel, "../") {
			t.Errorf("configMapGenerator %s: key %s comes from %s, not from %s", policyCMName, key, src, composePolicyDir)
			continue
		}
		if _, ok := files[rel]; !ok {
			t.Errorf("configMapGenerator %s: key %s: %s/%s does not exist", policyCMName, key, composePolicyDir, rel)
		}
		if key != configMapKey(rel) {
			t.Errorf("configMapGenerator %s: %s has key %s, want %s", policyCMName, rel, key, configMapKey(rel))
		}
		generated[rel] = key
	}
	for rel := range files {
		if _, ok := generated[rel]; !ok {
			t.Errorf("configMapGenerator %s lacks %s/%s", policyCMName, composePolicyDir, rel)
		}
	}
	// The base mcpgate Deployment projects exactly these keys to these paths.
	dep := findIn(t, o.base, "the base", "Deployment", mcpgateContainer)
	args := strs(container(t, dep, mcpgateContainer)["args"])
	cfg, _ := flagValue(args, "config")
	v := volumeAt(t, dep, container(t, dep, mcpgateContainer), cfg)
	if n := str(get(v, "configMap", "name")); n != policyCMName {
		t.Errorf("the mcpgate policy volume is ConfigMap %q, the overlay generates %s", n, policyCMName)
	}
	projected := map[string]string{}
	for _, it := range get(v, "configMap", "items").([]any) {
		projected[str(get(it, "path"))] = str(get(it, "key"))
	}
	if !reflect.DeepEqual(projected, generated) {
		t.Errorf("the mcpgate policy volume projects %v (path: key), the generator makes %v", projected, generated)
	}
}

// The issuer runs in mcpgate's pod, as the compose policy's issuer says, and Service
// issuer exposes its token endpoint.
func TestKubernetesDemoIssuer(t *testing.T) {
	o := loadOverlay(t)
	snap, _, _ := composeApps(t)
	is := composeIssuer(t, snap)
	authzHost, _ := hostPort(t, "authz.address", snap.Mesh.AuthzAddress)

	// The Deployment behind Service mcpgate (the authz.address host) gets the container.
	svc := findIn(t, o.base, "the base", "Service", authzHost)
	var mcpgateDep k8sDoc
	for _, d := range o.base {
		if d.kind() == "Deployment" && selects(svc, d) {
			mcpgateDep = d
		}
	}
	if mcpgateDep.doc == nil {
		t.Fatalf("no base Deployment behind Service %s", authzHost)
	}
	patch := findIn(t, o.patches, "the overlay's patches", "Deployment", mcpgateDep.name())
	c := container(t, patch, k8sIssuerService)
	iargs := demoContainer(t, patch, c, "issuer")
	iss, _ := flagValue(iargs, "issuer-url")
	if iss != is.Issuer || jwksURLOf(iss) != is.JWKSURI {
		t.Errorf("issuer --issuer-url %q: the compose policy's issuer %s has issuer %q and jwksUri %q", iss, is.Name, is.Issuer, is.JWKSURI)
	}
	if want := issuerURL(t, loadCompose(t)); iss != want {
		t.Errorf("issuer --issuer-url %q, compose's issuer %q", iss, want)
	}
	if !slices.Equal(strs(c["args"]), composeCommand(t, issuerService)) {
		t.Errorf("issuer args %q, compose's issuer command %q", strs(c["args"]), composeCommand(t, issuerService))
	}
	iu, err := url.Parse(iss)
	if err != nil {
		t.Fatal(err)
	}
	if iu.Scheme != "https" && iu.Hostname() != "127.0.0.1" && iu.Hostname() != "localhost" {
		t.Errorf("--issuer-url %s: plain http off loopback, which mcpgate rejects", iss)
	}
	port := listenPort(t, iargs, "addr")
	if ju, err := url.Parse(is.JWKSURI); err != nil || ju.Port() != strconv.Itoa(port) {
		t.Errorf("issuer listens on %d, the policy's jwksUri is %s", port, is.JWKSURI)
	} else if p := get(c, "readinessProbe", "httpGet"); str(get(p, "path")) != ju.Path || str(get(p, "port")) != strconv.Itoa(port) {
		t.Errorf("issuer readinessProbe %v, want GET %s on %d (its JWKS)", p, ju.Path, port)
	}
	if a, _ := flagValue(iargs, "audience"); !slices.Contains(is.Audiences, a) {
		t.Errorf("issuer --audience %q, the policy's issuer %s accepts %v", a, is.Name, is.Audiences)
	}
	if got := containerPorts(c); !slices.Equal(got, []int{port}) {
		t.Errorf("issuer containerPorts %v, want [%d]", got, port)
	}
	if get(c, "volumeMounts") != nil {
		t.Error("the issuer container mounts volumes: it needs none (its key lives in memory)")
	}
	if get(c, "securityContext", "readOnlyRootFilesystem") != true || get(c, "securityContext", "allowPrivilegeEscalation") != false {
		t.Errorf("issuer securityContext %v: want readOnlyRootFilesystem, no privilege escalation", c["securityContext"])
	}
	if a := str(get(patch.doc, "spec", "template", "metadata", "annotations", defaultContainer)); a != mcpgateContainer {
		t.Errorf("mcpgate pod annotation %s %q, want %s (kubectl logs deploy/mcpgate)", defaultContainer, a, mcpgateContainer)
	}
	container(t, mcpgateDep, mcpgateContainer)

	// Service issuer: to these pods, on the issuer's port.
	is2 := findIn(t, o.own, k8sDemoDir, "Service", k8sIssuerService)
	if !selects(is2, mcpgateDep) {
		t.Errorf("Service %s does not select the %s pods", k8sIssuerService, mcpgateDep.name())
	}
	if ports, targets := servicePorts(is2); !slices.Equal(ports, []int{port}) || !slices.Equal(targets, []int{port}) {
		t.Errorf("Service %s ports %v -> %v, want %d", k8sIssuerService, ports, targets, port)
	}
}

func TestKubernetesDemoInventory(t *testing.T) {
	o := loadOverlay(t)
	_, server, _ := composeApps(t)
	_, port := hostPort(t, "App "+server.ID+" address", server.Address)
	base := findIn(t, o.base, "the base", "Deployment", server.ID)
	bc := container(t, base, "app")
	if !slices.Contains(containerPorts(bc), port) {
		t.Errorf("base %s app containerPorts %v lack %d", server.ID, containerPorts(bc), port)
	}
	patch := findIn(t, o.patches, "the overlay's patches", "Deployment", server.ID)
	c := container(t, patch, "app")
	if cmd, ok := c["command"]; !ok {
		t.Error("the inventory patch must remove the base's command (npx ...) with command: null")
	} else if cmd != nil {
		t.Errorf("the inventory patch sets command %v: the demo image's entrypoint is %s", cmd, demoEntrypoint)
	}
	args := demoContainer(t, patch, c, "inventory")
	if p := listenPort(t, args, "addr"); p != port {
		t.Errorf("inventory --addr port %d, want %d (App %s address %s)", p, port, server.ID, server.Address)
	}
	host, _ := hostPort(t, "address", server.Address)
	if !slices.Equal(strs(c["args"]), composeCommand(t, host)) {
		t.Errorf("inventory args %q, compose's %s command %q", strs(c["args"]), host, composeCommand(t, host))
	}
	if str(get(c, "securityContext", "runAsUser")) == "" {
		t.Error("the inventory patch must set runAsUser to the demo image's USER (the base's is the node image's)")
	}
}

func TestKubernetesDemoAgent(t *testing.T) {
	o := loadOverlay(t)
	snap, server, agent := composeApps(t)
	id := agent.ID
	dep := findIn(t, o.own, k8sDemoDir, "Deployment", id)

	// Identity: the ClusterSPIFFEID of the base renders the App's SPIFFE ID.
	sa := str(get(dep.doc, "spec", "template", "spec", "serviceAccountName"))
	if sa != id {
		t.Errorf("Deployment %s serviceAccountName %q, want the App ID", id, sa)
	}
	findIn(t, o.own, k8sDemoDir, "ServiceAccount", sa)
	if l := str(get(dep.doc, "spec", "template", "metadata", "labels", appIDPodLabel)); l != id {
		t.Errorf("pod label %s %q, want %q (selected by %s)", appIDPodLabel, l, id, clusterSPIFFEID)
	}
	if agent.Namespace != o.k.Namespace {
		t.Errorf("App %s is in namespace %q, the overlay deploys to %q", id, agent.Namespace, o.k.Namespace)
	}
	cs := findIn(t, docsOf(t, clusterSPIFFEID), clusterSPIFFEID, "ClusterSPIFFEID", "mcpgate-apps")
	tmpl := str(get(cs.doc, "spec", "spiffeIDTemplate"))
	rendered := strings.NewReplacer("{{ .TrustDomain }}", snap.Mesh.TrustDomain,
		"{{ .PodMeta.Namespace }}", o.k.Namespace, "{{ .PodSpec.ServiceAccountName }}", sa).Replace(tmpl)
	if rendered != agent.SpiffeID {
		t.Errorf("ClusterSPIFFEID template %q gives %q, want %q", tmpl, rendered, agent.SpiffeID)
	}
	sel := get(cs.doc, "spec", "podSelector", "matchExpressions", 0)
	if str(get(sel, "key")) != appIDPodLabel || str(get(sel, "operator")) != "Exists" {
		t.Errorf("ClusterSPIFFEID selects %v, want pods with %s", sel, appIDPodLabel)
	}

	// The sidecar: the base's Envoy image, the bootstrap generated from
	// envoy/bootstrap/<id>.yaml, the SPIRE socket from the CSI driver.
	ec := container(t, dep, "envoy")
	if want := str(container(t, findIn(t, o.base, "the base", "Deployment", server.ID), "envoy")["image"]); str(ec["image"]) != want {
		t.Errorf("%s envoy image %q, the base's sidecars run %q", id, ec["image"], want)
	}
	cmd := strs(ec["command"])
	i := slices.Index(cmd, "-c")
	if i < 0 || i+1 >= len(cmd) {
		t.Fatalf("envoy command %q has no -c", cmd)
	}
	v := volumeAt(t, dep, ec, path.Dir(cmd[i+1]))
	cm := str(get(v, "configMap", "name"))
	key := ""
	for _, it := range get(v, "configMap", "items").([]any) {
		if str(get(it, "path")) == path.Base(cmd[i+1]) {
			key = str(get(it, "key"))
		}
	}
	src := o.generator(t, cm).sources(k8sDemoDir)[key]
	if want := filepath.ToSlash(filepath.Join(bootstrapDir, id+".yaml")); src != want {
		t.Errorf("%s's bootstrap is key %q of ConfigMap %s, generated from %q, want %s", id, key, cm, src, want)
	}
	if sv := volumeAt(t, dep, ec, path.Dir(snap.Mesh.SDS.SpireAgentSocket)); str(get(sv, "csi", "driver")) != spiffeCSIDriver {
		t.Errorf("the SPIRE socket volume is %v, want the SPIFFE CSI driver %s", sv, spiffeCSIDriver)
	}
	if !slices.Contains(containerPorts(ec), agent.Sidecar.InboundPort) {
		t.Errorf("envoy containerPorts %v lack inboundPort %d", containerPorts(ec), agent.Sidecar.InboundPort)
	}

	// The agent: through its sidecar, with a token from Service issuer, as an App that
	// inventory lets call its tools.
	ac := container(t, dep, "app")
	aargs := demoContainer(t, dep, ac, "agent")
	if get(ac, "volumeMounts") != nil {
		t.Error("the agent container must not mount the SPIRE socket (nor anything else)")
	}
	if a := str(get(dep.doc, "spec", "template", "metadata", "annotations", defaultContainer)); a != "app" {
		t.Errorf("%s pod annotation %s %q, want app (kubectl logs deploy/%s shows the transcript)", id, defaultContainer, a, id)
	}
	host, port := hostPort(t, "App "+id+" address", agent.Address)
	env := map[string]string{}
	for _, e := range get(ac, "env").([]any) {
		env[str(get(e, "name"))] = str(get(e, "value"))
	}
	if env["PORT"] != strconv.Itoa(port) || env["DAPR_HTTP_PORT"] != strconv.Itoa(agent.Sidecar.OutboundPort) {
		t.Errorf("agent env PORT=%q DAPR_HTTP_PORT=%q, want %d and %d", env["PORT"], env["DAPR_HTTP_PORT"], port, agent.Sidecar.OutboundPort)
	}
	wantURL := "http://127.0.0.1:" + strconv.Itoa(agent.Sidecar.OutboundPort) + "/v1.0/invoke/" + server.ID + "/method" + server.MCP.Path
	if u, _ := flagValue(aargs, "mcp-url"); u != wantURL {
		t.Errorf("agent --mcp-url %q, want %q (its sidecar's outboundPort, App %s, mcp.path)", u, wantURL, server.ID)
	}
	// --token-url: Service issuer's port (whose target is the issuer's --addr, checked by
	// TestKubernetesDemoIssuer) and the token path under --issuer-url's.
	svc := findIn(t, o.own, k8sDemoDir, "Service", k8sIssuerService)
	svcPorts, _ := servicePorts(svc)
	iu, err := url.Parse(composeIssuer(t, snap).Issuer)
	if err != nil {
		t.Fatal(err)
	}
	tu, _ := flagValue(aargs, "token-url")
	if u, err := url.Parse(tu); err != nil || u.Scheme != "http" || u.Hostname() != svc.name() ||
		!slices.Contains(svcPorts, atoi(u.Port())) || u.Path != path.Join(iu.Path, issuerTokenPath) {
		t.Errorf("agent --token-url %q, want http://%s:%v%s (Service %s)", tu, svc.name(), svcPorts, path.Join(iu.Path, issuerTokenPath), svc.name())
	}
	checkAgentAuthorized(t, "agent", aargs, snap, server, agent)
	if !slices.Contains(aargs, "--expect-policy=true") {
		t.Error("the agent must run with --expect-policy=true: it runs through mcpgate")
	}
	loop, _ := flagValue(aargs, "loop")
	maxRuns, _ := flagValue(aargs, "max-runs")
	if d, err := time.ParseDuration(loop); err != nil || d <= 0 || atoi(maxRuns) < 1 {
		t.Errorf("agent --loop %q --max-runs %q: want a positive interval and a bounded number of sessions", loop, maxRuns)
	}
	if !slices.Equal(strs(ac["args"]), composeCommand(t, host)) {
		t.Errorf("agent args %q, compose's %s command %q", strs(ac["args"]), host, composeCommand(t, host))
	}

	// Services at the policy's addresses, and only the inbound port open to other pods.
	for name, p := range map[string]int{agent.Sidecar.Address: agent.Sidecar.InboundPort, host: port} {
		s := findIn(t, o.own, k8sDemoDir, "Service", name)
		if !selects(s, dep) {
			t.Errorf("Service %s does not select the %s pods", name, id)
		}
		if ports, targets := servicePorts(s); !slices.Equal(ports, []int{p}) || !slices.Equal(targets, []int{p}) {
			t.Errorf("Service %s ports %v -> %v, want %d", name, ports, targets, p)
		}
	}
	np := findIn(t, o.own, k8sDemoDir, "NetworkPolicy", id+"-sidecar-only")
	open := map[int]bool{}
	for _, r := range get(np.doc, "spec", "ingress").([]any) {
		if get(r, "from") == nil {
			for _, p := range get(r, "ports").([]any) {
				open[atoi(str(get(p, "port")))] = true
			}
		}
	}
	if !reflect.DeepEqual(open, map[int]bool{agent.Sidecar.InboundPort: true}) {
		t.Errorf("NetworkPolicy opens %v to everyone, want only inboundPort %d", open, agent.Sidecar.InboundPort)
	}
	if !selectsPods(np, dep) {
		t.Errorf("NetworkPolicy %s does not select the %s pods", np.name(), id)
	}
}

func atoi(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		return -1
	}
	return n
}

// selectsPods reports whether a NetworkPolicy's podSelector.matchLabels selects d's pods.
func selectsPods(np, d k8sDoc) bool {
	return matchLabelsSelect(get(np.doc, "spec", "podSelector", "matchLabels"), d)
}

// matchLabelsSelect reports whether matchLabels (non-empty) selects d's pods.
func matchLabelsSelect(sel any, d k8sDoc) bool {
	m, _ := sel.(map[string]any)
	labels, _ := get(d.doc, "spec", "template", "metadata", "labels").(map[string]any)
	for k, v := range m {
		if str(labels[k]) != str(v) {
			return false
		}
	}
	return len(m) > 0
}

// kustomizeVersion is the kustomize that kubectl v1.32 embeds (kubectl kustomize, the
// command deploy/README.md gives), pinned so that the render test runs everywhere.
const kustomizeVersion = "v5.5.0"

// kustomizeBin returns bin/kustomize-<version>, installing it with go install when absent
// (about 15 s from a cold module cache).
func kustomizeBin(t *testing.T) string {
	t.Helper()
	bin, err := filepath.Abs(filepath.Join("..", "bin"))
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(bin, "kustomize-"+kustomizeVersion)
	if _, err := os.Stat(exe); err == nil {
		return exe
	}
	tmp := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "install", "sigs.k8s.io/kustomize/kustomize/v5@"+kustomizeVersion)
	cmd.Env = append(os.Environ(), "GOBIN="+tmp, "GOFLAGS=-mod=mod")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go install kustomize %s: %v\n%s", kustomizeVersion, err, out)
	}
	if err := os.MkdirAll(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(tmp, "kustomize"), exe); err != nil {
		t.Fatal(err)
	}
	return exe
}

// kustomizeBuild renders an overlay as deploy/README.md says (kubectl kustomize
// --load-restrictor LoadRestrictionsNone: the overlays list the base's files one by one)
// with the pinned kustomize.
func kustomizeBuild(t *testing.T, dir string) []k8sDoc {
	t.Helper()
	kustomize := kustomizeBin(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, kustomize, "build", "--load-restrictor", "LoadRestrictionsNone", dir)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kustomize build %s: %v\n%s", dir, err, stderr.String())
	}
	var docs []k8sDoc
	dec := yaml.NewDecoder(bytes.NewReader(out))
	for {
		var d map[string]any
		if err := dec.Decode(&d); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("kustomize build %s output: %v", dir, err)
		}
		docs = append(docs, k8sDoc{"(rendered " + dir + ")", d})
	}
	return docs
}

// TestKubernetesDemoRender renders the overlay with kustomize (pinned: the one kubectl
// v1.32 embeds, so the same as deploy/README.md's kubectl kustomize) and checks what
// kustomize made of the patches and generators.
func TestKubernetesDemoRender(t *testing.T) {
	docs := kustomizeBuild(t, k8sDemoDir)
	o := loadOverlay(t)
	for _, d := range docs {
		if ns := str(get(d.doc, "metadata", "namespace")); ns != o.k.Namespace {
			t.Errorf("rendered %s %s in namespace %q, want %q", d.kind(), d.name(), ns, o.k.Namespace)
		}
	}

	// The policy ConfigMap: deploy/compose/policy exactly, under its plain name.
	var policyCMs []k8sDoc
	for _, d := range docs {
		if d.kind() == "ConfigMap" && strings.HasPrefix(d.name(), policyCMName) {
			policyCMs = append(policyCMs, d)
		}
	}
	if len(policyCMs) != 1 || policyCMs[0].name() != policyCMName {
		t.Fatalf("rendered %d policy ConfigMaps, want one named %s", len(policyCMs), policyCMName)
	}
	data, _ := policyCMs[0].doc["data"].(map[string]any)
	want := map[string]any{}
	err := filepath.WalkDir(composePolicyDir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(composePolicyDir, p)
		want[configMapKey(filepath.ToSlash(rel))] = string(readFile(t, p))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(data, want) {
		t.Errorf("rendered ConfigMap %s differs from %s", policyCMName, composePolicyDir)
	}

	// Every ConfigMap a pod mounts exists; my-agent's bootstrap is envoy/bootstrap's.
	cms := map[string]map[string]any{}
	for _, d := range docs {
		if d.kind() == "ConfigMap" {
			cms[d.name()], _ = d.doc["data"].(map[string]any)
		}
	}
	_, server, agent := composeApps(t)
	for _, d := range docs {
		if d.kind() != "Deployment" {
			continue
		}
		for _, v := range get(d.doc, "spec", "template", "spec", "volumes").([]any) {
			n := str(get(v, "configMap", "name"))
			if n == "" {
				continue
			}
			if _, ok := cms[n]; !ok {
				t.Errorf("Deployment %s mounts ConfigMap %s, which is not rendered", d.name(), n)
			}
			if d.name() == agent.ID && str(get(cms[n], "bootstrap.yaml")) != string(readFile(t, filepath.Join(bootstrapDir, agent.ID+".yaml"))) {
				t.Errorf("Deployment %s mounts ConfigMap %s, which is not envoy/bootstrap/%s.yaml", d.name(), n, agent.ID)
			}
		}
	}

	// The patches changed what they should and nothing else of the base's containers.
	base := map[string]k8sDoc{}
	for _, d := range o.base {
		if d.kind() == "Deployment" {
			base[d.name()] = d
		}
	}
	mg := findIn(t, docs, "the rendered overlay", "Deployment", mcpgateContainer)
	var names []string
	for _, c := range podContainers(mg) {
		names = append(names, str(c["name"]))
	}
	sort.Strings(names)
	if !slices.Equal(names, []string{k8sIssuerService, mcpgateContainer}) {
		t.Errorf("rendered Deployment mcpgate has containers %v, want issuer and mcpgate", names)
	}
	if !reflect.DeepEqual(container(t, mg, mcpgateContainer), container(t, base[mcpgateContainer], mcpgateContainer)) {
		t.Error("the overlay changed the base's mcpgate container")
	}
	inv := findIn(t, docs, "the rendered overlay", "Deployment", server.ID)
	app := container(t, inv, "app")
	if _, ok := app["command"]; ok || str(app["image"]) != demoImage || !slices.Equal(strs(app["args"]), composeCommand(t, "inventory")) {
		t.Errorf("rendered inventory app container: command %v image %v args %v, want mcpgate-demo inventory", app["command"], app["image"], app["args"])
	}
	if !reflect.DeepEqual(container(t, inv, "envoy"), container(t, base[server.ID], "envoy")) {
		t.Error("the overlay changed inventory's Envoy container")
	}
}
