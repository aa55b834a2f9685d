"""deploy/: the systemd unit passes ``systemd-analyze verify`` and keeps its hardening; the
Dockerfile runs as a non-root user with a healthcheck."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).parent.parent / "deploy"
HARDENING = {
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "StateDirectory": "trisocks",
    "ExecReload": "/bin/kill -HUP $MAINPID",
}


def unit_settings(text: str) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Za-z]+=", line)
    )


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install Debian's systemd (scripts/test does)")
    unit = tmp_path / "trisocks.service"
    # verify checks that ExecStart exists: point it at this environment's trisocks.
    here = str(Path(sys.executable).parent / "trisocks")
    unit.write_text((DEPLOY / "trisocks.service").read_text().replace(
        "/usr/local/bin/trisocks", here))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_unit_is_hardened() -> None:
    settings = unit_settings((DEPLOY / "trisocks.service").read_text())
    for key, value in HARDENING.items():
        assert settings.get(key) == value, key
    assert "/var/lib/trisocks/" in settings["ExecStart"]  # the db in the state directory


def test_dockerfile_is_slim_non_root_with_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:[\d.]+-slim$", text, re.M)
    user = re.search(r"^USER (\S+)$", text, re.M)
    assert user is not None and user[1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
