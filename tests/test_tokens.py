"""Signing in with the company's identity provider: JWTs from a real OpenID
provider (npm's oidc-provider, tests/oidc.py) checked against ``[[issuers]]``,
beside tenant keys, on every frontend."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp.client import Client
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

from gateway.auth import tokens
from gateway.config import (
    AdmissionSettings,
    ConfigError,
    LoggingSettings,
    PageSettings,
    RedisSettings,
    ResumeSettings,
    ServerSettings,
    Tenant,
    settings_from_mapping,
)
from gateway.errors import UserBusy
from gateway.quotas import admission as admission_module
from gateway.quotas.admission import ADMISSION, Admission
from gateway.server.reload import reload_settings
from loadtest.emulator import EmulatorSettings
from loadtest.harness import free_port
from tests.helpers import (
    ACME_KEY,
    CHATIQ_KEY,
    LIMITED_KEY,
    TENANTS,
    GatewayProcess,
    Stack,
    StackFactory,
    eventually,
)
from tests.oidc import AUDIENCE, OpenIdProvider, SigningKey
from tests.redis_server import RedisServer
from tests.routes import ROUTES, events_of


async def call(stack: Stack, frontend: str, token: str) -> tuple[int, dict[str, str], bytes]:
    route = ROUTES[frontend]
    async with stack.session.post(
        stack.gateway.make_url(route.path),
        json=route.body("demo", "hi"),
        headers={"Authorization": f"Bearer {token}", **(route.headers or {})},
    ) as r:
        return r.status, dict(r.headers), await r.read()


def request_lines(stack: Stack) -> list[dict[str, Any]]:
    """The chat routes' request lines (the others' are debug lines without a tenant)."""
    return [
        line for line in stack.log_lines() if line.get("event") == "request" and "tenant" in line
    ]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with_public_key(oidc: OpenIdProvider) -> str:
    """The old confusion attack: HS256, "signed" with the issuer's public key as the secret."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": oidc.key.kid}).encode())
    now = int(time.time())
    claims = {"iss": oidc.issuer, "aud": "chatiq-gateway", "sub": "mallory", "exp": now + 300}
    payload = _b64(json.dumps(claims).encode())
    signature = hmac.new(oidc.key.public_pem(), f"{header}.{payload}".encode(), hashlib.sha256)
    return f"{header}.{payload}.{_b64(signature.digest())}"


