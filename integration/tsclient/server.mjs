// An off-the-shelf MCP server on the official TypeScript SDK (Streamable HTTP at /mcp, on
// the SDK's Express app, stateless), serving the demo policy's App "inventory" for
// mcpgate's end-to-end tests: get_inventory, delete_product, and get_customer (a task
// tool: task-augmented calls are answered with a handle, the result comes on
// tasks/result). It listens on 127.0.0.1:<random port> and writes JSON lines to stdout:
// {"listening":PORT} first, then {"call":TOOL,"args":{...}} for every tool it executes,
// so that a test can tell what really ran.
//
//   node server.mjs [--json]    --json: answer with application/json instead of SSE
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { createMcpExpressApp } from '@modelcontextprotocol/sdk/server/express.js';
import { InMemoryTaskStore } from '@modelcontextprotocol/sdk/experimental/tasks/stores/in-memory.js';
import { z } from 'zod';

const json = process.argv.includes('--json');
const stock = new Map([['SKU-42', 42], ['SKU-7', 7], ['SKU-1', 1]]);
const taskStore = new InMemoryTaskStore();
const log = (v) => process.stdout.write(JSON.stringify(v) + '\n');

function customer(id) {
  return { id, name: 'Ann Example', email: 'ann@example.com', ssn: '123-45-6789' };
}

function newServer() {
  const server = new McpServer(
    { name: 'inventory-ts', version: '1.0.0' },
    { capabilities: { tasks: { requests: { tools: { call: {} } } } }, taskStore },
  );
  server.registerTool('get_inventory', {
    description: 'Stock of a product',
    inputSchema: { product_id: z.string() },
  }, async ({ product_id }) => {
    log({ call: 'get_inventory', args: { product_id } });
    const quantity = stock.get(product_id) ?? 0;
    return { content: [{ type: 'text', text: `${product_id}: ${quantity}` }], structuredContent: { product_id, quantity } };
  });
  server.registerTool('delete_product', {
    description: 'Delete a product',
    inputSchema: { product_id: z.string() },
  }, async ({ product_id }) => {
    log({ call: 'delete_product', args: { product_id } });
    const deleted = stock.delete(product_id);
    return { content: [{ type: 'text', text: `deleted ${product_id}: ${deleted}` }], structuredContent: { product_id, deleted } };
  });
  server.experimental.tasks.registerToolTask('get_customer', {
    description: 'A customer record (its ssn is what policies redact)',
    inputSchema: { id: z.string() },
    // Every field required, no others: what clients validate results against.
    outputSchema: z.object({ id: z.string(), name: z.string(), email: z.string(), ssn: z.string() }).strict(),
    execution: { taskSupport: 'optional' },
  }, {
    async createTask({ id }, { taskStore: store, taskRequestedTtl }) {
      log({ call: 'get_customer', args: { id } });
      const task = await store.createTask({ ttl: taskRequestedTtl ?? 60000, pollInterval: 10 });
      const c = customer(id);
      await store.storeTaskResult(task.taskId, 'completed', {
        content: [{ type: 'text', text: JSON.stringify(c) }], structuredContent: c,
      });
      return { task: await store.getTask(task.taskId) };
    },
    async getTask(_args, { taskId, taskStore: store }) {
      return await store.getTask(taskId);
    },
    async getTaskResult(_args, { taskId, taskStore: store }) {
      return await store.getTaskResult(taskId);
    },
  });
  return server;
}

// host 0.0.0.0 turns off the SDK's localhost Host-header check: requests arrive through
// Envoy with the route's Host. The listener itself is loopback only.
const app = createMcpExpressApp({ host: '0.0.0.0' });
app.post('/mcp', async (req, res) => {
  const server = newServer();
  const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: json });
  res.on('close', () => { transport.close(); server.close(); });
  await server.connect(transport);
  await transport.handleRequest(req, res, req.body);
});
const listener = app.listen(0, '127.0.0.1', () => log({ listening: listener.address().port }));
process.on('SIGTERM', () => listener.close(() => process.exit(0)));
