"""``make load``: the Locust suite, headless, for a fixed time, against ``make run``'s stack.

Starts the emulator and the gateway (``loadtest.stack``) when nothing answers
on the gateway's URL, runs Locust with the given users and time, writes its
CSV and HTML reports and the suite's exact ``summary.md`` under
``results/load/<time>/``, stops what it started, and exits non-zero when a
threshold (``--max-ttft-p99-ms``, ``--max-failure-ratio``) is crossed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from loadtest.harness import answers, stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="http://127.0.0.1:8080")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--spawn-rate", type=float, default=10)
    parser.add_argument("--run-time", default="60s")
    parser.add_argument("--processes", type=int, default=0, help="Locust worker processes")
    parser.add_argument("--max-ttft-p99-ms", type=float, default=0, help="0: no threshold")
    parser.add_argument("--max-failure-ratio", type=float, default=0.01)
    parser.add_argument("--scenario", default="loadtest/scenario.toml", help="who the users are")
    parser.add_argument(
        "--drop-ratio", type=float, default=0.0,
        help="share of streams whose user drops the connection mid-answer and resumes "
        "(the gateway needs [resume] enabled)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    out = Path("results/load") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started: list[subprocess.Popen[bytes]] = []
    if not answers(f"{args.host}/healthz"):
        print(f"load: nothing on {args.host}; starting make run's stack", file=sys.stderr)
        started.append(
            subprocess.Popen(
                [sys.executable, "-m", "loadtest.stack"],
                stdout=(out / "stack.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        for _ in range(300):
            if answers(f"{args.host}/healthz"):
                break
            time.sleep(0.1)
        else:
            stop(*started)
            raise SystemExit(f"load: the stack did not start; see {out / 'stack.log'}")
    command = [
        sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py",
        "--headless", "--only-summary", "--skip-log-setup", "--host", args.host,
        "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
        "--run-time", args.run_time,
        "--csv", str(out / "locust"), "--html", str(out / "report.html"),
        "--chatiq-results", str(out), "--chatiq-scenario", args.scenario,
        "--max-ttft-p99-ms", str(args.max_ttft_p99_ms),
        "--max-failure-ratio", str(args.max_failure_ratio),
        "--chatiq-drop-ratio", str(args.drop_ratio),
    ]  # fmt: skip
    if args.processes:
        command += ["--processes", str(args.processes)]
    try:
        # The console gets the suite's progress lines and exact summary; Locust's
        # own tables (rounded, pooled across request types) stay out of it
        # (--skip-log-setup), and are in report.html and the CSV anyway.
        with (out / "locust.log").open("wb") as log:
            code = subprocess.call(command, stdout=log)
    finally:
        stop(*started)
    print(
        f"load: reports in {out}/ (summary.md: exact percentiles and failures; charts.png: "
        "TTFT and inter-token histograms, streams ended each second; report.html, "
        "locust_*.csv)"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