def tampered(token: str) -> str:
    """A real token whose claims were changed after it was signed."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"{header}.{_b64(json.dumps({**claims, 'sub': 'admin'}).encode())}.{signature}"


def bad_tokens(oidc: OpenIdProvider, real: str) -> dict[str, tuple[str, str]]:
    """What each bad token is, and what its 401 must say."""
    now = int(time.time())
    return {
        "expired": (oidc.mint(iat=now - 900, exp=now - 120), "the token has expired"),
        "not yet valid": (oidc.mint(nbf=now + 600), "the token is not valid yet"),
        "wrong audience": (oidc.mint(aud="another-api"), "another audience"),
        "wrong issuer": (oidc.mint(iss="https://login.example.com"), "is not one this gateway"),
        "no exp": (oidc.mint(exp=None), "no 'exp' claim"),
        "alg none": (
            jwt.encode(
                {"iss": oidc.issuer, "aud": "chatiq-gateway", "sub": "x", "exp": now + 300},
                "",
                "none",
                headers={"kid": oidc.key.kid},
            ),
            "algorithm (alg) is not allowed",
        ),
        "HS256 with the public key": (
            hs256_with_public_key(oidc),
            "algorithm (alg) is not allowed",
        ),
        "tampered payload": (tampered(real), "signature does not verify"),
        "a key never published": (oidc.mint(SigningKey("rogue")), "does not publish"),
        "garbage that looks like a JWT": ("eyJhbGciOi.bm9wZQ.c2ln", "malformed"),
        "garbage": ("not-a-token-at-all", "unknown API key"),
    }


BAD_TOKEN_ROUTES = pytest.mark.parametrize("frontend", ["chatiq", "openai", "ai-sdk"])


@pytest.mark.parametrize("frontend", list(ROUTES))
async def test_a_service_s_token_from_the_provider_streams_a_reply_beside_tenant_keys(
    make_stack: StackFactory, oidc: OpenIdProvider, frontend: str
) -> None:
    stack = await make_stack(issuers=(oidc.settings(),))
    token = await oidc.client_token("svc")
    for credential in (token, token, ACME_KEY):  # the second time, remembered
        status, _, body = await call(stack, frontend, credential)
        assert status == 200, body
        assert ROUTES[frontend].ended_whole(events_of(body)), body
    lines = request_lines(stack)
    assert [(line["tenant"], line.get("user")) for line in lines] == [
        ("acme", "svc"), ("acme", "svc"), ("acme", None)
    ]  # fmt: skip


@BAD_TOKEN_ROUTES
async def test_every_bad_token_is_a_401_that_says_why_in_the_route_s_shape(
    make_stack: StackFactory, oidc: OpenIdProvider, frontend: str
) -> None:
    stack = await make_stack(issuers=(oidc.settings(),), server=ServerSettings(
        max_auth_failures_per_minute=0))  # fmt: skip
    for case, (token, reason) in bad_tokens(oidc, await oidc.client_token()).items():
        status, headers, body = await call(stack, frontend, token)
        assert status == 401, (case, body)
        challenge = headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer error="invalid_token", error_description="'), case
        assert reason in challenge, (case, challenge)
        error = json.loads(body)["error"]
        assert reason in error["message"], (case, error)
        if frontend == "openai":
            assert error["code"] == "invalid_api_key", (case, error)
    assert not [line for line in request_lines(stack) if line.get("user")]


async def test_bad_tokens_count_towards_an_address_s_failed_credentials(
    make_stack: StackFactory, oidc: OpenIdProvider
) -> None:
    stack = await make_stack(issuers=(oidc.settings(),), server=ServerSettings(
        max_auth_failures_per_minute=3))  # fmt: skip
    now = int(time.time())
    for _ in range(3):
        assert (await call(stack, "chatiq", oidc.mint(exp=now - 120)))[0] == 401
    status, headers, _ = await call(stack, "chatiq", await oidc.client_token())
    assert status == 429 and int(headers["Retry-After"]) > 0


async def test_a_rotated_key_is_fetched_when_a_token_names_it_without_a_failed_request(
    make_stack: StackFactory, oidc: OpenIdProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens, "REFETCH_S", 1.0)  # 30 s in production
    stack = await make_stack(issuers=(oidc.settings(),))
    assert (await call(stack, "chatiq", await oidc.client_token()))[0] == 200
    old_key = oidc.key
    started = time.monotonic()
    await oidc.restart(SigningKey("key-2"))
    await eventually(lambda: time.monotonic() - started > 1.0)
    rotated = await oidc.client_token()
    assert jwt.get_unverified_header(rotated)["kid"] == "key-2"
    status, _, body = await call(stack, "chatiq", rotated)
    assert status == 200, body
    # The withdrawn key signs nothing any more.
    status, headers, _ = await call(stack, "chatiq", oidc.mint(old_key))
    assert status == 401 and "does not publish" in headers["WWW-Authenticate"]


async def test_an_unknown_key_fetches_the_issuer_s_keys_at_most_once_in_30_s(
    make_stack: StackFactory, aiohttp_server: Any, oidc: OpenIdProvider
) -> None:
    fetches: list[float] = []
    private = ("d", "p", "q", "dp", "dq", "qi")
    published = {"keys": [{k: v for k, v in oidc.key.jwk().items() if k not in private}]}

    async def jwks(request: web.Request) -> web.Response:
        fetches.append(time.monotonic())
        return web.json_response(published)

    app = web.Application()
    app.router.add_get("/keys", jwks)
    keys: TestServer = await aiohttp_server(app)
    stack = await make_stack(issuers=(oidc.settings(jwks_url=str(keys.make_url("/keys"))),))
    assert len(fetches) == 1  # at start
    assert (await call(stack, "chatiq", oidc.mint()))[0] == 200
    for n in range(5):
        status, _, _ = await call(stack, "chatiq", oidc.mint(SigningKey(f"rogue-{n}")))
        assert status == 401
    assert len(fetches) == 1, "fetched again within 30 s of the last fetch"


async def test_known_keys_keep_working_while_the_issuer_is_down(
    make_stack: StackFactory, oidc: OpenIdProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens, "REFETCH_S", 0.0)
    stack = await make_stack(issuers=(oidc.settings(),))
    await oidc.stop()
    status, _, body = await call(stack, "chatiq", oidc.mint(sub="still-here"))  # never seen
    assert status == 200, body
    status, headers, _ = await call(stack, "chatiq", oidc.mint(SigningKey("new")))
    assert status == 401 and "does not publish" in headers["WWW-Authenticate"]
    warnings = [line for line in stack.log_lines() if line["event"] == "issuer_keys_unavailable"]
    assert warnings and warnings[-1]["keys_kept"] == 1
    assert request_lines(stack)[0]["user"] == "still-here"


async def test_an_issuer_that_does_not_answer_at_start_is_a_warning_and_keys_still_work(
    make_stack: StackFactory, oidc: OpenIdProvider
) -> None:
    down = replace(oidc.settings(), issuer=f"http://127.0.0.1:{free_port()}")
    stack = await make_stack(issuers=(down,))
    (warning,) = [line for line in stack.log_lines() if line["event"] == "issuer_keys_unavailable"]
    assert warning["issuer"] == down.issuer and warning["keys_kept"] == 0
    status, _, body = await call(stack, "chatiq", ACME_KEY)
    assert status == 200, body
    status, headers, _ = await call(stack, "chatiq", oidc.mint(iss=down.issuer))
    assert status == 401 and "does not publish" in headers["WWW-Authenticate"]


async def test_a_tenant_claim_names_the_tenant(
    make_stack: StackFactory, oidc: OpenIdProvider
) -> None:
    stack = await make_stack(issuers=(oidc.settings(tenant="", tenant_claim="team"),))
    status, _, body = await call(stack, "chatiq", await oidc.client_token("svc-acme"))
    assert status == 200, body
    assert request_lines(stack)[-1]["tenant"] == "acme"
    status, headers, _ = await call(stack, "chatiq", await oidc.client_token("svc"))  # no team
    assert status == 401 and "no 'team' claim" in headers["WWW-Authenticate"]
    status, _, body = await call(stack, "chatiq", oidc.mint(team="nobody"))
    assert status == 403, body
    assert json.loads(body)["error"]["code"] == "FORBIDDEN"


@pytest.mark.parametrize("mode", ["claim", "hash", "none"])
async def test_the_user_on_the_log_line_as_logging_user_says(
    make_stack: StackFactory, oidc: OpenIdProvider, mode: str
) -> None:
    stack = await make_stack(issuers=(oidc.settings(),))
    stack.gateway.app[tokens.TOKENS].user_logged = mode  # as [logging] user = mode
    for sub in ("ada@example.com", "ada@example.com", "grace@example.com"):
        assert (await call(stack, "chatiq", oidc.mint(sub=sub)))[0] == 200
    users = [line.get("user") for line in request_lines(stack)]
    if mode == "claim":
        assert users == ["ada@example.com", "ada@example.com", "grace@example.com"]
    elif mode == "hash":
        assert users[0] == users[1] != users[2]
        assert all(isinstance(u, str) and len(u) == 16 and "@" not in u for u in users)
    else:
        assert users == [None, None, None]


def config(issuer: dict[str, Any], tenant: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "upstream": {"url": "http://127.0.0.1:8181/api/chat"},
        "tenants": [tenant or {"name": "people", "bots": ["*"]}],
        "issuers": [{"issuer": "https://login.example.com", "audience": "gw",
                     "tenant": "people", **issuer}],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("issuer", "says"),
    [
        ({"algorithms": ["HS256"]}, "'HS256' is not allowed"),
        ({"algorithms": ["none"]}, "'none' is not allowed"),
        ({"algorithms": []}, "at least one"),
        ({"issuer": "http://login.example.com"}, "must be an https URL"),
        ({"jwks_url": "http://keys.example.com/jwks"}, "must be an https URL"),
        ({"tenant": "nobody"}, "no [[tenants]] is named 'nobody'"),
        ({"tenant_claim": "team"}, "one of tenant or tenant_claim"),
        ({"tenant": ""}, "one of tenant or tenant_claim"),
        ({"audience": ""}, "audience"),
        ({"leeway_s": 3600}, "leeway_s"),
        ({"kid": "x"}, "issuers[0].kid: unknown key"),
    ],
)
def test_an_issuer_the_gateway_cannot_trust_safely_is_a_config_error(
    issuer: dict[str, Any], says: str
) -> None:
    with pytest.raises(ConfigError, match=None) as raised:
        settings_from_mapping(config(issuer), {})
    assert says in str(raised.value)


def test_a_tenant_without_a_key_must_be_an_issuer_s() -> None:
    raw = config({}, {"name": "people", "bots": ["*"]})
    assert settings_from_mapping(raw, {}).tenants[0].keys_sha256 == ()
    raw["issuers"] = []
    with pytest.raises(ConfigError, match="key_sha256: missing"):
        settings_from_mapping(raw, {})


def test_logging_user_is_claim_hash_or_none() -> None:
    raw = config({})
    assert settings_from_mapping(raw, {}).logging == LoggingSettings()
    with pytest.raises(ConfigError, match=r"logging\.user"):
        settings_from_mapping({**raw, "logging": {"user": "email"}}, {})


class MemoryTokens:
    """The MCP SDK's token storage, kept in memory (as a short-lived agent would)."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


