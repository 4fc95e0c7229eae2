"""The frontends: built-in wire formats, and third-party ones found through the
entry-point group ``chatiq_gateway.frontends`` (see docs/frontends.md).

A frontend imports only the shared vocabulary (``gateway.chat``, ``config``,
``errors``, ``exchange``, ``sse``): never the pipeline, the relay, auth or the
app's state. It lists its chat routes and its routes for a tenant; the app
binds them to the pipeline (``gateway.pipeline.bind``).
"""

from __future__ import annotations

from importlib.metadata import entry_points

from gateway.chat import StreamEncoder
from gateway.config import ConfigError, Settings
from gateway.frontends.ai_sdk import AISDKFrontend
from gateway.frontends.base import Frontend
from gateway.frontends.chatiq import ChatIQFrontend
from gateway.frontends.mcp import MCPFrontend
from gateway.frontends.openai import OpenAIFrontend

ENTRY_POINT_GROUP = "chatiq_gateway.frontends"
BUILT_IN: dict[str, type[Frontend]] = {
    cls.name: cls for cls in (ChatIQFrontend, OpenAIFrontend, AISDKFrontend, MCPFrontend)
}

__all__ = ["ENTRY_POINT_GROUP", "Frontend", "StreamEncoder", "frontend_class", "load_frontends"]


def frontend_class(name: str) -> type[Frontend]:
    """A built-in frontend, or the one a package registered under ``name``."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    for entry in entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            cls = entry.load()
        except Exception as e:  # a broken plugin: say which and why, in one line
            raise ConfigError(f"frontends.{name}: cannot load {entry.value} ({e})") from None
        if not (isinstance(cls, type) and issubclass(cls, Frontend)):
            raise ConfigError(f"frontends.{name}: {entry.value} is not a Frontend subclass")
        return cls
    known = sorted({*BUILT_IN, *(e.name for e in entry_points(group=ENTRY_POINT_GROUP))})
    raise ConfigError(f"frontends.{name}: no such frontend (known: {', '.join(known)})")


def load_frontends(settings: Settings) -> list[Frontend]:
    """The enabled frontends, configured; ``ConfigError`` names a bad one."""
    return [
        frontend_class(fs.name)(fs.prefix, dict(fs.options))
        for fs in settings.frontends
        if fs.enabled
    ]
