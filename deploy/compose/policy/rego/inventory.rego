# Per-call decisions for the inventory app, evaluated after the tool rules allowed a call.
# Input and output are documented in the README ("Rego"). Tests: inventory_test.rego.
package mcpgate

default decision := {"allow": false, "reason": "no rego rule allowed the call"}

# Methods other than tools/call (initialize, tools/list, ...) were decided by the rules.
decision := {"allow": true} if input.mcp.method != "tools/call"

# Listing asks "may this caller use the tool at all?"; argument conditions wait for calls.
# A listing decision also says what calls will have redacted: mcpgate removes it from the
# tool's outputSchema in tools/list, so clients that validate results accept them.
decision := {"allow": true} if {
	input.mcp.listing
	not email_hidden
}

decision := {"allow": true, "redact": ["/structuredContent/email"]} if {
	input.mcp.listing
	email_hidden
}

# get_inventory only for product ids of the form SKU-<digits>.
decision := {"allow": true} if {
	not input.mcp.listing
	input.mcp.tool == "get_inventory"
	valid_sku
}

decision := {"allow": false, "reason": "product_id must look like SKU-<digits>"} if {
	not input.mcp.listing
	input.mcp.tool == "get_inventory"
	not valid_sku
}

valid_sku if regex.match(`^SKU-[0-9]+$`, input.mcp.arguments.product_id)

# Listing items is fine; page sizes above 100 are capped by rewriting the argument.
decision := {"allow": true, "patch": [{"op": "replace", "path": "/limit", "value": 100}]} if {
	not input.mcp.listing
	startswith(input.mcp.tool, "list_")
	object.get(input.mcp.arguments, "limit", 0) > 100
}

decision := {"allow": true} if {
	not input.mcp.listing
	startswith(input.mcp.tool, "list_")
	object.get(input.mcp.arguments, "limit", 0) <= 100
}

# Reports stream progress; any step count the server accepts is fine.
decision := {"allow": true} if {
	not input.mcp.listing
	input.mcp.tool == "slow_report"
}

# Customers are readable; callers outside the gold tier also lose the email address.
decision := {"allow": true} if {
	not input.mcp.listing
	input.mcp.tool == "get_customer"
	not email_hidden
}

decision := {"allow": true, "redact": ["/structuredContent/email"]} if {
	not input.mcp.listing
	email_hidden
}

email_hidden if {
	input.mcp.tool == "get_customer"
	not input.subject.claims.tier == "gold"
}
