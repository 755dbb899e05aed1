// An off-the-shelf MCP client for mcpgate's end-to-end tests: the official TypeScript SDK,
// unchanged, pointed at a URL (typically an agent sidecar's /v1.0/invoke/<app>/method/mcp).
//
//   node client.mjs --url URL [--header 'Name: value']... --steps '[{"op":"list"},
//        {"op":"call","name":"get_inventory","arguments":{"product_id":"SKU-1"}}]'
//
// Prints one JSON line per step: {"op","ok":true,"result",...} or {"op","ok":false,"error"}.
// Progress notifications of a call are reported with their arrival time, so a test can
// check they came before the result. Task ops (MCP tasks, the SDK's experimental API):
// {"op":"taskcall","name",...} (create, poll, fetch the result), and taskget, taskresult,
// taskcancel with "taskId", and tasklist. Exit status 0 unless the client could not connect.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

function parseArgs(argv) {
  const out = { headers: {}, steps: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === "--url") out.url = next();
    else if (a === "--header") {
      const h = next();
      const colon = h.indexOf(":");
      if (colon < 1) throw new Error(`bad header ${JSON.stringify(h)}`);
      out.headers[h.slice(0, colon).trim()] = h.slice(colon + 1).trim();
    } else if (a === "--steps") out.steps = JSON.parse(next());
    else throw new Error(`unknown argument ${a}`);
  }
  if (!out.url) throw new Error("--url is required");
  return out;
}

function errorOf(e) {
  return { code: e?.code ?? null, message: String(e?.message ?? e) };
}

const args = parseArgs(process.argv.slice(2));
const emit = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const transport = new StreamableHTTPClientTransport(new URL(args.url), {
  requestInit: { headers: args.headers },
});
const client = new Client({ name: "mcpgate-e2e-typescript", version: "1.0.0" });
try {
  await client.connect(transport);
} catch (e) {
  emit({ op: "connect", ok: false, error: errorOf(e) });
  process.exit(2);
}
emit({ op: "connect", ok: true, sessionId: transport.sessionId ?? null });

for (const step of args.steps) {
  const started = Date.now();
  try {
    if (step.op === "list") {
      const r = await client.listTools();
      emit({ op: "list", ok: true, tools: r.tools.map((t) => t.name) });
    } else if (step.op === "call") {
      const progress = [];
      const r = await client.callTool({ name: step.name, arguments: step.arguments ?? {} }, undefined, {
        onprogress: (p) => progress.push({ progress: p.progress, total: p.total ?? null, atMs: Date.now() - started }),
        timeout: 30000,
      });
      emit({ op: "call", name: step.name, ok: !r.isError, result: r, progress, resultAtMs: Date.now() - started });
    } else if (step.op === "taskcall") {
      // A task-augmented call (MCP tasks): the SDK creates the task, polls tasks/get until
      // it ends and fetches tasks/result, validating it against the tool's outputSchema.
      const events = [];
      let result = null;
      let error = null;
      const stream = client.experimental.tasks.callToolStream({ name: step.name, arguments: step.arguments ?? {} }, undefined, {
        task: { ttl: step.ttl ?? 60000 },
        timeout: 30000,
      });
      for await (const m of stream) {
        if (m.type === "taskCreated" || m.type === "taskStatus") events.push({ type: m.type, taskId: m.task.taskId, status: m.task.status });
        else if (m.type === "result") result = m.result;
        else if (m.type === "error") error = errorOf(m.error);
      }
      emit({ op: "taskcall", name: step.name, ok: error === null && result !== null && !result.isError, result, error, events,
        taskId: events[0]?.taskId ?? null });
    } else if (step.op === "taskget") {
      const r = await client.experimental.tasks.getTask(step.taskId);
      emit({ op: "taskget", ok: true, task: r });
    } else if (step.op === "taskresult") {
      const r = await client.experimental.tasks.getTaskResult(step.taskId);
      emit({ op: "taskresult", ok: true, result: r });
    } else if (step.op === "tasklist") {
      const r = await client.experimental.tasks.listTasks();
      emit({ op: "tasklist", ok: true, taskIds: r.tasks.map((t) => t.taskId) });
    } else if (step.op === "taskcancel") {
      const r = await client.experimental.tasks.cancelTask(step.taskId);
      emit({ op: "taskcancel", ok: true, task: r });
    } else {
      emit({ op: step.op, ok: false, error: { code: null, message: "unknown op" } });
    }
  } catch (e) {
    emit({ op: step.op, name: step.name ?? null, ok: false, error: errorOf(e) });
  }
}
await client.close();
