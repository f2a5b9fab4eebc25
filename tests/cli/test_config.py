"""`flm config`, the output contract and user errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import flm_subprocess


def test_get_default_set_and_list(cli: Any) -> None:
    assert cli("config", "get", "proxy.port").data == {
        "key": "proxy.port",
        "value": 8080,
        "source": "default",
        "updated_at": None,
    }
    assert cli("config", "set", "proxy.port", "9090").data["value"] == 9090
    assert cli("config", "get", "proxy.port").data["value"] == 9090
    listed = {r["key"]: r for r in cli("config", "list").data}
    assert listed["proxy.port"]["source"] == "stored"
    assert listed["engine.health_latency_threshold_ms"]["value"] == 1500
    assert cli("config", "get", "proxy.port", "--format", "text").out.strip() == "9090"


def test_bad_values_are_user_errors(cli: Any) -> None:
    for key, value in [
        ("proxy.port", "70000"),
        ("proxy.port", "abc"),
        ("preferred_language", "fr"),
        ("proxy.bind", "not-an-ip"),
    ]:
        result = cli("config", "set", key, value)
        assert result.code == 1, (key, value)
        assert result.error["code"] == "INVALID_ARGUMENT"
        assert key in result.error["message"]
    unknown = cli("config", "get", "no.such.key")
    assert unknown.code == 1 and "known settings" in unknown.error["message"]


def test_usage_errors_follow_the_contract_without_traceback() -> None:
    for args in (["config"], ["nope"], ["config", "get"], ["api-keys", "create"]):
        proc = flm_subprocess(*args)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        import json

        body = json.loads(proc.stdout)
        assert set(body) == {"error"} and body["error"]["code"] == "INVALID_ARGUMENT"
        assert "Traceback" not in proc.stdout + proc.stderr


def test_text_errors_and_db_path_overrides(cli: Any, tmp_path: Any) -> None:
    other = tmp_path / "elsewhere" / "cfg.db"
    assert cli("config", "set", "proxy.port", "1234", "--db-path-config", str(other)).code == 0
    assert other.exists()
    assert cli("config", "get", "proxy.port").data["value"] == 8080
    assert cli("--db-path-config", str(other), "config", "get", "proxy.port").data["value"] == 1234
    text = cli("config", "set", "proxy.port", "0", "--format", "text")
    assert text.code == 1 and text.out.startswith("error [INVALID_ARGUMENT]")


def test_help_and_version() -> None:
    proc = flm_subprocess("--help")
    assert proc.returncode == 0 and "api-keys" in proc.stdout
    assert flm_subprocess("--version").stdout.startswith("flm ")


def test_a_read_only_config_db_is_opened_for_reading_and_says_so(cli: Any, tmp_path: Path) -> None:
    """Every command, `flm check` included, once failed with IO_ERROR: the file was opened
    for writing before it was read."""
    from tests.conftest import remount_read_only, small_tmpfs

    with small_tmpfs(tmp_path / "ro", "4m") as disk:
        db = str(disk / "config.db")
        assert cli("--db-path-config", db, "config", "set", "proxy.port", "9100").code == 0
        remount_read_only(disk)
        check = cli("--db-path-config", db, "check")
        assert check.code == 0, check.out
        assert any("read-only" in w for w in check.data["warnings"])
        got = cli("--db-path-config", db, "config", "get", "proxy.port")
        assert got.code == 0 and got.data["value"] == 9100
        assert cli("--db-path-config", db, "engines", "list").code == 0
        refused = cli("--db-path-config", db, "config", "set", "proxy.port", "9000")
        assert refused.code == 1 and refused.error["code"] == "MIGRATION_FAILED"
        assert "read-only" in refused.error["message"]
