package deploy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"net"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"testing/fstest"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"go.yaml.in/yaml/v3"

	"github.com/mcpgate/mcpgate/policy"
	"github.com/mcpgate/mcpgate/xds"
)

// The shipped deployments (docker-compose.yaml, deploy/kubernetes, the Dockerfile's CMD)
// run mcpgate's gRPC listeners over SPIFFE mTLS (serve --spiffe-socket), never plaintext
// beyond loopback: whoever reaches a plaintext xDS server reads every Envoy's
// configuration, and whoever reaches ext_authz/ext_proc drives decisions in other
// callers' names. The policy they serve is testdata/demo with mcpgate's SPIFFE ID in the
// Mesh (authz.spiffeId), which is what makes every Envoy's mcpgate cluster, and the
// bootstraps' xds_cluster, present the Envoy's SVID and accept only mcpgate's.

// mcpgateIDPath is the path of mcpgate's SPIFFE ID in the shipped deployments (the form
// README.md and the SPIRE integration test use): compose's registration entry and the
// Kubernetes ClusterSPIFFEID mcpgate issue it.
const mcpgateIDPath = "/ns/mcpgate/mcpgate"

// mcpgateSpiffeID is mcpgate's SPIFFE ID in snap's trust domain.
func mcpgateSpiffeID(snap *policy.Snapshot) string {
	return "spiffe://" + snap.Mesh.TrustDomain + mcpgateIDPath
}

// deployedEdits returns testdata/demo's files with mcpgate's SPIFFE ID added to the Mesh's
// authz block (right after authz.address), and why each changed file differs, for the
// header generatedHeader writes.
func deployedEdits(t *testing.T, snap *policy.Snapshot) (files map[string]string, reasons map[string][]string) {
	t.Helper()
	if snap.Mesh.AuthzSpiffeID != "" {
		t.Fatalf("testdata/demo names authz.spiffeId %s already: drop the edit here", snap.Mesh.AuthzSpiffeID)
	}
	files = demoFiles(t)
	reasons = map[string][]string{}
	found := 0
	for name, content := range files {
		lines := strings.SplitAfter(content, "\n")
		for i, l := range lines {
			key, val, ok := strings.Cut(strings.TrimSpace(l), ": ")
			if !ok || key != "address" || val != snap.Mesh.AuthzAddress {
				continue
			}
			indent := l[:len(l)-len(strings.TrimLeft(l, " "))]
			lines[i] = l + indent + "spiffeId: " + mcpgateSpiffeID(snap) + "\n"
			found++
			files[name] = strings.Join(lines, "")
			reasons[name] = append(reasons[name], "authz.spiffeId: mcpgate's SPIFFE ID, so that every Envoy reaches mcpgate (ext_authz,\n"+
				"ext_proc and xDS) over SPIFFE mTLS, as the shipped mcpgate serves them (--spiffe-socket).")
			break
		}
	}
	if found != 1 {
		t.Fatalf("testdata/demo: found authz.address %s %d times, want once", snap.Mesh.AuthzAddress, found)
	}
	return files, reasons
}

// deployedFiles is the policy the Kubernetes base ships (ConfigMap mcpgate-policy):
// deployedEdits with their headers.
func deployedFiles(t *testing.T) map[string]string {
	t.Helper()
	files, reasons := deployedEdits(t, loadDemo(t))
	for name, why := range reasons {
		files[name] = generatedHeader(name, "make bootstraps", why, "Lasting changes belong in testdata/demo.") + files[name]
	}
	return files
}

// generatedHeader is the comment heading a generated copy of testdata/demo/<name>.
func generatedHeader(name, by string, reasons []string, tail string) string {
	var b strings.Builder
	b.WriteString("# Generated from testdata/demo/" + name + " by `" + by + "`.\n# It differs only in:\n")
	for _, r := range reasons {
		b.WriteString("#   - " + strings.ReplaceAll(r, "\n", "\n#     ") + "\n")
	}
	b.WriteString("# " + strings.ReplaceAll(tail, "\n", "\n# ") + "\n")
	return b.String()
}

