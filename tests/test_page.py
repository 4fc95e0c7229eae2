"""Serving the page: the bundled or a team's own folder, CORS by allow-list, bot lists."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.config import ServerSettings
from tests.helpers import ACME_KEY, LIMITED_KEY, Stack, StackFactory


async def test_the_bundled_page_is_served_at_the_root(stack: Stack) -> None:
    async with stack.session.get(stack.gateway.make_url("/")) as r:
        assert r.status == 200
        assert r.content_type == "text/html"
        page = await r.text()
    assert '<script type="module" src="/static/app.js"></script>' in page
    for asset in ("app.js", "sse.js", "style.css", "favicon.svg"):
        async with stack.session.get(stack.gateway.make_url(f"/static/{asset}")) as r:
            assert r.status == 200, asset
    async with stack.session.get(stack.gateway.make_url("/static/../../gateway/config.py")) as r:
        assert r.status in (403, 404)


async def test_a_team_can_serve_its_own_page(make_stack: StackFactory, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<h1>our own</h1>")
    (tmp_path / "ours.js").write_text("console.log('ours')")
    stack = await make_stack(server=ServerSettings(static_dir=str(tmp_path)))
    async with stack.session.get(stack.gateway.make_url("/")) as r:
        assert await r.text() == "<h1>our own</h1>"
    async with stack.session.get(stack.gateway.make_url("/static/ours.js")) as r:
        assert r.status == 200


async def test_no_cross_origin_access_by_default(stack: Stack) -> None:
    origin = {"Origin": "https://elsewhere.example"}
    async with stack.session.options(
        stack.url, headers={**origin, "Access-Control-Request-Method": "POST"}
    ) as r:
        assert r.status == 403
        assert "Access-Control-Allow-Origin" not in r.headers
    async with await stack.chat(headers=origin) as r:
        assert r.status == 200
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_an_allowed_origin_gets_cors_headers_even_on_a_stream(
    make_stack: StackFactory,
) -> None:
    app_origin = "https://app.example.com"
    stack = await make_stack(server=ServerSettings(cors_origins=(app_origin,)))
    async with stack.session.options(
        stack.url, headers={"Origin": app_origin, "Access-Control-Request-Method": "POST"}
    ) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == app_origin
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    async with await stack.chat(headers={"Origin": app_origin}) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == app_origin
        assert "Retry-After" in r.headers["Access-Control-Expose-Headers"]
        assert (await r.read()).endswith(b"data: [DONE]\n\n")


async def test_the_bot_list_follows_the_tenant(stack: Stack) -> None:
    url = stack.gateway.make_url("/api/bots")
    async with stack.session.get(url, headers={"Authorization": f"Bearer {LIMITED_KEY}"}) as r:
        assert await r.json() == {"tenant": "limited", "bots": ["demo"], "default": "demo"}
    async with stack.session.get(url, headers={"Authorization": f"Bearer {ACME_KEY}"}) as r:
        assert (await r.json())["bots"] == ["demo"]  # "*": the bots the config names
    async with stack.session.get(url) as r:
        assert r.status == 401


async def test_the_page_is_served_with_a_strict_content_security_policy(stack: Stack) -> None:
    for path in ("/", "/static/app.js", "/static/style.css"):
        async with stack.session.get(stack.gateway.make_url(path)) as r:
            csp = r.headers["Content-Security-Policy"]
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["Referrer-Policy"] == "no-referrer"
            assert r.headers["X-Frame-Options"] == "DENY"
            assert r.headers["Server"] == "chatiq-gateway"  # no versions to look up
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
        assert "unsafe" not in csp and directives["frame-ancestors"] == "'none'"
    # The API's answers, streams and errors alike, are never sniffed as something else.
    async with await stack.chat() as r:
        await r.read()
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Server"] == "chatiq-gateway"
    async with await stack.chat(key="wrong") as r:
        assert r.status == 401 and r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Server"] == "chatiq-gateway"
    async with stack.session.get(stack.gateway.make_url("/metrics")) as r:
        assert r.headers["Server"] == "chatiq-gateway"


def test_the_page_has_no_inline_script_or_style_the_policy_would_have_to_allow() -> None:
    page = (Path(__file__).resolve().parent.parent / "clients" / "web" / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.S | re.I)
    assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=|javascript:", page, re.I)


async def test_a_team_sets_its_own_policy(make_stack: StackFactory, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<h1>ours</h1>")
    policy = "default-src 'self' https://cdn.example.com"
    stack = await make_stack(
        server=ServerSettings(static_dir=str(tmp_path), content_security_policy=policy)
    )
    async with stack.session.get(stack.gateway.make_url("/")) as r:
        assert r.headers["Content-Security-Policy"] == policy