async def test_an_mcp_client_discovers_the_issuer_from_the_401_and_signs_in_itself(
    make_stack: StackFactory, oidc: OpenIdProvider
) -> None:
    stack = await make_stack(issuers=(oidc.settings(),))
    url = str(stack.gateway.make_url("/mcp"))
    document = str(stack.gateway.make_url("/.well-known/oauth-protected-resource/mcp"))
    async with stack.session.post(url, json=ROUTES["mcp"].body("demo", "hi"),
                                  headers=ROUTES["mcp"].headers) as r:  # fmt: skip
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == f'Bearer resource_metadata="{document}"'
    async with stack.session.get(document) as r:
        assert r.status == 200
        assert await r.json() == {
            "resource": url,
            "authorization_servers": [oidc.issuer],
            "bearer_methods_supported": ["header"],
            "resource_name": "ChatIQ Gateway",
        }
    # The SDK's own OAuth client: the 401, the metadata, the issuer's, a token.
    signs_in = ClientCredentialsOAuthProvider(
        url, MemoryTokens(), "svc", "svc-secret", scope="chat", issuer=oidc.issuer
    )
    http = create_mcp_http_client(auth=signs_in)
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        assert "ask_demo" in [t.name for t in (await client.list_tools()).tools]
        result = await client.call_tool("ask_demo", {"question": "hi"})
    assert not result.is_error
    answered = {(line["status"], line.get("user")) for line in request_lines(stack)}
    assert answered == {(401, None), (200, "svc")}


