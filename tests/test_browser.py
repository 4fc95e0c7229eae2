"""The HTML chat page in real headless Chromium, against the real gateway and emulator."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest
from playwright.async_api import Browser, Page, async_playwright

from gateway.config import PageSettings, ResumeSettings
from loadtest.emulator import EmulatorSettings, compose_reply
from tests.cutting_proxy import CuttingProxy
from tests.helpers import ACME_KEY, TINY_KEY, Stack, StackFactory, eventually
from tests.oidc import OpenIdProvider

pytestmark = pytest.mark.external

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "results" / "screenshots"
PACED = EmulatorSettings(ttft_s=0.05, tokens_per_s=25, reply_tokens=12)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not os.path.exists(CHROMIUM) or shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("Chromium is not installed (apt-get install chromium); CI requires it")
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        await browser.close()


async def open_chat(
    browser: Browser, stack: Stack, key: str = ACME_KEY, width: int = 800, url: str | None = None
) -> Page:
    page = await browser.new_page(viewport={"width": width, "height": 800})
    page.on("pageerror", lambda error: pytest.fail(f"error in the page: {error}"))
    await page.goto(url or str(stack.gateway.make_url("/")))
    await page.get_by_label("Your gateway key").fill(key)
    await page.get_by_role("button", name="Use this key").click()
    return page


async def send(page: Page, text: str) -> None:
    await page.get_by_label("Message").fill(text)
    await page.get_by_label("Message").press("Enter")


async def replies(page: Page) -> list[str]:
    return await page.locator("#messages .bubble.assistant").all_text_contents()


async def wait_idle(page: Page) -> None:
    await page.wait_for_selector("#send:not([disabled])", timeout=15_000)


def expected_reply(message: str, earlier: list[str] | None = None, tokens: int = 12) -> str:
    return "".join(compose_reply(message, earlier or [], tokens))


async def test_a_reply_streams_in_token_by_token(
    browser: Browser, make_stack: StackFactory
) -> None:
    stack = await make_stack(PACED)
    page = await open_chat(browser, stack)
    await send(page, "What can you do?")
    seen: list[str] = []
    while await page.locator("#send").is_disabled():
        text = (await replies(page) or [""])[0]
        if text and (not seen or text != seen[-1]):
            seen.append(text)
            if len(seen) == 3:
                assert await page.locator(".bubble.streaming").count() == 1  # the cursor
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=ARTIFACTS / "mid-stream.png")
        await page.wait_for_timeout(15)
    final = expected_reply("What can you do?")
    assert await replies(page) == [final]
    intermediate = [s for s in seen if s != final]
    assert len(intermediate) >= 2, seen
    assert all(final.startswith(s) for s in intermediate)
    assert await page.locator(".streaming, .incomplete").count() == 0
    assert await page.locator("#message").evaluate("e => e === document.activeElement")


async def test_a_split_chunk_stream_renders_exactly(
    browser: Browser, make_stack: StackFactory
) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=40, split_writes=True)
    )
    page = await open_chat(browser, stack)
    await send(page, "ünïcödé 日本語 🙂")
    await wait_idle(page)
    assert await replies(page) == [expected_reply("ünïcödé 日本語 🙂", tokens=40)]


async def test_the_page_parser_survives_any_split(browser: Browser, stack: Stack) -> None:
    """The page's own SSE parser, fed a stream cut at every byte offset."""
    page = await open_chat(browser, stack)
    stream = (
        'data: {"choices":[{"delta":{"content":"naïve 日本 🙂"}}]}\r\n\r\n'
        ": ping\n\n"
        "data: line one\rdata: line two\r\r"
        "data: [DONE]\n\n"
    ).encode()
    result = await page.evaluate(
        """(bytes) => {
            const data = new Uint8Array(bytes);
            const outcomes = [];
            for (let cut = 0; cut <= data.length; cut++) {
                for (const step of [1, 3, 7]) {
                    const p = new window.chatiq.SSEParser();
                    const events = [...p.feed(data.slice(0, cut))];
                    for (let i = cut; i < data.length; i += step) {
                        events.push(...p.feed(data.slice(i, i + step)));
                    }
                    events.push(...p.close());
                    outcomes.push(JSON.stringify(events));
                }
            }
            return [...new Set(outcomes)];
        }""",
        list(stream),
    )
    assert len(result) == 1
    assert json.loads(result[0]) == [
        '{"choices":[{"delta":{"content":"naïve 日本 🙂"}}]}',
        "line one\nline two",
        "[DONE]",
    ]


