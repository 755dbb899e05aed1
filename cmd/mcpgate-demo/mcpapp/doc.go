// Package mcpapp is the demo MCP server App and client helpers, built on the official MCP
// Go SDK (github.com/modelcontextprotocol/go-sdk, package mcp, v1.8.0). The demo binary
// cmd/mcpgate-demo serves the App with [NewHandler] and uses the client helpers for its
// agent; the integration tests run the same App with [Start]. It is never linked into the
// mcpgate binary, and it imports no test package: what ships is built from this tree only.
//
// # Server
//
// [Start] serves the SDK's Streamable HTTP handler at /mcp on 127.0.0.1:0 with the tools
// get_inventory, list_items, delete_product, get_customer and slow_report. That server
// records what it actually executed ([Server.Calls], [Server.CallsTo]) and every HTTP
// request that reached it ([Server.Requests], [Server.RequestsFor], [Server.LastHeader]),
// so tests can assert that a denied call never reached it. [NewHandler] records nothing: a
// long-running process must not keep every request and call.
//
// # SDK behaviours relied on (read from the v1.8.0 sources)
//
//   - Response format. The handler answers every POST that carries a JSON-RPC
//     call with Content-Type text/event-stream by default
//     (StreamableHTTPOptions.JSONResponse=false): the response, and any
//     notification the tool handler sends with the request's context (such as
//     notifications/progress), are SSE "message" events on that POST's
//     response, flushed one by one. POSTs that carry only notifications or
//     responses get 202 Accepted with no body. With [Options.JSONResponse]
//     the handler answers with a single application/json body instead, and the
//     SDK routes in-request notifications to the standalone GET SSE stream
//     (streamableServerConn.Write), not to the POST: slow_report's progress
//     then no longer travels on the POST, so the default (SSE) is what the
//     progress scenarios need.
//   - Sessions. The handler is stateful: the response to initialize carries
//     Mcp-Session-Id; the client echoes it on every later POST, GET and DELETE.
//     An unknown session id gets 404. After initialize the client opens a
//     standalone GET SSE stream (Accept: text/event-stream) unless
//     [ConnectOptions.DisableStandaloneSSE]; Close sends DELETE.
//   - Protocol version. By default the v1.8.0 client first POSTs
//     "server/discover" (SEP-2575) with Mcp-Protocol-Version: 2026-07-28 and
//     Mcp-Method: server/discover, no session id. The stateful handler
//     answers it 200 (SSE) with a result whose supportedVersions lack
//     2026-07-28 (stateful servers only speak the legacy versions), so the
//     client falls back to "initialize" for 2025-11-25, sent with no
//     Mcp-Protocol-Version header; every later request carries
//     Mcp-Protocol-Version: 2025-11-25. [ConnectOptions.ProtocolVersion] =
//     [LegacyProtocolVersion] skips the discover probe. POSTs must Accept
//     both application/json and text/event-stream and have Content-Type
//     application/json (else 400/415).
//   - DNS-rebinding protection. Requests arriving on a loopback address whose
//     Host header is not a loopback host get 403; a proxy that rewrites Host
//     (e.g. to an app id) needs [Options.DisableLocalhostProtection].
//   - Tools are registered with mcp.AddTool, so the SDK validates arguments
//     against the inferred input schema (unknown properties are rejected)
//     before the handler runs, fills structuredContent from the typed output,
//     and (get_customer) fills content with the same value as JSON text.
//   - Progress. The client sets _meta.progressToken on tools/call; the tool
//     reads it with req.Params.GetProgressToken() and sends
//     ServerSession.NotifyProgress with the request's context; the client
//     delivers them to ClientOptions.ProgressNotificationHandler.
package mcpapp
