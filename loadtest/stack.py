"""``make run``: the emulator and the gateway together, until Ctrl-C.

Starts ``chatiq-emulator`` on the port the configuration's upstream URL
names, then ``chatiq-gateway``, waits until both answer, prints the URL and a
``curl -N`` line, and on Ctrl-C (or SIGTERM) stops both and waits for them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import tomllib
from urllib.parse import urlsplit

from loadtest.harness import answers, stop_on_signals, wait_exited


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        if proc.poll() is not None:
            raise SystemExit(f"stack: {proc.args!r} exited with {proc.returncode}")
        if answers(url):
            return
        time.sleep(0.1)
    raise SystemExit(f"stack: {url} did not answer within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config/gateway.toml")
    parser.add_argument("emulator_args", nargs="*", help="passed to chatiq-emulator")
    args = parser.parse_args(argv)
    with open(args.config, "rb") as f:
        config = tomllib.load(f)
    upstream = urlsplit(os.environ.get("CHATIQ_API_URL", config["upstream"]["url"]))
    host = os.environ.get("GATEWAY_HOST", config.get("server", {}).get("host", "127.0.0.1"))
    port = os.environ.get("GATEWAY_PORT", config.get("server", {}).get("port", 8080))

    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    stopped_by = stop_on_signals()  # from the start: a Ctrl-C while they start too

    emulator_local = upstream.hostname in ("127.0.0.1", "localhost", "::1")
    try:
        if emulator_local:
            procs.append(
                subprocess.Popen(
                    [
                        py,
                        "-m",
                        "loadtest.emulator",
                        "--host",
                        upstream.hostname or "127.0.0.1",
                        "--port",
                        str(upstream.port or 80),
                        *args.emulator_args,
                    ]
                )
            )
            _wait_ready(f"http://{upstream.hostname}:{upstream.port}/healthz", procs[-1])
        procs.append(subprocess.Popen([py, "-m", "gateway", "--config", args.config]))
        base = f"http://{host}:{port}"
        _wait_ready(f"{base}/healthz", procs[-1])
        print(
            f"\nChatIQ Gateway is ready on {base}  (emulator: "
            f"{'local' if emulator_local else upstream.geturl()}).\n\n"
            f"  Chat in a browser: {base}/  (key: demo-key)\n"
            f"  Or from a terminal: .venv/bin/chatiq-chat  (CHATIQ_GATEWAY_KEY=demo-key)\n"
            "  Or with curl:\n\n"
            f"  curl -N -H 'Authorization: Bearer demo-key' -H 'Content-Type: application/json' "
            f'-d \'{{"message":"hi"}}\' {base}/api/chatbot\n\n'
            "Press Ctrl-C to stop both.\n",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            time.sleep(0.2)
        return 1  # one of them died on its own
    except KeyboardInterrupt:
        return 0
    finally:
        if stopped_by == [signal.SIGINT]:  # Ctrl-C: both are stopping on their own
            wait_exited(procs, 1.5)
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()  # SIGTERM: a SIGINT the shell had them ignore would do nothing
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        print("stack: stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