async def until_true(page: Page, expression: str, timeout_s: float = 10) -> None:
    """Poll a JavaScript expression. (Playwright's wait_for_function evaluates a
    string inside the page, which the page's Content-Security-Policy forbids.)"""
    for _ in range(int(timeout_s / 0.02)):
        if await page.evaluate(expression):
            return
        await page.wait_for_timeout(20)
    raise AssertionError(f"never true: {expression}")


async def test_stop_cancels_the_stream_and_the_gateway_sees_it(
    browser: Browser, make_stack: StackFactory
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=10, reply_tokens=200))
    page = await open_chat(browser, stack)
    await send(page, "Tell me a long story")
    await until_true(page, "document.querySelector('.bubble.assistant')?.textContent.length > 10")
    await page.get_by_role("button", name="Stop").click()
    await wait_idle(page)
    bubble = page.locator(".bubble.assistant")
    assert await bubble.get_attribute("data-note") == "stopped"
    assert "incomplete" in (await bubble.get_attribute("class") or "")
    for _ in range(200):
        if await stack.metric("chatiq_gateway_client_disconnects_total", tenant="acme") == 1:
            break
        await page.wait_for_timeout(20)
    assert await stack.metric("chatiq_gateway_client_disconnects_total", tenant="acme") == 1


async def test_a_reload_keeps_the_conversation(browser: Browser, make_stack: StackFactory) -> None:
    stack = await make_stack(PACED)
    page = await open_chat(browser, stack)
    await send(page, "my name is Ada")
    await wait_idle(page)
    await page.reload()
    assert await page.locator("#messages .bubble").all_text_contents() == [
        "my name is Ada",
        expected_reply("my name is Ada"),
    ]
    await send(page, "who am I?")
    await wait_idle(page)
    assert (await replies(page))[-1] == expected_reply("who am I?", ["my name is Ada"])
    await page.get_by_role("button", name="New conversation").click()
    assert await page.locator("#messages .bubble").count() == 0
    await send(page, "hello again")
    await wait_idle(page)
    assert (await replies(page))[-1] == expected_reply("hello again")  # a fresh conversation


async def test_a_rejected_key_is_explained_and_asked_again(browser: Browser, stack: Stack) -> None:
    page = await open_chat(browser, stack, key="not-a-key")
    await send(page, "hi")
    await page.wait_for_selector(".bubble.error")
    assert "did not accept this key" in await page.locator(".bubble.error").inner_text()
    assert await page.get_by_label("Your gateway key").is_visible()


async def test_a_spent_quota_shows_the_wait(browser: Browser, stack: Stack) -> None:
    page = await open_chat(browser, stack, key=TINY_KEY)  # 3 requests a minute
    for i in range(3):
        await send(page, f"question {i}")
        await wait_idle(page)
    await send(page, "one more")
    await page.wait_for_selector(".bubble.error")
    error = await page.locator(".bubble.error").inner_text()
    assert "Too many requests" in error and "Try again in" in error
    assert await page.locator("#status").inner_text() == ""  # one place for an error
    await page.reload()  # and the failed question keeps its answer
    bubbles = await page.locator("#messages .bubble").all_text_contents()
    assert bubbles[-2:] == ["one more", error]


