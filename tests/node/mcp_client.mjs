// The MCP TypeScript SDK's Client over its StreamableHTTPClientTransport, as an
// agent host uses it: connect (initialize), list the tools, call one with a
// progress callback, end the session. Prints {version, session, tools, result,
// progress} (or {thrown}) as JSON.
//
//   node mcp_client.mjs <url (…/mcp)> <key> <tool> <question>
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

const [url, key, tool, question] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${key}` } },
});
const client = new Client({ name: 'chatiq-gateway-tests', version: '1.0.0' });
try {
  await client.connect(transport);
  const listed = await client.listTools();
  const progress = [];
  const result = await client.callTool({ name: tool, arguments: { question } }, undefined, {
    onprogress: (p) => progress.push(p),
  });
  const session = transport.sessionId;
  await transport.terminateSession();
  await client.close();
  console.log(JSON.stringify({
    version: transport.protocolVersion, session, tools: listed.tools.map((t) => t.name),
    result, progress,
  }));
} catch (e) {
  console.log(JSON.stringify({ thrown: String(e?.message ?? e), code: e?.code }));
}
