package deploy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"maps"
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
	"testing/fstest"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/mcpgate/mcpgate/policy"
)

// The high-availability overlay (deploy/kubernetes/ha): the base with two mcpgate
// replicas sharing one session key (Secret) and one Redis (rate limits, MCP tasks).
const (
	k8sHADir   = "kubernetes/ha"
	k8sHAKust  = "kubernetes/ha/kustomization.yaml"
	haMeshFile = "kubernetes/ha/mesh.yaml" // the base's mesh.yaml plus haRateLimits
	haReplicas = 2
	// The Secrets the user creates (deploy/README.md), and their keys.
	sessionKeySecret    = "mcpgate-session-key"
	sessionKeySecretKey = "key"
	redisSecret         = "mcpgate-redis"
	redisSecretKey      = "password"
	redisContainer      = "redis"
	// redisImage is the version of Debian bookworm's redis-server (../shared/TOOLING.md),
	// the one the integration tests and TestKubernetesHARender run.
	redisImage = "redis:7.0.15"
	// redisDataDir is the official image's WORKDIR, where Redis would write its files.
	redisDataDir = "/data"
	hostnameKey  = "kubernetes.io/hostname"
)

// haRateLimits is what the overlay's mesh.yaml adds to the Mesh spec of the base, at the
// spec's indentation: README "Limits" ("Where they are counted").
const haRateLimits = `# deploy/kubernetes/ha: the rate limits, and the MCP task table, in Redis (redis.yaml),
# shared by every replica; in each replica's memory while Redis does not answer.
rateLimits:
  redis: {address: "redis:6379", passwordFile: /secrets/redis-password}
  failureMode: local
`

// wantHAMesh is what deploy/kubernetes/ha/mesh.yaml must hold: the base's mesh.yaml
// (deployedEdits: testdata/demo with mcpgate's SPIFFE ID) with haRateLimits at the end of
// its spec, under a header saying both differences.
func wantHAMesh(t *testing.T) string {
	t.Helper()
	snap := loadDemo(t)
	if snap.Mesh.RateLimits != nil {
		t.Fatalf("testdata/demo names spec.rateLimits already: drop the edit here")
	}
	files, reasons := deployedEdits(t, snap)
	const name = "mesh.yaml"
	content, ok := files[name]
	if !ok {
		t.Fatalf("testdata/demo has no %s", name)
	}
	lines := strings.SplitAfter(content, "\n")
	spec := slices.IndexFunc(lines, func(l string) bool { return strings.TrimRight(l, " \r\n") == "spec:" })
	if spec < 0 || slices.ContainsFunc(lines[spec+1:], func(l string) bool { return strings.TrimRight(l, " \r\n") == "spec:" }) {
		t.Fatalf("testdata/demo/%s: want exactly one top-level spec:", name)
	}
	// The spec ends before the next line at column 0 (another key, ---) or at the end;
	// the block goes after its last non-blank line, at the indentation of its first key.
	end, indent := len(lines), ""
	for i := spec + 1; i < len(lines); i++ {
		l := lines[i]
		if strings.TrimSpace(l) == "" {
			continue
		}
		if !strings.HasPrefix(l, " ") {
			end = i
			break
		}
		if indent == "" && !strings.HasPrefix(strings.TrimSpace(l), "#") {
			indent = l[:len(l)-len(strings.TrimLeft(l, " "))]
		}
	}
	for end > spec+1 && strings.TrimSpace(lines[end-1]) == "" {
		end--
	}
	if indent == "" {
		t.Fatalf("testdata/demo/%s: spec: has no keys", name)
	}
	if !strings.HasSuffix(lines[end-1], "\n") {
		lines[end-1] += "\n"
	}
	var block strings.Builder
	for l := range strings.SplitAfterSeq(haRateLimits, "\n") {
		if l != "" {
			block.WriteString(indent + l)
		}
	}
	out := strings.Join(lines[:end], "") + block.String() + strings.Join(lines[end:], "")
	why := append(reasons[name], "spec.rateLimits: the rate limits and the MCP task table in Redis (redis.yaml,\n"+
		"Service redis), shared by the replicas; failureMode local while Redis does not answer.")
	return generatedHeader(name, "make bootstraps", why,
		"The overlay merges it into the base's ConfigMap mcpgate-policy, keeping its other files.\n"+
			"Lasting changes belong in testdata/demo.") + out
}

