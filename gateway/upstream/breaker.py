"""Circuit breakers on the upstream, one per bot: fail fast while a bot keeps
failing, and probe it back on a timer.

After resilience4j's time-based CircuitBreaker:

- **Closed**: requests go through. Each request's *final* outcome (after its
  retries) goes into a sliding window of ``window_s``; once the window holds
  ``min_requests`` outcomes and the failed share reaches ``failure_rate``, the
  circuit opens. A request that recovered by retry is a success, and so is a
  stream once its first event arrived (the upstream answered); one that ended
  for its own reasons (a 4xx other than 429, a hang-up) is no outcome at all.
- **Open**: requests fail at once (503 ``UPSTREAM_UNAVAILABLE``). After
  ``cooldown_s`` a timer makes it half-open, traffic or not, so that an
  instance nobody sends requests to still recovers, and the metric shows it.
- **Half-open**: up to ``half_open_requests`` probes go through. When that
  many have succeeded the circuit closes; the first failure re-opens it.

Every transition starts a new epoch, and an outcome counts only in the epoch
its request was admitted in: a slow success that started before the circuit
opened can never close it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from enum import IntEnum

from aiohttp import web

from gateway.config import CircuitSettings
from gateway.errors import CircuitOpen
from gateway.metrics import OTHER_BOT

_BUCKETS = 10  # the window slides in steps of window_s / 10


class State(IntEnum):
    """The values of the ``circuit_state`` gauge."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower()


# A transition's report: the bot, the new state, and why (for the log line).
OnTransition = Callable[[str, State, dict[str, object]], None]


class _Window:
    """Outcomes over the last ``window_s`` seconds, in ``_BUCKETS`` buckets."""

    __slots__ = ("_buckets", "_width", "failures", "total")

    def __init__(self, window_s: float) -> None:
        self._width = window_s / _BUCKETS
        self._buckets: deque[list[int]] = deque()  # [bucket number, total, failures]
        self.total = self.failures = 0

    def add(self, now: float, failed: bool) -> None:
        number = int(now / self._width)
        buckets = self._buckets
        while buckets and buckets[0][0] <= number - _BUCKETS:
            _, total, failures = buckets.popleft()
            self.total -= total
            self.failures -= failures
        if not buckets or buckets[-1][0] != number:
            buckets.append([number, 0, 0])
        bucket = buckets[-1]
        bucket[1] += 1
        bucket[2] += failed
        self.total += 1
        self.failures += failed

    def clear(self) -> None:
        self._buckets.clear()
        self.total = self.failures = 0


class Permit:
    """One request's pass through a breaker; settle it once with its outcome."""

    __slots__ = ("_breaker", "_epoch", "_probe", "_settled")

    def __init__(self, breaker: CircuitBreaker, epoch: int, probe: bool) -> None:
        self._breaker = breaker
        self._epoch = epoch
        self._probe = probe
        self._settled = False

    def success(self) -> None:
        self._settle(True)

    def failure(self) -> None:
        self._settle(False)

    def release(self) -> None:
        """No verdict on the upstream (the client left, or the request was at fault)."""
        self._settle(None)

    def _settle(self, ok: bool | None) -> None:
        if not self._settled:
            self._settled = True
            self._breaker._record(self._epoch, self._probe, ok)


