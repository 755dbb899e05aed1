package mcpapp

import (
	"net/http/httptest"
	"testing"
)

// NewHandler serves the same tools as StartServer, records nothing, and gives each
// handler its own stock.
func TestNewHandler(t *testing.T) {
	ctx := testCtx(t)
	a := httptest.NewServer(NewHandler(Options{}))
	t.Cleanup(a.Close)
	b := httptest.NewServer(NewHandler(Options{}))
	t.Cleanup(b.Close)

	ca := connect(t, ctx, ConnectOptions{Endpoint: a.URL + Path})
	names, err := ca.ToolNames(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(names) != 5 {
		t.Errorf("tools %v", names)
	}
	if _, err := ca.CallTool(ctx, ToolDeleteProduct, map[string]any{"product_id": "SKU-42"}); err != nil {
		t.Fatal(err)
	}
	res, err := ca.CallTool(ctx, ToolGetInventory, map[string]any{"product_id": "SKU-42"})
	if err != nil || !res.IsError {
		t.Errorf("SKU-42 after delete: %v %v, want a tool error", res, err)
	}
	var c Customer
	res, err = ca.CallTool(ctx, ToolGetCustomer, map[string]any{"id": "c1"})
	if err != nil || Structured(res, &c) != nil || c != CustomerFor("c1") {
		t.Errorf("get_customer: %+v %v", c, err)
	}

	cb := connect(t, ctx, ConnectOptions{Endpoint: b.URL + Path})
	var inv InventoryResult
	res, err = cb.CallTool(ctx, ToolGetInventory, map[string]any{"product_id": "SKU-42"})
	if err != nil || Structured(res, &inv) != nil || inv.Quantity != DefaultInventory["SKU-42"] {
		t.Errorf("another handler's SKU-42: %+v %v", inv, err)
	}
	if resp, err := a.Client().Get(a.URL + "/other"); err != nil || resp.StatusCode != 404 {
		t.Errorf("GET /other: %v %v, want 404", resp, err)
	} else {
		resp.Body.Close()
	}
}
