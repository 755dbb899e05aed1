//go:build integration

package integration

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/integration/envoyemu"
	"github.com/mcpgate/mcpgate/integration/testpki"
)

// spireVersion is the SPIRE release the suite runs, built from the pinned tools module
// integration/tools/spire into bin/spire-{server,agent}-<version> (make spire).
const spireVersion = "v1.15.3"

// svidTTL is the X509-SVID lifetime of the test's registration entries: short, so that
// the agent rotates them (at half their lifetime) while a session is open.
const svidTTL = 20 * time.Second

var (
	spireBuildOnce sync.Once
	spireBuildErr  error
)

// spireBinaries returns bin/spire-server-<v> and bin/spire-agent-<v>, building them
// (as `make spire` does) when absent. A cold build takes minutes: if it cannot finish
// within the test's deadline the test is skipped, and the build cache keeps its progress.
func spireBinaries(t *testing.T) (server, agent string) {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	server = filepath.Join(root, "bin", "spire-server-"+spireVersion)
	agent = filepath.Join(root, "bin", "spire-agent-"+spireVersion)
	spireBuildOnce.Do(func() {
		ctx := context.Background()
		if dl, ok := t.Deadline(); ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithDeadline(ctx, dl.Add(-90*time.Second))
			defer cancel()
		}
		for name, out := range map[string]string{"spire-server": server, "spire-agent": agent} {
			if _, err := os.Stat(out); err == nil {
				continue
			}
			start := time.Now()
			cmd := exec.CommandContext(ctx, "go", "build", "-o", out+".tmp", "github.com/spiffe/spire/cmd/"+name)
			cmd.Dir = filepath.Join(root, "integration", "tools", "spire")
			var buf bytes.Buffer
			cmd.Stdout, cmd.Stderr = &buf, &buf
			if err := cmd.Run(); err != nil {
				if ctx.Err() != nil {
					spireBuildErr = fmt.Errorf("building %s did not finish before the test deadline (run make spire): %w", name, ctx.Err())
				} else {
					spireBuildErr = fmt.Errorf("go build %s: %v\n%s", name, err, buf.String())
				}
				return
			}
			if spireBuildErr = os.Rename(out+".tmp", out); spireBuildErr != nil {
				return
			}
			t.Logf("built %s in %s", out, time.Since(start).Round(time.Second))
		}
	})
	if spireBuildErr != nil {
		// make test-integration builds SPIRE first (make spire), so this only fails when
		// go test runs alone on a cold cache; it says what to run rather than skipping.
		t.Fatal(spireBuildErr)
	}
	return server, agent
}

// spire is a SPIRE server and agent on loopback: join-token attestation, sqlite
// datastore, in-memory keys, trust domain example.org, the unix workload attestor.
type spire struct {
	server, agent string // binaries
	dir           string
	serverSock    string // server API (registration)
	agentSock     string // Workload API and SDS
}

const spireAgentID = "spiffe://example.org/agent"

