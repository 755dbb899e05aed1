package main

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"sort"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/mcpgate/mcpgate/extproc"
	"github.com/mcpgate/mcpgate/extproc/ratelimit"
	"github.com/mcpgate/mcpgate/policy"
)

// telemetry owns the OpenTelemetry meter and the Prometheus registry it exports into.
// A private registry (not the global one) keeps tests and multiple servers independent.
type telemetry struct {
	registry *prometheus.Registry
	meter    metric.Meter
}

func newTelemetry() (*telemetry, error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	exp, err := otelprom.New(otelprom.WithRegisterer(reg), otelprom.WithoutScopeInfo())
	if err != nil {
		return nil, err
	}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp))
	return &telemetry{registry: reg, meter: mp.Meter("github.com/mcpgate/mcpgate")}, nil
}

// adminHandler serves the admin endpoints. limits, when ext_proc runs, reports the
// rate-limit store for /readyz.
// pinSource is what ext_proc learned of the tool definitions pinning apps list.
type pinSource interface {
	Pins(app string) map[string]policy.ToolPin
	PinDefinitions(app string) map[string]string
	Drift(app string) map[string][]string
}

func adminHandler(store *policy.Store, tel *telemetry, limits func(context.Context) *extproc.RateLimitStatus, pins pinSource) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		// Ready once a snapshot is loaded. A rejected later edit does not make mcpgate
		// unready (the last good policy serves), but it is shown so operators see it.
		st := store.Status()
		code := http.StatusOK
		if store.Current() == nil {
			code = http.StatusServiceUnavailable
		}
		// A rate-limit store that is down does not make mcpgate unready either: every
		// replica would then leave the Service at once. Its failure mode decides calls,
		// and the detail here says which.
		var rl *extproc.RateLimitStatus
		if limits != nil && code == http.StatusOK {
			rl = limits(r.Context())
		}
		writeJSON(w, code, struct {
			Ready bool `json:"ready"`
			policy.Status
			RateLimits *extproc.RateLimitStatus `json:"rate_limits,omitempty"`
		}{Ready: code == http.StatusOK, Status: st, RateLimits: rl})
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(tel.registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /debug/snapshot", func(w http.ResponseWriter, _ *http.Request) {
		snap := store.Current()
		if snap == nil {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "no policy loaded"})
			return
		}
		writeJSON(w, http.StatusOK, describeSnapshot(snap, store.Status(), pins))
	})
	// The tool pins an app's lists showed (tools.pinning record or enforce), as a pin file
	// to review and commit: `mcpgate pins export --app X` prints it.
	mux.HandleFunc("GET /debug/pins", func(w http.ResponseWriter, r *http.Request) {
		app := r.URL.Query().Get("app")
		snap := store.Current()
		switch {
		case snap == nil:
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "no policy loaded"})
			return
		case app == "":
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "name the app: /debug/pins?app=<App ID>"})
			return
		case pins == nil:
			writeJSON(w, http.StatusNotFound, map[string]string{"error": "this mcpgate serves no ext_proc (--grpc-addr is empty): it sees no tools/list"})
			return
		}
		a := snap.App(app)
		if a == nil || a.MCP == nil || a.MCP.Tools.Pinning.Mode == policy.PinOff {
			writeJSON(w, http.StatusNotFound, map[string]string{"error": fmt.Sprintf("app %q has no tools.pinning (mode record or enforce) in policy version %s", app, snap.Version)})
			return
		}
		learned := pins.Pins(app)
		if len(learned) == 0 {
			writeJSON(w, http.StatusNotFound, map[string]string{"error": fmt.Sprintf("no tools/list of app %q has gone through this mcpgate yet: list the tools through its sidecar first", app)})
			return
		}
		w.Header().Set("Content-Type", "application/yaml")
		_, _ = w.Write(policy.FormatPinFile(app, learned, pins.PinDefinitions(app)))
	})
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

type appView struct {
	ID        string      `json:"id"`
	Namespace string      `json:"namespace"`
	SpiffeID  string      `json:"spiffe_id"`
	Source    string      `json:"source"`
	MCPPath   string      `json:"mcp_path,omitempty"`
	Metadata  string      `json:"resource_metadata,omitempty"`
	Issuers   []string    `json:"issuers,omitempty"`
	Scopes    []string    `json:"scopes,omitempty"`
	Rules     []string    `json:"rules,omitempty"`
	Rego      string      `json:"rego,omitempty"`
	Pinning   *pinView    `json:"pinning,omitempty"`
	Limits    *limitsView `json:"limits,omitempty"`
	CORS      *corsView   `json:"cors,omitempty"`
}

// limitsView is an app's limits, rates as the policy writes them ("100/m"); where they
// are counted is the snapshot's rate_limits.
type limitsView struct {
	MaxRequestBytes int64          `json:"max_request_bytes"`
	PerCaller       string         `json:"per_caller,omitempty"`
	PerSubject      string         `json:"per_subject,omitempty"`
	SubjectClaim    string         `json:"subject_claim,omitempty"`
	PerTenant       string         `json:"per_tenant,omitempty"`
	TenantClaim     string         `json:"tenant_claim,omitempty"`
	PerTool         []toolRateView `json:"per_tool,omitempty"` // in the order they are tried
}

// toolRateView is one perTool limit: counted for all callers together (per "all"), or
// per caller, subject or tenant (claim names the token claim of the last two).
type toolRateView struct {
	Tool  string `json:"tool"`
	Rate  string `json:"rate"`
	Per   string `json:"per"`
	Claim string `json:"claim,omitempty"`
}

