"""`flm api-keys`: the plaintext is shown once and stored nowhere; rotate and revoke."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.conftest import flm_subprocess


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_create_shows_plaintext_once_and_stores_only_a_hash(flm_home: Path) -> None:
    proc = flm_subprocess("api-keys", "create", "--label", "a", env={"FLM_LOG_LEVEL": "DEBUG"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    data = json.loads(proc.stdout)["data"]
    key = data["key"]
    assert key.startswith(f"flm_{data['id']}_") and len(key) > 50
    assert proc.stdout.count(key) == 1
    assert key not in proc.stderr
    assert key.split("_", 2)[2] not in proc.stderr  # (nor its secret part alone)
    # Keep a second process holding the WAL open is not needed: check every file FLM wrote,
    # including any -wal/-shm and log files, and the WAL of a fresh, un-checkpointed write.
    secret = key.split("_", 2)[2].encode()
    for path in _files_under(flm_home):
        blob = path.read_bytes()
        assert key.encode() not in blob, path
        assert secret not in blob, path

    listed = flm_subprocess("api-keys", "list")
    rows = json.loads(listed.stdout)["data"]
    assert len(rows) == 1
    assert set(rows[0]) == {
        "id",
        "label",
        "created_at",
        "revoked_at",
        "status",
        "models",
        "rpm",
        "burst",
        "tpm",
        "daily_tokens",
        "daily_requests",
        "expires_at",
        "read_only",
        "last_used_at",
        "today",
    }
    assert "argon2" not in listed.stdout and key not in listed.stdout


def test_key_not_in_wal_while_a_reader_keeps_it(flm_home: Path, cli: Any) -> None:
    import sqlite3

    cli("api-keys", "list")  # create the databases
    holder = sqlite3.connect(flm_home / "security.db")
    holder.execute("BEGIN")
    holder.execute("SELECT COUNT(*) FROM api_keys").fetchone()  # pins the WAL: no checkpoint
    try:
        result = cli("api-keys", "create", "--label", "wal")
        key = result.data["key"]
        wal = flm_home / "security.db-wal"
        assert wal.exists() and wal.stat().st_size > 0
        assert key.encode() not in wal.read_bytes()
        assert key.split("_", 2)[2].encode() not in wal.read_bytes()
        assert b"$argon2id$" in wal.read_bytes()
    finally:
        holder.rollback()
        holder.close()


def test_rotate_keeps_label_and_revokes_old(cli: Any) -> None:
    first = cli("api-keys", "create", "--label", "laptop").data
    rotated = cli("api-keys", "rotate", first["id"])
    assert rotated.code == 0
    new = rotated.data
    assert new["label"] == "laptop" and new["id"] != first["id"] and new["key"] != first["key"]
    assert new["replaces"] == first["id"]
    rows = {r["id"]: r for r in cli("api-keys", "list").data}
    assert rows[first["id"]]["status"] == "revoked" and rows[first["id"]]["revoked_at"]
    assert rows[new["id"]]["status"] == "active"
    # rotating a revoked key is refused
    again = cli("api-keys", "rotate", first["id"])
    assert again.code == 1 and again.error["code"] == "KEY_NOT_FOUND"


def test_revoke_unknown_and_twice(cli: Any) -> None:
    missing = cli("api-keys", "revoke", "0000000000000000")
    assert missing.code == 1
    assert missing.error["code"] == "KEY_NOT_FOUND"
    created = cli("api-keys", "create", "--label", "x").data
    assert cli("api-keys", "revoke", created["id"]).data["status"] == "revoked"
    twice = cli("api-keys", "revoke", created["id"])
    assert twice.code == 1 and "already revoked" in twice.error["message"]


def test_bad_label_is_a_user_error(cli: Any) -> None:
    result = cli("api-keys", "create", "--label", "   ")
    assert result.code == 1 and result.error["code"] == "INVALID_ARGUMENT"


def test_text_format_lists_without_hash(cli: Any) -> None:
    cli("api-keys", "create", "--label", "ui")
    out = cli("api-keys", "list", "--format", "text").out
    assert "LABEL" in out and "ui" in out and "argon2" not in out and "flm_" not in out
    assert os.linesep in out
