package deploy

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/mcpgate/mcpgate/envoy"
	"github.com/mcpgate/mcpgate/policy"
	"github.com/mcpgate/mcpgate/xds"
)

var update = flag.Bool("update", false, "rewrite the Kubernetes ConfigMaps copied from testdata/demo and envoy/bootstrap, and deploy/compose/policy")

// Paths, relative to this package's directory.
const (
	root         = ".."
	demoDir      = "../testdata/demo"
	composeFile  = "../docker-compose.yaml"
	dockerfile   = "../Dockerfile"
	bootstrapDir = "../envoy/bootstrap"
	spireDir     = "compose/spire"
	k8sDir       = "kubernetes"
	policyCMFile = "kubernetes/policy-configmap.yaml"
	policyCMName = "mcpgate-policy"
	envoyCMFile  = "kubernetes/inventory-envoy-bootstrap.yaml"
	envoyCMName  = "inventory-envoy-bootstrap"
	// The Grafana dashboard's ConfigMap, and the label Grafana's dashboard sidecar looks
	// for by default (grafana helm chart, sidecar.dashboards.label).
	dashboardCMFile  = "kubernetes/grafana-dashboard-configmap.yaml"
	dashboardCMName  = "mcpgate-grafana-dashboard"
	dashboardCMLabel = "grafana_dashboard"
	policyMount      = "/etc/mcpgate/policy"
	xdsAddress       = "mcpgate:18000" // what `make bootstraps` passes as --xds-address
	composeSocket    = "spire-agent-socket"
	appIDLabel       = "dev.mcpgate.app-id"
	// workloadLabel=mcpgateWorkload selects mcpgate's SPIRE registration entry in compose;
	// mcpgateWorkload is also the name of its Kubernetes ClusterSPIFFEID.
	workloadLabel   = "dev.mcpgate.workload"
	mcpgateWorkload = "mcpgate"
	// composePolicyDir is testdata/demo with only the issuer changed, mounted into the
	// compose mcpgate (TestComposePolicy).
	composePolicyDir = "compose/policy"
	demoTarget       = "demo"          // the Dockerfile stage of cmd/mcpgate-demo
	demoEntrypoint   = "/mcpgate-demo" // its ENTRYPOINT
)

func loadDemo(t *testing.T) *policy.Snapshot {
	t.Helper()
	snap, err := policy.LoadDir(context.Background(), demoDir)
	if err != nil {
		t.Fatalf("load %s: %v", demoDir, err)
	}
	if len(snap.Apps) == 0 {
		t.Fatal("the demo policy has no App")
	}
	return snap
}

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// yamlDocs decodes every document of a YAML file into generic values.
func yamlDocs(t *testing.T, p string) []map[string]any {
	t.Helper()
	dec := yaml.NewDecoder(bytes.NewReader(readFile(t, p)))
	var docs []map[string]any
	for {
		var d map[string]any
		err := dec.Decode(&d)
		if err != nil {
			if err.Error() == "EOF" {
				return docs
			}
			t.Fatalf("%s: document %d: %v", p, len(docs)+1, err)
		}
		if d != nil {
			docs = append(docs, d)
		}
	}
}

// get walks a generic YAML value by keys (strings for maps, ints for lists).
func get(v any, keys ...any) any {
	for _, k := range keys {
		switch k := k.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				return nil
			}
			v = m[k]
		case int:
			l, ok := v.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			v = l[k]
		}
	}
	return v
}

func str(v any) string {
	switch v := v.(type) {
	case nil:
		return ""
	case string:
		return v
	default:
		return fmt.Sprint(v)
	}
}

func strs(v any) []string {
	l, _ := v.([]any)
	out := make([]string, 0, len(l))
	for _, x := range l {
		out = append(out, str(x))
	}
	return out
}

func hostPort(t *testing.T, what, addr string) (string, int) {
	t.Helper()
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s %q: %v", what, addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("%s %q: %v", what, addr, err)
	}
	return h, n
}

// flagValue returns the value of --name in args (either "--name v" or "--name=v").
func flagValue(args []string, name string) (string, bool) {
	for i, a := range args {
		if a == "--"+name && i+1 < len(args) {
			return args[i+1], true
		}
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
	}
	return "", false
}

// listenPort is the port of a serve flag such as --grpc-addr 0.0.0.0:9001.
func listenPort(t *testing.T, args []string, name string) int {
	t.Helper()
	v, ok := flagValue(args, name)
	if !ok {
		t.Fatalf("no --%s in %q", name, args)
	}
	h, p := hostPort(t, "--"+name, v)
	if h != "0.0.0.0" && h != "" {
		t.Errorf("--%s %s listens on %q only: other containers cannot reach it", name, v, h)
	}
	return p
}

// pinned fails for images without a tag or with a floating "latest" tag.
func checkPinned(t *testing.T, where, image string) {
	t.Helper()
	ref := image
	if i := strings.Index(ref, "@"); i >= 0 {
		ref = ref[:i] // a digest pins it whatever the tag says
		if strings.HasPrefix(image[i+1:], "sha256:") {
			return
		}
	}
	name := ref[strings.LastIndex(ref, "/")+1:]
	_, tag, ok := strings.Cut(name, ":")
	if !ok || tag == "" {
		t.Errorf("%s: image %q has no tag", where, image)
		return
	}
	if tag == "latest" || strings.HasSuffix(tag, "-latest") || strings.HasPrefix(tag, "latest-") {
		t.Errorf("%s: image %q is not pinned (tag %q)", where, image, tag)
	}
}

// ---------------------------------------------------------------------------------------
// Bootstraps

// bootstrapYAML is exactly what `mcpgate bootstrap --config deploy/compose/policy --app
// ID --xds-address mcpgate:18000` prints (cmd/mcpgate/xds.go: envoy.Bootstrap, with the
// xds_cluster over SPIFFE mTLS when the Mesh names mcpgate's SPIFFE ID and certificates
// come from SPIRE; protojson with proto names, xds.JSONToYAML).
func bootstrapYAML(t *testing.T, snap *policy.Snapshot, app string) []byte {
	t.Helper()
	o := envoy.BootstrapOptions{NodeCluster: app, XDSAddress: xdsAddress, AdminPort: envoy.DefaultAdminPort}
	if snap.Mesh.MTLS != policy.MTLSDisabled {
		o.SpireAgentSocket = snap.Mesh.SDS.SpireAgentSocket
	}
	if id := snap.Mesh.AuthzSpiffeID; id != "" && o.SpireAgentSocket != "" {
		o.XDSTLS = &envoy.XDSTLS{SVID: snap.App(app).SpiffeID, Bundle: "spiffe://" + snap.Mesh.TrustDomain, ServerID: id}
	}
	b, err := envoy.Bootstrap(o)
	if err != nil {
		t.Fatalf("bootstrap %s: %v", app, err)
	}
	js, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	y, err := xds.JSONToYAML(js)
	if err != nil {
		t.Fatal(err)
	}
	return y
}

func sameYAML(t *testing.T, a, b []byte) bool {
	t.Helper()
	var x, y any
	if err := yaml.Unmarshal(a, &x); err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &y); err != nil {
		t.Fatal(err)
	}
	return reflect.DeepEqual(x, y)
}

