// The sample chat page: streams replies from the gateway token by token.
// Every piece of reply text goes into the page as text (textContent), never
// as HTML.
"use strict";

import { SSEParser } from "/static/sse.js";
import { currentToken, finishSignIn, signIn, signInSettings, signOut } from "/static/signin.js";

const KEY = "chatiq.key";
const CONVERSATION = "chatiq.conversation";
const DRAFT = "chatiq.draft";  // what was typed when a sign-in took the page away
const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), status: $("status"), chat: $("chat-form"), input: $("message"),
  send: $("send"), stop: $("stop"), bot: $("bot"), botLabel: $("bot-label"),
  keyForm: $("key-form"), key: $("key"), forget: $("forget-key"), fresh: $("new-conversation"),
  botOther: $("bot-other"), signIn: $("sign-in"),
};
// The gateway's single sign-on ([page] oidc_*), or null: a key is asked for.
let sso = null;
const OTHER = "other…";  // the picker's last entry: type any bot's slug

// The conversation survives reloads: its id and its finished messages.
let conversation = loadConversation();
let streaming = null;  // the AbortController of the reply in flight
let leaving = false;  // the page is being unloaded (a reload): a reply in flight is kept as it is

function loadConversation() {
  try {
    return JSON.parse(localStorage.getItem(CONVERSATION)) ?? newConversation();
  } catch {
    return newConversation();
  }
}

function newConversation() {
  return { id: null, bot: null, messages: [] };
}

function save() {
  localStorage.setItem(CONVERSATION, JSON.stringify(conversation));
}

// --- rendering -------------------------------------------------------------

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Show one message; returns its element. Messages are plain data:
// {role: "user"|"assistant"|"error", text, image?, suggestions?, note?}.
function show(message) {
  let node;
  if (message.suggestions) {
    node = element("li", "suggestions");
    for (const label of message.suggestions) {
      const chip = element("button", "", label);
      chip.type = "button";
      chip.addEventListener("click", () => ask(label));
      node.append(chip);
    }
  } else if (message.image) {
    node = element("li", "bubble assistant");
    const img = element("img");
    img.src = message.image;
    img.alt = message.text || "image from the assistant";
    node.append(img);
  } else {
    node = element("li", `bubble ${message.role}`, message.text);
  }
  if (message.note) markIncomplete(node, message, message.note);
  ui.messages.append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

function record(message) {
  conversation.messages.push(message);
  return show(message);
}

// A reply that did not reach [DONE] must not look complete.
function markIncomplete(node, message, note) {
  message.note = note;
  node.dataset.note = note;
  node.classList.add("incomplete");
}

function say(text) {
  ui.status.textContent = text;
}

// One place for an error: a bubble in the conversation, kept across reloads
// (so a failed question is never left without its answer).
function showError(text) {
  record({ role: "error", text });
  say("");
}

// --- talking to the gateway ------------------------------------------------

// A token from the sign-in (with single sign-on), else the key typed in.
function credential() {
  return sso ? currentToken() : localStorage.getItem(KEY);
}

function headers() {
  return { Authorization: `Bearer ${credential()}`, "Content-Type": "application/json" };
}

async function httpError(response) {
  let detail = "";
  try {
    detail = (await response.json()).error.message;
  } catch {
    // not the gateway's JSON: the status alone will do
  }
  const wait = response.headers.get("Retry-After");
  const later = wait ? ` Try again in ${wait} s.` : "";
  switch (response.status) {
    case 401:
      forgetKey();
      return sso
        ? `The gateway did not accept your sign-in (${detail}). Sign in again.`
        : "The gateway did not accept this key. Enter a valid key.";
    case 403:
      return `This key may not use that bot. ${detail}`;
    case 429:
      return `Too many requests for this key.${later} (${detail})`;
    case 503:
      return `The gateway is busy or restarting.${later}`;
    default:
      return `The gateway answered ${response.status}: ${detail || response.statusText}`;
  }
}

async function ask(text) {
  text = text.trim();
  if (!text || streaming) return;
  if (!credential()) {
    if (sso) {  // not signed in, or the sign-in ended: again, and back with what was typed
      sessionStorage.setItem(DRAFT, text);
      say("Signing in…");
      signIn(sso).catch((error) => say(error.message));
      return;
    }
    say("Enter your gateway key first.");
    askForKey();
    return;
  }
  say("");
  record({ role: "user", text });
  const reply = { role: "assistant", text: "" };
  const node = record(reply);  // recorded now, so extras that follow it stay after it
  const controller = new AbortController();
  setStreaming(controller);
  node.classList.add("streaming");
  try {
    const response = await fetch("/api/chatbot", {
      method: "POST",
      headers: { ...headers(), "X-Resumable": "1" },
      body: JSON.stringify({ message: text, conversation_id: conversation.id, bot: conversation.bot ?? undefined }),
      signal: controller.signal,
    });
    if (!response.ok) {
      node.remove();
      showError(await httpError(response));
      return;
    }
    // A resumable stream (the gateway's [resume] on) survives a dropped
    // connection, and a reload of this page: it is asked again after the
    // last event received.
    const streamId = response.headers.get("X-Stream-Id");
    if (streamId) reply.stream = { id: streamId, last: "" };
    await receive(reply, node, response, controller);
  } catch (error) {
    failed(reply, node, error);
  } finally {
    finish(reply, node);
  }
}

// A reply's events until [DONE], resumed after a cut while its stream can be
// (response null: resume at once, from the last event the reply has).
async function receive(reply, node, response, controller) {
  let done = false;
  let saved = 0;
  const handle = (data) => {
    if (data === "[DONE]") {
      done = true;
      return;
    }
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return;  // the gateway never forwards a malformed event; be lenient anyway
    }
    const delta = event.choices?.[0]?.delta?.content;
    if (typeof delta === "string") {
      reply.text += delta;
      node.textContent = reply.text;
    }
    for (const extra of event.responses ?? []) record({ role: "assistant", text: String(extra) });
    for (const a of event.attachments ?? []) {
      if (a?.type === "image" && typeof a.url === "string") record({ role: "assistant", image: a.url, text: a.alt ?? "" });
    }
    if (Array.isArray(event.suggestions) && event.suggestions.length) {
      record({ role: "assistant", suggestions: event.suggestions.map((s) => String(s.label ?? s)) });
    }
    if (typeof event.conversationId === "string") conversation.id = event.conversationId;
    if (event.error) {
      markIncomplete(node, reply, "interrupted");  // what came before it is only part of a reply
      showError(`The chat service reported an error: ${event.error.message ?? event.error.code}`);
    }
  };
  let parser = new SSEParser(reply.stream?.last ?? "");
  const keep = () => {  // after a whole batch: its text and its last id go together
    if (!reply.stream) return;
    reply.stream.last = parser.lastEventId;
    if (Date.now() - saved > 500) {  // where it got to survives a reload
      saved = Date.now();
      save();
    }
  };
  for (;;) {
    if (response === null) {  // cut off (or the page reloaded): ask after the last event
      node.classList.add("reconnecting");
      say("Reconnecting…");
      response = await resume(reply.stream.id, parser, controller.signal);
      node.classList.remove("reconnecting");
      if (!response.ok) {
        markIncomplete(node, reply, "interrupted");
        showError(response.status === 404
          ? "The reply was cut off, and the gateway no longer has the rest."
          : await httpError(response));
        return;
      }
      say("");
      parser = new SSEParser(parser.lastEventId);  // a new connection: nothing half-read carries over
    }
    const cut = await read(response, parser, handle, keep);
    if (done || !reply.stream || controller.signal.aborted) {
      if (cut) throw cut;
      break;
    }
    response = null;
  }
  if (!done) {
    markIncomplete(node, reply, "interrupted");
    showError("The reply was cut off before it finished.");
  }
}

