"""Tokens from the company's identity provider: a bearer credential that is a
JWT is checked against the ``[[issuers]]`` with PyJWT, by a key from its
issuer's published key set (JWKS).

Each issuer's keys are fetched at start (a warning, not a failure, when it
does not answer), kept, and fetched again when a token names a key id not
seen yet: at most once every ``REFETCH_S`` per issuer, whatever the tokens
say, and a failed fetch keeps the known keys. A verified token is remembered
(by its whole text) until it expires, so a caller's next request costs one
dictionary lookup; every rejection says why, in the Bearer challenge.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from aiohttp import web

from gateway.config import Issuer
from gateway.errors import Unauthorized
from gateway.logs import Logger

REFETCH_S = 30.0  # an unknown key id fetches the issuer's keys again, at most this often
FETCH_TIMEOUT_S = 5.0
REMEMBERED = 10_000  # verified tokens kept (the oldest forgotten first)

# A key type and the algorithms it can verify (a JWK's "alg", when given, narrows it).
_FAMILIES = {"RSA": ("RS", "PS"), "EC": ("ES",), "OKP": ("EdDSA",)}

_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidAudienceError, "the token is for another audience (aud)"),
    (jwt.InvalidIssuerError, "the token names another issuer (iss)"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.InvalidAlgorithmError, "the token's algorithm (alg) is not allowed"),
    (jwt.MissingRequiredClaimError, "the token lacks a required claim"),
    (jwt.InvalidIssuedAtError, "the token's iat is not a number"),
    (jwt.DecodeError, "the token is malformed"),
)


def looks_like_jwt(credential: str) -> bool:
    """A JWS in compact form: three base64url parts, its header a JSON object."""
    return credential.startswith("eyJ") and credential.count(".") == 2


@dataclass(frozen=True, slots=True)
class Verified:
    """What a verified token says: its tenant (by name) and its user."""

    issuer: str
    tenant: str
    user: str
    expires: float  # wall-clock time, leeway included
    user_id: str = ""  # the user's stable id, made once the token is verified


class IssuerKeys:
    """One issuer's published signing keys, by key id."""

    def __init__(self, settings: Issuer, log: Logger) -> None:
        self.settings = settings
        self._log = log
        self._jwks: dict[str, dict[str, Any]] = {}  # kid ("" for none) -> JWK
        self._keys: dict[tuple[str, str], jwt.PyJWK] = {}  # (kid, alg) -> key
        self._tried_at = -REFETCH_S
        self._lock = asyncio.Lock()

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        """Fetch the key set again, unless it was tried within ``REFETCH_S``;
        one fetch at a time, and the keys known stay if it fails."""
        async with self._lock:
            now = time.monotonic()
            if now - self._tried_at < REFETCH_S:
                return
            self._tried_at = now
            name = self.settings.issuer
            try:
                url = self.settings.jwks_url or await self._discover(session)
                jwks = _signing_keys(await _get_json(session, url))
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                self._log.warning("issuer_keys_unavailable", issuer=name,
                                  problem=_describe(e), keys_kept=len(self._jwks))  # fmt: skip
                return
            self._jwks, self._keys = jwks, {}  # a key the issuer withdrew stops working
            self._log.info("issuer_keys", issuer=name, keys=len(jwks))

    async def _discover(self, session: aiohttp.ClientSession) -> str:
        issuer = self.settings.issuer
        discovery = f"{issuer.rstrip('/')}/.well-known/openid-configuration"
        metadata = await _get_json(session, discovery)
        if metadata.get("issuer") != issuer:
            raise ValueError(f"its discovery document names issuer {metadata.get('issuer')!r}")
        url = metadata.get("jwks_uri")
        if not isinstance(url, str) or not url:
            raise ValueError("its discovery document has no jwks_uri")
        return url

    def key(self, kid: str, algorithm: str) -> jwt.PyJWK | None:
        """The key ``kid`` bound to ``algorithm``; None if the issuer published
        no such key. ``Unauthorized`` if it cannot verify that algorithm."""
        jwk = self._jwks.get(kid)
        if jwk is None:
            return None
        found = self._keys.get((kid, algorithm))
        if found is None:
            if algorithm not in self.settings.algorithms or not _fits(jwk, algorithm):
                raise Unauthorized("the token's algorithm (alg) is not allowed for its key")
            try:
                found = jwt.PyJWK(jwk, algorithm)
            except jwt.PyJWTError:
                raise Unauthorized("the token's key cannot verify its algorithm (alg)") from None
            self._keys[(kid, algorithm)] = found
        return found