// corsView is an app's CORS policy with its defaults applied, as Envoy's cors filter
// gets it.
type corsView struct {
	AllowOrigins     []string `json:"allow_origins"`
	AllowMethods     []string `json:"allow_methods"`
	AllowHeaders     []string `json:"allow_headers"`
	ExposeHeaders    []string `json:"expose_headers"`
	MaxAge           string   `json:"max_age"`
	AllowCredentials bool     `json:"allow_credentials"`
}

func describeLimits(l *policy.Limits) *limitsView {
	v := &limitsView{MaxRequestBytes: l.MaxRequestBytes}
	if l.PerCaller != nil {
		v.PerCaller = l.PerCaller.String()
	}
	if l.PerSubject != nil {
		v.PerSubject, v.SubjectClaim = l.PerSubject.String(), l.SubjectClaim
	}
	if l.PerTenant != nil {
		v.PerTenant, v.TenantClaim = l.PerTenant.String(), l.TenantClaim
	}
	for _, tr := range l.PerTool {
		tv := toolRateView{Tool: tr.Tool.String(), Rate: tr.Rate.String(), Per: string(tr.Per)}
		switch tr.Per {
		case policy.PerApp:
			tv.Per = "all"
		case policy.PerSubject, policy.PerTenant:
			tv.Claim = tr.Claim
		}
		v.PerTool = append(v.PerTool, tv)
	}
	return v
}

func describeCORS(c *policy.CORS) *corsView {
	if c == nil {
		return nil
	}
	v := &corsView{AllowOrigins: c.AllowOrigins, AllowMethods: c.AllowMethods, AllowHeaders: c.AllowHeaders,
		ExposeHeaders: c.ExposeHeaders, MaxAge: c.MaxAge.String(), AllowCredentials: c.AllowCredentials}
	if c.AnyOrigin {
		v.AllowOrigins = []string{"*"}
	}
	return v
}

// pinView is an app's tool pinning: the pins the policy holds, the tools its lists have
// shown this replica (their pins: /debug/pins?app=), and those hidden for drift and why.
type pinView struct {
	Mode    policy.PinMode      `json:"mode"`
	File    string              `json:"file"`
	Pinned  []string            `json:"pinned"`
	Learned []string            `json:"learned"`
	Drift   map[string][]string `json:"drift,omitempty"`
}

// describeSnapshot is a summary for humans: names, sources and rule names, nothing secret.
func describeSnapshot(s *policy.Snapshot, st policy.Status, pins pinSource) any {
	apps := make([]appView, 0, len(s.Apps))
	for _, a := range s.Apps {
		v := appView{ID: a.ID, Namespace: a.Namespace, SpiffeID: a.SpiffeID, Source: a.Source}
		if m := a.MCP; m != nil {
			v.MCPPath, v.Metadata, v.Scopes = m.Path, m.MetadataURL, m.Authentication.Scopes
			for _, is := range m.Authentication.Issuers {
				v.Issuers = append(v.Issuers, is.Name)
			}
			for _, r := range m.Tools.Rules {
				v.Rules = append(v.Rules, r.Name+": "+string(r.Action))
			}
			if m.Tools.Rego != nil {
				v.Rego = m.Tools.Rego.File
			}
			v.Limits, v.CORS = describeLimits(&m.Limits), describeCORS(m.CORS)
			if pn := m.Tools.Pinning; pn.Mode != policy.PinOff {
				v.Pinning = &pinView{Mode: pn.Mode, File: pn.File, Pinned: slices.Sorted(maps.Keys(pn.Pins)), Learned: []string{}}
				if pins != nil {
					v.Pinning.Learned = slices.Sorted(maps.Keys(pins.Pins(a.ID)))
					v.Pinning.Drift = pins.Drift(a.ID)
				}
			}
		}
		apps = append(apps, v)
	}
	sort.Slice(apps, func(i, j int) bool { return apps[i].ID < apps[j].ID })
	names := func(n int, each func(func(string))) []string {
		out := make([]string, 0, n)
		each(func(s string) { out = append(out, s) })
		sort.Strings(out)
		return out
	}
	return map[string]any{
		"status":       st,
		"files":        s.Files,
		"trust_domain": s.Mesh.TrustDomain,
		"rate_limits":  describeRateLimits(s.Mesh.RateLimits),
		"mtls":         s.Mesh.MTLS,
		"apps":         apps,
		"issuers": names(len(s.Mesh.Issuers), func(add func(string)) {
			for n := range s.Mesh.Issuers {
				add(n)
			}
		}),
		"http_endpoints": names(len(s.Endpoints), func(add func(string)) {
			for n := range s.Endpoints {
				add(n)
			}
		}),
		"gateways": names(len(s.Gateways), func(add func(string)) {
			for n := range s.Gateways {
				add(n)
			}
		}),
	}
}

// describeRateLimits names the store and how it is reached; the password file's path is
// shown, never its contents.
func describeRateLimits(rl *policy.RateLimitStore) any {
	if rl == nil {
		return map[string]string{"store": "local"}
	}
	prefix := rl.KeyPrefix
	if prefix == "" {
		prefix = ratelimit.DefaultKeyPrefix
	}
	out := map[string]any{"store": "redis", "address": rl.Address, "cluster": rl.Cluster, "key_prefix": prefix, "db": rl.DB, "tls": rl.TLS,
		"password_file": rl.PasswordFile, "failure_mode": rl.FailureMode, "timeout": rl.Timeout.String()}
	if s := rl.Sentinel; s != nil {
		out["sentinel"] = map[string]any{"master_name": s.MasterName, "addresses": s.Addrs, "password_file": s.PasswordFile}
	}
	return out
}