async def test_rich_replies_render_bubbles_images_and_suggestion_chips(
    browser: Browser, stack: Stack
) -> None:
    page = await open_chat(browser, stack)
    await page.evaluate(
        "localStorage.setItem('chatiq.conversation', JSON.stringify("
        "{id: null, bot: 'rich', messages: []}))"
    )
    await page.reload()
    await send(page, "everything please")
    await wait_idle(page)
    texts = await replies(page)
    assert texts[0] == expected_reply("everything please", tokens=40)  # the default
    assert "Here is a second message." in texts and "And a third." in texts
    image = page.locator("#messages img")
    assert await image.get_attribute("src") == "https://www.chatiq.io/logo.png"
    chips = page.locator(".suggestions button")
    assert await chips.all_text_contents() == ["Tell me more", "Thanks!"]
    await chips.first.click()
    await until_true(
        page,
        "[...document.querySelectorAll('.bubble.user')].at(-1)?.textContent === 'Tell me more'",
    )


async def test_markup_in_a_reply_is_shown_as_text(browser: Browser, stack: Stack) -> None:
    page = await open_chat(browser, stack)
    attack = "<script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'>"
    await send(page, attack)
    await wait_idle(page)
    assert attack in (await replies(page))[0]
    assert await page.evaluate("window.pwned") is None
    assert await page.locator("#messages script, #messages img").count() == 0


async def test_an_upstream_error_mid_stream_shows_an_error(browser: Browser, stack: Stack) -> None:
    page = await open_chat(browser, stack)
    await page.evaluate(
        "localStorage.setItem('chatiq.conversation', JSON.stringify("
        "{id: null, bot: 'fault-stall-mid', messages: []}))"
    )
    await page.reload()
    await send(page, "hi")
    await wait_idle(page)
    assert "chat service reported an error" in await page.locator(".bubble.error").inner_text()


async def test_a_network_failure_is_explained(browser: Browser, stack: Stack) -> None:
    page = await open_chat(browser, stack)
    await page.route("**/api/chatbot", lambda route: route.abort("connectionrefused"))
    await send(page, "hi")
    await page.wait_for_selector(".bubble.error")
    assert "Network error" in await page.locator(".bubble.error").inner_text()
    assert await page.locator("#send").is_enabled()


async def test_the_page_is_accessible_and_fits_a_phone(browser: Browser, stack: Stack) -> None:
    page = await open_chat(browser, stack, width=360)
    assert await page.locator("#messages").get_attribute("aria-live") == "polite"
    for label in ("Message",):
        assert await page.get_by_label(label).count() == 1
    await send(page, "a fairly long question " * 8)
    await wait_idle(page)
    assert await page.evaluate("document.documentElement.scrollWidth") <= 360
    await eventually(lambda: True)


async def test_enter_while_a_reply_streams_keeps_the_message(
    browser: Browser, make_stack: StackFactory
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=30))
    page = await open_chat(browser, stack)
    await send(page, "first question")
    await until_true(page, "document.querySelector('.bubble.assistant')?.textContent.length > 5")
    await send(page, "second question")  # Enter while the first reply streams
    assert await page.get_by_label("Message").input_value() == "second question"
    assert "still coming" in await page.locator("#status").inner_text()
    await wait_idle(page)
    await page.get_by_label("Message").press("Enter")
    await wait_idle(page)
    users = await page.locator("#messages .bubble.user").all_text_contents()
    assert users == ["first question", "second question"]


async def test_a_reply_cut_by_an_error_event_is_marked_interrupted(
    browser: Browser, stack: Stack
) -> None:
    page = await open_chat(browser, stack)
    await page.evaluate(
        "localStorage.setItem('chatiq.conversation', JSON.stringify("
        "{id: null, bot: 'fault-error-mid', messages: []}))"
    )
    await page.reload()
    await send(page, "hi")
    await wait_idle(page)
    bubble = page.locator(".bubble.assistant")
    assert await bubble.get_attribute("data-note") == "interrupted"
    await page.reload()  # still marked after a reload
    assert await page.locator(".bubble.assistant").get_attribute("data-note") == "interrupted"
    assert await page.locator(".bubble.error").count() == 1