class CircuitBreaker:
    def __init__(
        self,
        bot: str,
        settings: CircuitSettings,
        on_transition: OnTransition,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bot = bot
        self._s = settings
        self._on_transition = on_transition
        self._clock = clock
        self.state = State.CLOSED
        self._epoch = 0
        self._window = _Window(settings.window_s)
        self._half_open_at = 0.0  # while open
        self._timer: asyncio.TimerHandle | None = None
        self._probes = 0  # half-open: probes let through and not yet settled or failed
        self._probe_successes = 0

    def reconfigure(self, settings: CircuitSettings) -> None:
        """New thresholds (a reload); the state is kept, the window too if its length is."""
        if settings.window_s != self._s.window_s:
            self._window = _Window(settings.window_s)
        self._s = settings

    def permit(self) -> Permit:
        """Let a request try the upstream, or raise ``CircuitOpen``."""
        if self.state is State.OPEN and self._clock() >= self._half_open_at:
            self._half_open()  # the timer is late (a busy loop): the clock decides
        if self.state is State.CLOSED:
            return Permit(self, self._epoch, probe=False)
        if self.state is State.HALF_OPEN and self._probes < self._s.half_open_requests:
            self._probes += 1
            return Permit(self, self._epoch, probe=True)
        wait = self._half_open_at - self._clock() if self.state is State.OPEN else 1.0
        raise CircuitOpen(
            f"the chat service keeps failing for bot {self.bot!r}; requests are paused",
            retry_after=max(wait, 0.0),
        )

    def close(self) -> None:
        """Cancel the timer (the app is shutting down)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _record(self, epoch: int, probe: bool, ok: bool | None) -> None:
        if epoch != self._epoch:
            return  # admitted before the last transition: it says nothing about now
        if probe:
            self._probes -= 1
            if ok is None:
                return  # no verdict: the next request may probe instead
            if not ok:
                self._open(reason="probe_failed")
                return
            self._probe_successes += 1
            if self._probe_successes >= self._s.half_open_requests:
                self._transition(State.CLOSED, {})
            return
        if ok is None:
            return
        window = self._window
        window.add(self._clock(), not ok)
        if (
            not ok
            and window.total >= self._s.min_requests
            and window.failures >= self._s.failure_rate * window.total
        ):
            self._open(
                reason="failure_rate",
                failure_rate=round(window.failures / window.total, 3),
                window_s=self._s.window_s,
                requests=window.total,
                failures=window.failures,
            )

    def _open(self, **why: object) -> None:
        self._half_open_at = self._clock() + self._s.cooldown_s
        self.close()
        self._timer = asyncio.get_running_loop().call_later(self._s.cooldown_s, self._on_timer)
        self._transition(State.OPEN, why)

    def _on_timer(self) -> None:
        self._timer = None
        if self.state is State.OPEN:
            self._half_open()

    def _half_open(self) -> None:
        self.close()
        self._transition(State.HALF_OPEN, {})

    def _transition(self, to: State, why: dict[str, object]) -> None:
        self.state = to
        self._epoch += 1
        self._window.clear()
        self._probes = self._probe_successes = 0
        self._on_transition(self.bot, to, why)


class Breakers:
    """One breaker per bot the configuration names, and one shared by all others.

    The same bounded set as the metrics' ``bot`` label (``Metrics.bot_label``),
    so a client naming random bots cannot grow it.
    """

    def __init__(
        self,
        settings: CircuitSettings,
        bots: Iterable[str],
        label_of: Callable[[str], str],
        on_transition: OnTransition,
    ) -> None:
        self._label_of = label_of
        self._on_transition = on_transition
        self._breakers: dict[str, CircuitBreaker] = {}
        self.reconfigure(settings, bots)

    def reconfigure(self, settings: CircuitSettings, bots: Iterable[str]) -> list[str]:
        """New settings for every breaker, and breakers for newly named bots
        (returned). A bot no longer named keeps its breaker, unused."""
        for breaker in self._breakers.values():
            breaker.reconfigure(settings)
        added = []
        for label in sorted({self._label_of(bot) for bot in bots} | {OTHER_BOT}):
            if label not in self._breakers:
                self._breakers[label] = CircuitBreaker(label, settings, self._on_transition)
                added.append(label)
        return added

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return iter(self._breakers.values())

    def for_bot(self, bot: str) -> CircuitBreaker:
        return self._breakers[self._label_of(bot)]

    def not_closed(self) -> dict[str, str]:
        """The bots whose circuit is open or half-open, and its state."""
        return {
            b.bot: b.state.label for b in self._breakers.values() if b.state is not State.CLOSED
        }

    def close(self) -> None:
        for breaker in self._breakers.values():
            breaker.close()


BREAKERS = web.AppKey("breakers", Breakers)  # on the app
