"""``make screenshot``: the README's picture of the chat page, mid-stream, on a
phone-sized screen, taken in Debian's Chromium against a local stack.

The image in the reply is the emulator's own (a data: URL of the page's
icon), so nothing is fetched from the network; CJK and emoji need the Noto
fonts (``apt-get install fonts-noto-core fonts-noto-cjk fonts-noto-color-emoji``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import tempfile
from pathlib import Path

from playwright.async_api import async_playwright

from .harness import free_port, start_emulator, start_gateway, stop, wait_ready

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
KEY = "demo-key"


async def take(out: Path) -> None:
    icon = (ROOT / "clients" / "web" / "favicon.svg").read_bytes()
    icon = icon.replace(b"<svg ", b'<svg width="120" height="120" ', 1)  # a size of its own
    image = "data:image/svg+xml;base64," + base64.b64encode(icon).decode()
    emulator_port, port = free_port(), free_port()
    emulator = start_emulator(
        emulator_port, "--ttft-ms", "200", "--tokens-per-s", "12", "--image-url", image
    )
    gateway, _ = start_gateway(Path(tempfile.mkdtemp()), port, emulator_port, KEY)
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz")
        async with async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--headless", "--no-sandbox", "--disable-gpu",
                      "--disable-background-networking"],
            )  # fmt: skip
            page = await browser.new_page(viewport={"width": 480, "height": 820})
            await page.goto(f"http://127.0.0.1:{port}/")
            await page.get_by_label("Your gateway key").fill(KEY)
            await page.get_by_role("button", name="Use this key").click()
            await page.get_by_label("Bot", exact=True).select_option("other…")
            await page.get_by_label("Other bot").fill("rich")
            await page.get_by_label("Other bot").press("Enter")
            message = page.get_by_label("Message")
            await message.fill("What can the gateway do?")
            await message.press("Enter")
            await page.wait_for_selector("#send:not([disabled])", timeout=30_000)
            await message.fill("And how fast is it?")
            await message.press("Enter")
            await page.wait_for_timeout(1600)  # mid-stream
            await page.screenshot(path=str(out))
            await browser.close()
    finally:
        stop(gateway, emulator)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="screenshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "chat-page.png"))
    args = parser.parse_args(argv)
    asyncio.run(take(Path(args.out)))
    print(f"screenshot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