async def test_a_key_for_every_bot_can_pick_the_offered_bots(
    browser: Browser, make_stack: StackFactory
) -> None:
    stack = await make_stack(bots=("rich", "fault-500"))
    page = await open_chat(browser, stack)  # ACME_KEY may use "*"
    picker = page.get_by_label("Bot", exact=True)
    await until_true(page, "document.querySelectorAll('#bot option').length === 4")
    assert await picker.is_visible() and await picker.input_value() == "demo"
    options = ["demo", "rich", "fault-500", "other…"]
    assert await page.locator("#bot option").all_text_contents() == options
    await picker.select_option("rich")
    await send(page, "hi")
    await wait_idle(page)
    assert await page.locator(".suggestions button").count() == 2  # rich's suggestion chips


async def test_the_message_placeholder_fits_a_360_px_screen(browser: Browser, stack: Stack) -> None:
    page = await open_chat(browser, stack, width=360)
    fits = await page.evaluate(
        """() => {
            const box = document.getElementById("message");
            const style = getComputedStyle(box);
            const context = document.createElement("canvas").getContext("2d");
            context.font = `${style.fontSize} ${style.fontFamily}`;
            const room = box.clientWidth - parseFloat(style.paddingLeft)
                - parseFloat(style.paddingRight);
            return context.measureText(box.placeholder).width <= room;
        }"""
    )
    assert fits


async def test_any_bot_can_be_typed_in(browser: Browser, stack: Stack) -> None:
    page = await open_chat(browser, stack)
    await until_true(page, "document.querySelectorAll('#bot option').length === 2")
    await page.get_by_label("Bot", exact=True).select_option("other…")
    other = page.get_by_label("Other bot")
    await other.fill("fault-500")
    await other.press("Enter")
    assert await page.get_by_label("Bot", exact=True).input_value() == "fault-500"
    await send(page, "hi")
    await page.wait_for_selector(".bubble.error")
    assert "502" in await page.locator(".bubble.error").inner_text()  # that bot was asked
    await page.reload()  # and it is still the one in use
    await until_true(page, "document.querySelector('#bot').value === 'fault-500'")


async def test_a_connection_cut_mid_answer_is_resumed_without_a_gap_or_a_repeat(
    browser: Browser, make_stack: StackFactory
) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=25, reply_tokens=40),
        resume=ResumeSettings(enabled=True),
    )
    assert stack.gateway.port is not None
    proxy = await CuttingProxy(stack.gateway.port).start()
    try:
        page = await open_chat(browser, stack, url=f"{proxy.url}/")
        statuses: list[str] = []
        await page.expose_function("sawStatus", lambda text: statuses.append(text))
        await page.evaluate(
            """() => new MutationObserver(() => window.sawStatus(
                document.querySelector('#status').textContent)).observe(
                document.querySelector('#status'), {childList: true, characterData: true,
                subtree: true})"""
        )
        await send(page, "Tell me a long story")
        await until_true(
            page, "document.querySelector('.bubble.assistant')?.textContent.length > 20"
        )
        assert proxy.cut() >= 2  # the page's connection, and the proxy's to the gateway
        await wait_idle(page)
        assert await replies(page) == [expected_reply("Tell me a long story", tokens=40)]
        assert await page.locator(".incomplete, .bubble.error, .reconnecting").count() == 0
        assert "Reconnecting…" in statuses
        assert await stack.metric("chatiq_gateway_streams_resumed_total", tenant="acme") == 1
    finally:
        await proxy.close()


async def test_a_reload_mid_answer_goes_on_where_it_stopped(
    browser: Browser, make_stack: StackFactory
) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=40),
        resume=ResumeSettings(enabled=True),
    )
    page = await open_chat(browser, stack)
    await send(page, "Tell me a long story")
    await until_true(page, "document.querySelector('.bubble.assistant')?.textContent.length > 20")
    await page.wait_for_timeout(700)  # what it got so far is saved (twice a second)
    await page.reload()
    await wait_idle(page)
    assert await replies(page) == [expected_reply("Tell me a long story", tokens=40)]
    assert await page.locator(".incomplete, .bubble.error, .streaming").count() == 0
    assert await stack.metric("chatiq_gateway_streams_resumed_total", tenant="acme") == 1
    stored = await page.evaluate("JSON.parse(localStorage.getItem('chatiq.conversation'))")
    assert all("stream" not in m for m in stored["messages"])  # finished: nothing to resume


