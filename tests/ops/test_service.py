"""`flm service`: a systemd user unit systemd accepts, a launchd plist, a Task Scheduler XML.

No test enables anything on this machine: the unit directory is a temporary XDG_CONFIG_HOME,
install runs with --no-enable, and the service-manager calls are checked through an injected
runner."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from flm.core.paths import Paths
from flm.services.service import ServiceManager, ServiceSpec, verify_unit
from tests.support import free_port


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    base = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(base))
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "no-runtime"))
    return base


def _systemd_analyze_usable() -> str | None:
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze (package systemd) is not installed"
    return None


@pytest.mark.skipif(sys.platform != "linux", reason="systemd units are for Linux")
def test_install_writes_a_unit_systemd_accepts(cli: Any, xdg: Path, flm_home: Path) -> None:
    reason = _systemd_analyze_usable()
    if reason and os.environ.get("CI") != "true":
        pytest.skip(reason)
    result = cli("service", "install", "--port", "8123", "--bind", "127.0.0.1", "--no-enable")
    assert result.code == 0, result.out
    data = result.data
    unit = xdg / "systemd" / "user" / "flm.service"
    assert data["path"] == str(unit) and data["installed"] and not data["enabled"]
    text = unit.read_text()
    assert "Restart=on-failure" in text and "StandardOutput=journal" in text
    assert f"Environment=FLM_HOME={flm_home}" in text
    assert "proxy start --no-daemon --port 8123 --bind 127.0.0.1 --mode local-http" in text
    ok, output = verify_unit(unit)
    assert ok, output
    status = cli("service", "status").data
    assert status["installed"] is True and status["active"] is None  # no user bus here

    removed = cli("service", "uninstall")
    assert removed.code == 0 and removed.data["removed"] is True
    assert not unit.exists()
    assert cli("service", "status").data["installed"] is False


@pytest.mark.skipif(sys.platform != "linux", reason="systemd units are for Linux")
def test_a_broken_unit_is_refused_by_the_verifier(tmp_path: Path) -> None:
    """The check the install test relies on does catch mistakes."""
    if _systemd_analyze_usable():
        pytest.skip(str(_systemd_analyze_usable()))
    unit = tmp_path / "flm.service"
    unit.write_text("[Service]\nExecStart=relative/path --x\nRestart=sometimes\n")
    ok, _output = verify_unit(unit)
    assert not ok


def test_paths_with_spaces_are_quoted(tmp_path: Path) -> None:
    from flm.services.service import systemd_unit

    spec = ServiceSpec(
        8080, "127.0.0.1", "local-http", tmp_path / "my home", python="/opt/my python/bin/python3"
    )
    text = systemd_unit(spec)
    assert 'ExecStart="/opt/my python/bin/python3" -m flm' in text
    assert f'Environment="FLM_HOME={tmp_path}/my home"' in text
    if shutil.which("systemd-analyze") and sys.platform == "linux":
        unit = tmp_path / "flm.service"
        unit.write_text(text.replace("/opt/my python/bin/python3", sys.executable))
        ok, output = verify_unit(unit)
        assert ok, output


def test_launchd_plist_parses(cli: Any, flm_home: Path) -> None:
    result = cli("service", "install", "--platform", "macos", "--port", "9000")
    assert result.code == 0, result.out
    data = result.data
    if sys.platform != "darwin":
        assert data["installed"] is False
    plist = plistlib.loads(data["content"].encode())
    assert plist["Label"] == "dev.flm.gateway"
    assert plist["ProgramArguments"][1:] == [
        "-m",
        "flm",
        "proxy",
        "start",
        "--no-daemon",
        "--port",
        "9000",
        "--bind",
        "127.0.0.1",
        "--mode",
        "local-http",
    ]
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    assert plist["EnvironmentVariables"]["FLM_HOME"] == str(flm_home)


def test_windows_task_xml_parses(cli: Any) -> None:
    result = cli("service", "install", "--platform", "windows", "--mode", "dev-selfsigned")
    assert result.code == 0
    text = result.data["content"]
    root = ET.fromstring(text.split("\n", 1)[1])  # noqa: S314 - our own output
    ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
    assert root.find("t:Triggers/t:LogonTrigger", ns) is not None
    assert root.findtext("t:Settings/t:RestartOnFailure/t:Count", namespaces=ns) == "999"
    assert "--mode dev-selfsigned" in (
        root.findtext("t:Actions/t:Exec/t:Arguments", namespaces=ns) or ""
    )


@pytest.mark.skipif(sys.platform != "linux", reason="systemctl is Linux's")
def test_systemctl_calls_when_a_user_bus_exists(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl (package systemd) is not installed")
    calls: list[list[str]] = []

    def runner(argv: Sequence[str]) -> tuple[int, str]:
        calls.append(list(argv))
        return 0, "active" if "is-active" in argv else "enabled"

    runtime = tmp_path / "runtime"
    runtime.mkdir()
    (runtime / "bus").touch()
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    manager = ServiceManager(Paths.resolve(), platform="linux", runner=runner, env=env)
    spec = ServiceSpec(8080, "127.0.0.1", "local-http", tmp_path)
    installed = manager.install(spec)
    assert installed["enabled"] is True
    assert calls == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "flm.service"],
    ]
    assert manager.status()["active"] is True
    calls.clear()
    manager.uninstall()
    assert calls[0] == ["systemctl", "--user", "disable", "--now", "flm.service"]
    assert calls[-1] == ["systemctl", "--user", "daemon-reload"]
    assert not manager.path.exists()


def test_real_unit_starts_the_gateway(tmp_path: Path, flm_home: Path) -> None:
    """The command the unit runs really serves (started here by hand, not by systemd)."""
    import time
    import urllib.request

    port = free_port()
    spec = ServiceSpec(port, "127.0.0.1", "local-http", flm_home)
    proc = subprocess.Popen(
        spec.argv(),
        env={**os.environ, "FLM_HOME": str(flm_home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