// The bootstraps are generated from the shipped policy (mcpgate's SPIFFE ID in the Mesh):
// deploy/compose/policy and the Kubernetes ConfigMap agree on everything a bootstrap
// holds (the Mesh's trust domain, SPIRE socket and authz.spiffeId; the Apps' IDs).
func TestBootstrapsAreFresh(t *testing.T) {
	snap := loadDeployed(t)
	files, _ := filepath.Glob(filepath.Join(bootstrapDir, "*.yaml"))
	var have []string
	for _, f := range files {
		have = append(have, strings.TrimSuffix(filepath.Base(f), ".yaml"))
	}
	var want []string
	for id, app := range snap.Apps {
		if app.Sidecar != nil {
			want = append(want, id)
		}
	}
	sort.Strings(want)
	if !slices.Equal(have, want) {
		t.Errorf("envoy/bootstrap holds %v, want one bootstrap per App with a sidecar: %v (make bootstraps)", have, want)
	}
	for _, id := range want {
		p := filepath.Join(bootstrapDir, id+".yaml")
		got, err := os.ReadFile(p)
		if err != nil {
			t.Errorf("%v (make bootstraps)", err)
			continue
		}
		if !sameYAML(t, got, bootstrapYAML(t, snap, id)) {
			t.Errorf("%s is stale: run make bootstraps", p)
		}
	}
}

// ---------------------------------------------------------------------------------------
// Dockerfile

// dockerStage is what one FROM ... [AS name] stage of the Dockerfile says.
type dockerStage struct {
	name, from string
	user       string
	expose     []int
	entrypoint []string
	cmd        []string
	runs       []string // RUN instructions, continuation lines joined
	copies     []string // COPY instructions
}

// dockerfileInfo is the Dockerfile: every stage's base image, and the last stage (the
// default build target, the mcpgate image) in the embedded dockerStage.
type dockerfileInfo struct {
	froms  []string
	stages []*dockerStage
	dockerStage
}

func (d dockerfileInfo) stage(name string) *dockerStage {
	for _, s := range d.stages {
		if strings.EqualFold(s.name, name) {
			return s
		}
	}
	return nil
}

func parseDockerfile(t *testing.T) dockerfileInfo {
	t.Helper()
	var d dockerfileInfo
	cur := &dockerStage{}
	// Join continuation lines, drop comments.
	text := strings.ReplaceAll(string(readFile(t, dockerfile)), "\\\n", " ")
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		instr, rest, _ := strings.Cut(line, " ")
		rest = strings.TrimSpace(rest)
		switch strings.ToUpper(instr) {
		case "FROM":
			f := strings.Fields(rest)
			if len(f) > 0 && strings.HasPrefix(f[0], "--") {
				f = f[1:]
			}
			d.froms = append(d.froms, f[0])
			cur = &dockerStage{from: f[0]}
			if len(f) == 3 && strings.EqualFold(f[1], "AS") {
				cur.name = f[2]
			}
			d.stages = append(d.stages, cur)
		case "RUN":
			cur.runs = append(cur.runs, rest)
		case "COPY":
			cur.copies = append(cur.copies, rest)
		case "USER":
			cur.user = rest
		case "EXPOSE":
			for _, p := range strings.Fields(rest) {
				n, err := strconv.Atoi(strings.TrimSuffix(p, "/tcp"))
				if err != nil {
					t.Fatalf("Dockerfile EXPOSE %q: %v", p, err)
				}
				cur.expose = append(cur.expose, n)
			}
		case "ENTRYPOINT", "CMD":
			var l []string
			if err := json.Unmarshal([]byte(rest), &l); err != nil {
				t.Fatalf("Dockerfile %s must be exec (JSON) form: %v", instr, err)
			}
			if strings.EqualFold(instr, "CMD") {
				cur.cmd = l
			} else {
				cur.entrypoint = l
			}
		}
	}
	d.dockerStage = *cur
	return d
}

func TestDockerfile(t *testing.T) {
	snap := loadDemo(t)
	d := parseDockerfile(t)
	if len(d.froms) < 2 {
		t.Errorf("Dockerfile has %d stages, want a builder and a runtime stage", len(d.froms))
	}
	stages := map[string]bool{}
	text := string(readFile(t, dockerfile))
	for _, m := range regexp.MustCompile(`(?mi)^FROM\s+\S+\s+AS\s+(\S+)`).FindAllStringSubmatch(text, -1) {
		stages[m[1]] = true
	}
	for _, f := range d.froms {
		if !stages[f] {
			checkPinned(t, "Dockerfile FROM", f)
		}
	}
	if rt := d.froms[len(d.froms)-1]; !strings.HasPrefix(rt, "gcr.io/distroless/static") && rt != "scratch" {
		t.Errorf("runtime image %q: want distroless/static or scratch", rt)
	}
	if !strings.Contains(text, "CGO_ENABLED=0") || !strings.Contains(text, "-trimpath") {
		t.Error("the build must be static (CGO_ENABLED=0) and -trimpath")
	}
	if u, _, _ := strings.Cut(d.user, ":"); u != "65532" {
		t.Errorf("USER %q, want 65532 (non-root)", d.user)
	}
	if !slices.Equal(d.entrypoint, []string{"/mcpgate"}) {
		t.Errorf("ENTRYPOINT %q, want [/mcpgate]", d.entrypoint)
	}
	if len(d.cmd) == 0 || d.cmd[0] != "serve" {
		t.Fatalf("CMD %q must run serve", d.cmd)
	}
	if v, _ := flagValue(d.cmd, "config"); v != policyMount {
		t.Errorf("CMD --config %q, want %s", v, policyMount)
	}
	// The default is SPIFFE mTLS from the conventional SPIRE agent socket, with the
	// bundled demo policy's sidecars allowed: serve refuses plaintext beyond loopback.
	checkServeTLS(t, "Dockerfile CMD", d.cmd, snap)
	_, authzPort := hostPort(t, "authz.address", snap.Mesh.AuthzAddress)
	_, xdsPort := hostPort(t, "xds address", xdsAddress)
	want := map[string]int{"grpc-addr": authzPort, "xds-addr": xdsPort, "admin-addr": 9902}
	var ports []int
	for f, p := range want {
		got := listenPort(t, d.cmd, f)
		if got != p {
			t.Errorf("CMD --%s port %d, want %d", f, got, p)
		}
		ports = append(ports, got)
	}
	sort.Ints(ports)
	expose := slices.Clone(d.expose)
	sort.Ints(expose)
	if !slices.Equal(expose, ports) {
		t.Errorf("EXPOSE %v, want the CMD's ports %v", d.expose, ports)
	}
	for _, c := range d.copies {
		if strings.Contains(c, "mcpgate-demo") {
			t.Errorf("the mcpgate image (the last stage) copies the demo binary: COPY %s", c)
		}
	}
}

// The demo programs have a stage of their own, which is not the default target: the
// mcpgate image stays as minimal as it was.
func TestDockerfileDemoStage(t *testing.T) {
	d := parseDockerfile(t)
	demo := d.stage(demoTarget)
	if demo == nil {
		t.Fatalf("Dockerfile has no stage %q (docker-compose.yaml builds it with target: %s)", demoTarget, demoTarget)
	}
	if demo == d.stages[len(d.stages)-1] {
		t.Errorf("stage %s is the last stage, i.e. the default target: `docker build .` must give the mcpgate image", demoTarget)
	}
	if !strings.HasPrefix(demo.from, "gcr.io/distroless/static") {
		t.Errorf("stage %s FROM %q, want distroless/static", demoTarget, demo.from)
	}
	if u, _, _ := strings.Cut(demo.user, ":"); u != "65532" {
		t.Errorf("stage %s USER %q, want 65532 (non-root)", demoTarget, demo.user)
	}
	if !slices.Equal(demo.entrypoint, []string{demoEntrypoint}) {
		t.Errorf("stage %s ENTRYPOINT %q, want [%s]", demoTarget, demo.entrypoint, demoEntrypoint)
	}
	// COPY --from=<builder> <out> /mcpgate-demo, and the builder builds ./cmd/mcpgate-demo
	// statically into <out>.
	var builder, out string
	for _, c := range demo.copies {
		f := strings.Fields(c)
		if len(f) == 3 && strings.HasPrefix(f[0], "--from=") && f[2] == demoEntrypoint {
			builder, out = strings.TrimPrefix(f[0], "--from="), f[1]
		}
	}
	b := d.stage(builder)
	if b == nil {
		t.Fatalf("stage %s must COPY --from=<build stage> <binary> %s, has %q", demoTarget, demoEntrypoint, demo.copies)
	}
	built := false
	for _, r := range b.runs {
		if strings.Contains(r, "./cmd/mcpgate-demo") && strings.Contains(r, "-o "+out) {
			built = true
			if !strings.Contains(r, "CGO_ENABLED=0") || !strings.Contains(r, "-trimpath") {
				t.Errorf("stage %s: the demo build must be static (CGO_ENABLED=0) and -trimpath: RUN %s", builder, r)
			}
		}
	}
	if !built {
		t.Errorf("stage %s does not build ./cmd/mcpgate-demo into %s (RUN %q)", builder, out, b.runs)
	}
}

