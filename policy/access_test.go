package policy

import (
	"slices"
	"strings"
	"testing"
)

func TestAccessControlDaprSemantics(t *testing.T) {
	app := strings.Replace(appYAML, "        - {appId: my-agent, defaultAction: allow}\n", `        - {appId: my-agent, defaultAction: allow}
        - appId: auditor
          namespace: audit
          defaultAction: deny
          operations:
            - {name: /mcp, httpVerb: [GET, POST], action: allow}
            - {name: /admin/**, httpVerb: ["*"], action: deny}
        - appId: ops
          defaultAction: allow
          operations:
            - {name: /admin/*, httpVerb: [POST], action: deny}
            - {name: /admin/keys, httpVerb: [POST], action: allow}
`, 1)
	snap := requireLoad(t, map[string]string{"mesh.yaml": meshYAML, "app.yaml": app})
	ac := snap.App("inventory").MCP.AccessControl
	td := "example.org"
	tests := []struct {
		name   string
		caller Caller
		verb   string
		path   string
		want   Action
	}{
		{"listed caller, no operations", Caller{"my-agent", "default", td}, "POST", "/mcp", Allow},
		{"same app id, other namespace", Caller{"my-agent", "prod", td}, "POST", "/mcp", Deny},
		{"same app id, other trust domain", Caller{"my-agent", "default", "evil.org"}, "POST", "/mcp", Deny},
		{"unlisted caller gets top-level default", Caller{"stranger", "default", td}, "POST", "/mcp", Deny},
		{"anonymous caller", Caller{}, "POST", "/mcp", Deny},
		{"operation allows verb", Caller{"auditor", "audit", td}, "GET", "/mcp", Allow},
		{"operation lacks verb: policy default", Caller{"auditor", "audit", td}, "DELETE", "/mcp", Deny},
		{"query ignored", Caller{"auditor", "audit", td}, "POST", "/mcp?x=1", Allow},
		{"merged slashes", Caller{"auditor", "audit", td}, "POST", "//mcp", Allow},
		{"double star denies subtree", Caller{"auditor", "audit", td}, "GET", "/admin/a/b", Deny},
		{"no operation matches: policy default", Caller{"auditor", "audit", td}, "POST", "/other", Deny},
		{"single star matches one segment", Caller{"ops", "default", td}, "POST", "/admin/users", Deny},
		{"single star does not match two", Caller{"ops", "default", td}, "POST", "/admin/users/1", Allow},
		{"more specific operation wins", Caller{"ops", "default", td}, "POST", "/admin/keys", Allow},
		{"dot segments refused", Caller{"ops", "default", td}, "POST", "/x/../admin/users", Deny},
		{"encoded slash refused", Caller{"ops", "default", td}, "POST", "/admin%2Fusers", Deny},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, why := ac.Decide(tt.caller, tt.verb, tt.path)
			if got != tt.want {
				t.Errorf("Decide = %s (%s), want %s", got, why, tt.want)
			}
			if why == "" {
				t.Error("no reason given")
			}
		})
	}
}

func TestGlob(t *testing.T) {
	tests := []struct {
		pattern, s string
		want       bool
	}{
		{"get_inventory", "get_inventory", true},
		{"get_inventory", "get_inventory2", false},
		{"list_*", "list_", true},
		{"list_*", "list_items", true},
		{"list_*", "xlist_items", false},
		{"*_admin", "drop_admin", true},
		{"*", "", true},
		{"a*b*c", "abc", true},
		{"a*b*c", "axxbyyc", true},
		{"a*b*c", "acb", false},
		{"a*a", "a", false},
		{"file:///data/*", "file:///data/x/y.txt", true},
	}
	for _, tt := range tests {
		if got := MustGlob(tt.pattern).Match(tt.s); got != tt.want {
			t.Errorf("%q.Match(%q) = %v, want %v", tt.pattern, tt.s, got, tt.want)
		}
	}
	for _, bad := range []string{"", "a b", "tab\t"} {
		if _, err := CompileGlob(bad); err == nil {
			t.Errorf("CompileGlob(%q) accepted", bad)
		}
	}
}

func TestParsePointerAndRate(t *testing.T) {
	p, err := ParsePointer("/structuredContent/a~1b/c~0d")
	if err != nil || strings.Join(p.Tokens, "|") != "structuredContent|a/b|c~d" {
		t.Fatalf("ParsePointer = %+v, %v", p, err)
	}
	for _, bad := range []string{"", "a", "/a~", "/~2"} {
		if _, err := ParsePointer(bad); err == nil {
			t.Errorf("ParsePointer(%q) accepted", bad)
		}
	}
	r, err := ParseRate("10/s")
	if err != nil || r.N != 10 || r.Per.Seconds() != 1 {
		t.Fatalf("ParseRate = %+v, %v", r, err)
	}
	if r, err := ParseRate("1000000000/s"); err != nil || r.N != 1e9 {
		t.Fatalf("ParseRate(a billion per second) = %+v, %v", r, err)
	}
	for _, bad := range []string{"10", "0/s", "-1/m", "1/d", "x/h", "/s", "1000000001/s"} {
		if _, err := ParseRate(bad); err == nil {
			t.Errorf("ParseRate(%q) accepted", bad)
		}
	}
}

// An app's token audience is its resource unless it lists its own.
func TestAppAudiences(t *testing.T) {
	snap := requireLoad(t, map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML})
	if got := snap.App("inventory").MCP.Authentication.Audiences; !slices.Equal(got, []string{"https://inventory.example.com/mcp"}) {
		t.Errorf("default audiences = %q, want the resource", got)
	}
	snap = requireLoad(t, map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "issuers: [corp]", "issuers: [corp]\n      audiences: [api://mcp]", 1)})
	if got := snap.App("inventory").MCP.Authentication.Audiences; !slices.Equal(got, []string{"api://mcp"}) {
		t.Errorf("listed audiences = %q", got)
	}
}

func TestMetadataURLRootResource(t *testing.T) {
	snap := requireLoad(t, map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(strings.Replace(appYAML, "https://inventory.example.com/mcp", "https://inventory.example.com/", 1), "issuers: [corp]", "issuers: [corp]\n      audiences: [api://mcp]", 1)})
	if got, want := snap.App("inventory").MCP.MetadataURL, "https://inventory.example.com/.well-known/oauth-protected-resource"; got != want {
		t.Fatalf("MetadataURL = %q, want %q", got, want)
	}
}