async def test_without_issuers_there_is_no_sign_in_to_discover(make_stack: StackFactory) -> None:
    stack = await make_stack()
    async with stack.session.post(stack.gateway.make_url("/mcp"), json={}) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    async with stack.session.get(
        stack.gateway.make_url("/.well-known/oauth-protected-resource")
    ) as r:
        assert r.status == 404


async def test_behind_a_proxy_discovery_names_the_public_url(
    make_stack: StackFactory, oidc: OpenIdProvider
) -> None:
    public = "https://chat-gateway.example.com"
    server = ServerSettings(public_url=f"{public}/")
    stack = await make_stack(issuers=(oidc.settings(),), server=server)
    async with stack.session.post(stack.gateway.make_url("/mcp"), json={}) as r:
        assert r.headers["WWW-Authenticate"] == (
            f'Bearer resource_metadata="{public}/.well-known/oauth-protected-resource/mcp"'
        )
    for path, resource in (("/mcp", f"{public}/mcp"), ("", public)):
        url = stack.gateway.make_url(f"/.well-known/oauth-protected-resource{path}")
        async with stack.session.get(url) as r:
            assert (await r.json())["resource"] == resource
            assert r.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("url", ["https://gw.example.com/chat", "gw.example.com", "ftp://gw"])
def test_a_public_url_is_an_origin(url: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.public_url"):
        settings_from_mapping({**config({}), "server": {"public_url": url}}, {})


def with_user_limits(
    tenants: tuple[Tenant, ...], rate: int = 0, streams: int = 0
) -> tuple[Tenant, ...]:
    """The tenants, acme's users each with a quota of their own."""
    return tuple(
        replace(t, user_requests_per_minute=rate, user_max_streams=streams)
        if t.name == "acme"
        else t
        for t in tenants
    )


async def test_each_user_has_a_rate_of_their_own_within_the_tenant_s(
    make_stack: StackFactory, oidc: OpenIdProvider
) -> None:
    stack = await make_stack(issuers=(oidc.settings(),), tenants=with_user_limits(TENANTS, rate=2))
    ada, grace = oidc.mint(sub="ada"), oidc.mint(sub="grace")
    assert [(await call(stack, "chatiq", ada))[0] for _ in range(2)] == [200, 200]
    status, headers, body = await call(stack, "chatiq", ada)
    assert status == 429 and float(headers["Retry-After"]) >= 1
    error = json.loads(body)["error"]
    assert error["code"] == "RATE_LIMIT"
    assert error["message"] == "you may make 2 requests a minute (each user's own limit)"
    # Other users, and the tenant's own key, are not held to ada's.
    assert (await call(stack, "chatiq", grace))[0] == 200
    assert (await call(stack, "openai", ACME_KEY))[0] == 200
    assert (await call(stack, "openai", ada))[0] == 429  # on every frontend
    assert await stack.metric("chatiq_gateway_rejected_total", reason="user_rate_limit") == 2
    assert await stack.metric("chatiq_gateway_rejected_total", reason="rate_limit") == 0


async def test_each_user_has_streams_of_their_own_within_the_tenant_s(
    make_stack: StackFactory, oidc: OpenIdProvider
) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=100),
        issuers=(oidc.settings(),),
        tenants=with_user_limits(TENANTS, streams=1),
    )
    ada, grace = oidc.mint(sub="ada"), oidc.mint(sub="grace")
    async with await stack.chat(key=ada) as live:
        assert live.status == 200
        await live.content.readline()
        status, headers, body = await call(stack, "chatiq", ada)
        assert status == 429 and headers["Retry-After"] == "1"
        assert "you already have 1 streams open" in json.loads(body)["error"]["message"]
        assert (await call(stack, "chatiq", grace))[0] == 200
    await eventually(lambda: stack.gateway.app[ADMISSION].active == 0)
    assert (await call(stack, "chatiq", ada))[0] == 200  # ada's stream ended: ada's slot is free
    assert await stack.metric("chatiq_gateway_rejected_total", reason="user_concurrency") == 1


