"""ChatIQ Gateway.

The modules of the per-read path may be compiled by mypyc (setup.py): each
compiled module sits beside its source and is imported in its place. They
are used all together or not at all, because compiled together they call
each other's native code directly. The source is imported instead of every
one of them when ``CHATIQ_GATEWAY_NO_EXTENSIONS`` is set (as aiohttp's
``AIOHTTP_NO_EXTENSIONS``), and when a source is not what was compiled (an
edit that ``make`` has not compiled yet): a stale build never runs.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

_HERE = Path(__file__).resolve().parent


def _why_pure() -> str | None:
    """Why the compiled modules are not to be used (None: use them if built)."""
    if os.environ.get("CHATIQ_GATEWAY_NO_EXTENSIONS"):
        return "CHATIQ_GATEWAY_NO_EXTENSIONS is set"
    compiled = _HERE / "compiled.json"  # written by the build: each source's digest
    if not compiled.exists():
        return None
    for path, digest in json.loads(compiled.read_text()).items():
        source = _HERE.parent / path
        if not source.exists() or hashlib.sha256(source.read_bytes()).hexdigest() != digest:
            return f"{path} changed since it was compiled (make compiles it again)"
    return None


class _FromSource(importlib.abc.MetaPathFinder):
    """Imports the gateway's modules from their ``.py`` files, compiled or not."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not name.startswith("gateway.") or path is None:
            return None
        leaf = name.rpartition(".")[2]
        for folder in path:
            for candidate in (Path(folder) / leaf / "__init__.py", Path(folder) / f"{leaf}.py"):
                if candidate.is_file():
                    search = [str(candidate.parent)] if candidate.name == "__init__.py" else None
                    return importlib.util.spec_from_file_location(
                        name, candidate, submodule_search_locations=search
                    )
        return None


WHY_PURE = _why_pure()
if WHY_PURE is not None:
    sys.meta_path.insert(0, _FromSource())


def build() -> str:
    """Which path runs: "compiled" (mypyc) or "pure" (Python)."""
    import gateway.sse

    loader = getattr(gateway.sse.__spec__, "loader", None)
    return "compiled" if isinstance(loader, importlib.machinery.ExtensionFileLoader) else "pure"


def build_note() -> str:
    """The path that runs, and why when it is the pure one: for ``--version``
    and the start-up line."""
    if build() == "compiled":
        return "compiled with mypyc"
    why = WHY_PURE or "no compiled modules are installed"
    return f"pure Python: {why}"