// loadDeployed loads deployedFiles as mcpgate does.
func loadDeployed(t *testing.T) *policy.Snapshot {
	t.Helper()
	fsys := fstest.MapFS{}
	for name, content := range deployedFiles(t) {
		fsys[name] = &fstest.MapFile{Data: []byte(content), Mode: 0o644}
	}
	snap, err := policy.Load(context.Background(), fsys, "deployed")
	if err != nil {
		t.Fatalf("the shipped demo policy: %v", err)
	}
	return snap
}

// sidecarIDs are the SPIFFE IDs of every Envoy snap programs: the Apps' sidecars and the
// Gateways, sorted.
func sidecarIDs(snap *policy.Snapshot) []string {
	var out []string
	for _, app := range snap.Apps {
		if app.Sidecar != nil {
			out = append(out, app.SpiffeID)
		}
	}
	for _, gw := range snap.Gateways {
		out = append(out, xds.GatewaySpiffeID(snap.Mesh.TrustDomain, gw))
	}
	sort.Strings(out)
	return out
}

// serveDefaults are serve's listener defaults (cmd/mcpgate/serve.go), for args that omit
// a flag.
var serveDefaults = map[string]string{"grpc-addr": "127.0.0.1:9001", "xds-addr": "127.0.0.1:18000"}

// loopbackAddr is the rule of serve's checkListenSecurity: a loopback IP or localhost.
func loopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return strings.EqualFold(host, "localhost") || ip != nil && ip.IsLoopback()
}

// checkServeTLS checks the arguments of a shipped `mcpgate serve`: SPIFFE mTLS from the
// SPIRE agent socket the sidecars use, the allow-list exactly the Envoys of snap (the
// policy it serves), no gRPC listener plaintext beyond loopback, no --insecure-listen.
func checkServeTLS(t *testing.T, where string, args []string, snap *policy.Snapshot) {
	t.Helper()
	sock, tlsOn := flagValue(args, "spiffe-socket")
	agentSock := snap.Mesh.SDS.SpireAgentSocket
	if !tlsOn || sock != "unix://"+agentSock && sock != agentSock {
		t.Errorf("%s: --spiffe-socket %q, want unix://%s (the SPIRE agent socket of the sidecars, sds.spireAgentSocket)", where, sock, agentSock)
	}
	ids, _ := flagValue(args, "allowed-client-ids")
	var got []string
	for id := range strings.SplitSeq(ids, ",") {
		if id = strings.TrimSpace(id); id != "" {
			got = append(got, id)
		}
	}
	sort.Strings(got)
	if want := sidecarIDs(snap); len(want) == 0 || !slices.Equal(got, want) {
		t.Errorf("%s: --allowed-client-ids %q, want exactly the SPIFFE IDs of the policy's sidecars %v", where, ids, want)
	}
	for _, a := range args {
		if a == "--insecure-listen" || strings.HasPrefix(a, "--insecure-listen=") {
			t.Errorf("%s: %s: a shipped mcpgate never accepts plaintext beyond loopback", where, a)
		}
	}
	for _, f := range []string{"grpc-addr", "xds-addr"} {
		addr, ok := flagValue(args, f)
		if !ok {
			addr = serveDefaults[f]
		}
		if addr != "" && !loopbackAddr(addr) && sock == "" {
			t.Errorf("%s: --%s %s binds beyond loopback without TLS", where, f, addr)
		}
	}
}

