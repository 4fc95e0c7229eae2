// useChat's resume hook through the AI SDK's own client code: DefaultChatTransport's
// reconnectToStream (what useChat({ resume: true }) calls on mount) asks for the
// chat's active stream; readUIMessageStream rebuilds the assistant's message.
// Prints {message, errors}, {none: true} when nothing is streaming (204), or {thrown}.
//
//   node ui_resume.mjs <api url> <key> <chat id>
import { DefaultChatTransport, readUIMessageStream } from 'ai';

const [api, key, chatId] = process.argv.slice(2);
const transport = new DefaultChatTransport({ api, headers: { Authorization: `Bearer ${key}` } });
try {
  const stream = await transport.reconnectToStream({ chatId });
  if (stream === null) {
    console.log(JSON.stringify({ none: true }));
  } else {
    const errors = [];
    let message;
    for await (message of readUIMessageStream({ stream, onError: (e) => errors.push(e.message) })) {
      // each snapshot replaces the last; the final one is the whole message
    }
    console.log(JSON.stringify({ message, errors }));
  }
} catch (e) {
  console.log(JSON.stringify({ thrown: String(e?.message ?? e) }));
}
