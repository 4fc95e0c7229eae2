"""The compiled hot path: the modules every upstream read goes through,
compiled by mypyc from their own Python source into extension modules that
sit beside it (docs/architecture.md, "The compiled hot path").

The source stays the one description of what they do: mypyc compiles the
typed Python as it is, and the same files run as they are where nothing was
compiled. ``CHATIQ_GATEWAY_NO_EXTENSIONS=1`` builds none; a machine without
a C compiler builds none and installs all the same (the extensions are
optional), and the gateway says at start that it runs the pure path.
Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# All or none are used at run time (gateway/__init__.py): compiled together,
# they call each other's native code directly.
HOT_PATH = [
    "gateway/sse.py",
    "gateway/upstream/connection.py",
    "gateway/upstream/events.py",
    "gateway/downstream.py",
    "gateway/relay.py",
]


def compiled() -> list[Extension]:
    """The hot path's extension modules. mypyc type-checks them and writes
    their C here (~25 s): only for a command that builds them, not each time
    a build front-end runs this file (for metadata, for the sdist)."""
    builds = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}
    if os.environ.get("CHATIQ_GATEWAY_NO_EXTENSIONS") or not builds & set(sys.argv[1:]):
        return []
    from mypyc.build import mypycify

    # A type-check cache of its own: make runs this beside lint's mypy, and two
    # processes on one SQLite cache fail ("database is locked").
    os.environ["MYPY_CACHE_DIR"] = str(Path("build") / "mypyc-cache")
    built = mypycify(HOT_PATH, opt_level="3", group_name="gateway.native")
    for extension in built:
        extension.optional = True  # no compiler: a warning, and the pure path
    return built


class BuildHotPath(build_ext):
    """Also writes gateway/compiled.json, each compiled source's digest: the
    gateway compares them with its sources to tell a stale build."""

    def run(self) -> None:
        super().run()
        if not self.extensions:
            return
        for extension in self.extensions:
            if not Path(self.get_ext_fullpath(extension.name)).exists():
                return  # one failed (no compiler?): the pure path, and no digests
        package = Path(self.get_ext_fullpath("gateway.sse")).parent
        digests = {path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in HOT_PATH}
        (package / "compiled.json").write_text(json.dumps(digests, indent=1) + "\n")


setup(ext_modules=compiled(), cmdclass={"build_ext": BuildHotPath})
