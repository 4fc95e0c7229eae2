"""``make instructions``: the gateway's cost per stream in CPU instructions,
counted by valgrind's callgrind: a measure that does not move with the machine.

CPU time on a shared machine swings by 10-15% from one run to the next;
instruction counts repeat within about 1%, so a change of a few percent shows.
Each gateway (the working tree, and any git revision named with ``--rev``)
runs under callgrind against a fresh emulator: one-token replies, a few
streams at a time; after a warm-up the counters are zeroed, and dumped after
``--seconds``. The instructions are the process's own (user space): the
kernel's work for its system calls is not in them.

The *floor* is a bare aiohttp app answering the same request with a reply of
the same shape, in one write: what aiohttp and the loop cost before the
gateway does anything of its own. Given two reply lengths or more
(``--tokens 1,21``), each process's cost is also split into what a stream
costs whatever its length and what each event adds.

    python -m loadtest.instructions [--seconds 10] [--tokens 1[,21]] [--tokens-per-s 1000]
                                   [--rev REV]...
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from .harness import free_port, report, start_emulator, start_gateway, stop, wait_ready
from .loadgen import Target, run_streams

KEY = "instructions-key"
ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 10
FLOOR = "floor: bare aiohttp, one write"
READY_S = 180.0  # a process starts ~50x slower under callgrind
MESSAGE = "How do I reset my password?"


def callgrind(out: Path) -> list[str]:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("instructions: valgrind is missing (Debian: apt-get install valgrind)")
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]


def instructions_in(dumps: Sequence[Path]) -> int:
    """The instructions counted in callgrind's dumps (the largest total: the
    dump taken at the end of the window; the one at exit has only the rest)."""
    found = 0
    for dump in dumps:
        for line in dump.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                found = max(found, int(line.split()[1]))
    return found


async def control(pid: int, request: str) -> None:
    """Sends callgrind a request and waits for its answer. ``callgrind_control``
    finds a run through vgdb's list, which a process slowed down 50x by
    callgrind on a loaded machine may not be in yet: it then answers "No
    active callgrind runs", exit 0, and nothing is done; so ask until it is."""
    answer = ""
    for _ in range(60):
        done = await asyncio.to_thread(
            subprocess.run, ["callgrind_control", request, str(pid)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        answer = done.stdout + done.stderr
        if done.returncode == 0 and f"PID {pid}:" in answer and "OK" in answer:
            return
        await asyncio.sleep(0.5)
    raise SystemExit(f"instructions: callgrind_control {request} {pid} did not take: {answer}")


async def dumped(out: Path) -> int:
    """The instructions in the dump just requested, once callgrind has written
    all of it (its totals line comes last)."""
    for _ in range(600):
        counted = instructions_in(sorted(out.parent.glob(out.name + ".*")))
        if counted:
            return counted
        await asyncio.sleep(0.1)
    raise SystemExit(f"instructions: callgrind wrote no dump beside {out} in 60 s")


async def measure(
    process: subprocess.Popen[bytes], port: int, out: Path, seconds: float
) -> tuple[int, int, int]:
    """Streams, events and instructions in a window of ``seconds`` after a warm-up."""
    await wait_ready(f"http://127.0.0.1:{port}/healthz", timeout_s=READY_S)
    target = Target(
        "127.0.0.1", port, "/api/chatbot", {"message": MESSAGE, "stream": True}, key=KEY
    )
    await run_streams(target, CONCURRENCY, min(seconds, 3.0), 0.5, timeout_s=120)  # warm up
    await control(process.pid, "--zero")
    results = await run_streams(target, CONCURRENCY, seconds, 0.5, timeout_s=120)
    await control(process.pid, "--dump")
    streams = sum(1 for r in results if r.done)
    events = sum(len(r.event_times) for r in results)
    if not streams:
        errors = sorted({f"{r.status} {r.error}" for r in results})
        raise SystemExit(f"instructions: no stream finished in the window: {errors}")
    return streams, events, await dumped(out)


async def measure_gateway(
    tree: Path, tokens: int, tokens_per_s: float, seconds: float
) -> tuple[int, int, int]:
    folder = Path(tempfile.mkdtemp(prefix="instructions-"))
    emulator_port, port = free_port(), free_port()
    emulator = start_emulator(
        emulator_port, "--ttft-ms", "1", "--tokens-per-s", f"{tokens_per_s:g}",
        "--reply-tokens", str(tokens),
    )  # fmt: skip
    out = folder / "callgrind.out"
    gateway, _ = start_gateway(
        folder, port, emulator_port, KEY, prefix=callgrind(out), cwd=tree,
        admission={"max_streams": 1000, "max_queue": 1000}, logging={"format": "json"},
    )  # fmt: skip
    try:
        return await measure(gateway, port, out, seconds)
    finally:
        stop(gateway, emulator)


async def emulator_reply(tokens: int) -> bytes:
    """One streamed reply's body, as the emulator sends it to the gateway."""
    port = free_port()
    emulator = start_emulator(port, "--ttft-ms", "1", "--tokens-per-s", "0",
                              "--reply-tokens", str(tokens))  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz")
        body = {"message": MESSAGE, "bot_slug": "demo", "stream": True}
        url = f"http://127.0.0.1:{port}/api/chat"
        async with aiohttp.ClientSession() as session, session.post(url, json=body) as answer:
            return await answer.read()
    finally:
        stop(emulator)


async def measure_floor(tokens: int, seconds: float) -> tuple[int, int, int]:
    folder = Path(tempfile.mkdtemp(prefix="instructions-"))
    reply = folder / "reply.txt"
    reply.write_bytes(await emulator_reply(tokens))
    port = free_port()
    out = folder / "callgrind.out"
    floor = subprocess.Popen(
        [*callgrind(out), sys.executable, "-m", "loadtest.instructions",
         "--serve-floor", str(port), "--reply", str(reply)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        return await measure(floor, port, out, seconds)
    finally:
        stop(floor)


def serve_floor(port: int, reply: bytes) -> None:
    """The floor: aiohttp on uvloop, reading the request and answering with
    the emulator's reply, head and body in one write."""
    import uvloop
    from aiohttp import web

    class OneWrite(web.StreamResponse):
        _send_headers_immediately = False  # the head goes with the body, as the gateway's

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = OneWrite(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write_eof(reply)
        return response

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/api/chatbot", chat)
    app.router.add_get("/healthz", healthz)
    uvloop.run(web._run_app(app, host="127.0.0.1", port=port, access_log=None, print=None))


def checkout(rev: str, into: Path) -> Path:
    subprocess.run(
        ["git", "worktree", "add", "--detach", "--force", str(into), rev],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return into


Measured = tuple[str, int, int, int, int]  # process, reply tokens, streams, events, instructions


async def measure_all(args: argparse.Namespace, trees: list[tuple[str, Path]]) -> list[Measured]:
    rows: list[Measured] = []
    for tokens in args.tokens:
        for name, tree in trees:
            print(f"instructions: {name}, {tokens}-token replies", flush=True)
            measured = await measure_gateway(tree, tokens, args.tokens_per_s, args.seconds)
            rows.append((name, tokens, *measured))
        if not args.no_floor:
            print(f"instructions: {FLOOR}, {tokens}-token replies", flush=True)
            rows.append((FLOOR, tokens, *await measure_floor(tokens, args.seconds)))
    return rows


def split_costs(rows: list[Measured]) -> dict[str, tuple[float, float]]:
    """Per process measured at two reply lengths or more: the instructions a
    stream costs whatever its length, and each event's, from the line through
    its shortest and its longest replies."""
    split: dict[str, tuple[float, float]] = {}
    for name in dict.fromkeys(row[0] for row in rows):
        mine = sorted((r for r in rows if r[0] == name), key=lambda r: r[1])
        (_, _, s0, e0, c0), (_, _, s1, e1, c1) = mine[0], mine[-1]
        if len(mine) < 2 or e1 / s1 == e0 / s0:
            continue
        per_event = (c1 / s1 - c0 / s0) / (e1 / s1 - e0 / s0)
        split[name] = (c0 / s0 - per_event * e0 / s0, per_event)
    return split


async def run(args: argparse.Namespace) -> int:
    trees: list[tuple[str, Path]] = [("working tree", ROOT)]
    scratch = Path(tempfile.mkdtemp(prefix="instructions-revs-"))
    try:
        for i, rev in enumerate(args.rev):
            trees.append((rev, checkout(rev, scratch / str(i))))
        rows = await measure_all(args, trees)
    finally:
        for i in range(len(args.rev)):
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(scratch / str(i))],
                cwd=ROOT, capture_output=True,
            )  # fmt: skip
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [
        f"## Instructions per stream (callgrind; {CONCURRENCY} streams at a time, "
        f"{args.tokens_per_s:g} tokens/s each, {args.seconds:g} s a measure)",
        "",
        "| process | reply tokens | streams | events | instructions per stream | per event |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, tokens, streams, events, counted in rows:
        lines.append(
            f"| {name} | {tokens} | {streams:,} | {events:,} | {counted / streams / 1e3:,.0f} k "
            f"| {counted / events / 1e3:,.1f} k |"
        )
    split = split_costs(rows)
    if split:
        lines += ["", "| process | fixed, a stream | an event |", "| --- | ---: | ---: |"]
        lines += [f"| {n} | {f / 1e3:,.0f} k | {e / 1e3:,.1f} k |" for n, (f, e) in split.items()]
    report("\n".join(lines) + "\n", args.out)
    return 0


def token_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",")]
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError("reply tokens: non-negative integers, comma-separated")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="the measured window")
    parser.add_argument(
        "--tokens", type=token_counts, default=[1],
        help="content events a reply; two or more (1,21) also split a stream's cost per event",
    )  # fmt: skip
    parser.add_argument(
        "--tokens-per-s", type=float, default=1000.0,
        help="the emulator's pace within a stream (at 50, as make bench's, an event is a read)",
    )  # fmt: skip
    parser.add_argument("--rev", action="append", default=[], help="a git revision to compare")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare aiohttp floor")
    parser.add_argument("--out", default="results/instructions", help="where latest.md goes")
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--reply", type=Path, help=argparse.SUPPRESS)  # the floor's answer
    args = parser.parse_args(argv)
    if args.serve_floor is not None:
        serve_floor(args.serve_floor, args.reply.read_bytes())
        return 0
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
