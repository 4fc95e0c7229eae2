"""Locust suite: streaming chats through the gateway, measured per token.

Besides the HTTP request itself, each stream reports three custom request
types, measured exactly here (not Locust's rounding):

- ``TTFT``: request sent to the first content chunk received;
- ``ITL``: the gap between two content chunks (inter-token latency);
- ``STREAM``: request sent to ``[DONE]``; a failure when the stream ends
  without ``[DONE]`` or with an error event.

Locust stores response times above 100 ms rounded to two significant
digits, and its "Aggregated" row mixes these types with the HTTP requests:
read neither for these figures. The exact percentiles are written at the end
to ``summary.md`` in ``--chatiq-results`` (workers ship their raw samples to
the master, so this holds in distributed runs too), and thresholds given on
the command line (``--max-ttft-p99-ms``, ``--max-failure-ratio``) set the exit
code from those exact figures.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import statistics
import sys
import time
import tomllib
from collections import defaultdict
from pathlib import Path
from typing import Any

import gevent  # type: ignore[import-untyped]
from locust import HttpUser, between, events, task
from locust.env import Environment
from locust.runners import WorkerRunner
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

from gateway.sse import SSEParser
from loadtest.harness import percentile

SCENARIO = Path(__file__).with_name("scenario.toml")
KINDS = ("TTFT", "ITL", "STREAM", "RESUME")
PROGRESS_EVERY_S = 5.0


class Samples:
    """Raw measurements in milliseconds, failures by reason, and when each stream
    ended (for the timeline). A stream's samples are kept only once it has
    ended, so every count here is of finished streams, as Locust's are."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)
        self.failures: dict[str, int] = defaultdict(int)
        self.ends: list[tuple[float, bool]] = []  # (wall time, succeeded)
        self.resumed: dict[int, int] = defaultdict(int)  # streams by how often they resumed

    def drain(self) -> dict[str, Any]:
        out = {"values": dict(self.values), "failures": dict(self.failures), "ends": self.ends,
               "resumed": dict(self.resumed)}  # fmt: skip
        self.values, self.failures, self.ends = defaultdict(list), defaultdict(int), []
        self.resumed = defaultdict(int)
        return out

    def merge(self, data: dict[str, Any]) -> None:
        for kind, values in data["values"].items():
            self.values[kind].extend(values)
        for reason, n in data["failures"].items():
            self.failures[reason] += n
        self.ends.extend(tuple(e) for e in data.get("ends", []))
        for times, n in data.get("resumed", {}).items():
            self.resumed[int(times)] += n

    @property
    def streams(self) -> int:
        return len(self.values["STREAM"]) + sum(self.failures.values())


SAMPLES = Samples()  # one per Locust process: the suite's own bookkeeping


def _options(parser: Any) -> None:
    parser.add_argument("--max-ttft-p99-ms", type=float, default=0, help="fail above (0: off)")
    parser.add_argument("--max-failure-ratio", type=float, default=1.0, help="fail above")
    parser.add_argument("--chatiq-results", default="results/load", help="summary.md goes here")
    parser.add_argument("--chatiq-scenario", default=str(SCENARIO), help="profiles and think time")
    parser.add_argument(
        "--chatiq-resumable", action="store_true",
        help="ask for resumable streams (X-Resumable: 1), resumed when cut",
    )  # fmt: skip
    parser.add_argument(
        "--chatiq-drop-ratio", type=float, default=0.0,
        help="share of streams whose client drops its connection mid-answer and resumes "
        "(implies --chatiq-resumable; needs [resume] on)",
    )  # fmt: skip


def _send_samples(client_id: str, data: dict[str, Any]) -> None:
    data["chatiq_samples"] = SAMPLES.drain()


def _collect_samples(client_id: str, data: dict[str, Any]) -> None:
    if "chatiq_samples" in data:
        SAMPLES.merge(data["chatiq_samples"])


