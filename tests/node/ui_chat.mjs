// One chat turn through the AI SDK's own client code: DefaultChatTransport (what
// useChat uses) sends it, readUIMessageStream rebuilds the assistant's UI
// message from the stream. Prints {message, errors} (or {thrown}) as JSON.
//
//   node ui_chat.mjs <api url> <key> <bot or ""> <text> [conversation id in metadata]
import { DefaultChatTransport, readUIMessageStream } from 'ai';

const [api, key, bot, text, conversationId] = process.argv.slice(2);
const transport = new DefaultChatTransport({
  api,
  headers: { Authorization: `Bearer ${key}` },
  body: bot ? { bot } : {},
});
const messages = [];
if (conversationId) {  // an earlier turn, as useChat keeps it: the id in its metadata
  messages.push({ id: 'u0', role: 'user', parts: [{ type: 'text', text: 'earlier' }] });
  messages.push({
    id: 'a0', role: 'assistant', metadata: { conversationId },
    parts: [{ type: 'text', text: 'an earlier answer' }],
  });
}
messages.push({ id: 'u1', role: 'user', parts: [{ type: 'text', text }] });
try {
  const stream = await transport.sendMessages({
    chatId: 'chat-1', messages, trigger: 'submit-message', messageId: undefined,
    abortSignal: undefined,
  });
  const errors = [];
  let message;
  for await (message of readUIMessageStream({ stream, onError: (e) => errors.push(e.message) })) {
    // each snapshot replaces the last; the final one is the whole message
  }
  console.log(JSON.stringify({ message, errors }));
} catch (e) {
  console.log(JSON.stringify({ thrown: String(e?.message ?? e) }));
}
