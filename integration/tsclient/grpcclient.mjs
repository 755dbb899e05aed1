// An off-the-shelf gRPC client (@grpc/grpc-js with @grpc/proto-loader, loading
// proto/mcpgate/mcp/v1/mcp.proto at run time) of mcpgate's gRPC MCP service, driven by
// the end-to-end tests. It calls through an Envoy sidecar the way a gRPC client calls
// through Dapr: the App is named by the dapr-app-id metadata.
//
//   node grpcclient.mjs --addr HOST:PORT --app APP [--token TOKEN] --steps JSON
//
// steps: [{"rpc":"ListTools"} | {"rpc":"CallTool","tool":NAME,"args":{...}}
//         | {"rpc":"Session","calls":[{"tool":NAME,"args":{...}}, ...]}]
// Each step prints one JSON line: {"rpc","ok","code","details","result"} (code is the gRPC
// status code, 0 when ok; for Session, "results" lists each answer in order).
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const here = path.dirname(fileURLToPath(import.meta.url));
const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));

const def = protoLoader.loadSync(path.join(here, '..', '..', 'proto', 'mcpgate', 'mcp', 'v1', 'mcp.proto'), {
  keepCase: true, longs: String, enums: String, defaults: false, oneofs: true,
});
const { McpService } = grpc.loadPackageDefinition(def).mcpgate.mcp.v1;
const client = new McpService(args.addr, grpc.credentials.createInsecure());

const md = new grpc.Metadata();
md.set('dapr-app-id', args.app);
if (args.token) md.set('authorization', 'Bearer ' + args.token);

// google.protobuf.Struct <-> plain JSON, as proto-loader represents Struct.
function toValue(v) {
  if (v === null) return { nullValue: 'NULL_VALUE' };
  if (typeof v === 'number') return { numberValue: v };
  if (typeof v === 'string') return { stringValue: v };
  if (typeof v === 'boolean') return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: toStruct(v) };
}
function toStruct(o) {
  return { fields: Object.fromEntries(Object.entries(o ?? {}).map(([k, v]) => [k, toValue(v)])) };
}
function fromValue(v) {
  switch (v.kind) {
    case 'nullValue': return null;
    case 'numberValue': return v.numberValue;
    case 'stringValue': return v.stringValue;
    case 'boolValue': return v.boolValue;
    case 'listValue': return (v.listValue.values ?? []).map(fromValue);
    case 'structValue': return fromStruct(v.structValue);
  }
  return undefined;
}
function fromStruct(s) {
  return Object.fromEntries(Object.entries(s?.fields ?? {}).map(([k, v]) => [k, fromValue(v)]));
}
function plainResult(r) {
  if (!r) return r;
  return { ...r, structured_content: r.structured_content ? fromStruct(r.structured_content) : undefined };
}

function unary(method, request) {
  return new Promise((resolve) => {
    client[method](request, md, { deadline: Date.now() + 15000 }, (err, res) => {
      if (err) resolve({ ok: false, code: err.code, details: err.details });
      else resolve({ ok: true, code: 0, result: method === 'CallTool' ? plainResult(res) : res });
    });
  });
}

function session(calls) {
  return new Promise((resolve) => {
    const call = client.Session(md, { deadline: Date.now() + 15000 });
    const results = [];
    call.on('data', (m) => results.push({ request_id: m.request_id, response: m.response, call_tool: plainResult(m.call_tool), error: m.error }));
    call.on('error', (err) => resolve({ ok: false, code: err.code, details: err.details, results }));
    call.on('end', () => resolve({ ok: true, code: 0, results }));
    calls.forEach((c, i) => call.write({ request_id: String(i), call_tool: { name: c.tool, arguments: toStruct(c.args) } }));
    call.end();
  });
}

for (const step of JSON.parse(args.steps)) {
  let out;
  switch (step.rpc) {
    case 'ListTools': out = await unary('ListTools', {}); break;
    case 'CallTool': out = await unary('CallTool', { name: step.tool, arguments: toStruct(step.args) }); break;
    case 'Session': out = await session(step.calls); break;
    default: out = { ok: false, code: -1, details: 'unknown step ' + step.rpc };
  }
  process.stdout.write(JSON.stringify({ rpc: step.rpc, ...out }) + '\n');
}
client.close();