async def test_a_user_s_quota_holds_across_replicas_sharing_redis(
    make_stack: StackFactory,
    gateway_process: Callable[..., Awaitable[GatewayProcess]],
    oidc: OpenIdProvider,
    redis_server: RedisServer,
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=4))
    issuer = {"issuer": oidc.issuer, "audience": AUDIENCE, "tenant": "load"}
    replicas = [
        await gateway_process(
            stack.emulator, issuers=[issuer], redis={"url": redis_server.url},
            tenant_fields={"user_requests_per_minute": 4},
        )
        for _ in range(2)
    ]  # fmt: skip
    ada, grace = oidc.mint(sub="ada"), oidc.mint(sub="grace")
    statuses = []
    for i in range(8):
        async with stack.session.post(
            f"http://127.0.0.1:{replicas[i % 2].port}/api/chatbot",
            json={"message": "hi", "stream": False},
            headers={"Authorization": f"Bearer {ada}"},
        ) as r:
            statuses.append(r.status)
    assert statuses.count(200) == 4, statuses  # four in all, not four a replica
    async with stack.session.post(
        f"http://127.0.0.1:{replicas[1].port}/api/chatbot",
        json={"message": "hi", "stream": False},
        headers={"Authorization": f"Bearer {grace}"},
    ) as r:
        assert r.status == 200


