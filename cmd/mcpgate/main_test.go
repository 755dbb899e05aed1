package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func run(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	cmd := newRootCmd()
	var out, errb bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errb)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(context.Background())
	var ee *exitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.code
	default:
		code = 1
		errb.WriteString(err.Error())
	}
	return out.String(), errb.String(), code
}

func TestValidateDemo(t *testing.T) {
	out, errOut, code := run(t, "validate", "../../testdata/demo")
	if code != 0 || !strings.HasPrefix(out, "ok: 3 file(s)") || errOut != "" {
		t.Fatalf("code %d, stdout %q, stderr %q", code, out, errOut)
	}
}

func TestValidateReportsFileLine(t *testing.T) {
	dir := t.TempDir()
	demo, err := os.ReadFile("../../testdata/demo/mesh.yaml")
	if err != nil {
		t.Fatal(err)
	}
	bad := strings.Replace(string(demo), "  mtls: strict\n", "  mtls: strict\n  mTLS: strict\n  colour: blue\n", 1)
	if err := os.WriteFile(filepath.Join(dir, "mesh.yaml"), []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	out, errOut, code := run(t, "validate", dir)
	if code != 1 || out != "" {
		t.Fatalf("code %d, stdout %q", code, out)
	}
	lines := strings.Split(strings.TrimSpace(errOut), "\n")
	want := []string{
		filepath.Join(dir, "mesh.yaml") + `:10: spec: unknown field "mTLS" (did you mean "mtls"?)`,
		filepath.Join(dir, "mesh.yaml") + `:11: spec: unknown field "colour"`,
		"2 problem(s)",
	}
	if strings.Join(lines, "\n") != strings.Join(want, "\n") {
		t.Fatalf("stderr:\n%s\nwant:\n%s", errOut, strings.Join(want, "\n"))
	}
}

func TestValidateMissingDirectory(t *testing.T) {
	_, errOut, code := run(t, "validate", filepath.Join(t.TempDir(), "nope"))
	if code != 1 || !strings.Contains(errOut, "no such file or directory") {
		t.Fatalf("code %d, stderr %q", code, errOut)
	}
}

func TestVersion(t *testing.T) {
	out, _, code := run(t, "version")
	if code != 0 || !strings.HasPrefix(out, "mcpgate dev (commit unknown, go") {
		t.Fatalf("code %d, out %q", code, out)
	}
}

func TestRenderDemo(t *testing.T) {
	out, errOut, code := run(t, "render", "--app", "inventory", "--config", "../../testdata/demo")
	if code != 0 {
		t.Fatalf("code %d, stderr %q", code, errOut)
	}
	for _, want := range []string{"listeners:", "envoy.filters.http.ext_authz", "envoy.filters.http.ext_proc", "app_id: inventory", "clusters:", "/.well-known/oauth-protected-resource/mcp"} {
		if !strings.Contains(out, want) {
			t.Errorf("render output lacks %q", want)
		}
	}
	_, errOut, code = run(t, "render", "--app", "nope", "--config", "../../testdata/demo")
	if code == 0 || !strings.Contains(errOut, "nope") {
		t.Fatalf("unknown app: code %d, stderr %q", code, errOut)
	}
}

func TestBootstrap(t *testing.T) {
	out, errOut, code := run(t, "bootstrap", "--app", "my-agent", "--xds-address", "mcpgate:18000")
	if code != 0 {
		t.Fatalf("code %d, stderr %q", code, errOut)
	}
	for _, want := range []string{"cluster: my-agent", "ads_config:", "port_value: 18000", "admin:"} {
		if !strings.Contains(out, want) {
			t.Errorf("bootstrap lacks %q:\n%s", want, out)
		}
	}
	if _, _, code := run(t, "bootstrap", "--app", "my-agent", "--xds-address", "no-port"); code == 0 {
		t.Fatal("a bad --xds-address was accepted")
	}
}

// TestBootstrapXDSOverMTLS: when the Mesh names mcpgate's SPIFFE ID and certificates come
// from SPIRE, the ADS cluster presents the Envoy's SVID and accepts only mcpgate's.
func TestBootstrapXDSOverMTLS(t *testing.T) {
	out, errOut, code := run(t, "bootstrap", "--app", "inventory", "--xds-address", "mcpgate:18000", "--config", "../../testdata/xds/authz-mtls")
	if code != 0 {
		t.Fatalf("code %d, stderr %q", code, errOut)
	}
	for _, want := range []string{"UpstreamTlsContext", "spiffe://example.org/ns/default/inventory", "exact: spiffe://example.org/ns/mcpgate/mcpgate"} {
		if !strings.Contains(out, want) {
			t.Errorf("bootstrap lacks %q:\n%s", want, out)
		}
	}
	// The demo names no mcpgate identity: plaintext ADS, as before.
	out, _, _ = run(t, "bootstrap", "--app", "inventory", "--xds-address", "mcpgate:18000", "--config", "../../testdata/demo")
	if strings.Contains(out, "UpstreamTlsContext") {
		t.Error("ADS over TLS without authz.spiffeId")
	}
}
