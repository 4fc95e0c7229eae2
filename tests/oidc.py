"""A real OpenID provider for the sign-in tests: npm's ``oidc-provider``
(tests/node/oidc_provider.mjs) on a loopback port, signing with keys the test
holds too, so that it can also make the tokens a provider never would
(expired, for another audience, signed with a key never published...)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config import Issuer
from loadtest.harness import free_port
from tests.helpers import NODE_DIR, node

AUDIENCE = "chatiq-gateway"


@dataclass
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    def jwk(self) -> dict[str, Any]:
        """The private JWK, as the provider is given it."""
        found: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(self.private, as_dict=True)
        found.pop("key_ops", None)  # PyJWT's ["sign"]: the provider verifies with it too
        return {**found, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass
class OpenIdProvider:
    """oidc-provider, running; ``restart`` it with other keys to rotate them."""

    directory: Path
    port: int
    key: SigningKey
    process: asyncio.subprocess.Process | None = None
    redirect_uri: str = ""  # where the page client "page" comes back to

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self, **options: Any) -> Issuer:
        return Issuer(**{"issuer": self.issuer, "audience": AUDIENCE, "tenant": "acme", **options})

    async def start(self) -> None:
        keys = self.directory / f"keys-{self.key.kid}.json"
        keys.write_text(json.dumps({"keys": [self.key.jwk()]}))
        self.process = await asyncio.create_subprocess_exec(
            node(), str(NODE_DIR / "oidc_provider.mjs"), str(self.port), str(keys),
            *([self.redirect_uri] if self.redirect_uri else []),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 20)
        assert json.loads(line)["issuer"] == self.issuer, line

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        self.process = None

    async def restart(self, key: SigningKey | None = None, redirect_uri: str = "") -> None:
        await self.stop()
        self.key = key or self.key
        self.redirect_uri = redirect_uri or self.redirect_uri
        await self.start()

    async def client_token(self, client_id: str = "svc") -> str:
        """An access token by the client credentials grant, as a service gets one."""
        auth = aiohttp.encode_basic_auth(client_id, f"{client_id}-secret")
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{self.issuer}/token",
                data={"grant_type": "client_credentials", "scope": "chat"},
                headers={"Authorization": auth},
            ) as r,
        ):
            body = await r.json()
            assert r.status == 200, body
        token: str = body["access_token"]
        return token

    def mint(self, key: SigningKey | None = None, headers: dict[str, Any] | None = None,
             **claims: Any) -> str:  # fmt: skip
        """A token signed with this provider's key (or ``key``), with its
        usual claims unless ``claims`` say otherwise (None: left out)."""
        now = int(time.time())
        signer = key or self.key
        body = {"iss": self.issuer, "aud": AUDIENCE, "sub": "minted-user", "iat": now,
                "exp": now + 300, **claims}  # fmt: skip
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(
            body, signer.private, "RS256", headers={"kid": signer.kid, **(headers or {})}
        )


@pytest.fixture
async def oidc(tmp_path: Path) -> AsyncIterator[OpenIdProvider]:
    provider = OpenIdProvider(tmp_path, free_port(), SigningKey("key-1"))
    await provider.start()
    yield provider
    await provider.stop()
