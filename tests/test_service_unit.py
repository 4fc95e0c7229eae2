"""The shipped systemd unit reloads with HUP and lets the supervisor pass SIGTERM on."""

from __future__ import annotations

import configparser
import tomllib
from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "config" / "chatiq-gateway.service"
CONFIG = UNIT.with_name("gateway.toml")


def test_the_systemd_unit_reloads_with_hup_and_signals_the_supervisor_alone() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    service = unit["Service"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillMode"] == "mixed"  # else every worker gets SIGTERM twice
    assert "chatiq-gateway --config" in service["ExecStart"]
    grace = tomllib.loads(CONFIG.read_text())["server"]["shutdown_grace_s"]
    assert int(service["TimeoutStopSec"]) > grace
