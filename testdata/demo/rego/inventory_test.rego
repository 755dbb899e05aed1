# Tests of inventory.rego: `make opa-test`, or `opa test testdata/demo/rego`.
package mcpgate_test

import data.mcpgate

call(tool, args) := {
	"caller": {"app_id": "my-agent", "namespace": "default", "spiffe_id": "spiffe://example.org/ns/default/my-agent"},
	"subject": {"sub": "alice", "scopes": ["mcp:tools"], "claims": {"tier": "gold"}},
	"target": {"app_id": "inventory"},
	"mcp": {"method": "tools/call", "tool": tool, "arguments": args, "id": 1, "protocol_version": "2025-06-18", "session_id": "s"},
	"http": {"method": "POST", "path": "/mcp", "headers": {}},
}

test_sku_allowed if mcpgate.decision.allow with input as call("get_inventory", {"product_id": "SKU-42"})

test_bad_sku_denied_with_reason if {
	d := mcpgate.decision with input as call("get_inventory", {"product_id": "42; drop"})
	not d.allow
	d.reason == "product_id must look like SKU-<digits>"
}

test_missing_sku_denied if not mcpgate.decision.allow with input as call("get_inventory", {})

test_listing_ignores_arguments if {
	inp := object.union(call("get_inventory", {}), {"mcp": {"method": "tools/call", "tool": "get_inventory", "arguments": {}, "listing": true}})
	mcpgate.decision.allow with input as inp
}

test_limit_capped if {
	d := mcpgate.decision with input as call("list_items", {"limit": 500})
	d.allow
	d.patch == [{"op": "replace", "path": "/limit", "value": 100}]
}

test_small_limit_untouched if {
	d := mcpgate.decision with input as call("list_items", {"limit": 10})
	d.allow
	not d.patch
}

test_customer_email_redacted_below_gold if {
	inp := object.union(call("get_customer", {"id": "c1"}), {"subject": {"sub": "bob", "scopes": [], "claims": {"tier": "silver"}}})
	d := mcpgate.decision with input as inp
	d.allow
	d.redact == ["/structuredContent/email"]
}

test_customer_listing_says_what_calls_redact if {
	listing := {"mcp": {"method": "tools/call", "tool": "get_customer", "arguments": {}, "listing": true}}
	silver := object.union(object.union(call("get_customer", {}), listing), {"subject": {"sub": "bob", "scopes": [], "claims": {"tier": "silver"}}})
	d := mcpgate.decision with input as silver
	d.allow
	d.redact == ["/structuredContent/email"]
	gold := object.union(object.union(call("get_customer", {}), listing), {"subject": {"sub": "alice", "scopes": [], "claims": {"tier": "gold"}}})
	g := mcpgate.decision with input as gold
	g.allow
	not g.redact
}

test_unknown_tool_denied if not mcpgate.decision.allow with input as call("drop_tables", {})

test_protocol_methods_allowed if {
	inp := object.union(call("", {}), {"mcp": {"method": "initialize", "tool": "", "arguments": {}}})
	mcpgate.decision.allow with input as inp
}

test_slow_report_allowed if mcpgate.decision.allow with input as call("slow_report", {"steps": 3})