function failed(reply, node, error) {
  if (leaving && reply.stream) return;  // the page is going away: the reply resumes when it is back
  if (error.name === "AbortError") {
    markIncomplete(node, reply, "stopped");
  } else {
    markIncomplete(node, reply, "interrupted");
    showError("Network error: the gateway could not be reached.");
  }
}

function finish(reply, node) {
  if (leaving && reply.stream) return;
  node.classList.remove("streaming");
  delete reply.stream;  // done, one way or another: nothing to resume after a reload
  if (!reply.text && !reply.note) {  // nothing to keep (e.g. the request was refused)
    node.remove();
    conversation.messages.splice(conversation.messages.indexOf(reply), 1);
  }
  save();
  setStreaming(null);
}

// After a reload: a reply that was still streaming goes on from where it got to.
async function resumeAfterReload(reply, node) {
  const controller = new AbortController();
  setStreaming(controller);
  node.classList.add("streaming");
  try {
    await receive(reply, node, null, controller);
  } catch (error) {
    failed(reply, node, error);
  } finally {
    finish(reply, node);
  }
}

// Reads a stream to its end; returns the error that cut it, if one did.
// afterBatch runs once the events of each network read are handled.
async function read(response, parser, handle, afterBatch = () => {}) {
  const reader = response.body.getReader();
  try {
    for (;;) {
      const { done: ended, value } = await reader.read();
      if (ended) break;
      parser.feed(value).forEach(handle);
      afterBatch();
    }
    parser.close().forEach(handle);
    return null;
  } catch (error) {
    if (error.name === "AbortError") throw error;
    return error;
  }
}

// The stream again, after the last event this page has: tried for a while
// with growing pauses (the server's retry: hint first) while the network is away.
const RESUME_FOR_MS = 30_000;
async function resume(streamId, parser, signal) {
  const until = Date.now() + RESUME_FOR_MS;
  let wait = parser.retry ?? 500;
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, wait));
    if (signal.aborted) throw new DOMException("stopped", "AbortError");
    try {
      const response = await fetch(`/api/chatbot/streams/${encodeURIComponent(streamId)}`, {
        headers: { ...headers(), "Last-Event-ID": parser.lastEventId },
        signal,
      });
      if (response.ok || ![502, 503, 504].includes(response.status) || Date.now() + wait > until) {
        return response;
      }
    } catch (error) {
      if (error.name === "AbortError" || Date.now() + wait > until) throw error;
    }
    wait = Math.min(wait * 2, 4000);
  }
}

