"""`flm security exposure`: engines listening on every address are reported with the fix."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from flm.core.paths import Paths
from flm.services.context import Context
from flm.testing.emulators import start_emulator
from tests.support import free_port


def _report(cli: Any, engine_id: str) -> dict[str, Any]:
    result = cli("security", "exposure")
    assert result.code == 0, result.out
    rows = {r["engine_id"]: r for r in result.data["engines"]}
    return rows[engine_id]  # type: ignore[no-any-return]


def test_wildcard_bind_is_exposed_with_the_fix(cli: Any, flm_home: Path) -> None:
    with start_emulator("ollama", models=["m:1"], host="0.0.0.0") as emu:
        port = emu.url.rsplit(":", 1)[1]
        cli(
            "engines",
            "add",
            "--kind",
            "ollama",
            "--url",
            f"http://127.0.0.1:{port}",
            "--id",
            "wide",
        )
        report = _report(cli, "wide")
        assert report["status"] == "exposed"
        assert report["listen"] == ["0.0.0.0"]
        assert "OLLAMA_HOST=127.0.0.1" in report["fix"]
        assert report["answers_without_key"] is True
        # the probe went over loopback (the emulator saw it) and only there
        assert ("GET", "/api/tags") in emu.requests
        assert all(not i["address"].startswith("127.") for i in report["reachable_on"])
        text = cli("security", "exposure", "--format", "text")
        assert "OLLAMA_HOST=127.0.0.1" in text.out and "exposed" in text.out
    conn = sqlite3.connect(flm_home / "security.db")
    rows = conn.execute(
        "SELECT severity, details_json FROM audit_logs WHERE event_type = 'engine_exposed'"
    ).fetchall()
    conn.close()
    assert rows and rows[0][0] == "high" and '"wide"' in rows[0][1]


def test_vllm_on_wildcard_gets_the_host_flag(cli: Any) -> None:
    with start_emulator("vllm", models=["m"], host="0.0.0.0") as emu:
        cli(
            "engines",
            "add",
            "--kind",
            "vllm",
            "--url",
            emu.url.replace("0.0.0.0", "127.0.0.1"),
            "--id",
            "v",
        )
        report = _report(cli, "v")
        assert report["status"] == "exposed"
        assert "--host 127.0.0.1" in report["fix"]


def test_loopback_bind_is_loopback_only(cli: Any, flm_home: Path) -> None:
    with start_emulator("ollama", models=["m:1"], host="127.0.0.1") as emu:
        cli("engines", "add", "--kind", "ollama", "--url", emu.url, "--id", "tight")
        report = _report(cli, "tight")
        assert report["status"] == "loopback-only"
        assert report["listen"] == ["127.0.0.1"]
        assert report["fix"] is None and report["reachable_on"] == []
        assert report["answers_without_key"] is True
    if (flm_home / "security.db").exists():
        conn = sqlite3.connect(flm_home / "security.db")
        count = conn.execute(
            "SELECT COUNT(*) FROM audit_logs "
            "WHERE event_type = 'engine_exposed' AND details_json LIKE "
            "'%tight%'"
        ).fetchone()[0]
        conn.close()
        assert count == 0


def test_proxy_start_and_up_warn(cli: Any, capsys: Any) -> None:
    from flm.cli.security import exposure_warnings

    with start_emulator("lmstudio", models=["m"], host="0.0.0.0") as emu:
        port = emu.url.rsplit(":", 1)[1]
        cli(
            "engines",
            "add",
            "--kind",
            "lmstudio",
            "--url",
            f"http://127.0.0.1:{port}",
            "--id",
            "lms",
        )
        ctx = Context(Paths.resolve())
        try:
            lines = exposure_warnings(ctx)()
        finally:
            ctx.close()
        assert len([line for line in lines if "engine lms" in line]) == 1
        assert "Serve on Local Network" in lines[0]
        assert list(emu.requests) == []  # the warning reads the socket table only
        assert "engine lms" in capsys.readouterr().err


def test_remote_engines_are_not_probed(cli: Any) -> None:
    cli("engines", "add", "--kind", "vllm", "--url", "http://192.0.2.10:8000", "--id", "far")
    report = _report(cli, "far")
    assert report["status"] == "remote" and report["answers_without_key"] is None


def test_proxy_start_prints_the_warning(cli: Any) -> None:
    """The real `flm proxy start` (daemon) names the exposed engine on stderr and in its notes;
    its own listening port is never mistaken for an engine."""
    import json

    from tests.conftest import flm_subprocess

    with start_emulator("ollama", models=["m:1"], host="0.0.0.0") as emu:
        port = emu.url.rsplit(":", 1)[1]
        cli(
            "engines",
            "add",
            "--kind",
            "ollama",
            "--url",
            f"http://127.0.0.1:{port}",
            "--id",
            "wide",
        )
        gateway_port = free_port()
        # an engine registered on the gateway's own port: FLM itself, never "exposed"
        cli(
            "engines",
            "add",
            "--kind",
            "vllm",
            "--url",
            f"http://127.0.0.1:{gateway_port}",
            "--id",
            "self",
        )
        try:
            started = flm_subprocess(
                "proxy", "start", "--port", str(gateway_port), "--bind", "0.0.0.0"
            )
            assert started.returncode == 0, started.stdout + started.stderr
            notes = json.loads(started.stdout)["data"]["notes"]
            assert [n for n in notes if "engine wide (ollama)" in n and "OLLAMA_HOST" in n]
            assert not [n for n in notes if "engine self" in n]
            assert "engine wide (ollama) is reachable from the network" in started.stderr
        finally:
            cli("proxy", "stop", "--all")