async def test_idle_users_quotas_are_forgotten_past_a_bound_and_live_ones_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admission_module, "USERS_KEPT", 2)
    admission = Admission(AdmissionSettings(), with_user_limits(TENANTS, streams=1))
    live = admission.slot("acme", "ada")
    await live.take()
    for user in ("grace", "alan", "edsger"):
        async with admission.slot("acme", user):
            pass
    # Past the bound, the oldest idle go (grace); ada's stream keeps hers.
    kept = [name.rpartition("\x1f")[2] for name in admission._users]
    assert kept == ["ada", "alan", "edsger"]
    with pytest.raises(UserBusy):  # ada's state, kept: still one stream open
        await admission.slot("acme", "ada").take()
    live.give_back()


NOT_FOUND = "no resumable stream with that id for this key (it may have expired)"


@pytest.mark.parametrize("shared", [False, True], ids=["one process", "through redis"])
async def test_a_user_s_resumable_stream_and_stored_response_are_theirs_alone(
    make_stack: StackFactory, oidc: OpenIdProvider, request: pytest.FixtureRequest, shared: bool
) -> None:
    """Another user of the same tenant gets what another tenant gets: a 404.
    Through Redis, the second replica holds none of it and must ask."""
    options: dict[str, Any] = {"resume": ResumeSettings(enabled=True)}
    if shared:
        redis: RedisServer = request.getfixturevalue("redis_server")
        options["redis"] = RedisSettings(url=redis.url)
    first = await make_stack(issuers=(oidc.settings(),), **options)
    other = await make_stack(issuers=(oidc.settings(),), **options) if shared else first
    ada, grace = oidc.mint(sub="ada"), oidc.mint(sub="grace")
    started = await first.chat(key=ada, headers={"X-Resumable": "1"})
    stream_id = started.headers["X-Stream-Id"]
    await started.read()
    created = await first.session.post(
        first.gateway.make_url("/v1/responses"), json={"model": "demo", "input": "hi"},
        headers={"Authorization": f"Bearer {ada}"},
    )  # fmt: skip
    response_id = (await created.json())["id"]
    stream_url = other.gateway.make_url(f"/api/chatbot/streams/{stream_id}")
    response_url = other.gateway.make_url(f"/v1/responses/{response_id}")

    async def as_(token: str) -> tuple[int, Any, int, Any]:
        auth = {"Authorization": f"Bearer {token}", "Last-Event-ID": "1"}
        async with other.session.get(stream_url, headers=auth) as s:
            stream = (s.status, await s.read())
        async with other.session.get(response_url, headers=auth) as r:
            return stream[0], stream[1], r.status, await r.json()

    async def eventually_stored() -> tuple[int, Any, int, Any]:
        for _ in range(100):  # a replica's copy reaches Redis a moment after the end
            answers = await as_(ada)
            if answers[2] == 200:
                return answers
            await asyncio.sleep(0.05)
        return answers

    owned = await eventually_stored()
    assert (owned[0], owned[2]) == (200, 200), owned
    assert owned[3]["id"] == response_id
    for stranger in (grace, LIMITED_KEY):  # another user, another tenant: alike
        status, body, response_status, response = await as_(stranger)
        assert (status, json.loads(body)["error"]["message"]) == (404, NOT_FOUND)
        assert (response_status == 404 and response["error"]["code"] == "not_found") or (
            response_status == 404
        ), response
    previous = await other.session.post(
        other.gateway.make_url("/v1/responses"),
        json={"model": "demo", "input": "more", "previous_response_id": response_id},
        headers={"Authorization": f"Bearer {grace}"},
    )
    assert previous.status == 404