function setStreaming(controller) {
  streaming = controller;
  ui.send.disabled = controller !== null;
  ui.stop.disabled = controller === null;
  ui.chat.setAttribute("aria-busy", String(controller !== null));
  if (controller === null) ui.input.focus();
}

// --- key and bots ------------------------------------------------------------

function askForKey() {
  if (sso) {  // single sign-on: a button, not a key
    ui.signIn.hidden = false;
    ui.forget.hidden = true;
    return;
  }
  ui.keyForm.hidden = false;
  ui.key.focus();
}

function forgetKey() {
  localStorage.removeItem(KEY);
  signOut();
  ui.bot.hidden = ui.botLabel.hidden = true;
  askForKey();
}

async function loadBots() {
  const response = await fetch("/api/bots", { headers: headers() }).catch(() => null);
  if (!response?.ok) {
    if (response?.status === 401) {
      forgetKey();
      showError(sso ? "The gateway did not accept your sign-in. Sign in again."
        : "The gateway did not accept this key. Enter a valid key.");
    }
    return;
  }
  const { bots, default: fallback } = await response.json();
  const choices = conversation.bot && !bots.includes(conversation.bot) ? [...bots, conversation.bot] : bots;
  ui.bot.replaceChildren(...choices.map((bot) => element("option", "", bot)), element("option", "", OTHER));
  ui.bot.value = conversation.bot ?? (bots.includes(fallback) ? fallback : bots[0]);
  ui.bot.hidden = ui.botLabel.hidden = false;  // the bot in use is always shown
}

// --- wiring ------------------------------------------------------------------

ui.chat.addEventListener("submit", (event) => {
  event.preventDefault();
  if (streaming) {  // keep what was typed: it goes when the reply is done
    say("A reply is still coming; send this when it is done (or Stop it).");
    return;
  }
  const text = ui.input.value;
  ui.input.value = "";
  ask(text);
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.chat.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => streaming?.abort());
ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY, ui.key.value.trim());
  ui.key.value = "";
  ui.keyForm.hidden = true;
  say("");
  loadBots();
  ui.input.focus();
});
ui.forget.addEventListener("click", forgetKey);
ui.signIn.addEventListener("click", () => {
  say("Signing in…");
  signIn(sso).catch((error) => say(error.message));
});
ui.fresh.addEventListener("click", () => {
  streaming?.abort();
  conversation = { ...newConversation(), bot: conversation.bot };
  save();
  ui.messages.replaceChildren();
  say("");
  ui.input.focus();
});
function useBot(bot) {
  // A conversation belongs to its bot: another bot starts a new one.
  if (conversation.id && conversation.bot !== bot) {
    conversation = newConversation();
    ui.messages.replaceChildren();
  }
  conversation.bot = bot;
  save();
}

ui.bot.addEventListener("change", () => {
  if (ui.bot.value === OTHER) {  // free entry: a bot the list does not name
    ui.botOther.hidden = false;
    ui.botOther.focus();
    return;
  }
  ui.botOther.hidden = true;
  useBot(ui.bot.value);
});
ui.botOther.addEventListener("keydown", (event) => {
  if (event.key !== "Enter") return;
  event.preventDefault();
  const bot = ui.botOther.value.trim();
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(bot)) {
    say("A bot's slug: letters, digits, '.', '_' and '-'.");
    return;
  }
  if (![...ui.bot.options].some((option) => option.value === bot)) {
    ui.bot.insertBefore(element("option", "", bot), ui.bot.lastElementChild);
  }
  ui.bot.value = bot;
  ui.botOther.hidden = true;
  ui.botOther.value = "";
  say("");
  useBot(bot);
  ui.input.focus();
});

const nodes = conversation.messages.map(show);
// Not saved here: what was saved last holds a reply's text and the id of its
// last event together, so a resume after the reload repeats nothing.
window.addEventListener("pagehide", () => {
  leaving = true;
});

async function start() {
  sso = await signInSettings();
  if (sso) {
    ui.forget.textContent = "Sign out";
    try {
      if (await finishSignIn(sso)) say("");
    } catch (error) {  // said on the status line: not a part of the conversation
      say(error.message);
    }
    const draft = sessionStorage.getItem(DRAFT);
    if (draft !== null) {
      sessionStorage.removeItem(DRAFT);
      ui.input.value = draft;
    }
  }
  if (credential()) {
    ui.signIn.hidden = true;
    ui.forget.hidden = false;
    loadBots();
  } else {
    askForKey();
  }
  const unfinished = conversation.messages.findLastIndex((m) => m.stream);
  if (unfinished >= 0 && credential()) {
    resumeAfterReload(conversation.messages[unfinished], nodes[unfinished]);
  } else if (unfinished >= 0) {  // no key to resume it with: it stays a part of a reply
    const reply = conversation.messages[unfinished];
    delete reply.stream;
    markIncomplete(nodes[unfinished], reply, "interrupted");
    save();
  }
}

start();

window.chatiq = { SSEParser };  // for the browser tests of the parser
