"""``make bench``'s chart and its short table for a terminal: what a person
would rather see than read, from the same results as the full table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from loadtest.harness import percentile


class Result(Protocol):
    path: str
    ttft_ms: list[float]
    events: int
    errors: int
    proxy_cpu_s: float | None


Levels = Sequence[tuple[int, Sequence[Result]]]  # (concurrent streams, results by path)


def added_ttft(result: Result, direct: Result | None, q: float) -> float | None:
    if direct is None or result is direct or not result.ttft_ms or not direct.ttft_ms:
        return None
    return percentile(result.ttft_ms, q) - percentile(direct.ttft_ms, q)


def cpu_per_100k(result: Result) -> float | None:
    if result.proxy_cpu_s is None or not result.events:
        return None
    return result.proxy_cpu_s / result.events * 100_000


def terminal_table(levels: Levels) -> str:
    """Narrow enough for an 80-column terminal: the figures that compare paths."""
    rows = [
        f"{'streams':>7}  {'path':<8} {'+TTFT p50/p99 ms':>17} {'CPU s/100k ev':>13} {'errors':>6}"
    ]
    for streams, results in levels:
        direct = next((r for r in results if r.path == "direct"), None)
        for r in results:
            p50, p99 = added_ttft(r, direct, 0.5), added_ttft(r, direct, 0.99)
            ttft = "–" if p50 is None or p99 is None else f"{p50:+.1f} / {p99:+.1f}"
            cpu = cpu_per_100k(r)
            rows.append(
                f"{streams:>7,}  {r.path:<8} {ttft:>17} {'–' if cpu is None else f'{cpu:.2f}':>13}"
                f" {r.errors:>6}"
            )
    return "\n".join(rows)


def write_chart(levels: Levels, out: Path, title: str) -> None:
    """Added TTFT (p50, p99) and CPU per 100k events by concurrency, one line a path."""
    import matplotlib

    matplotlib.use("Agg")  # no screen: straight to a PNG
    import matplotlib.pyplot as plt

    paths = [r.path for r in levels[0][1]] if levels else []
    figure, (ttft_axis, cpu_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for path in paths:
        xs, p50s, p99s, cpus = [], [], [], []
        for streams, results in levels:
            direct = next((r for r in results if r.path == "direct"), None)
            result = next((r for r in results if r.path == path), None)
            if result is None:
                continue
            xs.append(streams)
            p50s.append(added_ttft(result, direct, 0.5))
            p99s.append(added_ttft(result, direct, 0.99))
            cpus.append(cpu_per_100k(result))
        if any(v is not None for v in p50s):
            line = ttft_axis.plot(xs, [v or 0 for v in p50s], marker="o", label=f"{path} p50")[0]
            ttft_axis.plot(xs, [v or 0 for v in p99s], marker="x", linestyle="--",
                           color=line.get_color(), label=f"{path} p99")  # fmt: skip
        if any(v is not None for v in cpus):
            cpu_axis.plot(xs, [v or 0 for v in cpus], marker="o", label=path)
    ttft_axis.set(title="Added time to first token", xlabel="concurrent streams", ylabel="ms")
    cpu_axis.set(title="Proxy CPU per 100k events", xlabel="concurrent streams", ylabel="CPU s")
    levels_run = [streams for streams, _ in levels]
    for axis in (ttft_axis, cpu_axis):
        axis.set_xscale("log")
        axis.set_xticks(levels_run, [f"{n:,}" for n in levels_run])
        axis.minorticks_off()
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
