// A buffered Server-Sent Events parser for the browser.
//
// Network chunks may end anywhere: inside a line, inside a UTF-8 character.
// Bytes are decoded with a streaming TextDecoder (which holds back a split
// character) and lines are buffered until they end, so an event cut across
// two reads is never lost or garbled. Splitting each chunk on "\n" (as
// ChatIQ's published example does) is the bug this replaces.
"use strict";

export class SSEParser {
  // lastEventId: where a stream resumed on a new connection had got to.
  constructor(lastEventId = "") {
    this.decoder = new TextDecoder("utf-8");
    this.buffer = "";        // text not yet split into whole lines
    this.data = null;        // data lines of the event being read
    this.skipLF = false;     // the last chunk ended in "\r": a "\n" next belongs to it
    this.idBuffer = lastEventId;
    this.lastEventId = lastEventId;  // the id of the last whole event (as EventSource keeps it)
    this.retry = null;       // the server's reconnection hint, in ms
  }

  // Feed bytes (Uint8Array); returns the data of each event completed by them.
  feed(bytes) {
    return this.#lines(this.decoder.decode(bytes, { stream: true }));
  }

  // End of stream: the decoder's leftovers; an unfinished event is dropped.
  close() {
    return this.#lines(this.decoder.decode());
  }

  #lines(text) {
    if (this.skipLF && text.startsWith("\n")) text = text.slice(1);
    if (text) this.skipLF = false;
    this.buffer += text;
    const events = [];
    let start = 0;
    for (;;) {
      const match = /\r\n|\r|\n/g;
      match.lastIndex = start;
      const found = match.exec(this.buffer);
      if (!found) break;
      if (found[0] === "\r" && found.index === this.buffer.length - 1) {
        this.skipLF = true;  // maybe half of a "\r\n" cut between two reads
      }
      this.#line(this.buffer.slice(start, found.index), events);
      start = found.index + found[0].length;
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  #line(line, events) {
    if (line === "") {  // an event ends: only now does its id count
      this.lastEventId = this.idBuffer;
      if (this.data !== null) events.push(this.data.join("\n"));
      this.data = null;
      return;
    }
    if (line.startsWith(":")) return;  // a comment, e.g. the gateway's ": ping"
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") (this.data ??= []).push(value);
    else if (field === "id" && !value.includes("\0")) this.idBuffer = value;
    else if (field === "retry" && /^[0-9]+$/.test(value)) this.retry = Number(value);
  }
}
