"""The compiled hot path and the pure one: the same events from the same
bytes, cut anywhere; the switch between them; and what says which one runs.

In ``make test`` these run twice: on the compiled path (the parser under
test is the compiled one, compared with its own source loaded apart) and
with ``CHATIQ_GATEWAY_NO_EXTENSIONS=1`` (every module from its source)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway
from gateway import sse
from tests.test_sse import streams

ROOT = Path(__file__).resolve().parent.parent
PURE = bool(os.environ.get("CHATIQ_GATEWAY_NO_EXTENSIONS"))


def from_source() -> ModuleType:
    """gateway/sse.py run as Python, beside whatever ``gateway.sse`` is."""
    name = "gateway_sse_from_source"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "gateway" / "sse.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # the dataclass looks its module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def parse(module: Any, data: bytes, cuts: list[int], max_event_bytes: int) -> list[object]:
    """Everything a parser says about ``data`` fed in pieces: each event's
    fields, a refusal and the events before it, the bytes left at the end."""
    parser = module.SSEParser(max_event_bytes)
    said: list[object] = []
    last = 0
    try:
        for cut in [*sorted(set(cuts)), len(data)]:
            said += [_fields(e) for e in parser.feed(data[last:cut])]
            last = cut
        said += [_fields(e) for e in parser.flush()]
    except module.SSEProtocolError as e:
        said += ["refused", str(e), *(_fields(event) for event in e.events)]
        return said
    leftover = parser.close()
    said.append(None if leftover is None else _fields(leftover))
    return said


def _fields(event: Any) -> tuple[object, ...]:
    return (event.raw, event.data, event.event, event.id, event.retry)


def test_ci_runs_the_compiled_path_unless_told_not_to() -> None:
    if not os.environ.get("CI") or PURE:
        pytest.skip("CI only, on its compiled run")
    assert gateway.build() == "compiled", gateway.build_note()


# Any bytes at all: line endings of every kind, fields, comments, cut events,
# bytes that are not UTF-8; and a small size limit, so that refusals come too.
_pieces = st.sampled_from(
    [b"data: ", b"data:", b"event: x", b"id: 7", b"id: a\0b", b"retry: 250", b"retry: x",
     b": ping", b"\n", b"\r\n", b"\r", b"\n\n", b"{\"choices\": []}", b"\xff\xfe", "é🙂".encode(),
     b"x", b" "]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.lists(_pieces, max_size=60).map(b"".join),
        streams().map(lambda stream: stream[0]),
        st.binary(max_size=300),
    ),
    st.data(),
)
def test_the_compiled_and_the_pure_parser_say_the_same_of_any_bytes_cut_anywhere(
    data: bytes, draw: st.DataObject
) -> None:
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=12))
    limit = draw.draw(st.sampled_from([1 << 20, 64, 16]))
    running = parse(sse, data, cuts, limit)
    assert running == parse(from_source(), data, cuts, limit)
    if "refused" not in running:  # byte-exact: every byte is in an event or left over
        tail = running[-1]
        kept = b"".join(f[0] for f in running[:-1] if isinstance(f, tuple))
        assert kept + (tail[0] if isinstance(tail, tuple) else b"") == data


def run(*args: str, cwd: Path = ROOT, **env: str) -> str:
    """What a Python process prints; on the pure path only if ``env`` asks for it."""
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if k != "CHATIQ_GATEWAY_NO_EXTENSIONS"} | env,
        timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def python(*code: str, cwd: Path = ROOT, **env: str) -> str:
    return run("-c", ";".join(code), cwd=cwd, **env)


LOADED = (
    "import sys, gateway, gateway.app",
    "print(sorted({m.__spec__.origin.rsplit('.', 1)[-1] for n, m in list(sys.modules.items())"
    " if n.startswith('gateway.') and getattr(m, '__spec__', None) and m.__spec__.origin}))",
)


def test_no_extensions_imports_every_module_from_its_source() -> None:
    assert python(*LOADED, CHATIQ_GATEWAY_NO_EXTENSIONS="1") == "['py']"
    note = python("import gateway; print(gateway.build_note())", CHATIQ_GATEWAY_NO_EXTENSIONS="1")
    assert note == "pure Python: CHATIQ_GATEWAY_NO_EXTENSIONS is set"
    version = run("-m", "gateway", "--version", CHATIQ_GATEWAY_NO_EXTENSIONS="1")
    assert "(pure Python: CHATIQ_GATEWAY_NO_EXTENSIONS is set)" in version


def compiled_or_skip() -> None:
    if PURE or gateway.build() != "compiled":
        pytest.skip("the compiled path is not built here")


def test_the_compiled_path_is_used_whole_and_says_so() -> None:
    compiled_or_skip()
    hot = python(
        "import gateway.relay, gateway.sse, gateway.upstream.connection",
        "import gateway.upstream.events, gateway.downstream",
        "print({m.__spec__.origin.rsplit('.', 1)[-1] for m in (gateway.relay, gateway.sse,"
        " gateway.upstream.connection, gateway.upstream.events, gateway.downstream)})",
    )
    assert hot == "{'so'}"
    assert "(compiled with mypyc)" in run("-m", "gateway", "--version")


def test_a_source_edited_since_it_was_compiled_turns_the_compiled_path_off(
    tmp_path: Path,
) -> None:
    """An edit not compiled yet: the whole of the gateway runs from source
    (half compiled, half not, the modules would not fit together)."""
    compiled_or_skip()
    shutil.copytree(ROOT / "gateway", tmp_path / "gateway")
    assert python(*LOADED, cwd=tmp_path) == "['py', 'so']"  # the copy, compiled
    edited = tmp_path / "gateway" / "relay.py"
    edited.write_text(edited.read_text() + "# edited\n")
    assert python(*LOADED, cwd=tmp_path) == "['py']"
    note = python("import gateway; print(gateway.build_note())", cwd=tmp_path)
    assert (
        note
        == "pure Python: gateway/relay.py changed since it was compiled (make compiles it again)"
    )