// spireProc runs one SPIRE process until the test ends, its output kept for failures.
func spireProc(t *testing.T, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	var mu sync.Mutex
	var buf bytes.Buffer
	w := writerFunc(func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return buf.Write(p) })
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		if t.Failed() {
			mu.Lock()
			t.Logf("%s output:\n%s", filepath.Base(name), buf.String())
			mu.Unlock()
		}
	})
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// startSPIRE starts the server, waits for it to be healthy, mints a join token, starts
// the agent with it and waits for the agent to be healthy.
func startSPIRE(t *testing.T) *spire {
	t.Helper()
	s := &spire{dir: t.TempDir()}
	s.server, s.agent = spireBinaries(t)
	s.serverSock = filepath.Join(s.dir, "s.sock")
	s.agentSock = filepath.Join(s.dir, "a.sock")
	port := freePort(t)
	serverConf := fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port = "%d"
  socket_path = %q
  trust_domain = "example.org"
  data_dir = %q
  log_level = "DEBUG"
  ca_ttl = "24h"
  default_x509_svid_ttl = "1m"
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = %q
    }
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "memory" {
    plugin_data {}
  }
}
`, port, s.serverSock, filepath.Join(s.dir, "server"), filepath.Join(s.dir, "datastore.sqlite3"))
	agentConf := fmt.Sprintf(`agent {
  data_dir = %q
  log_level = "DEBUG"
  server_address = "127.0.0.1"
  server_port = "%d"
  socket_path = %q
  trust_domain = "example.org"
  insecure_bootstrap = true
}
plugins {
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "memory" {
    plugin_data {}
  }
  WorkloadAttestor "unix" {
    plugin_data {
      discover_workload_path = true
    }
  }
}
`, filepath.Join(s.dir, "agent"), port, s.agentSock)
	for name, conf := range map[string]string{"server.conf": serverConf, "agent.conf": agentConf} {
		if err := os.WriteFile(filepath.Join(s.dir, name), []byte(conf), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	spireProc(t, s.server, "run", "-config", filepath.Join(s.dir, "server.conf"))
	requireEventually(t, 30*time.Second, "the SPIRE server to be healthy", func() bool {
		return exec.Command(s.server, "healthcheck", "-socketPath", s.serverSock).Run() == nil
	})
	out := s.serverCmd(t, "token", "generate", "-spiffeID", spireAgentID, "-ttl", "600")
	m := regexp.MustCompile(`Token: (\S+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("token generate: %s", out)
	}
	spireProc(t, s.agent, "run", "-config", filepath.Join(s.dir, "agent.conf"), "-joinToken", m[1])
	requireEventually(t, 30*time.Second, "the SPIRE agent to be healthy", func() bool {
		return exec.Command(s.agent, "healthcheck", "-socketPath", s.agentSock).Run() == nil
	})
	return s
}