// checkEnvoysUseMTLS checks that snap makes every Envoy reach mcpgate over SPIFFE mTLS:
// it names mcpgate's SPIFFE ID, and the mcpgate cluster of each sidecar (those of Apps
// serving MCP; an agent's has none) presents that sidecar's SVID and accepts only
// mcpgate's. The bootstraps' xds_cluster is TestComposeMcpgate's.
func checkEnvoysUseMTLS(t *testing.T, where string, snap *policy.Snapshot) {
	t.Helper()
	if got, want := snap.Mesh.AuthzSpiffeID, mcpgateSpiffeID(snap); got != want {
		t.Fatalf("%s: Mesh authz.spiffeId %q, want %s: without it the Envoys reach ext_authz/ext_proc in plaintext, which the shipped mcpgate refuses", where, got, want)
	}
	for id, app := range snap.Apps {
		if app.Sidecar == nil {
			continue
		}
		res, err := xds.Translate(snap, id)
		if err != nil {
			t.Fatalf("%s: translate %s: %v", where, id, err)
		}
		var found bool
		for _, cl := range res.Clusters {
			if cl.GetName() != xds.ClusterAuthz {
				continue
			}
			found = true
			var tc tlsv3.UpstreamTlsContext
			if ts := cl.GetTransportSocket(); ts == nil || ts.GetTypedConfig().UnmarshalTo(&tc) != nil {
				t.Errorf("%s: App %s's %s cluster is plaintext", where, id, xds.ClusterAuthz)
				continue
			}
			checkUpstreamMTLS(t, where+": App "+id+"'s "+xds.ClusterAuthz+" cluster", &tc, app.SpiffeID, snap.Mesh.AuthzSpiffeID)
		}
		if !found && app.MCP != nil {
			t.Errorf("%s: App %s serves MCP but has no %s cluster", where, id, xds.ClusterAuthz)
		}
	}
}

// checkUpstreamMTLS checks an Envoy UpstreamTlsContext: it presents the SVID self (an SDS
// secret named by the SPIFFE ID, SPIRE's naming) and accepts only the server ID.
func checkUpstreamMTLS(t *testing.T, where string, tc *tlsv3.UpstreamTlsContext, self, server string) {
	t.Helper()
	ctx := tc.GetCommonTlsContext()
	certs := ctx.GetTlsCertificateSdsSecretConfigs()
	if len(certs) != 1 || certs[0].GetName() != self {
		t.Errorf("%s presents %v, want the SVID %s", where, certs, self)
	}
	sans := ctx.GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames()
	if len(sans) != 1 || sans[0].GetMatcher().GetExact() != server {
		t.Errorf("%s accepts %v, want exactly %s", where, sans, server)
	}
}

// TestDeployedPolicy: the policy the shipped deployments serve has every Envoy reach
// mcpgate over SPIFFE mTLS; the one testdata/demo is (the embedded demo, the loopback
// tests) does not, which is why the deployments carry their own copy.
func TestDeployedPolicy(t *testing.T) {
	checkEnvoysUseMTLS(t, "the Kubernetes policy ConfigMap", loadDeployed(t))
	snap, _, _ := composeApps(t)
	checkEnvoysUseMTLS(t, "deploy/compose/policy", snap)
	if id := loadDemo(t).Mesh.AuthzSpiffeID; id != "" {
		t.Errorf("testdata/demo names authz.spiffeId %s: the plaintext loopback demo and tests would need mTLS", id)
	}
}

// TestNoShippedInsecureListen: no shipped file starts mcpgate with --insecure-listen, in
// any command, argument or value (comments may explain the flag).
func TestNoShippedInsecureListen(t *testing.T) {
	var walk func(where string, v any)
	walk = func(where string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				walk(where, k)
				walk(where, x)
			}
		case []any:
			for _, x := range v {
				walk(where, x)
			}
		case string:
			if strings.Contains(v, "insecure-listen") {
				t.Errorf("%s: %q", where, v)
			}
		}
	}
	var files []string
	files = append(files, composeFile)
	err := filepath.WalkDir(".", func(p string, e fs.DirEntry, err error) error {
		if err == nil && !e.IsDir() && (strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) {
			files = append(files, p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		// Any YAML, not only mappings: a JSON patch (kubernetes/ha) is a list.
		dec := yaml.NewDecoder(bytes.NewReader(readFile(t, f)))
		for {
			var d any
			if err := dec.Decode(&d); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			walk(f, d)
		}
	}
	for i, line := range strings.Split(string(readFile(t, dockerfile)), "\n") {
		if l := strings.TrimSpace(line); !strings.HasPrefix(l, "#") && strings.Contains(l, "insecure-listen") {
			t.Errorf("Dockerfile:%d: %s", i+1, l)
		}
	}
	if len(files) < 3 {
		t.Fatalf("scanned only %v", files)
	}
}
