"""An opened upstream stream, read into its journal whoever is reading it.

The same events the relay would send (``gateway.relay.translate``), one SSE
event per journal entry, appended from inside the upstream connection's
``buffer_updated``. The upstream is never paused for a reader: the journal is
bounded instead. The idle gap and the total deadline are watched as the
relay watches them; any failure, or the end of a drain's grace, ends the
journal with one error event and ``[DONE]``, so every reader ends the same.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from gateway.chat import StreamEncoder
from gateway.config import UpstreamSettings
from gateway.downstream import translate
from gateway.errors import GatewayError, IdleTimeout, TotalTimeout, UpstreamError
from gateway.resume.journal import Journal, split_events
from gateway.sse import DONE_EVENT, Event, format_event
from gateway.timers import Timer, TimerHeap
from gateway.upstream.events import EventSource

# A field line of the upstream's own id or reconnection time, whatever its line end.
_ID_OR_RETRY = re.compile(rb"(?:^|(?<=[\r\n]))(?:id|retry)(?::[^\r\n]*)?(?:\r\n|\r|\n)")


def _without_id_and_retry(event: Event) -> Event:
    """The event without the upstream's ``id:`` and ``retry:`` lines: in a
    resumable stream the journal's ids are the only ids (a client resumes
    after them), and the reconnection time is the gateway's to give."""
    return Event(_ID_OR_RETRY.sub(b"", event.raw), event.data, event.event)


def ending(err: GatewayError, encoder: StreamEncoder | None) -> list[bytes]:
    """A failure's last events, in the stream's wire format."""
    if encoder is None:
        return [format_event(err.body_json()), DONE_EVENT]
    return split_events(encoder.error(err))


class Recorder:
    def __init__(
        self,
        source: EventSource,
        journal: Journal,
        encoder: StreamEncoder | None,
        settings: UpstreamSettings,
        deadline: float,
        on_content: Callable[[], None],
        on_failure: Callable[[UpstreamError], None],
        timers: TimerHeap,
        on_error_event: Callable[[str], None] = lambda code: None,  # ChatIQ's own error event
        on_conversation: Callable[[str], None] | None = None,  # the conversation id it names
    ) -> None:
        self._source = source
        self._journal = journal
        self._encoder = encoder
        self._settings = settings
        self._deadline = deadline
        self._on_content: Callable[[], None] | None = on_content  # once, at the first token
        self._on_failure = on_failure
        self._on_error_event = on_error_event
        self._on_conversation = on_conversation
        self._loop = asyncio.get_running_loop()
        self._ended: asyncio.Future[None] = self._loop.create_future()
        self._done = False
        self._last_event = 0.0
        self._timers = timers  # the app's, with the relays' timers
        self._timer: Timer | None = None

    async def run(self, first: list[Event]) -> None:
        """Until the stream ends; cancelled, the journal ends with ``cancelled_by``."""
        try:
            self.on_events(first)
            first.clear()
            if not self._ended.done():
                self._arm()
                self._source.attach(self)
            await asyncio.shield(self._ended)
        finally:
            if self._timer is not None:
                self._timers.cancel(self._timer)
            self._source.close(done=self._done)

    def end_with(self, err: GatewayError) -> None:
        """End the journal early (a drain's grace ran out, say)."""
        self._journal.append(ending(err, self._encoder), final=True)
        self._stop()

    # EventConsumer: called from the upstream connection's buffer_updated

    def on_events(self, events: list[Event]) -> None:
        if self._ended.done():
            return
        with_data = [
            e if e.id is None and e.retry is None else _without_id_and_retry(e)
            for e in events
            if e.data is not None
        ]
        if not with_data:  # comments and blank events are no sign of life
            return
        self._last_event = self._loop.time()
        pieces, failure, done, content, _, error_code, conversation = translate(
            with_data, self._encoder
        )
        if error_code is not None:
            self._on_error_event(error_code)
        if conversation is not None and self._on_conversation is not None:
            self._on_conversation(str(conversation))
        if self._encoder is None:
            entries = pieces
        else:
            entries = [event for piece in pieces for event in split_events(piece)]
        if content and self._on_content is not None:
            self._on_content()
            self._on_content = None
        if failure is not None:
            self._journal.append(entries)
            self.on_failure(failure)
        elif done:
            self._done = True
            self._journal.append(entries, final=True)
            self._stop()
        elif entries:
            self._journal.append(entries)

    def on_failure(self, failure: UpstreamError) -> None:
        if not self._ended.done():
            self._on_failure(failure)
            self.end_with(failure)

    # the timer

    def _stop(self) -> None:
        if not self._ended.done():
            self._ended.set_result(None)

    def _arm(self) -> None:
        when = min(self._deadline, self._last_event + self._settings.idle_timeout_s)
        self._timer = self._timers.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._ended.done():
            return
        now = self._loop.time()
        if now >= self._deadline:
            self.on_failure(TotalTimeout("the stream ran past its time limit"))
        elif now >= self._last_event + self._settings.idle_timeout_s:
            self.on_failure(IdleTimeout("the chat service stopped sending"))
        else:
            self._arm()
