"""The reference stays true to the code: every route the gateway mounts and
every status the OpenAPI document lists are in docs/api.md; every
configuration key is in docs/configuration.md; every metric is in
docs/observability.md, and every metric it names exists; the README and the
docs link nowhere outside the repository, and every link resolves."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from gateway.app import create_app
from gateway.config import (
    BotSettings,
    Issuer,
    ResumeSettings,
    Settings,
    Tenant,
    settings_from_mapping,
)
from gateway.metrics import Metrics
from gateway.routes.ops import OPENAPI
from tests.helpers import gateway_settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API = (DOCS / "api.md").read_text()
CONFIGURATION = (DOCS / "configuration.md").read_text()
OBSERVABILITY = (DOCS / "observability.md").read_text()
OPERATIONS = (DOCS / "operations.md").read_text()


def section(page: str, title: str) -> str:
    """A page's text under a heading, up to the next heading of level one or two."""
    found = re.search(rf"^(#+) {re.escape(title)}\n(.*?)(?=^#{{1,2}} |\Z)", page, re.M | re.S)
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


def test_every_configuration_key_is_in_the_configuration_page() -> None:
    config = CONFIGURATION
    for table in dataclasses.fields(Settings):
        if table.name == "bots":
            continue  # [bots.<slug>], below
        if table.name in ("tenants", "issuers", "frontends"):
            heading = {"tenants": "[[tenants]]", "issuers": "[[issuers]]"}
            assert heading.get(table.name, "[frontends.") in config
            continue
        for key in dataclasses.fields(getattr(Settings(), table.name)):
            if key.name == "api_key":  # from the environment only, as CHATIQ_API_KEY
                continue
            assert f"`{key.name}`" in config, f"[{table.name}] {key.name}"
    for key in dataclasses.fields(Tenant):
        assert f"`{key.name}`" in config, f"[[tenants]] {key.name}"
    for key in dataclasses.fields(Issuer):
        assert f"`{key.name}`" in config, f"[[issuers]] {key.name}"
    assert "[bots.<slug>]" in config
    for key in dataclasses.fields(BotSettings):
        if key.name != "slug":  # the table's name
            assert f"`{key.name}`" in config, f"[bots.<slug>] {key.name}"


def test_every_metric_is_in_the_metrics_table_and_every_one_there_exists() -> None:
    table = section(OBSERVABILITY, "Metrics")
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


def anchors(page: Path) -> set[str]:
    """The ids of a page's headings, as a Markdown renderer makes them."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {
        re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        for title in re.findall(r"^#+ (.+)$", text, re.M)
    }


def test_the_readme_and_docs_link_nowhere_outside_the_repository() -> None:
    pages = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted(DOCS.glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
            assert not target.startswith(("http://", "https://")), (page.name, target)
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.is_relative_to(ROOT) and resolved.exists(), (page.name, target)
            if anchor:
                assert anchor in anchors(resolved), (page.name, target)


def test_the_multi_tenant_example_is_a_valid_configuration(tmp_path: Path) -> None:
    example = section(OPERATIONS, "A multi-tenant configuration")
    (toml,) = re.findall(r"```toml\n(.*?)```", example, re.S)
    for name in ("gateway.pem", "gateway.key"):  # the files it names, made up
        (tmp_path / name).write_text("")
    toml = toml.replace("/etc/chatiq-gateway/tls/", f"{tmp_path}/")
    settings = settings_from_mapping(tomllib.loads(toml), {})
    assert [t.name for t in settings.tenants] == ["people", "support-site", "it-portal"]
    assert settings.issuers and settings.page.oidc_issuer == settings.issuers[0].issuer
