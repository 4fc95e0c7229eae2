// The AI SDK's default OpenAI provider, createOpenAI(...)(model): it calls the
// Responses API. streamText and generateText, as an app would, against the
// gateway. Prints {streamed, parts, generated, finishReason} (or {thrown}) as JSON.
//
//   node openai_provider.mjs <base url (…/v1)> <key> <bot> <text>
import { createOpenAI } from '@ai-sdk/openai';
import { generateText, streamText } from 'ai';

const [baseURL, apiKey, bot, prompt] = process.argv.slice(2);
const openai = createOpenAI({ baseURL, apiKey });
try {
  const result = streamText({ model: openai(bot), prompt, maxRetries: 0 });
  const parts = [];
  let streamed = '';
  for await (const part of result.fullStream) {
    parts.push(part.type);
    if (part.type === 'text-delta') streamed += part.text;
    if (part.type === 'error') parts.push(`error: ${part.error?.message ?? part.error}`);
  }
  const generated = await generateText({ model: openai(bot), prompt, maxRetries: 0 });
  console.log(JSON.stringify({
    streamed, parts, generated: generated.text, finishReason: generated.finishReason,
    responseId: generated.response?.id,
  }));
} catch (e) {
  console.log(JSON.stringify({ thrown: String(e?.message ?? e), status: e?.statusCode }));
}
