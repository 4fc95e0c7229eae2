"""The project's one incremental Server-Sent Events parser.

Bytes go in, whole events come out. Each event keeps the exact bytes it was
made of (``raw``), so a relay can forward the upstream's bytes untouched while
knowing where every event ends. The concatenation of every event's ``raw``
(plus whatever is still buffered) is exactly the input.

Follows the WHATWG event-stream rules: lines end in ``\\n``, ``\\r\\n`` or
``\\r``; lines starting with ``:`` are comments; ``data`` lines accumulate,
joined by ``\\n``; a blank line ends an event. A block without a ``data`` field
(a comment, a keep-alive, a stray blank line) is still returned, with
``data=None``, so that no byte is ever dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_EVENT_BYTES = 1 << 20
DONE_DATA = "[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
# Bytes searched for as ints: ``bytes in bytes`` first tries the needle as an
# int, and raises and clears a TypeError on every call (several times slower).
_CR, _LF = 0x0D, 0x0A


class SSEProtocolError(Exception):
    """The stream cannot be parsed safely (an oversized event).

    ``events`` holds the whole events that came before the problem, so that a
    relay can still deliver them, in order, before it gives up.
    """

    def __init__(self, message: str, events: list[Event]) -> None:
        super().__init__(message)
        self.events = events


@dataclass(slots=True)  # not frozen: a frozen dataclass is several times slower to build
class Event:
    raw: bytes
    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None

    @property
    def is_done(self) -> bool:
        return self.data == DONE_DATA


def format_event(data: str) -> bytes:
    """Frame ``data`` as one event; embedded newlines become several data lines."""
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "".join(f"data: {line}\n" for line in lines).encode() + b"\n"


class SSEParser:
    """Incremental parser: ``feed()`` chunks cut anywhere, ``close()`` at the end."""

    __slots__ = (
        "_buf",
        "_data",
        "_event",
        "_id",
        "_max",
        "_retry",
        "_scan",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._buf = bytearray()  # bytes of the event being read
        self._scan = 0  # where the next unread line starts in _buf
        self._max = max_event_bytes
        self._reset_fields()

    def _reset_fields(self) -> None:
        self._data: list[str] | None = None
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet belong to a complete event."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[Event]:
        if self._buf or _CR in chunk:
            return self._feed(chunk, [])
        size = len(chunk)
        if (  # one read, one event of one "data: " line: most reads of a stream
            chunk.find(b"\n") == size - 2
            and chunk[-1] == _LF
            and chunk.startswith(b"data: ")
            and size <= self._max
        ):
            return [Event(chunk, chunk[6:-2].decode("utf-8", "replace"))]
        # Fast path for what upstreams send nearly always: events of one
        # "data: " line each, ending in a blank line, none cut by this chunk.
        events: list[Event] = []
        start = 0
        blocks = chunk.split(b"\n\n")
        del blocks[-1]  # what follows the last blank line: nothing, or a cut event
        for block in blocks:
            end = start + len(block) + 2
            if block[:6] != b"data: " or _LF in block or end - start > self._max:
                break
            events.append(Event(chunk[start:end], block[6:].decode("utf-8", "replace")))
            start = end
        if start == len(chunk):
            return events
        return self._feed(chunk[start:], events)

    def flush(self) -> list[Event]:
        """The input has ended: events held only because their last byte was a
        ``\r`` (which a ``\n`` might have followed) are complete after all."""
        return self._feed(b"", [], final=True)

    def _feed(self, chunk: bytes, events: list[Event], final: bool = False) -> list[Event]:
        """The general case: any line endings, fields, comments, and cuts."""
        buf = self._buf
        buf += chunk
        start = 0  # first byte of the event being read
        pos = self._scan
        end = len(buf)
        while pos < end:
            lf = buf.find(b"\n", pos)
            cr = buf.find(b"\r", pos, lf if lf >= 0 else end)
            if cr >= 0:
                line_end = cr
                if cr + 1 < end:
                    next_pos = cr + 2 if buf[cr + 1] == 0x0A else cr + 1
                elif final:
                    next_pos = cr + 1
                else:
                    # A \r last: the next byte decides whether a \n belongs to
                    # this line ending, so its event waits (its bytes stay whole).
                    break
            elif lf >= 0:
                line_end = lf
                next_pos = lf + 1
            else:
                break
            if line_end == pos:
                if next_pos - start > self._max:
                    self._too_big(events)
                events.append(self._dispatch(bytes(buf[start:next_pos])))
                start = next_pos
            else:
                self._field(buf[pos:line_end])
            pos = next_pos
        if start:  # a fresh buffer, not a trimmed one: a trimmed one keeps its capacity
            self._buf = buf = bytearray(buf[start:]) if start < len(buf) else bytearray()
        self._scan = pos - start
        if len(buf) > self._max:
            self._too_big(events)
        return events

    def _too_big(self, events: list[Event]) -> None:
        # The stream is abandoned after this: the parser is not fed again.
        raise SSEProtocolError(f"event larger than {self._max} bytes", events)

    def close(self) -> Event | None:
        """End of stream: return trailing bytes that never formed a whole event.

        Per the spec such an incomplete event is not dispatched; the caller
        decides what a stream cut mid-event means. The returned block has
        ``data=None`` and carries the leftover bytes.
        """
        if not self._buf:
            return None
        leftover = Event(raw=bytes(self._buf))
        self._buf.clear()
        self._scan = 0
        self._reset_fields()
        return leftover

    def _field(self, line: bytearray) -> None:
        if line[:1] == b":":
            return
        colon = line.find(b":")
        if colon < 0:
            name, value = bytes(line), b""
        else:
            name = bytes(line[:colon])
            value = bytes(line[colon + 1 : colon + 2].lstrip(b" ") + line[colon + 2 :])
        if name == b"data":
            if self._data is None:
                self._data = []
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id" and 0 not in value:
            self._id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            self._retry = int(value)

    def _dispatch(self, raw: bytes) -> Event:
        data = None if self._data is None else "\n".join(self._data)
        event = Event(raw, data, self._event, self._id, self._retry)
        self._reset_fields()
        return event
