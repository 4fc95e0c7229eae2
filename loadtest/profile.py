"""``make profile``: where one gateway process spends its CPU under load, by py-spy.

Two loads, each against a fresh emulator and gateway, with py-spy sampling
the gateway (native code hidden: the Python functions that cost):

- ``per stream``: one-token replies, so that each stream's fixed cost (the
  request, its head, the upstream request, the log line, the metrics)
  dominates;
- ``per event``: 200-token replies, so that the relay's cost per event
  dominates.

For each it prints and writes (``results/profile/latest.md``) the gateway's
CPU per stream and per event, and the functions with the most samples:
*own* (the function itself running) and *total* (it or what it called).

    python -m loadtest.profile [--seconds 10] [--streams 200]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from .harness import cpu_seconds, free_port, report, start_emulator, start_gateway, stop, wait_ready
from .loadgen import Target, run_streams

KEY = "profile-key"
LOADS = {  # name: (reply tokens, tokens a second per stream)
    "per stream": (1, 50.0),
    "per event": (200, 50.0),
}
TOP = 15


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("profile: py-spy is missing (.venv/bin/pip install py-spy)")
    return found


def frame_name(frame: str) -> str:
    """``function (path/to/module.py:line)`` as ``module.py:function``."""
    function, _, where = frame.partition(" (")
    module = where.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return f"{module}:{function}"


def top_functions(collapsed: str) -> tuple[int, Counter[str], Counter[str]]:
    """Samples in all; per function, own samples and total samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        samples += n
        if frames:
            own[frames[-1]] += n
        for name in set(frames):
            total[name] += n
    return samples, own, total


async def profile_load(name: str, tokens: int, rate: float, args: argparse.Namespace) -> str:
    folder = Path(tempfile.mkdtemp(prefix="profile-"))
    emulator_port, port = free_port(), free_port()
    emulator = start_emulator(
        emulator_port, "--ttft-ms", "20", "--tokens-per-s", str(rate),
        "--reply-tokens", str(tokens),
    )  # fmt: skip
    gateway, _ = start_gateway(
        folder, port, emulator_port, KEY,
        admission={"max_streams": 5000, "max_queue": 5000},
        upstream={"max_connections": 5000}, logging={"format": "json"},
    )  # fmt: skip
    out = folder / "profile.txt"
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz")
        body = {"message": "How do I reset my password?", "stream": True}
        target = Target("127.0.0.1", port, "/api/chatbot", body, key=KEY)
        await run_streams(target, args.streams, 2.0, 1.0, timeout_s=60)  # warm up
        spy = subprocess.Popen(
            [py_spy(), "record", "--pid", str(gateway.pid), "--duration", str(round(args.seconds)),
             "--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=(folder / "py-spy.log").open("wb"),
        )  # fmt: skip
        cpu_before = cpu_seconds(gateway.pid)
        started = time.perf_counter()
        results = await run_streams(target, args.streams, args.seconds, 1.0, timeout_s=60)
        wall = time.perf_counter() - started
        cpu = cpu_seconds(gateway.pid) - cpu_before
        spy.wait(timeout=args.seconds + 30)
    finally:
        stop(gateway, emulator)
    if not out.exists():
        why = (folder / "py-spy.log").read_text().strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"profile: py-spy took no samples: {why[0]}")
    streams = sum(1 for r in results if r.done)
    events = sum(len(r.event_times) for r in results)
    samples, own, total = top_functions(out.read_text())
    lines = [
        f"### {name}: {tokens}-token replies, {args.streams} concurrent streams, "
        f"{args.seconds:g} s",
        "",
        f"{streams:,} streams, {events:,} events in {wall:.1f} s; gateway CPU {cpu:.2f} s: "
        f"**{cpu / max(streams, 1) * 1e6:,.0f} us per stream**, "
        f"**{cpu / max(events, 1) * 1e6:,.1f} us per event**; {samples:,} samples.",
        "",
        "| function (module:name) | own | total |",
        "| --- | ---: | ---: |",
    ]
    for function, n in own.most_common(TOP):
        lines.append(f"| `{function}` | {n / samples:.1%} | {total[function] / samples:.1%} |")
    lines += ["", "Most inclusive (own + what they call), beyond the event loop itself:", ""]
    loop_frames = ("base_events.py", "runners.py", "__main__.py", "events.py:_run", "<module>")
    shown = 0
    for function, n in total.most_common():
        if any(f in function for f in loop_frames):
            continue
        lines.append(f"- `{function}` {n / samples:.1%}")
        shown += 1
        if shown == TOP:
            break
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> int:
    sections = [f"## Profile of one gateway process (py-spy, {args.seconds:g} s a load)", ""]
    for name, (tokens, rate) in LOADS.items():
        print(f"profile: {name} ({tokens}-token replies) for {args.seconds:g} s", flush=True)
        sections.append(await profile_load(name, tokens, rate, args))
    report("\n".join(sections), args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="sampling time per load")
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams")
    parser.add_argument("--out", default="results/profile", help="where latest.md goes")
    return asyncio.run(run(parser.parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