def _summarise(environment: Environment, **kwargs: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    options = environment.parsed_options
    streams = SAMPLES.streams
    rows = [
        "| measure | count | p50 ms | p90 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in KINDS:
        v = SAMPLES.values[kind]
        if v:
            rows.append(
                f"| {kind} | {len(v)} | {statistics.median(v):.1f} | {percentile(v, 0.9):.1f} "
                f"| {percentile(v, 0.99):.1f} | {max(v):.1f} |"
            )
    failures = sum(SAMPLES.failures.values())
    ratio = failures / streams if streams else 0.0
    failed = ["| failed streams: reason | count |", "| --- | ---: |"] + [
        f"| {reason} | {n} |" for reason, n in sorted(SAMPLES.failures.items())
    ]
    text = "\n".join(
        [
            f"## Load: {streams} streams, {failures} failed ({ratio:.2%})",
            "",
            *rows,
            "",
            *(failed if failures else ["No stream failed."]),
            "",
            _resumes_line(),
        ]
    )
    print(text, file=sys.stderr)  # stderr: make load keeps Locust's own tables in a file
    if options is not None:
        out = Path(options.chatiq_results)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(text + "\n")
        _charts(out / "charts.png")
        if options.csv_prefix:
            _final_stats_csv(environment, options.csv_prefix)
        p99 = percentile(SAMPLES.values["TTFT"], 0.99) if SAMPLES.values["TTFT"] else 0.0
        crossed = []
        if options.max_ttft_p99_ms and p99 > options.max_ttft_p99_ms:
            crossed.append(f"TTFT p99 {p99:.0f} ms > {options.max_ttft_p99_ms:.0f} ms")
        if ratio > options.max_failure_ratio:
            crossed.append(f"failure ratio {ratio:.2%} > {options.max_failure_ratio:.2%}")
        if not streams:
            crossed.append("no stream completed")
        if crossed:
            print("THRESHOLD CROSSED: " + "; ".join(crossed), file=sys.stderr)
        # The thresholds decide, not Locust's default (exit 1 on any failure at all).
        environment.process_exit_code = 1 if crossed else 0


def _resumes_line() -> str:
    resumed = SAMPLES.resumed
    if not resumed:
        return "No stream was resumed."
    streams, times = sum(resumed.values()), sum(k * n for k, n in resumed.items())
    return f"Resumed: {streams} streams, {times} resumes (RESUME: resume asked to its first event)."


def _final_stats_csv(environment: Environment, prefix: str) -> None:
    """Locust writes its CSV once a second, so its last write can miss the run's
    last second: write the stats table again now that every stream has ended,
    so that it counts what summary.md counts."""
    table = StatsCSV(environment, PERCENTILES_TO_REPORT)
    with open(f"{prefix}_stats.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table.requests_csv_columns)
        table._requests_data_rows(writer)  # Locust's own row format


def _charts(path: Path) -> None:
    """TTFT and inter-token histograms, and streams finished and failed each second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ttft, itl, timeline) = plt.subplots(1, 3, figsize=(14, 4))
    ttft.hist(SAMPLES.values["TTFT"] or [0], bins=40)
    ttft.set(title="Time to first token", xlabel="ms", ylabel="streams")
    itl.hist(SAMPLES.values["ITL"] or [0], bins=40)
    itl.set(title="Gap between tokens", xlabel="ms", ylabel="gaps")
    itl.set_yscale("log")
    if SAMPLES.ends:
        start = min(t for t, _ in SAMPLES.ends)
        seconds = int(max(t for t, _ in SAMPLES.ends) - start) + 1
        ok, bad = [0] * seconds, [0] * seconds
        for t, succeeded in SAMPLES.ends:
            (ok if succeeded else bad)[int(t - start)] += 1
        timeline.bar(range(seconds), ok, label="finished", color="tab:green")
        timeline.bar(range(seconds), bad, bottom=ok, label="failed", color="tab:red")
        timeline.legend()
    timeline.set(title="Streams ended each second", xlabel="s", ylabel="streams")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _progress(environment: Environment, **kwargs: Any) -> None:
    """Every few seconds while it runs: users, streams so far, failures, TTFT."""
    if isinstance(environment.runner, WorkerRunner):
        return

    def report() -> None:
        started = time.monotonic()
        while True:
            gevent.sleep(PROGRESS_EVERY_S)
            runner = environment.runner
            users = runner.user_count if runner is not None else 0
            ttft = SAMPLES.values["TTFT"]
            so_far = (
                f"TTFT p50 {percentile(ttft, 0.5):.0f} / p99 {percentile(ttft, 0.99):.0f} ms"
                if ttft
                else "no token yet"
            )
            print(
                f"load: {time.monotonic() - started:.0f} s, {users} users, "
                f"{SAMPLES.streams} streams done, {sum(SAMPLES.failures.values())} failed, "
                f"{so_far}",
                file=sys.stderr,
                flush=True,
            )

    gevent.spawn(report)


MAX_RESUMES = 5  # a stream cut more often than this counts as failed


class Reading:
    """One answer as a client reads it, over one connection or several
    (resumed after a cut): its samples, kept until it ends."""

    def __init__(self, started: float, conversation_id: str | None) -> None:
        self.started = started
        self.conversation_id = conversation_id
        self.samples: list[tuple[str, float]] = []
        self.last_token: float | None = None
        self.last_event_id = ""
        self.done = False
        self.failure: str | None = None
        self.drop_after: int | None = None  # events, then this client drops its connection
        self.events = 0
        self.resumes = 0
        self.resumed_at: float | None = None  # a resume was asked: its first event is timed

    def read(self, response: Any) -> None:
        """Events until the stream ends, its connection breaks, or the client drops it."""
        parser = SSEParser()  # a fresh one per connection: a cut event comes again whole
        try:
            for chunk in response.iter_content(chunk_size=None):
                now = time.perf_counter()
                for event in parser.feed(chunk):
                    if event.data is not None:
                        self._event(event.data, event.id, now)
                if self.drop_after is not None and self.events >= self.drop_after:
                    self.drop_after = None
                    response.close()
                    return
        except OSError:  # requests' ChunkedEncodingError, a reset: resumed if it can be
            pass

    def _event(self, data: str, event_id: str | None, now: float) -> None:
        self.events += 1
        if event_id is not None:
            self.last_event_id = event_id
        if self.resumed_at is not None:
            self.samples.append(("RESUME", (now - self.resumed_at) * 1000))
            self.resumed_at = None
            self.last_token = None if self.last_token is None else now  # no gap across a cut
        if data == "[DONE]":
            self.done = True
            return
        payload = json.loads(data)
        if "choices" in payload:
            if self.last_token is None and not any(k == "TTFT" for k, _ in self.samples):
                self.samples.append(("TTFT", (now - self.started) * 1000))
            elif self.last_token is not None:
                self.samples.append(("ITL", (now - self.last_token) * 1000))
            self.last_token = now
        elif "error" in payload:
            code = (payload["error"] or {}).get("code", "?")
            self.failure = f"error event {code}"
        self.conversation_id = payload.get("conversationId", self.conversation_id)


class ChatUser(HttpUser):
    """Holds multi-turn conversations, streaming every reply."""

    wait_time = between(0, 0)  # think time comes from the scenario, between turns
    started = itertools.count()

    def on_start(self) -> None:
        options = self.environment.parsed_options
        path = Path(options.chatiq_scenario) if options is not None else SCENARIO
        scenario = tomllib.loads(path.read_text())
        profiles = scenario["profiles"]
        # Round-robin over the profiles repeated by weight: the mix holds even for a few users.
        weighted = [p for p in profiles for _ in range(p["weight"])]
        self.profile = weighted[next(ChatUser.started) % len(weighted)]
        self.think = scenario["think_time_s"]
        self.turns = scenario["turns"]

    @task
    def conversation(self) -> None:
        conversation_id = None
        for _ in range(random.randint(*self.turns)):
            conversation_id = self.ask(random.choice(self.profile["messages"]), conversation_id)
            time.sleep(random.uniform(*self.think))

    def ask(self, message: str, conversation_id: str | None) -> str | None:
        name = f"{self.profile['name']}/{self.profile['bot']}"
        body = {"message": message, "bot": self.profile["bot"], "conversation_id": conversation_id}
        auth = {"Authorization": f"Bearer {self.profile['key']}"}
        options = self.environment.parsed_options
        drop_ratio = options.chatiq_drop_ratio if options is not None else 0.0
        resumable = drop_ratio > 0 or (options is not None and options.chatiq_resumable)
        stream = Reading(time.perf_counter(), conversation_id)
        if random.random() < drop_ratio:  # this client will lose its connection mid-answer
            stream.drop_after = random.randint(1, 30)
        with self.client.post(
            "/api/chatbot", json=body, stream=True, name=name, catch_response=True,
            headers={**auth, "X-Resumable": "1"} if resumable else auth,
        ) as response:  # fmt: skip
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                self._fail(name, stream.started, f"HTTP {response.status_code}")
                return conversation_id
            response.success()
            stream_id = response.headers.get("X-Stream-Id")
            stream.read(response)
        while not stream.done and stream_id and stream.resumes < MAX_RESUMES:
            # Cut off (on purpose or not): resume after the last event received.
            stream.resumes += 1
            asked = time.perf_counter()
            with self.client.get(
                f"/api/chatbot/streams/{stream_id}", stream=True, name="resume",
                headers={**auth, "Last-Event-ID": stream.last_event_id}, catch_response=True,
            ) as response:  # fmt: skip
                if response.status_code != 200:
                    response.failure(f"HTTP {response.status_code}")
                    stream.failure = f"resume HTTP {response.status_code}"
                    break
                response.success()
                stream.resumed_at = asked
                stream.read(response)
        for kind, ms in stream.samples:  # the stream ended: now its samples count
            self._record(kind, name, ms)
        if stream.resumes:
            SAMPLES.resumed[stream.resumes] += 1
        if stream.failure or not stream.done:
            self._fail(name, stream.started, stream.failure or "ended without [DONE]")
        else:
            self._record("STREAM", name, (time.perf_counter() - stream.started) * 1000)
            SAMPLES.ends.append((time.time(), True))
        return stream.conversation_id

    def _record(self, kind: str, name: str, ms: float) -> None:
        SAMPLES.values[kind].append(ms)
        self.environment.events.request.fire(
            request_type=kind, name=name, response_time=ms, response_length=0,
            exception=None, context={},
        )  # fmt: skip

    def _fail(self, name: str, started: float, reason: str) -> None:
        SAMPLES.failures[reason] += 1
        SAMPLES.ends.append((time.time(), False))
        self.environment.events.request.fire(
            request_type="STREAM", name=name,
            response_time=(time.perf_counter() - started) * 1000, response_length=0,
            exception=Exception(reason), context={},
        )  # fmt: skip


for hook, listener in (
    (events.init_command_line_parser, _options),
    (events.report_to_master, _send_samples),
    (events.worker_report, _collect_samples),
    (events.test_start, _progress),
    (events.quitting, _summarise),
):
    hook.add_listener(listener)  # type: ignore[no-untyped-call]