async def signed_in_page(browser: Browser, stack: Stack, oidc: OpenIdProvider, user: str) -> Page:
    """The page, signed in through the identity provider's own forms."""
    page = await browser.new_page()
    page.on("pageerror", lambda error: pytest.fail(f"error in the page: {error}"))
    await page.goto(str(stack.gateway.make_url("/")))
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{oidc.issuer}/**")
    await page.locator("input[name=login]").fill(user)
    await page.locator("input[name=password]").fill("any password")
    await page.get_by_role("button", name="Sign-in").click()
    await page.get_by_role("button", name="Continue").click()  # the consent
    await page.wait_for_selector("#bot:not([hidden])")  # back, signed in: its bots listed
    return page


async def sso_stack(make_stack: StackFactory, oidc: OpenIdProvider) -> Stack:
    page = PageSettings(oidc_issuer=oidc.issuer, oidc_client_id="page", oidc_scope="openid chat")
    stack = await make_stack(PACED, issuers=(oidc.settings(),), page=page)
    await oidc.restart(redirect_uri=str(stack.gateway.make_url("/")))
    return stack


async def test_the_page_signs_in_with_the_identity_provider_and_streams_a_reply(
    browser: Browser, make_stack: StackFactory, oidc: OpenIdProvider
) -> None:
    stack = await sso_stack(make_stack, oidc)
    page = await signed_in_page(browser, stack, oidc, "ada")
    assert page.url == str(stack.gateway.make_url("/"))  # the code is gone from the address
    assert await page.get_by_label("Your gateway key").is_hidden()
    await send(page, "What can you do?")
    await wait_idle(page)
    assert await replies(page) == [expected_reply("What can you do?")]
    users = {line.get("user") for line in stack.log_lines() if line.get("event") == "request"}
    assert "ada" in users
    # The token lives in this tab only: sessionStorage, never localStorage.
    assert "chatiq.token" in await page.evaluate("Object.keys(sessionStorage)")
    assert not [k for k in await page.evaluate("Object.keys(localStorage)") if "token" in k]


async def test_an_ended_sign_in_signs_in_again_and_keeps_what_was_typed(
    browser: Browser, make_stack: StackFactory, oidc: OpenIdProvider
) -> None:
    stack = await sso_stack(make_stack, oidc)
    page = await signed_in_page(browser, stack, oidc, "grace")
    await page.evaluate(
        "() => { const t = JSON.parse(sessionStorage.getItem('chatiq.token'));"
        " t.expires_at = Date.now(); sessionStorage.setItem('chatiq.token', JSON.stringify(t)); }"
    )
    visited: list[str] = []
    page.on("framenavigated", lambda frame: visited.append(frame.url))
    await send(page, "Still there?")  # off to the provider, and back: its session holds
    await page.wait_for_selector("#bot:not([hidden])")  # back, and signed in again
    await eventually(lambda: "code=" in "".join(visited))
    # Back from the provider (its redirect is not a page of its own): a new code, from it.
    issued = f"iss={quote(oidc.issuer, safe='')}"
    assert any("code=" in url and issued in url for url in visited), visited
    await page.wait_for_selector("#bot:not([hidden])")
    await page.get_by_label("Message").press("Enter")
    await wait_idle(page)
    assert await replies(page) == [expected_reply("Still there?")]


async def test_a_sign_in_answer_for_another_request_is_refused(
    browser: Browser, make_stack: StackFactory, oidc: OpenIdProvider
) -> None:
    stack = await sso_stack(make_stack, oidc)
    page = await browser.new_page()
    await page.goto(str(stack.gateway.make_url("/?code=stolen&state=forged")))
    await page.wait_for_selector("#status:has-text('state')")
    assert "Sign-in failed" in await page.locator("#status").inner_text()
    assert await page.get_by_role("button", name="Sign in").is_visible()
    assert page.url == str(stack.gateway.make_url("/"))
