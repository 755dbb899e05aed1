// Package mcp parses and rewrites Model Context Protocol traffic (JSON-RPC 2.0 over MCP
// "Streamable HTTP") for the ext_proc server. It is a pure layer: no gRPC, no policy, no I/O.
//
// Requests: ParseBody parses a POST body strictly (one pass over the bytes rejects invalid
// JSON, invalid UTF-8, lone UTF-16 surrogate escapes, duplicate object keys at any depth and
// nesting deeper than a limit), classifies each JSON-RPC message and extracts what decisions
// need (tool name and arguments, prompt name, resource URI, progress token).
// PatchArguments rewrites the arguments of one tools/call.
//
// Responses: ParseResponseBody and RewriteResponse handle application/json bodies;
// FilterList and Redact rewrite a single JSON-RPC response object. For text/event-stream
// bodies, Framer splits an arbitrarily chunked byte stream into server-sent events and
// Rewriter passes every event through unchanged, as soon as it is complete, except the
// response being rewritten.
//
// Strictness is a security property, not pedantry: ext_proc decides on its own parse of a
// message, and the MCP server acts on another parser's. Wherever two common JSON parsers
// could disagree (duplicate keys: Go's encoding/json keeps the last, others the first;
// invalid UTF-8 and lone surrogates: replaced or kept; case-insensitive struct field
// matching in encoding/json), this package refuses the input instead of picking a side.
package mcp