// ---------------------------------------------------------------------------------------
// docker-compose.yaml

type compose struct {
	Services map[string]service `yaml:"services"`
	Volumes  map[string]any     `yaml:"volumes"`
}

type service struct {
	Image       string            `yaml:"image"`
	Build       any               `yaml:"build"`
	Command     []string          `yaml:"command"`
	Entrypoint  []string          `yaml:"entrypoint"`
	Hostname    string            `yaml:"hostname"`
	NetworkMode string            `yaml:"network_mode"`
	Networks    map[string]any    `yaml:"networks"`
	Environment map[string]string `yaml:"environment"`
	Labels      map[string]string `yaml:"labels"`
	Volumes     []string          `yaml:"volumes"`
	Expose      []string          `yaml:"expose"`
	Ports       []string          `yaml:"ports"`
	PID         string            `yaml:"pid"`
	DependsOn   any               `yaml:"depends_on"`
}

func loadCompose(t *testing.T) compose {
	t.Helper()
	var c compose
	dec := yaml.NewDecoder(bytes.NewReader(readFile(t, composeFile)))
	if err := dec.Decode(&c); err != nil {
		t.Fatalf("%s: %v", composeFile, err)
	}
	return c
}

// mount is one "source:target[:mode]" volume.
type mount struct{ source, target, mode string }

func (s service) mounts() []mount {
	var out []mount
	for _, v := range s.Volumes {
		p := strings.Split(v, ":")
		m := mount{source: p[0]}
		if len(p) > 1 {
			m.target = p[1]
		}
		if len(p) > 2 {
			m.mode = p[2]
		}
		out = append(out, m)
	}
	return out
}

func (s service) mountAt(target string) (mount, bool) {
	for _, m := range s.mounts() {
		if m.target == target {
			return m, true
		}
	}
	return mount{}, false
}

func (s service) exposes(port int) bool {
	return slices.Contains(s.Expose, strconv.Itoa(port))
}

func (s service) aliases() []string {
	var out []string
	for _, n := range s.Networks {
		out = append(out, strs(get(n, "aliases"))...)
	}
	return out
}

// hcl extracts `key = "value"` settings from a SPIRE config (no HCL parser among the
// module's dependencies; SPIRE's configs here are flat enough).
func hcl(t *testing.T, p, key string) string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^\s*` + regexp.QuoteMeta(key) + `\s*=\s*(.*?)\s*$`).FindStringSubmatch(string(readFile(t, p)))
	if m == nil {
		t.Fatalf("%s: no %s", p, key)
	}
	return strings.Trim(m[1], `"`)
}

func TestComposeImagesPinned(t *testing.T) {
	c := loadCompose(t)
	for name, s := range c.Services {
		if s.Image == "" {
			if s.Build == nil {
				t.Errorf("service %s has neither image nor build", name)
			}
			continue
		}
		if s.Build != nil {
			continue // the local tag of what compose builds
		}
		checkPinned(t, "service "+name, s.Image)
	}
}

func TestComposeMcpgate(t *testing.T) {
	snap := loadDemo(t)
	c := loadCompose(t)
	authzHost, authzPort := hostPort(t, "authz.address", snap.Mesh.AuthzAddress)
	xdsHost, xdsPort := hostPort(t, "xds address", xdsAddress)
	if authzHost != xdsHost {
		t.Errorf("authz.address host %q and the bootstraps' xDS host %q differ: one mcpgate service serves both", authzHost, xdsHost)
	}
	s, ok := c.Services[authzHost]
	if !ok {
		t.Fatalf("no compose service %q (the Mesh's authz.address %s)", authzHost, snap.Mesh.AuthzAddress)
	}
	build, _ := s.Build.(map[string]any)
	if str(get(build, "context")) != "." || str(get(build, "dockerfile")) != "Dockerfile" {
		t.Errorf("service %s must be built from ./Dockerfile, build: %v", authzHost, s.Build)
	}
	d := parseDockerfile(t)
	args := s.Command
	if len(args) == 0 {
		args = d.cmd
	}
	if v, _ := flagValue(args, "config"); v != policyMount {
		t.Errorf("mcpgate --config %q, want %s", v, policyMount)
	}
	m, ok := s.mountAt(policyMount)
	if want := path.Join("deploy", composePolicyDir); !ok || path.Clean(m.source) != want || m.mode != "ro" {
		t.Errorf("mcpgate must mount ./%s read-only at %s, has %+v", want, policyMount, s.Volumes)
	}
	for f, p := range map[string]int{"grpc-addr": authzPort, "xds-addr": xdsPort} {
		if got := listenPort(t, args, f); got != p {
			t.Errorf("mcpgate --%s port %d, want %d", f, got, p)
		}
	}
	// The compose command must not drift from the Dockerfile's CMD: it may only add flags.
	checkSharedServeFlags(t, "compose mcpgate", args, d.cmd)
	for _, p := range []int{authzPort, xdsPort, listenPort(t, args, "admin-addr")} {
		if !s.exposes(p) {
			t.Errorf("mcpgate does not expose %d (expose: %v)", p, s.Expose)
		}
	}
	// SPIFFE mTLS: the SPIRE agent's socket (the sidecars' volume), its own registration
	// entry's selector (TestComposeSpire), the sidecars of the policy it serves allowed.
	composeSnap, _, _ := composeApps(t)
	checkServeTLS(t, "compose mcpgate", args, composeSnap)
	socketDir := path.Dir(composeSnap.Mesh.SDS.SpireAgentSocket)
	if m, ok := s.mountAt(socketDir); !ok || m.source != composeSocket {
		t.Errorf("mcpgate must mount the %s volume at %s (--spiffe-socket), has %v", composeSocket, socketDir, s.Volumes)
	}
	if s.Labels[workloadLabel] != mcpgateWorkload {
		t.Errorf("mcpgate: label %s=%q, want %q (the selector of its SPIRE registration entry)", workloadLabel, s.Labels[workloadLabel], mcpgateWorkload)
	}
	if deps := dependsOn(s); !slices.Contains(deps, "spire-agent") {
		t.Errorf("mcpgate depends_on %v, want spire-agent (it waits for its SVID)", deps)
	}
	// Every bootstrap's xds_cluster reaches this service, over SPIFFE mTLS with the
	// sidecar's SVID, accepting only mcpgate's.
	files, _ := filepath.Glob(filepath.Join(bootstrapDir, "*.yaml"))
	for _, f := range files {
		app := composeSnap.App(strings.TrimSuffix(filepath.Base(f), ".yaml"))
		if app == nil {
			t.Errorf("%s: no App %s in the compose policy", f, filepath.Base(f))
			continue
		}
		docs := yamlDocs(t, f)
		found := false
		for _, cl := range get(docs[0], "static_resources", "clusters").([]any) {
			if str(get(cl, "name")) != envoy.XDSCluster {
				continue
			}
			found = true
			sa := get(cl, "load_assignment", "endpoints", 0, "lb_endpoints", 0, "endpoint", "address", "socket_address")
			if h, p := str(get(sa, "address")), str(get(sa, "port_value")); h != authzHost || p != strconv.Itoa(xdsPort) {
				t.Errorf("%s: xds_cluster reaches %s:%s, want %s:%d", f, h, p, authzHost, xdsPort)
			}
			tc := get(cl, "transport_socket", "typed_config")
			if !strings.HasSuffix(str(get(tc, "@type")), ".UpstreamTlsContext") {
				t.Errorf("%s: xds_cluster is plaintext (transport_socket %v): mcpgate serves xDS over SPIFFE mTLS only", f, get(cl, "transport_socket"))
				continue
			}
			js, err := json.Marshal(tc)
			if err != nil {
				t.Fatal(err)
			}
			var utc tlsv3.UpstreamTlsContext
			if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(js, &utc); err != nil {
				t.Fatalf("%s: xds_cluster transport socket: %v", f, err)
			}
			checkUpstreamMTLS(t, f+": xds_cluster", &utc, app.SpiffeID, mcpgateSpiffeID(composeSnap))
		}
		if !found {
			t.Errorf("%s has no %s", f, envoy.XDSCluster)
		}
	}
}

