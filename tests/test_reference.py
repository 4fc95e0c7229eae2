"""The reference stays true to the code: every route the gateway mounts and
every status the OpenAPI document lists are in docs/api.md; every
configuration key and metric is in the README, and every metric it names
exists; neither links outside the repository."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from gateway.app import create_app
from gateway.config import ResumeSettings, Settings, Tenant
from gateway.handlers import OPENAPI
from gateway.metrics import Metrics
from tests.conftest import gateway_settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
API = (ROOT / "docs" / "api.md").read_text()


def section(title: str) -> str:
    """The README's text under a heading, up to the next heading of its level or above."""
    found = re.search(rf"^(#+) {re.escape(title)}\n(.*?)(?=^#{{1,2}} |\Z)", README, re.M | re.S)
    assert found, f"no section {title!r}"
    return found.group(2)


def test_every_mounted_route_is_in_the_api_section() -> None:
    settings = gateway_settings("http://127.0.0.1:9/api/chat")
    app: web.Application = create_app(replace(settings, resume=ResumeSettings(enabled=True)))
    routes = {
        r.resource.canonical
        for r in app.router.routes()
        if r.resource is not None and r.method not in ("HEAD", "OPTIONS")
    }
    api = API
    for route in routes - {"/static"}:
        assert f"`{route}" in api or f" {route}`" in api or route in api, route


def test_every_configuration_key_is_in_the_configuration_section() -> None:
    config = section("Configuration") + section("Fleet-wide tenant quotas (Redis)")
    for table in dataclasses.fields(Settings):
        if table.name in ("tenants", "frontends"):
            assert f"[{'[tenants]' if table.name == 'tenants' else 'frontends.'}" in config
            continue
        for key in dataclasses.fields(getattr(Settings(), table.name)):
            if key.name == "api_key":  # from the environment only, as CHATIQ_API_KEY
                continue
            assert f"`{key.name}`" in config, f"[{table.name}] {key.name}"
    for key in dataclasses.fields(Tenant):
        assert f"`{key.name}`" in config, f"[[tenants]] {key.name}"


def test_every_metric_is_in_the_metrics_table_and_every_one_there_exists() -> None:
    table = section("Metrics")
    exported = {
        family.name.removeprefix("chatiq_gateway_")
        for family in Metrics(["demo"]).registry.collect()
        if family.name.startswith("chatiq_gateway_")
    }
    listed = set(re.findall(r"^\| `([a-z_]+)` \| (?:counter|gauge|histogram|info)", table, re.M))
    names = {n.removesuffix("_total") for n in listed}
    assert exported - {"build"} <= names | {"build_info"}, exported - names
    assert names <= exported | {"build_info"}, names - exported


def test_every_documented_status_is_in_the_error_table() -> None:
    document = json.loads(Path(OPENAPI).read_text())
    statuses = {
        int(code)
        for path in document["paths"].values()
        for op in path.values()
        for code in op["responses"]
        if int(code) >= 400
    }
    errors = API
    for status in statuses:
        assert re.search(rf"^\| (\d+ / )*{status}( / \d+)* \|", errors, re.M), status


def test_the_readme_and_docs_link_nowhere_outside_the_repository() -> None:
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
            assert not target.startswith(("http://", "https://")), (page.name, target)
            resolved = (page.parent / target.split("#")[0]).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), (page.name, target)