@pytest.mark.parametrize(
    ("page", "says"),
    [
        ({"oidc_issuer": "https://login.example.com"}, "both oidc_issuer and oidc_client_id"),
        ({"oidc_client_id": "page"}, "both oidc_issuer and oidc_client_id"),
        ({"oidc_issuer": "https://elsewhere.example.com", "oidc_client_id": "page"},
         "must be one of the [[issuers]]"),
    ],
)  # fmt: skip
def test_the_page_signs_in_only_with_an_issuer_the_gateway_trusts(
    page: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping({**config({}), "page": page}, {})
    assert says in str(raised.value)


async def test_the_page_learns_how_to_sign_in_and_may_fetch_from_the_issuer(
    make_stack: StackFactory, oidc: OpenIdProvider
) -> None:
    keys_only = await make_stack()
    async with keys_only.session.get(keys_only.gateway.make_url("/api/sign-in")) as r:
        assert r.status == 404
    page = PageSettings(oidc_issuer=oidc.issuer, oidc_client_id="page")
    stack = await make_stack(issuers=(oidc.settings(),), page=page)
    async with stack.session.get(stack.gateway.make_url("/api/sign-in")) as r:
        assert await r.json() == {"issuer": oidc.issuer, "client_id": "page", "scope": "openid"}
    async with stack.session.get(stack.gateway.make_url("/")) as r:
        policy = r.headers["Content-Security-Policy"]
    assert f"connect-src 'self' {oidc.issuer};" in policy
    async with keys_only.session.get(keys_only.gateway.make_url("/")) as r:
        assert "connect-src 'self';" in r.headers["Content-Security-Policy"]


async def test_a_reload_adds_an_issuer_and_fetches_its_keys(
    make_stack: StackFactory,
    oidc: OpenIdProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATIQ_API_KEY", CHATIQ_KEY)  # as a gateway process has it
    stack = await make_stack()
    token = await oidc.client_token()
    assert (await call(stack, "chatiq", token))[0] == 401  # no issuers: an unknown key
    emulator = stack.emulator.make_url("/api/chat")
    config = tmp_path / "gateway.toml"
    tenants = "".join(
        f'[[tenants]]\nname = "{t.name}"\nkey_sha256 = "{t.key_sha256}"\n'
        f"bots = {json.dumps(t.bots)}\n"
        for t in TENANTS
    )
    config.write_text(
        f'[upstream]\nurl = "{emulator}"\nbot_slug = "demo"\n{tenants}'
        f'[[issuers]]\nissuer = "{oidc.issuer}"\naudience = "{AUDIENCE}"\ntenant = "acme"\n'
    )
    assert await reload_settings(stack.gateway.app, config)
    status, _, body = await call(stack, "chatiq", token)
    assert status == 200, body
    assert (await call(stack, "chatiq", ACME_KEY))[0] == 200
