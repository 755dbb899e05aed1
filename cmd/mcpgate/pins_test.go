package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/mcpgate/mcpgate"
	"github.com/mcpgate/mcpgate/policy"
)

type fakePins map[string]policy.ToolPin

func (f fakePins) Pins(string) map[string]policy.ToolPin { return f }
func (f fakePins) PinDefinitions(string) map[string]string {
	return map[string]string{"get_inventory": `{"description":"Stock"}`}
}
func (f fakePins) Drift(string) map[string][]string {
	return map[string][]string{"get_customer": {"no pin"}}
}

// /debug/pins answers a pin file for an app in record mode, and says why it cannot for
// the others; `mcpgate pins export` prints it, or fails with that reason.
func TestPinsExport(t *testing.T) {
	snap, err := policy.Load(context.Background(), mcpgate.DemoPolicy(), "demo")
	if err != nil {
		t.Fatal(err)
	}
	snap.App("inventory").MCP.Tools.Pinning = policy.Pinning{Mode: policy.PinRecord, File: "pins/inventory.yaml"}
	_, pin, err := policy.FingerprintTool([]byte(`{"name":"get_inventory","description":"Stock"}`))
	if err != nil {
		t.Fatal(err)
	}
	store, tel := adminState(t, snap)
	srv := httptest.NewServer(adminHandler(store, tel, nil, fakePins{"get_inventory": pin}))
	t.Cleanup(srv.Close)
	addr := strings.TrimPrefix(srv.URL, "http://")

	run := func(args ...string) (string, error) {
		cmd := newRootCmd()
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetErr(&out)
		cmd.SetArgs(args)
		err := cmd.ExecuteContext(context.Background())
		return out.String(), err
	}
	out, err := run("pins", "export", "--app", "inventory", "--admin-addr", addr)
	if err != nil || !strings.Contains(out, "sha256: "+pin.SHA256) || !strings.Contains(out, `# {"description":"Stock"}`) {
		t.Fatalf("pins export: %v\n%s", err, out)
	}
	if _, err := run("pins", "export", "--app", "my-agent", "--admin-addr", addr); err == nil || !strings.Contains(err.Error(), `app "my-agent" has no tools.pinning`) {
		t.Errorf("an app without pinning: %v", err)
	}
	if _, err := run("pins", "export", "--admin-addr", addr); err == nil || !strings.Contains(err.Error(), "--app is required") {
		t.Errorf("no --app: %v", err)
	}
	resp, err := http.Get(srv.URL + "/debug/snapshot")
	if err != nil {
		t.Fatal(err)
	}
	var snapView struct {
		Apps []struct {
			ID      string   `json:"id"`
			Pinning *pinView `json:"pinning"`
		} `json:"apps"`
	}
	err = json.NewDecoder(resp.Body).Decode(&snapView)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range snapView.Apps {
		if a.ID == "inventory" && (a.Pinning == nil || a.Pinning.Mode != policy.PinRecord || strings.Join(a.Pinning.Learned, ",") != "get_inventory" ||
			strings.Join(a.Pinning.Drift["get_customer"], "") != "no pin") {
			t.Errorf("/debug/snapshot inventory pinning: %+v", a.Pinning)
		}
		if a.ID == "my-agent" && a.Pinning != nil {
			t.Errorf("/debug/snapshot shows pinning for my-agent: %+v", a.Pinning)
		}
	}
	rec := httptest.NewRecorder()
	adminHandler(store, tel, nil, nil).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/debug/pins?app=inventory", nil))
	if rec.Code != http.StatusNotFound || !strings.Contains(rec.Body.String(), "no ext_proc") {
		t.Errorf("without ext_proc: %d %s", rec.Code, rec.Body.String())
	}
}