// serveFlagsShared are the serve flags whose values the compose command and the
// Kubernetes Deployment share with the Dockerfile's CMD (they may only add flags).
var serveFlagsShared = []string{"config", "grpc-addr", "xds-addr", "admin-addr", "spiffe-socket", "allowed-client-ids"}

// checkSharedServeFlags fails unless args (what runs as what) give every flag of
// serveFlagsShared the value the Dockerfile's CMD gives it.
func checkSharedServeFlags(t *testing.T, what string, args, cmd []string) {
	t.Helper()
	for _, f := range serveFlagsShared {
		a, _ := flagValue(args, f)
		b, _ := flagValue(cmd, f)
		if a != b {
			t.Errorf("%s --%s %q, Dockerfile CMD %q", what, f, a, b)
		}
	}
}

// dependsOn lists a compose service's depends_on, in either of its forms.
func dependsOn(s service) []string {
	switch d := s.DependsOn.(type) {
	case []any:
		return strs(d)
	case map[string]any:
		var out []string
		for k := range d {
			out = append(out, k)
		}
		sort.Strings(out)
		return out
	}
	return nil
}

func TestComposeSidecarsAndApps(t *testing.T) {
	snap := loadDemo(t)
	c := loadCompose(t)
	socketDir := path.Dir(snap.Mesh.SDS.SpireAgentSocket)
	for id, app := range snap.Apps {
		if app.Sidecar == nil {
			continue
		}
		sc := app.Sidecar
		s, ok := c.Services[sc.Address]
		if !ok {
			t.Errorf("App %s: no compose service %q (sidecar.address)", id, sc.Address)
			continue
		}
		if !strings.HasPrefix(s.Image, "envoyproxy/envoy:") {
			t.Errorf("service %s runs %q, want envoyproxy/envoy", sc.Address, s.Image)
		}
		cfg := ""
		for i, a := range s.Command {
			if (a == "-c" || a == "--config-path") && i+1 < len(s.Command) {
				cfg = s.Command[i+1]
			}
		}
		if cfg == "" {
			t.Errorf("service %s: command %q has no -c <bootstrap>", sc.Address, s.Command)
		} else if m, ok := s.mountAt(cfg); !ok || path.Clean(m.source) != "envoy/bootstrap/"+id+".yaml" {
			t.Errorf("service %s must mount ./envoy/bootstrap/%s.yaml at %s, has %v", sc.Address, id, cfg, s.Volumes)
		}
		if m, ok := s.mountAt(socketDir); !ok || m.source != composeSocket {
			t.Errorf("service %s must mount the %s volume at %s (sds.spireAgentSocket %s)", sc.Address, composeSocket, socketDir, snap.Mesh.SDS.SpireAgentSocket)
		}
		if !s.exposes(sc.InboundPort) {
			t.Errorf("service %s does not expose inboundPort %d (expose: %v)", sc.Address, sc.InboundPort, s.Expose)
		}
		if s.Labels[appIDLabel] != id {
			t.Errorf("service %s: label %s=%q, want %q (the SPIRE registration selector)", sc.Address, appIDLabel, s.Labels[appIDLabel], id)
		}

		// The app process: its own service in the sidecar's network namespace, reachable
		// from the sidecar at the App's address.
		host, port := hostPort(t, "App "+id+" address", app.Address)
		as, ok := c.Services[host]
		if !ok {
			t.Errorf("App %s: no compose service %q (address %s)", id, host, app.Address)
			continue
		}
		if as.NetworkMode != "service:"+sc.Address {
			t.Errorf("service %s: network_mode %q, want service:%s (the sidecar's localhost is the app's)", host, as.NetworkMode, sc.Address)
		}
		if !slices.Contains(s.aliases(), host) {
			t.Errorf("service %s lacks the network alias %q, so the App's address %s does not resolve", sc.Address, host, app.Address)
		}
		if as.Environment["PORT"] != strconv.Itoa(port) {
			t.Errorf("service %s: PORT=%q, want %d (address %s)", host, as.Environment["PORT"], port, app.Address)
		}
		if as.Environment["DAPR_HTTP_PORT"] != strconv.Itoa(sc.OutboundPort) {
			t.Errorf("service %s: DAPR_HTTP_PORT=%q, want the sidecar's outboundPort %d", host, as.Environment["DAPR_HTTP_PORT"], sc.OutboundPort)
		}
		if u := as.Environment["MCP_URL"]; u != "" && !strings.HasPrefix(u, "http://127.0.0.1:"+strconv.Itoa(sc.OutboundPort)+"/") {
			t.Errorf("service %s: MCP_URL %q must go through the sidecar's outbound port %d", host, u, sc.OutboundPort)
		}
		if _, ok := as.mountAt(socketDir); ok {
			t.Errorf("service %s mounts the SPIRE agent socket: only its Envoy may hold the App's identity", host)
		}
	}
}

