"""`flm migrate legacy plan|convert|apply` (SPEC §8.1) against fixtures built here."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

LEGACY_SCHEMA = """
CREATE TABLE apis (id TEXT PRIMARY KEY, name TEXT, model TEXT, port INTEGER,
                   enable_auth INTEGER, status TEXT, created_at TEXT, updated_at TEXT);
CREATE TABLE api_keys (id TEXT PRIMARY KEY, api_id TEXT, created_at TEXT, encrypted_key BLOB,
                       nonce BLOB);
CREATE TABLE user_settings (key TEXT PRIMARY KEY, value TEXT, updated_at TEXT);
"""


def make_legacy(
    root: Path,
    *,
    db_name: str = "flm.db",
    skip_table: str | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(
        json.dumps(
            config
            if config is not None
            else {"port": 9090, "language": "ja", "theme": "dark", "telemetry": {"enabled": False}}
        )
    )
    conn = sqlite3.connect(root / db_name)
    for statement in LEGACY_SCHEMA.split(";"):
        if statement.strip() and (skip_table is None or f"TABLE {skip_table} " not in statement):
            conn.execute(statement)
    if skip_table != "apis":
        conn.executemany(
            "INSERT INTO apis VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                ("a1", "Chat API", "llama3:8b", 8081, 1, "running", "2024-01-01", "2024-01-02"),
                ("a2", "Chat API", "qwen2:7b", 8082, 0, "stopped", "2024-01-03", None),  # same name
                ("a3", None, None, None, None, None, None, None),  # NULLs everywhere
            ],
        )
        # a name with bytes that are not UTF-8
        conn.execute(
            "INSERT INTO apis VALUES ('a4', CAST(X'4170699f' AS TEXT), 'm', 8084, "
            "1, 'running', NULL, NULL)"
        )
    if skip_table != "api_keys":
        conn.executemany(
            "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?)",
            [
                ("k1", "a1", "2024-01-01", b"\x01\x02secret-ciphertext", b"n1"),
                ("k2", "a2", "2024-01-02", b"\x03\x04", None),
            ],
        )
    if skip_table != "user_settings":
        conn.executemany(
            "INSERT INTO user_settings VALUES (?, ?, ?)",
            [
                ("log_level", "debug", "2024-01-01"),
                ("window_width", "1024", None),
                ("empty", None, None),
            ],
        )
    conn.commit()
    conn.close()
    return root


def _bytes(home: Path) -> dict[str, bytes]:
    return {name: (home / name).read_bytes() for name in ("config.db", "security.db")}


def _prepare_home(cli: Any, home: Path) -> dict[str, bytes]:
    assert cli("config", "set", "proxy.bind", "127.0.0.1").code == 0
    assert cli("api-keys", "create", "--label", "existing").code == 0
    return _bytes(home)


def test_plan_and_convert(cli: Any, tmp_path: Path, flm_home: Path) -> None:
    source = make_legacy(tmp_path / "legacy")
    out = tmp_path / "out"
    result = cli("migrate", "legacy", "plan", "--source", str(source), "--tmp", str(out))
    assert result.code == 0, result.out
    plan = json.loads((out / "migration-plan.json").read_text())
    assert plan["counts"]["apis"] == 4 and plan["counts"]["api_keys"] == 2
    assert plan["counts"]["api_keys_not_migrated"] == 2
    assert "create new keys" in plan["api_keys"]
    profiles = {p["id"]: p for p in plan["proxy_profiles"]}
    assert set(profiles) == {"legacy-chat-api", "legacy-chat-api-2", "legacy-api-a3", "legacy-api"}
    assert any("used more than once" in w for w in plan["warnings"])
    assert any("not UTF-8" in w for w in plan["warnings"])
    assert any("no valid port" in w for w in plan["warnings"])
    settings = {s["key"]: s["value"] for s in plan["settings"]}
    assert settings == {"proxy.port": "9090", "preferred_language": "ja", "log.level": "debug"}
    assert not (flm_home / "config.db").exists()  # plan writes no database

    result = cli("migrate", "legacy", "convert", "--source", str(source), "--tmp", str(out))
    assert result.code == 0
    converted = json.loads((out / "settings.json").read_text())
    notes = converted["notes"]["legacy.import"]
    assert notes["config_json"] == {"theme": "dark", "telemetry": {"enabled": False}}
    assert notes["user_settings"] == {"window_width": "1024", "empty": None}
    rows = json.loads((out / "proxy_profiles.json").read_text())
    assert rows[0]["config"]["legacy"]["enable_auth"] is True
    assert (out / "proxy_profiles.json").stat().st_mode & 0o777 == 0o600
    assert list((flm_home / "logs" / "migrations").glob("*.log"))


def test_apply_needs_confirm_and_changes_nothing(cli: Any, tmp_path: Path, flm_home: Path) -> None:
    before = _prepare_home(cli, flm_home)
    source = make_legacy(tmp_path / "legacy")
    result = cli("migrate", "legacy", "apply", "--source", str(source))
    assert result.code == 1 and "--confirm" in result.error["message"]
    assert _bytes(flm_home) == before
    assert not (flm_home / "backups").exists()
    assert not (flm_home / "migration").exists()


def test_apply_confirm(cli: Any, tmp_path: Path, flm_home: Path) -> None:
    _prepare_home(cli, flm_home)
    source = make_legacy(tmp_path / "legacy", db_name="data.db")
    result = cli("migrate", "legacy", "apply", "--source", str(source), "--confirm")
    assert result.code == 0, result.out
    data = result.data
    assert data["applied"] is True
    for backup in data["backups"].values():
        assert Path(backup).is_file() and Path(backup).stat().st_mode & 0o777 == 0o600
    assert cli("config", "get", "proxy.port").data["value"] == 9090
    assert cli("config", "get", "log.level").data["value"] == "debug"
    conn = sqlite3.connect(flm_home / "config.db")
    ids = sorted(r[0] for r in conn.execute("SELECT id FROM proxy_profiles"))
    notes = conn.execute("SELECT notes FROM settings WHERE key = 'legacy.import'").fetchone()[0]
    conn.close()
    assert ids == ["legacy-api", "legacy-api-a3", "legacy-chat-api", "legacy-chat-api-2"]
    assert json.loads(notes)["config_json"]["theme"] == "dark"
    assert cli("check").code == 0
    log = Path(data["log"]).read_text()
    assert "check passed" in log and "backup:" in log
    # a second apply: the existing settings are kept, profiles get fresh ids, nothing breaks
    again = cli("migrate", "legacy", "apply", "--source", str(source), "--confirm")
    assert again.code == 0, again.out
    assert again.data["conflicts"] == [] and again.data["counts"]["settings_to_write"] == 0


def test_forced_failure_mid_apply_leaves_both_databases(
    cli: Any, tmp_path: Path, flm_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flm.services import legacy

    before = _prepare_home(cli, flm_home)
    source = make_legacy(tmp_path / "legacy")
    calls = {"n": 0}
    real = legacy.insert_profile

    def failing(conn: sqlite3.Connection, profile: dict[str, Any], stamp: str) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk went away")
        real(conn, profile, stamp)

    monkeypatch.setattr(legacy, "insert_profile", failing)
    result = cli("migrate", "legacy", "apply", "--source", str(source), "--confirm")
    assert result.code == 1 and result.error["code"] == "MIGRATION_FAILED"
    assert calls["n"] == 3
    assert _bytes(flm_home) == before
    assert "rolled back" in result.error["message"]


def test_failed_check_restores_backups(
    cli: Any, tmp_path: Path, flm_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flm.services import check, legacy

    before = _prepare_home(cli, flm_home)
    source = make_legacy(tmp_path / "legacy")
    real = check.run_check

    def bad_check(storage: Any, **kw: Any) -> dict[str, Any]:
        report = real(storage, **kw)
        assert storage.config.query_one("SELECT COUNT(*) FROM proxy_profiles")[0] == 4
        return {**report, "ok": False, "problems": ["forced by the test"]}

    monkeypatch.setattr(check, "run_check", bad_check)
    result = cli("migrate", "legacy", "apply", "--source", str(source), "--confirm")
    assert result.code == 1 and "restored" in result.error["message"]
    assert _bytes(flm_home) == before
    assert legacy  # (the module under test)


@pytest.mark.parametrize(
    "damage", ["no-config", "bad-json", "no-db", "not-sqlite", "no-dir", "array-config"]
)
def test_bad_sources_exit_1_and_write_nothing(
    cli: Any, tmp_path: Path, flm_home: Path, damage: str
) -> None:
    source = make_legacy(tmp_path / "legacy")
    if damage == "no-config":
        (source / "config.json").unlink()
    elif damage == "bad-json":
        (source / "config.json").write_bytes(b'{"port": 80')
    elif damage == "array-config":
        (source / "config.json").write_text("[1, 2]")
    elif damage == "no-db":
        (source / "flm.db").unlink()
    elif damage == "not-sqlite":
        (source / "flm.db").write_bytes(b"this is not a database at all" * 200)
    elif damage == "no-dir":
        source = tmp_path / "nowhere"
    out = tmp_path / "out"
    for action in ("plan", "convert", "apply"):
        extra = ["--confirm"] if action == "apply" else []
        result = cli(
            "migrate", "legacy", action, "--source", str(source), "--tmp", str(out), *extra
        )
        assert result.code == 1, (action, result.out)
        assert result.error["code"] == "LEGACY_SOURCE_INVALID"
    assert not out.exists()
    assert list(flm_home.iterdir()) == []


def test_missing_table_is_a_warning(cli: Any, tmp_path: Path) -> None:
    source = make_legacy(tmp_path / "legacy", skip_table="api_keys")
    result = cli("migrate", "legacy", "plan", "--source", str(source), "--tmp", str(tmp_path / "o"))
    assert result.code == 0
    assert any("api_keys is missing" in w for w in result.data["warnings"])
    assert result.data["counts"]["api_keys_not_migrated"] == 0