func (s *spire) serverCmd(t *testing.T, args ...string) string {
	t.Helper()
	args = append(args, "-socketPath", s.serverSock)
	out, err := exec.Command(s.server, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("spire-server %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// register creates an entry for id, selected by this user and the workload's executable:
// the emulated sidecars run inside the test binary, each asking SDS for its own SPIFFE ID,
// and mcpgate runs its own binary, so it is given only its own SVID by the Workload API.
func (s *spire) register(t *testing.T, id, executable string) {
	t.Helper()
	path, err := filepath.EvalSymlinks(executable)
	if err != nil {
		t.Fatal(err)
	}
	s.serverCmd(t, "entry", "create", "-parentID", spireAgentID, "-spiffeID", id,
		"-selector", "unix:uid:"+strconv.Itoa(os.Getuid()), "-selector", "unix:path:"+path,
		"-x509SVIDTTL", strconv.Itoa(int(svidTTL/time.Second)))
}

// svid fetches id's SVID from the agent's SDS API as a TLS certificate.
func (s *spire) svid(t *testing.T, id string) tls.Certificate {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sec, err := s.fetch(ctx, id)
	if err != nil {
		t.Fatalf("SVID %s: %v", id, err)
	}
	tc := sec.GetTlsCertificate()
	c, err := tls.X509KeyPair(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes())
	if err != nil {
		t.Fatalf("SVID %s: %v", id, err)
	}
	return c
}

// fetch asks the agent's SDS API for one secret, as this process.
func (s *spire) fetch(ctx context.Context, name string) (*tlsv3.Secret, error) {
	conn, err := grpc.NewClient("unix://"+s.agentSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	resp, err := secretv3.NewSecretDiscoveryServiceClient(conn).FetchSecrets(ctx, &discoveryv3.DiscoveryRequest{
		Node: &corev3.Node{Id: "probe", Cluster: "probe"}, TypeUrl: resource.SecretType, ResourceNames: []string{name},
	})
	if err != nil {
		return nil, err
	}
	for _, a := range resp.GetResources() {
		var sec tlsv3.Secret
		if err := a.UnmarshalTo(&sec); err != nil {
			return nil, err
		}
		if sec.GetName() == name {
			return &sec, nil
		}
	}
	return nil, fmt.Errorf("no secret %q in the response", name)
}

// gateID is mcpgate's SPIFFE ID in the SPIRE mesh (the Mesh's authz.spiffeId).
const gateID = "spiffe://example.org/ns/mcpgate/mcpgate"

// startSPIREMesh is startMeshWith with every certificate from SPIRE: the demo's
// mtls: strict and sds.spireAgentSocket (pointed at the test's agent) for the sidecars,
// authz.spiffeId with `mcpgate serve --spiffe-socket` for mcpgate's ext_authz, ext_proc
// and xDS listeners, and each emulated Envoy started from `mcpgate bootstrap` output, so
// that it reaches xDS over SPIFFE mTLS exactly as that bootstrap tells Envoy to.
func startSPIREMesh(t *testing.T, sp *spire) *mesh {
	t.Helper()
	m := &mesh{iss: bearertest.NewIssuer(t)}
	m.app = startMCPApp(t, mcpapp.Options{DisableLocalhostProtection: true})
	m.meshPolicy(t, "strict")
	mesh := filepath.Join(m.dir, "mesh.yaml")
	replaceInFile(t, mesh, "spireAgentSocket: /run/spire/agent.sock", "spireAgentSocket: "+sp.agentSock)
	replaceInFile(t, mesh, "address: "+m.addrs.grpc, "address: "+m.addrs.grpc+"\n    spiffeId: "+gateID)
	m.gate = startGate(t, m.dir, "--shutdown-timeout", "2s",
		"--grpc-addr", m.addrs.grpc, "--xds-addr", m.addrs.xds, "--admin-addr", m.addrs.admin,
		"--spiffe-socket", "unix://"+sp.agentSock, "--allowed-client-ids", spiffeID("inventory")+","+spiffeID("my-agent"))
	m.inventory = m.startSPIREEmulator(t, "inventory")
	m.agent = m.startSPIREEmulator(t, "my-agent")
	m.invokeURL = "http://" + m.agent.Listener("outbound") + "/v1.0/invoke/inventory/method/mcp"
	return m
}

// bootstrap is `mcpgate bootstrap` for app, parsed as Envoy reads it.
func (m *mesh) bootstrap(t *testing.T, app string) *bootstrapv3.Bootstrap {
	t.Helper()
	out, err := exec.Command(mcpgateBin, "bootstrap", "--app", app, "--node-id", app+"-1",
		"--xds-address", m.addrs.xds, "--config", m.dir).Output()
	if err != nil {
		t.Fatalf("mcpgate bootstrap --app %s: %v", app, err)
	}
	var doc any
	if err := yaml.Unmarshal(out, &doc); err != nil {
		t.Fatal(err)
	}
	js, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	var b bootstrapv3.Bootstrap
	if err := protojson.Unmarshal(js, &b); err != nil {
		t.Fatalf("bootstrap for %s: %v\n%s", app, err, out)
	}
	return &b
}

func (m *mesh) startSPIREEmulator(t *testing.T, app string) *envoyemu.Emulator {
	t.Helper()
	return m.runEmulator(t, app, 30*time.Second, envoyemu.Options{Bootstrap: m.bootstrap(t, app)})
}

// tlsPost sends one MCP initialize to addr over TLS with certs (the server's certificate
// is not checked: the tests look at it instead); it returns the HTTP status and body, or
// the error of a refused handshake.
func tlsPost(t *testing.T, addr, auth string, certs ...tls.Certificate) (int, string, error) {
	t.Helper()
	_, code, body, err := tlsExchange(t, addr, auth, certs...)
	return code, body, err
}

// handshake connects to inventory's inbound listener with certs and sends one MCP
// initialize; it returns the server's leaf certificate and the HTTP status, or the
// error of a refused handshake.
func handshake(t *testing.T, addr, auth string, certs ...tls.Certificate) (*x509.Certificate, int, error) {
	t.Helper()
	leaf, code, _, err := tlsExchange(t, addr, auth, certs...)
	return leaf, code, err
}

func tlsExchange(t *testing.T, addr, auth string, certs ...tls.Certificate) (*x509.Certificate, int, string, error) {
	t.Helper()
	var leaf *x509.Certificate
	tr := &http.Transport{TLSClientConfig: &tls.Config{
		Certificates: certs, InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			var err error
			leaf, err = x509.ParseCertificate(raw[0])
			return err
		},
	}}
	defer tr.CloseIdleConnections()
	req := mcpPost(t, "https://"+addr+"/mcp", auth, initialize)
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		return leaf, 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return leaf, resp.StatusCode, string(b), nil
}

// TestSPIRE runs the mesh over SVIDs issued by a real SPIRE server and agent (v1.15.3):
// the emulated sidecars, started from `mcpgate bootstrap`, take their certificates and
// the trust bundle from the agent's SDS API, named as mcpgate's translation names them
// for spireAgentSocket; mcpgate takes its own SVID from the agent's Workload API, and
// every connection (sidecar to sidecar, sidecar to ext_authz/ext_proc, sidecar to xDS) is
// SPIFFE mTLS. The SPIRE scenarios run first, then every end-to-end scenario.
func TestSPIRE(t *testing.T) {
	if envoyBin != "" {
		t.Skip("real Envoy on one host: SPIRE would give both sidecars the same selectors; emulator only")
	}
	start := time.Now()
	sp := startSPIRE(t)
	agentUp := time.Now()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, app := range []string{"inventory", "my-agent", "stranger"} {
		sp.register(t, spiffeID(app), self)
	}
	sp.register(t, gateID, mcpgateBin)
	// Poll until the agent has synced the entries and holds the SVIDs (about 5 s after
	// the agent starts).
	requireEventually(t, 45*time.Second, "the agent to serve the SVIDs over SDS", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for _, id := range []string{spiffeID("inventory"), spiffeID("my-agent"), spiffeID("stranger"), "spiffe://example.org"} {
			if _, err := sp.fetch(ctx, id); err != nil {
				return false
			}
		}
		return true
	})
	t.Logf("SPIRE: server and agent healthy after %s; SVIDs served %s after that",
		agentUp.Sub(start).Round(100*time.Millisecond), time.Since(agentUp).Round(100*time.Millisecond))
	// The bundle comes as Envoy's SPIFFE certificate validator (SPIRE's answer to an
	// Envoy ≥ 1.18, or one that does not say its version), which the emulator applies.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if b, err := sp.fetch(ctx, "spiffe://example.org"); err != nil ||
		b.GetValidationContext().GetCustomValidatorConfig().GetName() != "envoy.tls.cert_validator.spiffe" {
		t.Fatalf("bundle secret %v (%v)", b, err)
	}
	// Selected by its executable, the test process is not given mcpgate's SVID.
	if _, err := sp.fetch(ctx, gateID); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("SDS for mcpgate's ID from the test process: %v", err)
	}
	m := startSPIREMesh(t, sp)
	stranger := sp.svid(t, spiffeID("stranger"))
	m.stranger = &stranger
	in := m.inventory.Listener("inbound")

	// The SVID inventory's listener serves is the one SPIRE issued for inventory.
	leaf, _, _ := handshake(t, in, "")
	if leaf == nil || len(leaf.URIs) != 1 || leaf.URIs[0].String() != spiffeID("inventory") {
		t.Fatalf("inventory's listener serves %v", leaf)
	}

	s := m.connect(t, m.invokeURL, map[string]string{"Authorization": m.token(t, map[string]any{"azp": "stranger"})})
	call := func(t *testing.T) {
		t.Helper()
		res, err := s.CallTool(callCtx(t), "get_inventory", map[string]any{"product_id": "SKU-42"})
		if err != nil || res.IsError {
			t.Fatalf("get_inventory through both sidecars: %v %v", err, res)
		}
		calls := m.app.Calls()
		last := calls[len(calls)-1]
		if got := last.Header.Get(contract.HeaderCallerAppID); last.Tool != "get_inventory" || got != "my-agent" {
			t.Fatalf("the server saw tool %q from caller %q, want my-agent", last.Tool, got)
		}
	}

	t.Run("allowed call over SPIRE-issued mTLS names the attested caller", func(t *testing.T) {
		// The token's azp says "stranger", whom inventory refuses: the caller that
		// reaches policy is my-agent, from the SVID SPIRE issued to its sidecar.
		call(t)
		// The decision was made by mcpgate, reached over mTLS with inventory's SVID. The
		// decision log is written off the request path: poll for the line.
		requireEventually(t, 10*time.Second, "a decision for my-agent's SVID in mcpgate's log", func() bool {
			return m.gate.logs.count(func(l map[string]any) bool {
				return l["msg"] == "authz decision" && l["caller"] == "my-agent" && l["spiffe_id"] == spiffeID("my-agent")
			}) > 0
		})
	})

	t.Run("a workload with no registration entry cannot call", func(t *testing.T) {
		calls := len(m.app.Requests())
		// SPIRE gives no SVID for an identity the workload has no entry for.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := sp.fetch(ctx, spiffeID("nobody"))
		if status.Code(err) != codes.InvalidArgument {
			t.Fatalf("SDS for an unregistered ID: %v", err)
		}
		// Without an SVID: no client certificate, or one SPIRE never issued (a CA of
		// its own, even naming my-agent), is refused at the handshake.
		ca := testpki.NewCA(t, "example.org")
		for name, certs := range map[string][]tls.Certificate{
			"no certificate":            nil,
			"a certificate not SPIRE's": {ca.TLSCert(t, spiffeID("my-agent"))},
		} {
			if _, code, err := handshake(t, in, m.token(t, nil), certs...); err == nil {
				t.Fatalf("%s: got HTTP %d, want a failed handshake", name, code)
			}
		}
		if len(m.app.Requests()) != calls {
			t.Fatal("the call reached the server")
		}
	})

	t.Run("a certificate from another trust domain is refused at the handshake", func(t *testing.T) {
		calls := len(m.app.Requests())
		foreign := testpki.NewCA(t, "evil.example")
		if _, code, err := handshake(t, in, m.token(t, nil), foreign.TLSCert(t, "spiffe://evil.example/ns/default/my-agent")); err == nil {
			t.Fatalf("got HTTP %d, want a failed handshake", code)
		}
		if len(m.app.Requests()) != calls {
			t.Fatal("the call reached the server")
		}
	})

	t.Run("mcpgate admits only the Envoys on its allow-list", func(t *testing.T) {
		// The stranger holds a valid SVID of the trust domain, but it is not an Envoy
		// that --allowed-client-ids names: neither ext_authz nor xDS will talk to it.
		for _, addr := range []string{m.addrs.grpc, m.addrs.xds} {
			conn, err := tls.Dial("tcp", addr, &tls.Config{Certificates: []tls.Certificate{stranger}, InsecureSkipVerify: true, NextProtos: []string{"h2"}})
			if err == nil {
				// TLS 1.3: the server's verdict on the client certificate comes with the
				// first read.
				_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
				_, err = conn.Read(make([]byte, 1))
				conn.Close()
			}
			if err == nil || !strings.Contains(err.Error(), "certificate") && !strings.Contains(err.Error(), "tls") {
				t.Fatalf("%s: the stranger's connection was not refused (%v)", addr, err)
			}
		}
	})

	t.Run("SVID rotation during an open session", func(t *testing.T) {
		before, _, _ := handshake(t, in, "")
		if before == nil {
			t.Fatal("no server certificate")
		}
		// The agent renews an SVID at half its lifetime; wait until inventory's
		// listener serves a new one (bounded by two lifetimes).
		var after *x509.Certificate
		requireEventually(t, 2*svidTTL+10*time.Second, "inventory's SVID to rotate", func() bool {
			after, _, _ = handshake(t, in, "")
			return after != nil && after.SerialNumber.Cmp(before.SerialNumber) != 0
		})
		t.Logf("inventory's SVID rotated: serial %x (until %s) → %x (until %s)", before.SerialNumber, before.NotAfter.Format(time.TimeOnly),
			after.SerialNumber, after.NotAfter.Format(time.TimeOnly))
		if after.URIs[0].String() != spiffeID("inventory") {
			t.Fatalf("rotated SVID names %v", after.URIs)
		}
		// The open session keeps working, and so does a new one (new handshakes with
		// the rotated SVIDs on both sides).
		call(t)
		s = m.connect(t, m.invokeURL, map[string]string{"Authorization": m.token(t, nil)})
		call(t)
	})

	t.Run("end to end", func(t *testing.T) {
		// The stranger's SVID was issued before the rotation wait; take a fresh one.
		fresh := sp.svid(t, spiffeID("stranger"))
		m.stranger = &fresh
		runEndToEnd(t, m)
	})
}