func TestComposeSpire(t *testing.T) {
	snap := loadDemo(t)
	c := loadCompose(t)
	socket := snap.Mesh.SDS.SpireAgentSocket
	if socket == "" {
		t.Fatal("the demo Mesh has no sds.spireAgentSocket")
	}
	server, agent := c.Services["spire-server"], c.Services["spire-agent"]
	const spireVersion = "1.15.3"
	for name, s := range map[string]service{"spire-server": server, "spire-agent": agent, "spire-register": c.Services["spire-register"]} {
		if !strings.HasPrefix(s.Image, "ghcr.io/spiffe/spire-") || !strings.HasSuffix(s.Image, ":"+spireVersion) {
			t.Errorf("service %s image %q, want ghcr.io/spiffe/spire-*:%s", name, s.Image, spireVersion)
		}
	}
	serverConf := filepath.Join(spireDir, "server.conf")
	agentConf := filepath.Join(spireDir, "agent.conf")
	for svc, conf := range map[string]string{"spire-server": serverConf, "spire-agent": agentConf} {
		s := c.Services[svc]
		var target string
		for i, a := range s.Command {
			if a == "-config" && i+1 < len(s.Command) {
				target = s.Command[i+1]
			}
		}
		if m, ok := s.mountAt(target); target == "" || !ok || path.Clean(m.source) != path.Join("deploy", conf) {
			t.Errorf("service %s must run with -config pointing at ./deploy/%s (command %q, volumes %v)", svc, conf, s.Command, s.Volumes)
		}
		if td := hcl(t, conf, "trust_domain"); td != snap.Mesh.TrustDomain {
			t.Errorf("%s trust_domain %q, want the Mesh's %q", conf, td, snap.Mesh.TrustDomain)
		}
	}
	if got := hcl(t, agentConf, "socket_path"); got != socket {
		t.Errorf("%s socket_path %q, want sds.spireAgentSocket %q", agentConf, got, socket)
	}
	if m, ok := agent.mountAt(path.Dir(socket)); !ok || m.source != composeSocket {
		t.Errorf("spire-agent must mount the %s volume at %s", composeSocket, path.Dir(socket))
	}
	if _, ok := c.Volumes[composeSocket]; !ok {
		t.Errorf("no top-level volume %s", composeSocket)
	}
	if agent.PID != "host" {
		t.Error("spire-agent needs pid: host for the docker workload attestor")
	}
	if m, ok := agent.mountAt("/var/run/docker.sock"); !ok || m.source != "/var/run/docker.sock" {
		t.Error("spire-agent needs the Docker socket for the docker workload attestor")
	}
	// Node attestation: the agent's http_challenge hostname is its compose hostname, the
	// server admits exactly it, and the entries are parented on the resulting agent ID.
	agentHost := hcl(t, agentConf, "hostname")
	if agent.Hostname != agentHost {
		t.Errorf("spire-agent hostname %q, agent.conf http_challenge hostname %q", agent.Hostname, agentHost)
	}
	if got := hcl(t, agentConf, "server_address"); got != "spire-server" {
		t.Errorf("agent.conf server_address %q, want the compose service spire-server", got)
	}
	pat := hcl(t, serverConf, "allowed_dns_patterns")
	pat = strings.Trim(pat, `[]" `)
	if !regexp.MustCompile(pat).MatchString(agentHost) {
		t.Errorf("server allowed_dns_patterns %q does not admit %q", pat, agentHost)
	}
	agentID := "spiffe://" + snap.Mesh.TrustDomain + "/spire/agent/http_challenge/" + agentHost

	// Registration entries: exactly one per App with a sidecar, SPIFFE ID = App.SpiffeID,
	// selected by the label its sidecar carries, and mcpgate's (below).
	reg := c.Services["spire-register"]
	var dataPath string
	for i, a := range reg.Command {
		if a == "-data" && i+1 < len(reg.Command) {
			dataPath = reg.Command[i+1]
		}
	}
	entriesFile := filepath.Join(spireDir, "entries.json")
	if m, ok := reg.mountAt(dataPath); dataPath == "" || !ok || path.Clean(m.source) != path.Join("deploy", entriesFile) {
		t.Errorf("spire-register must run entry create -data with ./deploy/%s mounted (command %q)", entriesFile, reg.Command)
	}
	var entries struct {
		Entries []struct {
			SpiffeID  string `json:"spiffe_id"`
			ParentID  string `json:"parent_id"`
			TTL       int    `json:"x509_svid_ttl"` // SPIRE's common.RegistrationEntry names
			Selectors []struct {
				Type  string `json:"type"`
				Value string `json:"value"`
			} `json:"selectors"`
		} `json:"entries"`
	}
	dec := json.NewDecoder(bytes.NewReader(readFile(t, entriesFile)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&entries); err != nil {
		t.Fatalf("%s: %v", entriesFile, err)
	}
	got := map[string]string{} // SPIFFE ID -> selector
	for _, e := range entries.Entries {
		if e.ParentID != agentID {
			t.Errorf("entry %s: parent_id %q, want %q", e.SpiffeID, e.ParentID, agentID)
		}
		if len(e.Selectors) != 1 || e.Selectors[0].Type != "docker" {
			t.Errorf("entry %s: want one docker selector, have %+v", e.SpiffeID, e.Selectors)
			continue
		}
		got[e.SpiffeID] = e.Selectors[0].Value
	}
	want := map[string]string{}
	for id, app := range snap.Apps {
		if app.Sidecar != nil {
			want[app.SpiffeID] = "label:" + appIDLabel + ":" + id
			if l := c.Services[app.Sidecar.Address].Labels[appIDLabel]; l != id {
				t.Errorf("the entry for %s selects label %s=%s, the sidecar %s has %q", app.SpiffeID, appIDLabel, id, app.Sidecar.Address, l)
			}
		}
	}
	// And mcpgate's own, for its SPIFFE mTLS listeners: the ID the compose policy's Mesh
	// names (authz.spiffeId), selected by a label only the mcpgate service carries.
	composeSnap, _, _ := composeApps(t)
	authzHost, _ := hostPort(t, "authz.address", composeSnap.Mesh.AuthzAddress)
	want[composeSnap.Mesh.AuthzSpiffeID] = "label:" + workloadLabel + ":" + mcpgateWorkload
	for name, s := range c.Services {
		if l, ok := s.Labels[workloadLabel]; ok && (name != authzHost || l != mcpgateWorkload) {
			t.Errorf("service %s carries %s=%s: only %s may hold mcpgate's SVID", name, workloadLabel, l, authzHost)
		}
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("registration entries %v, want %v", got, want)
	}
	// The bootstraps' SDS cluster uses the same socket.
	files, _ := filepath.Glob(filepath.Join(bootstrapDir, "*.yaml"))
	for _, f := range files {
		found := false
		for _, cl := range get(yamlDocs(t, f)[0], "static_resources", "clusters").([]any) {
			if str(get(cl, "name")) == envoy.SpireAgentCluster {
				found = true
				if p := str(get(cl, "load_assignment", "endpoints", 0, "lb_endpoints", 0, "endpoint", "address", "pipe", "path")); p != socket {
					t.Errorf("%s: spire_agent pipe %q, want %q", f, p, socket)
				}
			}
		}
		if !found {
			t.Errorf("%s has no %s cluster", f, envoy.SpireAgentCluster)
		}
	}
}

// ---------------------------------------------------------------------------------------
// Kubernetes

type k8sDoc struct {
	file string
	doc  map[string]any
}

func (d k8sDoc) kind() string { return str(d.doc["kind"]) }
func (d k8sDoc) name() string { return str(get(d.doc, "metadata", "name")) }

func k8sDocs(t *testing.T) []k8sDoc {
	t.Helper()
	var out []k8sDoc
	err := filepath.WalkDir(k8sDir, func(p string, e fs.DirEntry, err error) error {
		if err == nil && e.IsDir() && (p == filepath.FromSlash(k8sDemoDir) || p == filepath.FromSlash(k8sHADir)) {
			// The overlays patch these manifests: kubernetes_demo_test.go, kubernetes_ha_test.go.
			return fs.SkipDir
		}
		if err != nil || e.IsDir() || (!strings.HasSuffix(p, ".yaml") && !strings.HasSuffix(p, ".yml")) {
			return err
		}
		for i, d := range yamlDocs(t, p) {
			if str(d["apiVersion"]) == "" || str(d["kind"]) == "" {
				t.Errorf("%s document %d: apiVersion and kind are required", p, i+1)
			}
			if str(d["kind"]) != "Kustomization" && str(get(d, "metadata", "name")) == "" {
				t.Errorf("%s document %d: metadata.name is required", p, i+1)
			}
			out = append(out, k8sDoc{p, d})
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// find is findIn with k8sDir as where it looked.
func find(t *testing.T, docs []k8sDoc, kind, name string) k8sDoc {
	t.Helper()
	return findIn(t, docs, k8sDir, kind, name)
}

func container(t *testing.T, d k8sDoc, name string) map[string]any {
	t.Helper()
	for _, c := range get(d.doc, "spec", "template", "spec", "containers").([]any) {
		if str(get(c, "name")) == name {
			return c.(map[string]any)
		}
	}
	t.Fatalf("%s %s has no container %q", d.kind(), d.name(), name)
	return nil
}

func volume(t *testing.T, d k8sDoc, name string) map[string]any {
	t.Helper()
	for _, v := range get(d.doc, "spec", "template", "spec", "volumes").([]any) {
		if str(get(v, "name")) == name {
			return v.(map[string]any)
		}
	}
	t.Fatalf("%s %s has no volume %q", d.kind(), d.name(), name)
	return nil
}

func volumeAt(t *testing.T, d k8sDoc, c map[string]any, mountPath string) map[string]any {
	t.Helper()
	for _, m := range get(c, "volumeMounts").([]any) {
		if str(get(m, "mountPath")) == mountPath {
			if get(m, "readOnly") != true {
				t.Errorf("%s: %s is not mounted readOnly", d.name(), mountPath)
			}
			return volume(t, d, str(get(m, "name")))
		}
	}
	t.Fatalf("%s container %s mounts nothing at %s", d.name(), str(c["name"]), mountPath)
	return nil
}

func containerPorts(c map[string]any) []int {
	var out []int
	for _, p := range get(c, "ports").([]any) {
		n, _ := strconv.Atoi(str(get(p, "containerPort")))
		out = append(out, n)
	}
	sort.Ints(out)
	return out
}

func servicePorts(d k8sDoc) (ports, targets []int) {
	for _, p := range get(d.doc, "spec", "ports").([]any) {
		n, _ := strconv.Atoi(str(get(p, "port")))
		tp, _ := strconv.Atoi(str(get(p, "targetPort")))
		if tp == 0 {
			tp = n
		}
		ports, targets = append(ports, n), append(targets, tp)
	}
	sort.Ints(ports)
	sort.Ints(targets)
	return ports, targets
}

func selects(svc, deploy k8sDoc) bool {
	sel, _ := get(svc.doc, "spec", "selector").(map[string]any)
	labels, _ := get(deploy.doc, "spec", "template", "metadata", "labels").(map[string]any)
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if str(labels[k]) != str(v) {
			return false
		}
	}
	return true
}

func TestKubernetesParses(t *testing.T) {
	docs := k8sDocs(t)
	if len(docs) == 0 {
		t.Fatal("no manifests")
	}
	k := find(t, docs, "Kustomization", "")
	listed := map[string]bool{}
	for _, r := range strs(get(k.doc, "resources")) {
		listed[filepath.Join(k8sDir, r)] = true
		if _, err := os.Stat(filepath.Join(k8sDir, r)); err != nil {
			t.Errorf("kustomization resource %s: %v", r, err)
		}
	}
	for _, d := range docs {
		// spire/ needs SPIRE's CRDs and is applied on its own.
		if d.kind() != "Kustomization" && filepath.Dir(d.file) == k8sDir && !listed[d.file] {
			t.Errorf("%s is not listed in the kustomization", d.file)
		}
		for _, c := range podContainers(d) {
			checkPinned(t, d.file+" "+str(c["name"]), str(c["image"]))
		}
	}
}

func podContainers(d k8sDoc) []map[string]any {
	var out []map[string]any
	l, _ := get(d.doc, "spec", "template", "spec", "containers").([]any)
	for _, c := range l {
		out = append(out, c.(map[string]any))
	}
	return out
}

func TestKubernetesMcpgate(t *testing.T) {
	snap := loadDemo(t)
	docs := k8sDocs(t)
	authzHost, authzPort := hostPort(t, "authz.address", snap.Mesh.AuthzAddress)
	_, xdsPort := hostPort(t, "xds address", xdsAddress)
	dep := find(t, docs, "Deployment", "mcpgate")
	c := container(t, dep, "mcpgate")
	args := strs(c["args"])
	checkSharedServeFlags(t, "Deployment mcpgate", args, parseDockerfile(t).cmd)
	// SPIFFE mTLS: the SVID from the SPIFFE CSI driver's socket, as the sidecars get theirs,
	// and exactly the sidecars of the policy it serves (the ConfigMap) allowed.
	deployed := loadDeployed(t)
	checkServeTLS(t, "Deployment mcpgate", args, deployed)
	if sv := volumeAt(t, dep, c, path.Dir(deployed.Mesh.SDS.SpireAgentSocket)); str(get(sv, "csi", "driver")) != "csi.spiffe.io" {
		t.Errorf("mcpgate's SPIRE socket volume is %v, want the SPIFFE CSI driver csi.spiffe.io", sv)
	}
	// Its SPIFFE ID: the ClusterSPIFFEID mcpgate renders the Mesh's authz.spiffeId for
	// these pods (their namespace, their service account), and the apps' does not select them.
	sa := str(get(dep.doc, "spec", "template", "spec", "serviceAccountName"))
	if sa == "" || sa == "default" {
		t.Errorf("Deployment mcpgate serviceAccountName %q: want its own (its SPIFFE ID is derived from it)", sa)
	} else {
		find(t, docs, "ServiceAccount", sa)
	}
	ns := loadKustomization(t, k8sBaseKust).Namespace
	cs := find(t, docs, "ClusterSPIFFEID", mcpgateWorkload)
	tmpl := str(get(cs.doc, "spec", "spiffeIDTemplate"))
	rendered := strings.NewReplacer("{{ .TrustDomain }}", deployed.Mesh.TrustDomain,
		"{{ .PodMeta.Namespace }}", ns, "{{ .PodSpec.ServiceAccountName }}", sa).Replace(tmpl)
	if rendered != deployed.Mesh.AuthzSpiffeID {
		t.Errorf("ClusterSPIFFEID %s template %q gives %q, want the Mesh's authz.spiffeId %q", mcpgateWorkload, tmpl, rendered, deployed.Mesh.AuthzSpiffeID)
	}
	podLabels, _ := get(dep.doc, "spec", "template", "metadata", "labels").(map[string]any)
	sel, _ := get(cs.doc, "spec", "podSelector", "matchLabels").(map[string]any)
	for k, v := range sel {
		if str(podLabels[k]) != str(v) {
			t.Errorf("ClusterSPIFFEID %s selects %s=%v, the mcpgate pods have %v", mcpgateWorkload, k, v, podLabels)
		}
	}
	if len(sel) == 0 || get(cs.doc, "spec", "podSelector", "matchExpressions") != nil {
		t.Errorf("ClusterSPIFFEID %s podSelector %v: want matchLabels only", mcpgateWorkload, get(cs.doc, "spec", "podSelector"))
	}
	if got := str(get(cs.doc, "spec", "namespaceSelector", "matchLabels", "kubernetes.io/metadata.name")); got != ns {
		t.Errorf("ClusterSPIFFEID %s namespaceSelector %v: want only namespace %s, where mcpgate runs", mcpgateWorkload, get(cs.doc, "spec", "namespaceSelector"), ns)
	}
	// No App can be issued mcpgate's ID: the apps' ClusterSPIFFEID renders
	// ns/<namespace>/..., so it must skip a namespace named like mcpgate's ID's.
	mcpgateNS := strings.Split(strings.TrimPrefix(mcpgateIDPath, "/"), "/")[1]
	excl := get(find(t, docs, "ClusterSPIFFEID", "mcpgate-apps").doc, "spec", "namespaceSelector", "matchExpressions", 0)
	if str(get(excl, "key")) != "kubernetes.io/metadata.name" || str(get(excl, "operator")) != "NotIn" || !slices.Contains(strs(get(excl, "values")), mcpgateNS) {
		t.Errorf("ClusterSPIFFEID mcpgate-apps namespaceSelector %v: want namespace %s excluded (its pods would get mcpgate's ID)", excl, mcpgateNS)
	}
	if _, ok := podLabels[appIDPodLabel]; ok {
		t.Errorf("the mcpgate pods carry %s: ClusterSPIFFEID mcpgate-apps would give them an App's identity", appIDPodLabel)
	}

	grpc, xdsP, admin := listenPort(t, args, "grpc-addr"), listenPort(t, args, "xds-addr"), listenPort(t, args, "admin-addr")
	if grpc != authzPort || xdsP != xdsPort {
		t.Errorf("Deployment mcpgate ports grpc %d xds %d, want %d and %d", grpc, xdsP, authzPort, xdsPort)
	}
	want := []int{grpc, xdsP, admin}
	sort.Ints(want)
	if got := containerPorts(c); !slices.Equal(got, want) {
		t.Errorf("mcpgate containerPorts %v, want the flags' ports %v", got, want)
	}
	svc := find(t, docs, "Service", authzHost)
	if !selects(svc, dep) {
		t.Errorf("Service %s does not select the mcpgate pods", authzHost)
	}
	if ports, targets := servicePorts(svc); !slices.Equal(ports, want) || !slices.Equal(targets, want) {
		t.Errorf("Service %s ports %v -> %v, want %v", authzHost, ports, targets, want)
	}
	for probe, p := range map[string]string{"readinessProbe": "/readyz", "livenessProbe": "/healthz"} {
		g := get(c, probe, "httpGet")
		if str(get(g, "path")) != p || str(get(g, "port")) != strconv.Itoa(admin) {
			t.Errorf("mcpgate %s %v, want GET %s on %d", probe, g, p, admin)
		}
	}
	podSC := get(dep.doc, "spec", "template", "spec", "securityContext")
	if get(podSC, "runAsNonRoot") != true || str(get(podSC, "runAsUser")) != "65532" {
		t.Errorf("mcpgate pod securityContext %v: want runAsNonRoot and runAsUser 65532", podSC)
	}
	if get(c, "securityContext", "readOnlyRootFilesystem") != true || get(c, "securityContext", "allowPrivilegeEscalation") != false {
		t.Errorf("mcpgate container securityContext %v: want readOnlyRootFilesystem, no privilege escalation", c["securityContext"])
	}
	cfg, _ := flagValue(args, "config")
	v := volumeAt(t, dep, c, cfg)
	if str(get(v, "configMap", "name")) != policyCMName {
		t.Errorf("the policy volume is %v, want ConfigMap %s", v, policyCMName)
	}
	// ConfigMap keys are flat: the volume's items must rebuild the shipped policy exactly.
	cm := find(t, docs, "ConfigMap", policyCMName)
	data, _ := cm.doc["data"].(map[string]any)
	got := map[string]string{}
	items, _ := get(v, "configMap", "items").([]any)
	for _, it := range items {
		got[str(get(it, "path"))] = str(data[str(get(it, "key"))])
	}
	if len(items) != len(data) {
		t.Errorf("ConfigMap %s has %d keys, the volume projects %d", policyCMName, len(data), len(items))
	}
	wantFiles := deployedFiles(t)
	for p, content := range wantFiles {
		if g, ok := got[p]; !ok {
			t.Errorf("the policy volume lacks %s (make bootstraps)", p)
		} else if g != content {
			t.Errorf("%s in ConfigMap %s differs from testdata/demo with mcpgate's SPIFFE ID (make bootstraps)", p, policyCMName)
		}
	}
	for p := range got {
		if _, ok := wantFiles[p]; !ok {
			t.Errorf("the policy volume holds %s, which testdata/demo does not", p)
		}
	}
}

func TestKubernetesInventorySidecar(t *testing.T) {
	snap := loadDemo(t)
	docs := k8sDocs(t)
	const id = "inventory"
	app := snap.App(id)
	if app == nil || app.Sidecar == nil {
		t.Fatalf("the demo policy has no App %s with a sidecar", id)
	}
	dep := find(t, docs, "Deployment", id)
	sa := str(get(dep.doc, "spec", "template", "spec", "serviceAccountName"))
	if sa != id {
		t.Errorf("Deployment %s serviceAccountName %q, want the App ID (the SPIFFE ID is derived from it)", id, sa)
	}
	find(t, docs, "ServiceAccount", sa)
	if l := str(get(dep.doc, "spec", "template", "metadata", "labels", "mcpgate.dev/app-id")); l != id {
		t.Errorf("pod label mcpgate.dev/app-id %q, want %q (selected by spire/clusterspiffeid.yaml)", l, id)
	}
	// The ClusterSPIFFEID renders spiffe://<td>/ns/<namespace>/<service account>.
	cs := find(t, docs, "ClusterSPIFFEID", "mcpgate-apps")
	tmpl := str(get(cs.doc, "spec", "spiffeIDTemplate"))
	rendered := strings.NewReplacer("{{ .TrustDomain }}", snap.Mesh.TrustDomain,
		"{{ .PodMeta.Namespace }}", app.Namespace, "{{ .PodSpec.ServiceAccountName }}", sa).Replace(tmpl)
	if rendered != app.SpiffeID {
		t.Errorf("ClusterSPIFFEID template %q gives %q, want %q", tmpl, rendered, app.SpiffeID)
	}

	ec := container(t, dep, "envoy")
	if !strings.HasPrefix(str(ec["image"]), "envoyproxy/envoy:") {
		t.Errorf("envoy container image %q", ec["image"])
	}
	cmd := strs(ec["command"])
	i := slices.Index(cmd, "-c")
	if i < 0 || i+1 >= len(cmd) {
		t.Fatalf("envoy command %q has no -c", cmd)
	}
	v := volumeAt(t, dep, ec, path.Dir(cmd[i+1]))
	if str(get(v, "configMap", "name")) != envoyCMName {
		t.Errorf("the bootstrap volume is %v, want ConfigMap %s", v, envoyCMName)
	}
	key := ""
	items, _ := get(v, "configMap", "items").([]any)
	for _, it := range items {
		if str(get(it, "path")) == path.Base(cmd[i+1]) {
			key = str(get(it, "key"))
		}
	}
	cm := find(t, docs, "ConfigMap", envoyCMName)
	if b := str(get(cm.doc, "data", key)); b != string(readFile(t, filepath.Join(bootstrapDir, id+".yaml"))) {
		t.Errorf("ConfigMap %s key %q differs from envoy/bootstrap/%s.yaml (make bootstraps)", envoyCMName, key, id)
	}
	sv := volumeAt(t, dep, ec, path.Dir(snap.Mesh.SDS.SpireAgentSocket))
	if str(get(sv, "csi", "driver")) != "csi.spiffe.io" {
		t.Errorf("the SPIRE socket volume is %v, want the SPIFFE CSI driver csi.spiffe.io", sv)
	}
	if !slices.Contains(containerPorts(ec), app.Sidecar.InboundPort) {
		t.Errorf("envoy containerPorts %v lack inboundPort %d", containerPorts(ec), app.Sidecar.InboundPort)
	}

	// The app container: port and outbound port as the policy says; no SPIRE socket.
	ac := container(t, dep, "app")
	host, port := hostPort(t, "address", app.Address)
	if !slices.Contains(containerPorts(ac), port) {
		t.Errorf("app containerPorts %v lack %d (address %s)", containerPorts(ac), port, app.Address)
	}
	env := map[string]string{}
	for _, e := range get(ac, "env").([]any) {
		env[str(get(e, "name"))] = str(get(e, "value"))
	}
	if env["PORT"] != strconv.Itoa(port) || env["DAPR_HTTP_PORT"] != strconv.Itoa(app.Sidecar.OutboundPort) {
		t.Errorf("app env PORT=%q DAPR_HTTP_PORT=%q, want %d and %d", env["PORT"], env["DAPR_HTTP_PORT"], port, app.Sidecar.OutboundPort)
	}
	if get(ac, "volumeMounts") != nil {
		t.Error("the app container must not mount the SPIRE socket (nor anything else here)")
	}

	// Services: sidecar.address:inboundPort and address host:port, both to these pods.
	for name, p := range map[string]int{app.Sidecar.Address: app.Sidecar.InboundPort, host: port} {
		svc := find(t, docs, "Service", name)
		if !selects(svc, dep) {
			t.Errorf("Service %s does not select the %s pods", name, id)
		}
		if ports, targets := servicePorts(svc); !slices.Equal(ports, []int{p}) || !slices.Equal(targets, []int{p}) {
			t.Errorf("Service %s ports %v -> %v, want %d", name, ports, targets, p)
		}
	}
	// Only the sidecar's inbound port is open to other pods.
	np := find(t, docs, "NetworkPolicy", id+"-sidecar-only")
	open := map[int]bool{}
	for _, r := range get(np.doc, "spec", "ingress").([]any) {
		if get(r, "from") != nil {
			continue
		}
		for _, p := range get(r, "ports").([]any) {
			n, _ := strconv.Atoi(str(get(p, "port")))
			open[n] = true
		}
	}
	if !reflect.DeepEqual(open, map[int]bool{app.Sidecar.InboundPort: true}) {
		t.Errorf("NetworkPolicy opens %v to everyone, want only inboundPort %d", open, app.Sidecar.InboundPort)
	}
}

// demoFiles maps testdata/demo's files (slash paths) to their contents.
func demoFiles(t *testing.T) map[string]string {
	t.Helper()
	out, err := filesUnder(t, demoDir)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// filesUnder maps the files below dir (slash paths relative to it) to their contents;
// the error is the walk's.
func filesUnder(t *testing.T, dir string) (map[string]string, error) {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		out[filepath.ToSlash(rel)] = string(readFile(t, p))
		return nil
	})
	return out, err
}

// configMapKey flattens a relative path into a ConfigMap key (rego/x.rego -> rego.x.rego).
func configMapKey(p string) string { return strings.ReplaceAll(p, "/", ".") }

// TestKubernetesConfigMaps checks that the generated ConfigMaps are present; with -update
// it writes them from testdata/demo (with mcpgate's SPIFFE ID) and envoy/bootstrap (make
// bootstraps runs that).
func TestKubernetesConfigMaps(t *testing.T) {
	policyCM := configMap(policyCMName, nil,
		"# Generated from testdata/demo by `make bootstraps` (go test ./deploy -update); do not edit.\n"+
			"# The same policy, plus mcpgate's SPIFFE ID in the Mesh (authz.spiffeId) so that every Envoy\n"+
			"# reaches mcpgate over SPIFFE mTLS. Keys are flat; the mcpgate Deployment's volume items\n"+
			"# restore rego/. Edit the policy here (or regenerate) and apply: mcpgate picks it up through\n"+
			"# the kubelet's symlink swap.\n",
		func() map[string]string {
			m := map[string]string{}
			for p, c := range deployedFiles(t) {
				m[configMapKey(p)] = c
			}
			return m
		}())
	envoyCM := configMap(envoyCMName, nil,
		"# Generated from envoy/bootstrap/inventory.yaml by `make bootstraps`; do not edit.\n",
		map[string]string{"bootstrap.yaml": string(readFile(t, filepath.Join(bootstrapDir, "inventory.yaml")))})
	dashboardCM := configMap(dashboardCMName, map[string]string{dashboardCMLabel: "1"},
		"# Generated from deploy/grafana/mcpgate.json by `make bootstraps`; do not edit.\n"+
			"# Grafana's dashboard sidecar (kube-prometheus-stack, grafana chart: sidecar.dashboards,\n"+
			"# label "+dashboardCMLabel+") loads every ConfigMap carrying this label in its namespaces.\n"+
			"# Without the sidecar, import deploy/grafana/mcpgate.json in Grafana's UI.\n",
		map[string]string{"mcpgate.json": string(readFile(t, dashboardPath))})
	for f, want := range map[string][]byte{policyCMFile: policyCM, envoyCMFile: envoyCM, dashboardCMFile: dashboardCM} {
		if *update {
			if err := os.WriteFile(f, want, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if got, err := os.ReadFile(f); err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s is stale or missing: run make bootstraps", f)
		}
	}
}

func configMap(name string, labels map[string]string, header string, data map[string]string) []byte {
	keys := make([]string, 0, len(data))
	for k := range data {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	dn := &yaml.Node{Kind: yaml.MappingNode}
	for _, k := range keys {
		dn.Content = append(dn.Content,
			&yaml.Node{Kind: yaml.ScalarNode, Value: k},
			&yaml.Node{Kind: yaml.ScalarNode, Value: data[k], Style: yaml.LiteralStyle})
	}
	meta := &yaml.Node{Kind: yaml.MappingNode, Content: []*yaml.Node{
		{Kind: yaml.ScalarNode, Value: "name"}, {Kind: yaml.ScalarNode, Value: name},
	}}
	if len(labels) > 0 {
		ln := &yaml.Node{Kind: yaml.MappingNode}
		for _, k := range slices.Sorted(maps.Keys(labels)) {
			ln.Content = append(ln.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: k},
				&yaml.Node{Kind: yaml.ScalarNode, Value: labels[k], Style: yaml.DoubleQuotedStyle})
		}
		meta.Content = append(meta.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: "labels"}, ln)
	}
	doc := &yaml.Node{Kind: yaml.MappingNode, Content: []*yaml.Node{
		{Kind: yaml.ScalarNode, Value: "apiVersion"}, {Kind: yaml.ScalarNode, Value: "v1"},
		{Kind: yaml.ScalarNode, Value: "kind"}, {Kind: yaml.ScalarNode, Value: "ConfigMap"},
		{Kind: yaml.ScalarNode, Value: "metadata"}, meta,
		{Kind: yaml.ScalarNode, Value: "data"}, dn,
	}}
	var buf bytes.Buffer
	buf.WriteString(header)
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(doc); err != nil {
		panic(err)
	}
	_ = enc.Close()
	return buf.Bytes()
}

// The repository root holds what compose builds, and the build context .dockerignore leaves
// is enough to build both images' binaries without the test tree: the files are copied as
// Docker would send them (minus the excluded ones) and built there.
func TestComposeBuildContext(t *testing.T) {
	for _, p := range []string{"Dockerfile", ".dockerignore", "go.mod", "testdata/demo"} {
		if _, err := os.Stat(filepath.Join(root, p)); err != nil {
			t.Error(err)
		}
	}
	var patterns []string
	for _, line := range strings.Split(string(readFile(t, filepath.Join(root, ".dockerignore"))), "\n") {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
			patterns = append(patterns, line)
		}
	}
	// The shipped images are built from product code only.
	if !slices.Contains(patterns, "integration") {
		t.Errorf(".dockerignore does not exclude integration: the images must build without the test tree")
	}
	ctxDir := t.TempDir()
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil || rel == "." {
			return err
		}
		if dockerIgnored(patterns, filepath.ToSlash(rel)) {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(ctxDir, rel), 0o755)
		}
		if !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(ctxDir, rel), b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(ctxDir, "testdata", "demo")); err != nil {
		t.Errorf("the build context lacks testdata/demo, which the image copies: %v", err)
	}
	cmd := exec.Command("go", "build", "-o", os.DevNull, "./cmd/mcpgate", "./cmd/mcpgate-demo")
	cmd.Dir = ctxDir
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=readonly")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("go build ./cmd/mcpgate ./cmd/mcpgate-demo in the .dockerignore'd context: %v\n%s", err, out)
	}
}

// dockerIgnored reports whether rel (slash-separated, relative to the context root) is
// excluded by a .dockerignore pattern: the pattern matches it or one of its parents, and
// a leading **/ matches at any depth.
func dockerIgnored(patterns []string, rel string) bool {
	parts := strings.Split(rel, "/")
	for _, pat := range patterns {
		pat = strings.TrimPrefix(pat, "/")
		anyDepth := strings.HasPrefix(pat, "**/")
		pat = strings.TrimPrefix(pat, "**/")
		n := strings.Count(pat, "/") + 1
		// parts[i:i+n] is the pattern's span: at the root, or anywhere with **/. Matching
		// a parent directory's span excludes everything under it too.
		for i := 0; i+n <= len(parts) && (i == 0 || anyDepth); i++ {
			if ok, _ := path.Match(pat, strings.Join(parts[i:i+n], "/")); ok {
				return true
			}
		}
	}
	return false
}