class TokenVerifier:
    """The issuers (``TOKENS``, on the app): ``verify`` a JWT into who sent it."""

    def __init__(
        self,
        issuers: Iterable[Issuer],
        log: Logger,
        user_logged: str = "claim",
        secret: bytes = b"",
    ) -> None:
        self._log = log
        self.user_logged = user_logged  # [logging] user; a reload may change it
        self._secret = secret
        self._issuers: dict[str, IssuerKeys] = {}
        self._remembered: OrderedDict[str, Verified] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self.replace(issuers)

    @property
    def active(self) -> bool:
        return bool(self._issuers)

    def replace(self, issuers: Iterable[Issuer]) -> None:
        """A reload: these issuers from now on (an unchanged one keeps its keys)."""
        before = self._issuers
        self._issuers = {
            i.issuer: before[i.issuer]
            if i.issuer in before and before[i.issuer].settings == i
            else IssuerKeys(i, self._log)
            for i in issuers
        }
        self._remembered.clear()

    def _user_id(self, verified: Verified) -> str:
        """The user's stable id, whatever the log shows: what their quotas and
        their streams are kept under. A keyed digest of issuer and user (so
        that a list of likely names cannot be hashed to find one)."""
        named = f"{verified.issuer}\x00{verified.user}".encode("utf-8", "surrogateescape")
        return hmac.new(self._secret, named, hashlib.sha256).hexdigest()[:32]

    def user_label(self, verified: Verified) -> str | None:
        """The user as the log line shows it: the claim, a digest, or none."""
        if self.user_logged == "none":
            return None
        if self.user_logged == "hash":
            return verified.user_id[:16]
        return verified.user

    async def start(self) -> None:
        """Fetch every issuer's keys (those that do not answer are warned of)."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
            self._session = aiohttp.ClientSession(timeout=timeout, trust_env=True)
        await asyncio.gather(*(keys.refresh(self._session) for keys in self._issuers.values()))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def verify(self, token: str) -> Verified:
        """Who ``token`` signs in; ``Unauthorized`` saying why it does not."""
        now = time.time()
        seen = self._remembered.get(token)
        if seen is not None and now < seen.expires:
            return seen
        try:  # one parse, to learn whose it is and which key signed it
            unverified = jwt.decode_complete(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthorized("the token is malformed") from None
        header = unverified["header"]
        issuer = unverified["payload"].get("iss")
        keys = self._issuers.get(issuer) if isinstance(issuer, str) else None
        if keys is None:
            raise Unauthorized("the token's issuer (iss) is not one this gateway trusts")
        kid, algorithm = header.get("kid", ""), header.get("alg")
        if not isinstance(kid, str) or not isinstance(algorithm, str):
            raise Unauthorized("the token is malformed")
        key = keys.key(kid, algorithm)
        if key is None and self._session is not None:
            await keys.refresh(self._session)  # a key the issuer published since?
            key = keys.key(kid, algorithm)
        if key is None:
            raise Unauthorized("the token is signed by a key its issuer does not publish (kid)")
        verified = _check(token, key, keys.settings)
        verified = dataclasses.replace(verified, user_id=self._user_id(verified))  # once a token
        self._remember(token, verified)
        return verified

    def _remember(self, token: str, verified: Verified) -> None:
        remembered = self._remembered
        remembered[token] = verified
        if len(remembered) > REMEMBERED:
            remembered.popitem(last=False)


def _check(token: str, key: jwt.PyJWK, issuer: Issuer) -> Verified:
    """The token's claims, checked: signature, ``iss``, ``aud``, ``exp`` (required),
    ``nbf`` and ``iat`` (when present), with the issuer's leeway."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=list(issuer.algorithms),
            audience=issuer.audience,
            issuer=issuer.issuer,
            leeway=issuer.leeway_s,
            options={"require": ["exp", "iss", "aud"]},
        )
    except jwt.PyJWTError as e:
        raise Unauthorized(_reason(e)) from None
    user = claims.get(issuer.user_claim)
    if not isinstance(user, str) or not user:
        raise Unauthorized(f"the token has no {issuer.user_claim!r} claim naming its user")
    tenant = issuer.tenant
    if issuer.tenant_claim:
        named = claims.get(issuer.tenant_claim)
        if not isinstance(named, str) or not named:
            raise Unauthorized(f"the token has no {issuer.tenant_claim!r} claim naming its tenant")
        tenant = named
    return Verified(issuer.issuer, tenant, user, float(claims["exp"]) + issuer.leeway_s)


def _reason(error: Exception) -> str:
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            if isinstance(error, jwt.MissingRequiredClaimError):
                return f"the token has no {error.claim!r} claim"
            return reason
    return "the token is not valid"


def _fits(jwk: Mapping[str, Any], algorithm: str) -> bool:
    """Whether a key of this type (and "alg", if the issuer gave one) verifies ``algorithm``."""
    if "alg" in jwk:
        return bool(jwk["alg"] == algorithm)
    return algorithm.startswith(_FAMILIES.get(str(jwk.get("kty")), ()))


def _signing_keys(jwks: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A JWKS's public signing keys by id; ``ValueError`` if it has none.
    Symmetric ("oct") keys and keys for encryption are left out."""
    keys = jwks.get("keys")
    if not isinstance(keys, list):
        raise ValueError("its key set has no 'keys' list")
    found: dict[str, dict[str, Any]] = {}
    for jwk in keys:
        if not isinstance(jwk, dict) or jwk.get("kty") not in _FAMILIES:
            continue
        if jwk.get("use", "sig") != "sig" or "d" in jwk:  # a private key is never taken
            continue
        kid = jwk.get("kid", "")
        if isinstance(kid, str):
            found[kid] = jwk
    if not found:
        raise ValueError("its key set has no public signing key (RSA, EC or OKP)")
    return found


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url, allow_redirects=False) as response:
        if response.status != 200:
            raise ValueError(f"{url} answered {response.status}")
        body = await response.json(content_type=None)
    if not isinstance(body, dict):
        raise ValueError(f"{url} did not answer a JSON object")
    return body


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within {FETCH_TIMEOUT_S:g} s"
    return (str(error) or type(error).__name__)[:200]


def user_secret(upstream_key: str | None) -> bytes:
    """The key users' digests are made with: the same on every replica that
    shares the ChatIQ key, so that one user's lines match across the fleet."""
    return hmac.new((upstream_key or "").encode(), b"chatiq-gateway users", hashlib.sha256).digest()


TOKENS = web.AppKey("tokens", TokenVerifier)
