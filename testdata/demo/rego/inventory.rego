# Per-tool decisions for the inventory app, evaluated after the tool rules allowed a call.
# Input: the document described in the README ("Rego input"). Output: data.mcpgate.decision.
package mcpgate

default decision := {"allow": false, "reason": "no rego rule allowed the call"}

# Non-tool methods (initialize, tools/list, ...) were already decided by the rules.
decision := {"allow": true} if input.mcp.method != "tools/call"

# get_inventory only for product ids of the form SKU-<digits>.
decision := {"allow": true} if {
	input.mcp.tool == "get_inventory"
	regex.match(`^SKU-[0-9]+$`, input.mcp.arguments.product_id)
}

decision := {"allow": false, "reason": "product_id must look like SKU-<digits>"} if {
	input.mcp.tool == "get_inventory"
	not regex.match(`^SKU-[0-9]+$`, object.get(input.mcp.arguments, "product_id", ""))
}

# Listing is always fine; page sizes are capped by rewriting the argument.
decision := {"allow": true, "patch": [{"op": "replace", "path": "/limit", "value": 100}]} if {
	startswith(input.mcp.tool, "list_")
	object.get(input.mcp.arguments, "limit", 0) > 100
}

decision := {"allow": true} if {
	startswith(input.mcp.tool, "list_")
	object.get(input.mcp.arguments, "limit", 0) <= 100
}

decision := {"allow": true} if input.mcp.tool == "get_customer"
