"""The gateway against its own OpenAPI document: schemathesis fuzzing a live process.

Every generated request goes to a real gateway process in front of a real
emulator. Whatever is sent, the answer must be in the document (status,
content type, headers, body schema) and never a 5xx of the gateway's own
making. ``FUZZ_EXAMPLES`` sets how many examples per operation (a longer
campaign: ``FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/test_openapi.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import SchemaValidator, core_schema
from schemathesis.checks import positive_data_acceptance

from gateway.routes.ops import OPENAPI
from loadtest.harness import free_port, start_emulator, start_gateway, stop, wait_answering
from tests.helpers import ACME_KEY, CHATIQ_KEY

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
_FRAMING = frozenset({"transfer-encoding", "content-length"})
schema = schemathesis.openapi.from_path(OPENAPI)


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("fuzz")
    emulator_port, port = free_port(), free_port()
    env_key = os.environ.get("CHATIQ_API_KEY")
    os.environ["CHATIQ_API_KEY"] = CHATIQ_KEY  # the emulator requires it
    emulator = start_emulator(emulator_port, "--ttft-ms", "0", "--tokens-per-s", "0")
    if env_key is None:
        del os.environ["CHATIQ_API_KEY"]
    else:
        os.environ["CHATIQ_API_KEY"] = env_key
    gateway, log = start_gateway(
        tmp, port, emulator_port, ACME_KEY, api_key=CHATIQ_KEY,
        # Let the fuzzer past the key check, and let an over-long message be
        # refused as such (400) before the body's size limit (413) is reached.
        server={"max_auth_failures_per_minute": 0, "max_body_bytes": 1 << 20},
        admission={"tenant_requests_per_minute": 0, "tenant_max_streams": 0},
        resume={"enabled": True},
    )  # fmt: skip
    processes: list[subprocess.Popen[bytes]] = [emulator, gateway]
    try:
        wait_answering(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}"
        assert "Traceback" not in log.read_text()
    finally:
        stop(*processes)


def test_the_served_document_is_the_one_in_the_repository(gateway_url: str) -> None:
    with urllib.request.urlopen(f"{gateway_url}/openapi.json") as r:
        assert json.load(r) == json.loads(Path(OPENAPI).read_text())


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_is_in_the_document(
    case: schemathesis.Case,  # type: ignore[type-arg]
    gateway_url: str,
) -> None:
    headers = {"Authorization": f"Bearer {ACME_KEY}"} if case.operation.security else {}
    # The message's framing is the HTTP client's: a generated Transfer-Encoding
    # (or Content-Length) made requests send a body the request line did not
    # announce, whose bytes aiohttp's parser then refused as the next request
    # (a plain-text 400). Hostile framing has tests of its own (test_hostile_clients).
    for name in [n for n in case.headers or {} if n.lower() in _FRAMING]:
        del case.headers[name]
    response = case.call(base_url=gateway_url, headers=headers, timeout=30)
    # Every check but one: the gateway refuses a few schema-valid bodies on
    # purpose (a message of Unicode whitespace only, NUL characters), which
    # JSON Schema patterns cannot say the same way in every regex dialect.
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
    if response.status_code == 400 and case.path == "/mcp":  # JSON-RPC's own codes
        codes: set[object] = {-32700, -32600, -32602, -32020, -32022}
        assert response.json()["error"]["code"] in codes
    elif response.status_code == 400:  # the OpenAI frontend in its own words
        codes = (
            {"invalid_request", "unsupported_parameter"}
            if case.path.startswith("/v1/")
            else {"INVALID_REQUEST"}
        )
        assert response.json()["error"]["code"] in codes
    assert response.status_code < 500 or response.status_code in (502, 503, 504)
    assert b"Traceback" not in response.content


printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=120)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    authorization=st.one_of(
        printable, printable.map(lambda t: f"Bearer {t}"), st.just(f"Bearer {ACME_KEY}")
    ),
    content_type=st.one_of(printable, st.just("application/json")),
    body=st.one_of(
        st.binary(max_size=3000),
        st.builds(lambda v: json.dumps(v).encode(), json_values),
        st.builds(lambda v: json.dumps({"message": "hi", **v}).encode(), st.dictionaries(
            st.sampled_from(["bot", "stream", "history", "conversation_id", "private_mode", "x"]),
            json_values, max_size=3)),
    ),
)  # fmt: skip
def test_random_headers_and_bodies_get_a_clear_answer(
    gateway_url: str, authorization: str, content_type: str, body: bytes
) -> None:
    request = urllib.request.Request(
        f"{gateway_url}/api/chatbot", data=body, method="POST",
        headers={"Authorization": authorization, "Content-Type": content_type},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            status, payload = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    assert status < 500 or status in (502, 503, 504), payload
    if status != 200:
        error = json.loads(payload)["error"]
        assert error["code"] and error["message"]


def test_the_document_suits_client_and_model_generators() -> None:
    """openapi-python-client reads a 200's first content type (JSON first, then
    the stream); datamodel-code-generator's models validate patterns with
    pydantic-core's Rust regex engine (no backtracking, no lone surrogates);
    the server URL is the one the document was fetched from."""
    document = json.loads(Path(OPENAPI).read_text())
    assert document["servers"] == [
        {"url": "/", "description": document["servers"][0]["description"]}
    ]

    def patterns(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
            return found + [p for v in node.values() for p in patterns(v)]
        if isinstance(node, list):
            return [p for v in node for p in patterns(v)]
        return []

    found = patterns(document)
    assert len(found) > 10
    for pattern in found:  # raises SchemaError if the Rust engine cannot compile it
        SchemaValidator(core_schema.str_schema(pattern=pattern, regex_engine="rust-regex"))
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            content = operation["responses"].get("200", {}).get("content", {})
            if "application/json" in content:
                assert next(iter(content)) == "application/json", f"{method} {path}"