// TestKubernetesHAPolicy keeps the overlay's mesh.yaml equal to the base's plus exactly
// spec.rateLimits; -update (make bootstraps) rewrites it.
func TestKubernetesHAPolicy(t *testing.T) {
	want := wantHAMesh(t)
	if *update {
		if err := os.WriteFile(haMeshFile, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got := string(readFile(t, haMeshFile))
	if got != want {
		t.Errorf("%s differs from the base's mesh.yaml plus spec.rateLimits: make bootstraps (go test ./deploy -run TestKubernetesHAPolicy -update)", haMeshFile)
	}
	// The same said as YAML, whatever the generator above does: take rateLimits away and
	// the base's Mesh is left, nothing else.
	var base, ha map[string]any
	if err := yaml.Unmarshal([]byte(deployedFiles(t)["mesh.yaml"]), &base); err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal([]byte(got), &ha); err != nil {
		t.Fatalf("%s: %v", haMeshFile, err)
	}
	spec, _ := ha["spec"].(map[string]any)
	if spec["rateLimits"] == nil {
		t.Fatalf("%s has no spec.rateLimits", haMeshFile)
	}
	spec = maps.Clone(spec)
	delete(spec, "rateLimits")
	ha = maps.Clone(ha)
	ha["spec"] = spec
	if !reflect.DeepEqual(ha, base) {
		t.Errorf("%s without spec.rateLimits differs from the base's mesh.yaml (%s)", haMeshFile, policyCMFile)
	}
}

// TestKubernetesHAKustomization checks the overlay as kustomize reads it: every base
// manifest listed file by file, every file of the overlay used, patches on base objects,
// the policy ConfigMap merged with mesh.yaml only, no Secret committed.
func TestKubernetesHAKustomization(t *testing.T) {
	k := loadKustomization(t, k8sHAKust)
	base := loadKustomization(t, k8sBaseKust)
	if k.Namespace != base.Namespace {
		t.Errorf("overlay namespace %q, base %q", k.Namespace, base.Namespace)
	}
	dir := filepath.FromSlash(k8sHADir)
	used := map[string]bool{filepath.FromSlash(k8sHAKust): true}
	var baseDocs, own []k8sDoc
	var want, got []string
	for _, r := range base.Resources {
		want = append(want, filepath.Join(filepath.FromSlash(k8sDir), filepath.FromSlash(r)))
	}
	for _, r := range k.Resources {
		p := filepath.Join(dir, filepath.FromSlash(r))
		if st, err := os.Stat(p); err != nil {
			t.Errorf("kustomization resource %s: %v", r, err)
			continue
		} else if st.IsDir() {
			t.Errorf("kustomization resource %s is a directory: list the base's files (kustomize sees a cycle)", r)
			continue
		}
		switch filepath.Dir(p) {
		case dir:
			used[p] = true
			own = append(own, docsOf(t, p)...)
		case filepath.FromSlash(k8sDir):
			got = append(got, p)
			baseDocs = append(baseDocs, docsOf(t, p)...)
		default:
			t.Errorf("kustomization resource %s is neither the overlay's nor the base's", r)
		}
	}
	sort.Strings(want)
	sort.Strings(got)
	if !slices.Equal(got, want) {
		t.Errorf("the overlay lists the base manifests %v, want every one of the base's: %v", got, want)
	}
	for _, d := range own {
		if d.kind() == "Secret" {
			t.Errorf("%s: Secret %s: the user creates the Secrets (deploy/README.md); never commit a key", d.file, d.name())
		}
		for _, b := range baseDocs {
			if d.kind() == b.kind() && d.name() == b.name() {
				t.Errorf("%s: %s %s is already in %s (patch it instead)", d.file, d.kind(), d.name(), b.file)
			}
		}
		for _, c := range podContainers(d) {
			checkPinned(t, d.file+" "+str(c["name"]), str(c["image"]))
		}
	}
	for _, pt := range k.Patches {
		p := filepath.Join(dir, filepath.FromSlash(pt.Path))
		if pt.Path == "" || pt.Patch != "" || filepath.Dir(p) != dir {
			t.Errorf("patch %+v: want a file of %s", pt, k8sHADir)
			continue
		}
		used[p] = true
		if pt.Target != nil { // a JSON patch: its target is a base object
			kind, name := str(get(pt.Target, "kind")), str(get(pt.Target, "name"))
			findIn(t, baseDocs, "the base manifests the overlay lists", kind, name)
			continue
		}
		for _, d := range docsOf(t, p) { // a strategic merge patch names its objects
			findIn(t, baseDocs, "the base manifests the overlay lists", d.kind(), d.name())
		}
	}
	// The generator replaces mesh.yaml in the base's ConfigMap and keeps the rest of it.
	if len(k.ConfigMapGenerator) != 1 || k.ConfigMapGenerator[0].Name != policyCMName {
		t.Fatalf("configMapGenerator %+v: want one, %s", k.ConfigMapGenerator, policyCMName)
	}
	g := k.ConfigMapGenerator[0]
	if g.Behavior != "merge" {
		t.Errorf("configMapGenerator %s behavior %q: want merge (the base's ConfigMap keeps its other files)", policyCMName, g.Behavior)
	}
	if !g.Options.DisableNameSuffixHash {
		t.Errorf("configMapGenerator %s needs options.disableNameSuffixHash: a hash suffix turns every policy edit into a rollout instead of a live reload", policyCMName)
	}
	if len(g.Literals) > 0 || len(g.Envs) > 0 {
		t.Errorf("configMapGenerator %s: files only", policyCMName)
	}
	if src := g.sources(k8sHADir); !reflect.DeepEqual(src, map[string]string{"mesh.yaml": haMeshFile}) {
		t.Errorf("configMapGenerator %s takes %v, want only mesh.yaml=%s", policyCMName, src, haMeshFile)
	}
	used[filepath.FromSlash(haMeshFile)] = true
	if _, ok := get(findIn(t, baseDocs, "the base", "ConfigMap", policyCMName).doc, "data", "mesh.yaml").(string); !ok {
		t.Errorf("the base's ConfigMap %s has no mesh.yaml for the generator to replace", policyCMName)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if p := filepath.Join(dir, e.Name()); !used[p] {
			t.Errorf("%s is neither a resource, a patch nor a generator file of %s", p, k8sHAKust)
		}
	}
}

// secretFile says which Secret and key a container reads at file: the read-only mount of
// the directory holding it, a secret or projected volume, the item that projects it.
func secretFile(t *testing.T, d k8sDoc, c map[string]any, file string) (secret, key string) {
	t.Helper()
	var mount map[string]any
	dir := "" // the mount's path, the longest that holds file
	for _, m := range mappings(get(c, "volumeMounts")) {
		mp := strings.TrimSuffix(str(m["mountPath"]), "/")
		if strings.HasPrefix(file, mp+"/") && (mount == nil || len(mp) > len(dir)) {
			mount, dir = m, mp
		}
	}
	where := d.name() + "/" + str(c["name"])
	if mount == nil {
		t.Fatalf("%s mounts nothing that holds %s", where, file)
	}
	if mount["readOnly"] != true {
		t.Errorf("%s: %s is not mounted readOnly", where, mount["mountPath"])
	}
	if mount["subPath"] != nil {
		t.Errorf("%s: %s is a subPath mount, which never sees a rotated Secret", where, mount["mountPath"])
	}
	rel := strings.TrimPrefix(file, dir+"/")
	v := volume(t, d, str(mount["name"]))
	var sources []map[string]any // {name, items, optional}
	if s, ok := v["secret"].(map[string]any); ok {
		sources = append(sources, map[string]any{"name": s["secretName"], "items": s["items"], "optional": s["optional"]})
	}
	for _, s := range mappings(get(v, "projected", "sources")) {
		if s, ok := s["secret"].(map[string]any); ok {
			sources = append(sources, s)
		}
	}
	for _, s := range sources {
		items, k := mappings(s["items"]), ""
		if len(items) == 0 {
			k = rel // every key of the Secret is a file
		}
		for _, it := range items {
			if str(it["path"]) == rel {
				k = str(it["key"])
			}
		}
		if k == "" {
			continue
		}
		if s["optional"] == true {
			t.Errorf("%s: Secret %s is optional: without it the pod would start without %s", where, s["name"], file)
		}
		return str(s["name"]), k
	}
	t.Errorf("%s: %s is not a file of a Secret (volume %s: %v)", where, file, mount["name"], v)
	return "", ""
}

// mappings is a YAML list of mappings (the items that are not are left out).
func mappings(v any) []map[string]any {
	l, _ := v.([]any)
	var out []map[string]any
	for _, x := range l {
		if m, ok := x.(map[string]any); ok {
			out = append(out, m)
		}
	}
	return out
}

// envSecret is the Secret and key a container's environment variable comes from.
func envSecret(c map[string]any, name string) (secret, key string) {
	for _, e := range mappings(c["env"]) {
		if str(e["name"]) == name {
			ref := get(e, "valueFrom", "secretKeyRef")
			return str(get(ref, "name")), str(get(ref, "key"))
		}
	}
	return "", ""
}

// envVarRef is NAME when s is exactly "$(NAME)", the kubelet's expansion of a container's
// environment variable in args.
func envVarRef(s string) string {
	if n, ok := strings.CutPrefix(s, "$("); ok && strings.HasSuffix(n, ")") {
		return strings.TrimSuffix(n, ")")
	}
	return ""
}

// redisServerArgs are the arguments the Redis container passes to redis-server.
func redisServerArgs(t *testing.T, c map[string]any) []string {
	t.Helper()
	cmd, args := strs(c["command"]), strs(c["args"])
	switch {
	case slices.Equal(cmd, []string{"redis-server"}):
		return args
	case len(cmd) == 0 && len(args) > 0 && args[0] == "redis-server":
		return args[1:]
	case len(cmd) == 0 && len(args) > 0 && strings.HasPrefix(args[0], "-"):
		return args // the image's entrypoint prepends redis-server
	}
	t.Fatalf("the Redis container runs %q %q, want redis-server", cmd, args)
	return nil
}

// memBytes reads a Kubernetes memory quantity (Mi, Gi) or a Redis one (mb, gb: Redis's
// are binary too); 0 when it is neither.
func memBytes(s string) int64 {
	for suffix, m := range map[string]int64{"Mi": 1 << 20, "Gi": 1 << 30, "mb": 1 << 20, "gb": 1 << 30} {
		if n, ok := strings.CutSuffix(s, suffix); ok {
			if v, err := strconv.ParseInt(n, 10, 64); err == nil {
				return v * m
			}
		}
	}
	return 0
}

// haRender is the rendered overlay with what the tests look at in it.
type haRender struct {
	docs            []k8sDoc
	base            map[[2]string]k8sDoc // the base manifests, by kind and name
	mcpgate, redis  k8sDoc               // their Deployments
	mcpgateC        map[string]any       // the mcpgate container
	redisC          map[string]any
	redisArgs       []string
	snap            *policy.Snapshot // the rendered policy, loaded as mcpgate loads it
	redisPort       int              // the port Redis listens on (--port)
	mcpgateBaseArgs []string
}

func renderHA(t *testing.T) haRender {
	t.Helper()
	r := haRender{docs: kustomizeBuild(t, k8sHADir), base: map[[2]string]k8sDoc{}}
	for _, res := range loadKustomization(t, k8sBaseKust).Resources {
		for _, d := range docsOf(t, filepath.Join(filepath.FromSlash(k8sDir), filepath.FromSlash(res))) {
			r.base[[2]string{d.kind(), d.name()}] = d
		}
	}
	const where = "the rendered overlay"
	r.mcpgate = findIn(t, r.docs, where, "Deployment", mcpgateContainer)
	r.mcpgateC = container(t, r.mcpgate, mcpgateContainer)
	r.mcpgateBaseArgs = strs(container(t, r.base[[2]string{"Deployment", mcpgateContainer}], mcpgateContainer)["args"])

	// The policy as the mcpgate pods see it: the ConfigMap's keys at the volume's paths.
	cfg, _ := flagValue(strs(r.mcpgateC["args"]), "config")
	v := volumeAt(t, r.mcpgate, r.mcpgateC, cfg)
	cm := findIn(t, r.docs, where, "ConfigMap", str(get(v, "configMap", "name")))
	fsys := fstest.MapFS{}
	for _, it := range mappings(get(v, "configMap", "items")) {
		data, ok := get(cm.doc, "data", str(it["key"])).(string)
		if !ok {
			t.Fatalf("ConfigMap %s has no key %s", cm.name(), it["key"])
		}
		fsys[str(it["path"])] = &fstest.MapFile{Data: []byte(data), Mode: 0o644}
	}
	snap, err := policy.Load(context.Background(), fsys, "rendered "+k8sHADir)
	if err != nil {
		t.Fatalf("the rendered policy: %v", err)
	}
	r.snap = snap

	// Redis: the Deployment behind the Service the Mesh names.
	if snap.Mesh.RateLimits == nil {
		t.Fatal("the rendered Mesh names no spec.rateLimits.redis: the replicas count limits and remember tasks each on its own")
	}
	host, _ := hostPort(t, "rateLimits.redis.address", snap.Mesh.RateLimits.Address)
	svc := findIn(t, r.docs, where, "Service", host)
	for _, d := range r.docs {
		if d.kind() == "Deployment" && selects(svc, d) {
			if r.redis.doc != nil {
				t.Fatalf("Service %s selects the pods of Deployments %s and %s", host, r.redis.name(), d.name())
			}
			r.redis = d
		}
	}
	if r.redis.doc == nil {
		t.Fatalf("Service %s (rateLimits.redis.address) selects no Deployment's pods", host)
	}
	r.redisC = container(t, r.redis, redisContainer)
	r.redisArgs = redisServerArgs(t, r.redisC)
	r.redisPort = 6379 // redis-server's default
	if p, ok := flagValue(r.redisArgs, "port"); ok {
		r.redisPort = atoi(p)
	}
	return r
}

// TestKubernetesHARender renders the overlay with the pinned kustomize and checks what
// makes two replicas one mcpgate: the replicas, their disruption budget and spread, one
// session key, the base's flags, the policy naming the overlay's Redis, the Secrets on
// both sides, Redis itself and who may reach it.
func TestKubernetesHARender(t *testing.T) {
	r := renderHA(t)
	podLabels := func(d k8sDoc) map[string]any {
		l, _ := get(d.doc, "spec", "template", "metadata", "labels").(map[string]any)
		return l
	}

	t.Run("base", func(t *testing.T) {
		ns := loadKustomization(t, k8sHAKust).Namespace
		for _, d := range r.docs {
			if got := str(get(d.doc, "metadata", "namespace")); got != ns {
				t.Errorf("rendered %s %s in namespace %q, want %q", d.kind(), d.name(), got, ns)
			}
			if d.kind() == "Secret" {
				t.Errorf("rendered Secret %s: the user creates the Secrets; never commit a key", d.name())
			}
		}
		// Every base object is there, and unchanged but for mcpgate's Deployment and the
		// policy ConfigMap (checked below).
		for id, b := range r.base {
			d := findIn(t, r.docs, "the rendered overlay", id[0], id[1])
			if id == [2]string{"Deployment", mcpgateContainer} || id == [2]string{"ConfigMap", policyCMName} {
				continue
			}
			got := maps.Clone(d.doc)
			meta := maps.Clone(got["metadata"].(map[string]any))
			delete(meta, "namespace")
			got["metadata"] = meta
			if !reflect.DeepEqual(got, b.doc) {
				t.Errorf("the overlay changed the base's %s %s", id[0], id[1])
			}
		}
		// mcpgate's Deployment: replicas, spread, the Secrets' volume and mount, one flag;
		// the rest of the pod as the base has it.
		bd := r.base[[2]string{"Deployment", mcpgateContainer}]
		strip := func(d k8sDoc) (spec, pod, c map[string]any) {
			spec = maps.Clone(d.doc["spec"].(map[string]any))
			tmpl := maps.Clone(spec["template"].(map[string]any))
			pod = maps.Clone(tmpl["spec"].(map[string]any))
			c = maps.Clone(container(t, d, mcpgateContainer))
			delete(spec, "replicas")
			delete(spec, "template")
			for _, k := range []string{"containers", "volumes", "topologySpreadConstraints", "affinity"} {
				delete(pod, k)
			}
			delete(c, "args")
			delete(c, "volumeMounts")
			delete(c, "image") // kustomize edit set image (deploy/README.md) may change it
			return spec, pod, c
		}
		s1, p1, c1 := strip(r.mcpgate)
		s2, p2, c2 := strip(bd)
		if !reflect.DeepEqual(s1, s2) || !reflect.DeepEqual(p1, p2) || !reflect.DeepEqual(c1, c2) ||
			!reflect.DeepEqual(get(r.mcpgate.doc, "spec", "template", "metadata"), get(bd.doc, "spec", "template", "metadata")) {
			t.Error("the overlay changed the base's mcpgate Deployment beyond replicas, spread, volumes, mounts and args")
		}
		if n := len(podContainers(r.mcpgate)); n != 1 {
			t.Errorf("rendered Deployment mcpgate has %d containers, the base 1", n)
		}
		for _, m := range mappings(get(container(t, bd, mcpgateContainer), "volumeMounts")) {
			if !slices.ContainsFunc(mappings(r.mcpgateC["volumeMounts"]), func(x map[string]any) bool { return reflect.DeepEqual(x, m) }) {
				t.Errorf("the overlay dropped or changed the base's mcpgate mount %v", m)
			}
		}
		for _, v := range mappings(get(bd.doc, "spec", "template", "spec", "volumes")) {
			if !reflect.DeepEqual(volume(t, r.mcpgate, str(v["name"])), v) {
				t.Errorf("the overlay changed the base's mcpgate volume %s", v["name"])
			}
		}
	})

	t.Run("replicas", func(t *testing.T) {
		if n := atoi(str(get(r.mcpgate.doc, "spec", "replicas"))); n != haReplicas {
			t.Errorf("Deployment mcpgate replicas %d, want %d", n, haReplicas)
		}
		// Preferred, not required: on different nodes when there are nodes to spare.
		spread := false
		for _, c := range mappings(get(r.mcpgate.doc, "spec", "template", "spec", "topologySpreadConstraints")) {
			if str(c["topologyKey"]) != hostnameKey {
				continue
			}
			if w := str(c["whenUnsatisfiable"]); w != "ScheduleAnyway" {
				t.Errorf("topologySpreadConstraint on %s whenUnsatisfiable %q: want ScheduleAnyway (a replica must not stay pending on a one-node cluster)", hostnameKey, w)
			}
			if !matchLabelsSelect(get(c, "labelSelector", "matchLabels"), r.mcpgate) || get(c, "labelSelector", "matchExpressions") != nil {
				t.Errorf("topologySpreadConstraint labelSelector %v does not select the mcpgate pods %v", c["labelSelector"], podLabels(r.mcpgate))
			}
			spread = spread || atoi(str(c["maxSkew"])) == 1
		}
		for _, a := range mappings(get(r.mcpgate.doc, "spec", "template", "spec", "affinity", "podAntiAffinity", "preferredDuringSchedulingIgnoredDuringExecution")) {
			term := get(a, "podAffinityTerm")
			spread = spread || str(get(term, "topologyKey")) == hostnameKey && matchLabelsSelect(get(term, "labelSelector", "matchLabels"), r.mcpgate)
		}
		if get(r.mcpgate.doc, "spec", "template", "spec", "affinity", "podAntiAffinity", "requiredDuringSchedulingIgnoredDuringExecution") != nil {
			t.Error("required pod anti-affinity: a replica stays pending where there are fewer nodes; prefer it")
		}
		if !spread {
			t.Errorf("Deployment mcpgate: no topology spread (maxSkew 1) or preferred anti-affinity over %s for its pods", hostnameKey)
		}
	})

	t.Run("pdb", func(t *testing.T) {
		var pdbs []k8sDoc
		for _, d := range r.docs {
			if d.kind() == "PodDisruptionBudget" {
				pdbs = append(pdbs, d)
			}
		}
		if len(pdbs) != 1 {
			t.Fatalf("rendered %d PodDisruptionBudgets, want 1", len(pdbs))
		}
		p := pdbs[0]
		if v := str(p.doc["apiVersion"]); v != "policy/v1" {
			t.Errorf("PodDisruptionBudget %s apiVersion %q, want policy/v1", p.name(), v)
		}
		if !matchLabelsSelect(get(p.doc, "spec", "selector", "matchLabels"), r.mcpgate) || get(p.doc, "spec", "selector", "matchExpressions") != nil {
			t.Errorf("PodDisruptionBudget %s selects %v, not the mcpgate pods %v", p.name(), get(p.doc, "spec", "selector"), podLabels(r.mcpgate))
		}
		if matchLabelsSelect(get(p.doc, "spec", "selector", "matchLabels"), r.redis) {
			t.Errorf("PodDisruptionBudget %s also selects the Redis pods", p.name())
		}
		if m := get(p.doc, "spec", "minAvailable"); str(m) != "1" || get(p.doc, "spec", "maxUnavailable") != nil {
			t.Errorf("PodDisruptionBudget %s minAvailable %v maxUnavailable %v: want minAvailable 1 (fewer than the %d replicas, or no drain could ever evict one)", p.name(), m, get(p.doc, "spec", "maxUnavailable"), haReplicas)
		}
	})

	t.Run("session-key", func(t *testing.T) {
		args := strs(r.mcpgateC["args"])
		file, ok := flagValue(args, "session-key-file")
		if !ok || !path.IsAbs(file) {
			t.Fatalf("mcpgate args %q: want --session-key-file with an absolute path", args)
		}
		if s, k := secretFile(t, r.mcpgate, r.mcpgateC, file); s != sessionKeySecret || k != sessionKeySecretKey {
			t.Errorf("--session-key-file %s is key %q of Secret %q, want key %s of %s (deploy/README.md's kubectl create secret)", file, k, s, sessionKeySecretKey, sessionKeySecret)
		}
	})

	t.Run("flags", func(t *testing.T) {
		// The base's args exactly, then --session-key-file and nothing else.
		args := strs(r.mcpgateC["args"])
		file, _ := flagValue(args, "session-key-file")
		if want := append(slices.Clone(r.mcpgateBaseArgs), "--session-key-file", file); !slices.Equal(args, want) {
			t.Errorf("rendered mcpgate args %q, want the base's %q plus --session-key-file", args, r.mcpgateBaseArgs)
		}
		checkSharedServeFlags(t, "rendered mcpgate", args, parseDockerfile(t).cmd)
		checkServeTLS(t, "rendered "+k8sHADir+" mcpgate", args, r.snap)
	})

	t.Run("policy", func(t *testing.T) {
		// The base's ConfigMap with mesh.yaml replaced by the overlay's, which loads.
		cm := findIn(t, r.docs, "the rendered overlay", "ConfigMap", policyCMName)
		data, _ := cm.doc["data"].(map[string]any)
		want := maps.Clone(r.base[[2]string{"ConfigMap", policyCMName}].doc["data"].(map[string]any))
		want["mesh.yaml"] = string(readFile(t, haMeshFile))
		if !reflect.DeepEqual(data, want) {
			t.Errorf("rendered ConfigMap %s is not the base's with %s as mesh.yaml", policyCMName, haMeshFile)
		}
		checkEnvoysUseMTLS(t, "the rendered "+k8sHADir+" policy", r.snap)

		rl := r.snap.Mesh.RateLimits
		host, port := hostPort(t, "rateLimits.redis.address", rl.Address)
		svc := findIn(t, r.docs, "the rendered overlay", "Service", host)
		target := 0
		for _, p := range mappings(get(svc.doc, "spec", "ports")) {
			if atoi(str(p["port"])) == port {
				target = atoi(str(p["targetPort"]))
				if p["targetPort"] == nil {
					target = port
				}
			}
		}
		if target != r.redisPort || !slices.Contains(containerPorts(r.redisC), r.redisPort) {
			t.Errorf("rateLimits.redis.address %s: Service %s port %d goes to %d, Redis listens on %d (containerPorts %v)", rl.Address, host, port, target, r.redisPort, containerPorts(r.redisC))
		}
		if rl.FailureMode != policy.FailLocal {
			t.Errorf("rateLimits.failureMode %q, want %s (count in each replica while Redis is down)", rl.FailureMode, policy.FailLocal)
		}
		if rl.TLS {
			t.Error("rateLimits.redis.tls: the overlay's Redis serves no TLS")
		}
		// The password: a file of Secret mcpgate-redis for mcpgate, the same key of the
		// same Secret for Redis's --requirepass.
		if rl.PasswordFile == "" {
			t.Fatal("rateLimits.redis names no passwordFile: Redis requires a password")
		}
		s, k := secretFile(t, r.mcpgate, r.mcpgateC, rl.PasswordFile)
		if s != redisSecret || k != redisSecretKey {
			t.Errorf("rateLimits.redis.passwordFile %s is key %q of Secret %q, want key %s of %s", rl.PasswordFile, k, s, redisSecretKey, redisSecret)
		}
		pw, _ := flagValue(r.redisArgs, "requirepass")
		name := envVarRef(pw)
		if name == "" {
			t.Fatalf("Redis --requirepass %q: want $(VAR), an environment variable from Secret %s", pw, redisSecret)
		}
		if rs, rk := envSecret(r.redisC, name); rs != s || rk != k || s == "" {
			t.Errorf("Redis --requirepass $(%s) is key %q of Secret %q, mcpgate's passwordFile key %q of %q", name, rk, rs, k, s)
		}
	})

	t.Run("redis", func(t *testing.T) {
		c := r.redisC
		if img := str(c["image"]); img != redisImage {
			t.Errorf("Redis image %q, want %s (the redis-server the tests run)", img, redisImage)
		}
		if v, ok := flagValue(r.redisArgs, "save"); !ok || v != "" {
			t.Errorf("Redis args %q: want --save \"\" (no snapshots)", r.redisArgs)
		}
		if v, _ := flagValue(r.redisArgs, "appendonly"); v != "no" {
			t.Errorf("Redis args %q: want --appendonly no", r.redisArgs)
		}
		podSC := get(r.redis.doc, "spec", "template", "spec", "securityContext")
		sc := c["securityContext"]
		nonRoot := get(sc, "runAsNonRoot") == true || get(sc, "runAsNonRoot") == nil && get(podSC, "runAsNonRoot") == true
		uid := str(get(sc, "runAsUser"))
		if uid == "" {
			uid = str(get(podSC, "runAsUser"))
		}
		if !nonRoot || uid == "" || uid == "0" {
			t.Errorf("Redis runs as %q (runAsNonRoot %v/%v): want a non-root user", uid, get(podSC, "runAsNonRoot"), get(sc, "runAsNonRoot"))
		}
		if get(sc, "readOnlyRootFilesystem") != true || get(sc, "allowPrivilegeEscalation") != false || !slices.Contains(strs(get(sc, "capabilities", "drop")), "ALL") {
			t.Errorf("Redis securityContext %v: want readOnlyRootFilesystem, no privilege escalation, capabilities dropped", sc)
		}
		dir := redisDataDir
		if v, ok := flagValue(r.redisArgs, "dir"); ok {
			dir = v
		}
		var data map[string]any
		for _, m := range mappings(c["volumeMounts"]) {
			if str(m["mountPath"]) == dir {
				data = volume(t, r.redis, str(m["name"]))
			}
		}
		if _, ok := data["emptyDir"]; !ok {
			t.Errorf("Redis's directory %s is %v, want an emptyDir (the root file system is read-only; nothing persists)", dir, data)
		}
		limit := memBytes(str(get(c, "resources", "limits", "memory")))
		if str(get(c, "resources", "requests", "cpu")) == "" || str(get(c, "resources", "requests", "memory")) == "" || limit == 0 {
			t.Errorf("Redis resources %v: want cpu and memory requests and a memory limit", c["resources"])
		}
		if mm, _ := flagValue(r.redisArgs, "maxmemory"); memBytes(mm) == 0 || memBytes(mm) >= limit {
			t.Errorf("Redis --maxmemory %q, memory limit %v: want maxmemory below the limit (evict rather than be OOM-killed)", mm, get(c, "resources", "limits", "memory"))
		}
		// Ready only when it answers: a TCP probe on its port, or an authenticated PING
		// whose answer is compared (redis-cli exits 0 on NOAUTH and WRONGPASS too).
		probe, _ := c["readinessProbe"].(map[string]any)
		switch {
		case probe["tcpSocket"] != nil:
			if p := atoi(str(get(probe, "tcpSocket", "port"))); p != r.redisPort {
				t.Errorf("Redis readinessProbe on port %d, Redis listens on %d", p, r.redisPort)
			}
		case probe["exec"] != nil:
			cmd := strings.Join(strs(get(probe, "exec", "command")), " ")
			if !strings.Contains(cmd, "redis-cli") || !strings.Contains(cmd, "ping") || !strings.Contains(cmd, "PONG") {
				t.Errorf("Redis readinessProbe %q: want redis-cli ping compared with PONG", cmd)
			}
			// redis-cli reads its password from REDISCLI_AUTH: the Secret's, as Redis's.
			s, k := envSecret(c, "REDISCLI_AUTH")
			pw, _ := flagValue(r.redisArgs, "requirepass")
			ps, pk := envSecret(c, envVarRef(pw))
			if s == "" || s != ps || k != pk {
				t.Errorf("Redis readinessProbe: REDISCLI_AUTH is key %q of Secret %q, --requirepass key %q of %q: the probe would not authenticate", k, s, pk, ps)
			}
		default:
			t.Errorf("Redis readinessProbe %v: want tcpSocket or exec redis-cli ping", probe)
		}
		for _, d := range r.docs {
			for _, c := range podContainers(d) {
				checkPinned(t, "rendered "+d.kind()+" "+d.name()+" "+str(c["name"]), str(c["image"]))
			}
		}
		// Services and pods do not cross: Service mcpgate does not reach Redis, nor the
		// Redis Service mcpgate.
		host, _ := hostPort(t, "authz.address", r.snap.Mesh.AuthzAddress)
		rhost, _ := hostPort(t, "rateLimits.redis.address", r.snap.Mesh.RateLimits.Address)
		if selects(findIn(t, r.docs, "the rendered overlay", "Service", host), r.redis) || selects(findIn(t, r.docs, "the rendered overlay", "Service", rhost), r.mcpgate) {
			t.Errorf("the Services %s and %s select each other's pods (labels %v, %v)", host, rhost, podLabels(r.mcpgate), podLabels(r.redis))
		}
	})

	t.Run("networkpolicy", func(t *testing.T) {
		var nps []k8sDoc
		for _, d := range r.docs {
			if d.kind() != "NetworkPolicy" {
				continue
			}
			if selectsPods(d, r.redis) {
				nps = append(nps, d)
			}
			if selectsPods(d, r.mcpgate) {
				t.Errorf("NetworkPolicy %s selects the mcpgate pods: it would cut the Envoys off", d.name())
			}
		}
		if len(nps) != 1 {
			t.Fatalf("%d NetworkPolicies select the Redis pods %v, want 1", len(nps), podLabels(r.redis))
		}
		np := nps[0]
		if get(np.doc, "spec", "podSelector", "matchExpressions") != nil {
			t.Errorf("NetworkPolicy %s podSelector %v: matchLabels only", np.name(), get(np.doc, "spec", "podSelector"))
		}
		if !slices.Contains(strs(get(np.doc, "spec", "policyTypes")), "Ingress") {
			t.Errorf("NetworkPolicy %s policyTypes %v lack Ingress", np.name(), get(np.doc, "spec", "policyTypes"))
		}
		rules := mappings(get(np.doc, "spec", "ingress"))
		if len(rules) != 1 {
			t.Fatalf("NetworkPolicy %s has %d ingress rules, want 1 (mcpgate's pods on %d)", np.name(), len(rules), r.redisPort)
		}
		from := mappings(rules[0]["from"])
		if len(from) != 1 || len(from[0]) != 1 || from[0]["podSelector"] == nil ||
			get(from[0], "podSelector", "matchExpressions") != nil || !matchLabelsSelect(get(from[0], "podSelector", "matchLabels"), r.mcpgate) {
			t.Errorf("NetworkPolicy %s admits %v, want only a podSelector matching the mcpgate pods %v (this namespace)", np.name(), rules[0]["from"], podLabels(r.mcpgate))
		}
		ports := mappings(rules[0]["ports"])
		if len(ports) != 1 || atoi(str(ports[0]["port"])) != r.redisPort || (ports[0]["protocol"] != nil && str(ports[0]["protocol"]) != "TCP") || ports[0]["endPort"] != nil {
			t.Errorf("NetworkPolicy %s opens %v, want only TCP %d (Redis's port)", np.name(), rules[0]["ports"], r.redisPort)
		}
	})
}

// TestKubernetesHARedisServer runs the overlay's Redis container command with Debian's
// redis-server (the image's version), the Secret's value in its environment as the
// kubelet would put it, on a Unix socket of the test instead of TCP 6379: it must start,
// refuse an unauthenticated client, keep nothing on disk, and its readiness probe must
// pass with the password and fail without it or with another.
func TestKubernetesHARedisServer(t *testing.T) {
	// As integration/redistest looks for them: the PATH, then where the Debian package
	// puts them (a test's PATH may lack /usr/bin). make test installs them (make redis).
	bins := map[string]string{}
	for _, p := range []string{"redis-server", "redis-cli", "sh"} {
		for _, c := range []string{p, "/usr/bin/" + p} {
			if b, err := exec.LookPath(c); err == nil && bins[p] == "" {
				bins[p] = b
			}
		}
		if bins[p] == "" {
			t.Fatalf("%s not installed: run make redis (the Debian package redis-server), as make test does", p)
		}
	}
	r := renderHA(t)
	c := r.redisC
	buf := make([]byte, 16)
	if _, err := rand.Read(buf); err != nil {
		t.Fatal(err)
	}
	password := hex.EncodeToString(buf)

	// The container's environment: values as written, the Secret's keys as the password.
	env := map[string]string{}
	for _, e := range mappings(c["env"]) {
		if ref := get(e, "valueFrom", "secretKeyRef"); ref != nil {
			if str(get(ref, "name")) != redisSecret || str(get(ref, "key")) != redisSecretKey {
				t.Fatalf("Redis env %s from %v: only Secret %s key %s is known here", e["name"], ref, redisSecret, redisSecretKey)
			}
			env[str(e["name"])] = password
		} else {
			env[str(e["name"])] = str(e["value"])
		}
	}
	var args []string
	for _, a := range r.redisArgs {
		if n := envVarRef(a); n != "" {
			v, ok := env[n]
			if !ok {
				t.Fatalf("Redis arg %s: no environment variable %s (the kubelet would pass it verbatim)", a, n)
			}
			a = v
		}
		args = append(args, a)
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "redis.sock")
	// Later arguments win: no TCP port, the test's socket, the test's directory.
	args = append(args, "--port", "0", "--unixsocket", sock, "--dir", dir)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	srv := exec.CommandContext(ctx, bins["redis-server"], args...)
	out, err := srv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	// Its log is read to the end (redis-server must never block on stdout): ready says
	// when it accepts connections, eof when it has exited; log is complete after eof.
	ready, eof := make(chan struct{}), make(chan struct{})
	var log bytes.Buffer
	go func(ready chan struct{}) {
		defer close(eof)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			log.WriteString(sc.Text() + "\n")
			if ready != nil && strings.Contains(strings.ToLower(sc.Text()), "ready to accept connections") {
				close(ready)
				ready = nil
			}
		}
	}(ready)
	t.Cleanup(func() {
		_ = srv.Process.Kill() // fails harmlessly once it has exited
		<-eof
		_ = srv.Wait()
	})
	select {
	case <-ready:
	case <-eof:
		t.Fatalf("redis-server %q exited before it was ready:\n%s", args, log.String())
	case <-ctx.Done():
		t.Fatalf("redis-server %q not ready: %v", args, ctx.Err())
	}

	// run runs a command with the container's environment but REDISCLI_AUTH as given
	// ("" for none).
	run := func(auth string, name string, a ...string) (string, error) {
		cmd := exec.CommandContext(ctx, name, a...)
		cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool {
			return strings.HasPrefix(kv, "REDISCLI_AUTH=") || strings.HasPrefix(kv, "PATH=")
		})
		// The probe's sh finds redis-cli as the image's PATH would.
		cmd.Env = append(cmd.Env, "PATH="+filepath.Dir(bins["redis-cli"])+string(os.PathListSeparator)+os.Getenv("PATH"))
		for k, v := range env {
			if k != "REDISCLI_AUTH" {
				cmd.Env = append(cmd.Env, k+"="+v)
			}
		}
		if auth != "" {
			cmd.Env = append(cmd.Env, "REDISCLI_AUTH="+auth)
		}
		b, err := cmd.CombinedOutput()
		return string(b), err
	}
	if got, _ := run("", bins["redis-cli"], "-s", sock, "ping"); !strings.Contains(got, "NOAUTH") {
		t.Errorf("redis-cli ping without the password: %q, want NOAUTH (--requirepass)", got)
	}
	for k, want := range map[string]string{"save": "", "appendonly": "no"} {
		got, err := run(password, bins["redis-cli"], "-s", sock, "--raw", "config", "get", k)
		if err != nil || got != k+"\n"+want+"\n" {
			t.Errorf("CONFIG GET %s: %q %v, want %q", k, got, err, want)
		}
	}
	// The probe as the kubelet runs it, its redis-cli pointed at the test's socket.
	cmd := strs(get(c, "readinessProbe", "exec", "command"))
	if len(cmd) == 0 {
		return // a TCP probe: TestKubernetesHARender checked its port
	}
	probe := slices.Clone(cmd)
	probe[len(probe)-1] = strings.ReplaceAll(probe[len(probe)-1], "redis-cli", "redis-cli -s '"+sock+"'")
	if probe[len(probe)-1] == cmd[len(cmd)-1] {
		t.Fatalf("readinessProbe %q: no redis-cli to point at the test's Redis", cmd)
	}
	for _, tc := range []struct {
		what, auth string
		ok         bool
	}{
		{"the Secret's password", env["REDISCLI_AUTH"], true},
		{"no password", "", false},
		{"another password", password + "x", false},
	} {
		if got, err := run(tc.auth, probe[0], probe[1:]...); (err == nil) != tc.ok {
			t.Errorf("readinessProbe %q with %s: err %v (output %q), want success %v", cmd, tc.what, err, got, tc.ok)
		}
	}
	if env["REDISCLI_AUTH"] != password {
		t.Errorf("the Redis container's REDISCLI_AUTH is not the Secret's password: its readiness probe cannot authenticate")
	}

	// Nothing on disk, even at a clean shutdown (where Redis saves if --save allows it).
	if got, err := run(password, bins["redis-cli"], "-s", sock, "shutdown"); err != nil {
		t.Fatalf("redis-cli shutdown: %v %s", err, got)
	}
	select {
	case <-eof:
	case <-ctx.Done():
		t.Fatalf("redis-server did not exit after SHUTDOWN: %v", ctx.Err())
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() != filepath.Base(sock) {
			t.Errorf("Redis left %s in its directory: want no persistence\n%s", e.Name(), log.String())
		}
	}
}
