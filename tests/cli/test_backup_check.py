"""Backups (3 generations, restore refused while a daemon runs) and `flm check`."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any


def test_backup_keeps_three_generations(cli: Any, flm_home: Path) -> None:
    made = [cli("security", "backup", "create").data["file"] for _ in range(4)]
    left = sorted(p.name for p in (flm_home / "backups").iterdir())
    assert len(left) == 3 and Path(made[0]).name not in left
    assert all(Path(f).name in left for f in made[1:])
    for name in left:
        assert stat.S_IMODE((flm_home / "backups" / name).stat().st_mode) == 0o600


def test_restore_brings_back_keys(cli: Any, tmp_path: Path) -> None:
    kept = cli("api-keys", "create", "--label", "kept").data
    backup = cli("security", "backup", "create", "--output", str(tmp_path / "b")).data["file"]
    cli("api-keys", "create", "--label", "later")
    cli("api-keys", "revoke", kept["id"])
    restored = cli("security", "backup", "restore", "--file", backup)
    assert restored.code == 0, restored.out
    assert restored.data["problems"] == [] and restored.data["schema_version"] >= 1
    rows = cli("api-keys", "list").data
    assert [(r["label"], r["status"]) for r in rows] == [("kept", "active")]
    # the database it replaced is kept beside it, whole: nothing made since the backup is lost
    previous = Path(restored.data["previous"])
    assert previous.name.startswith("security.db.before-restore.")
    assert stat.S_IMODE(previous.stat().st_mode) == 0o600
    with sqlite3.connect(f"file:{previous}?mode=ro", uri=True) as db:
        labels = sorted(r[0] for r in db.execute("SELECT label FROM api_keys"))
    assert labels == ["kept", "later"]


def test_restore_repairs_a_database_whose_header_is_garbage(
    cli: Any, flm_home: Path, tmp_path: Path
) -> None:
    kept = cli("api-keys", "create", "--label", "kept").data
    folder = tmp_path / "b"
    backup = cli("security", "backup", "create", "--output", str(folder)).data["file"]
    (flm_home / "security.db").write_bytes(os.urandom(8192))
    for stale in ("security.db-wal", "security.db-shm"):
        (flm_home / stale).unlink(missing_ok=True)
    folder.chmod(0o500)  # a read-only place: reading the backup must not write beside it
    try:
        restored = cli("security", "backup", "restore", "--file", backup)
    finally:
        folder.chmod(0o700)
    assert restored.code == 0, restored.out
    assert [r["label"] for r in cli("api-keys", "list").data] == ["kept"]
    assert kept["id"] in {r["id"] for r in cli("api-keys", "list").data}
    assert sorted(p.name for p in folder.iterdir()) == [Path(backup).name]
    assert len(Path(restored.data["previous"]).read_bytes()) == 8192  # the broken one, kept
    assert stat.S_IMODE((flm_home / "security.db").stat().st_mode) == 0o600


def test_restore_refused_while_daemon_runs(cli: Any, flm_home: Path) -> None:
    backup = cli("security", "backup", "create").data["file"]
    run = flm_home / "run"
    run.mkdir(mode=0o700)
    (run / "proxy-daemon.json").write_text(
        json.dumps({"port": 1, "token": "t", "pid": os.getpid(), "started_at": "now"})
    )
    lock = os.open(run / "daemon.lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # what a live daemon holds for its whole life
    try:
        refused = cli("security", "backup", "restore", "--file", backup)
    finally:
        os.close(lock)  # the daemon is gone, and its lock with it
    assert refused.code == 1 and refused.error["code"] == "PROXY_ALREADY_RUNNING"
    # a stale run file (no daemon holds the lock) does not block
    assert cli("security", "backup", "restore", "--file", backup).code == 0
    # a --no-daemon proxy has no daemon, only a handle with its (live) pid
    from flm.core.paths import Paths
    from flm.storage import Storage
    from flm.storage.config_db import ProxyHandleRow, ProxyHandlesRepo

    storage = Storage(Paths.resolve())
    repo = ProxyHandlesRepo(storage.config)
    repo.add(
        ProxyHandleRow(
            "proxy-9", os.getpid(), 9, None, "127.0.0.1", "local-http", "{}", "2026-01-01T00:00:00Z"
        )
    )
    refused = cli("security", "backup", "restore", "--file", backup)
    assert refused.code == 1 and refused.error["code"] == "PROXY_ALREADY_RUNNING"
    assert "proxy-9" in refused.error["message"]
    repo.remove(["proxy-9"])
    storage.close()
    assert cli("security", "backup", "restore", "--file", backup).code == 0


def test_restore_rejects_garbage(cli: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.bak"
    bad.write_bytes(b"garbage" * 1000)
    result = cli("security", "backup", "restore", "--file", str(bad))
    assert result.code == 1 and result.error["code"] == "INVALID_ARGUMENT"


def test_check_healthy_and_verbose(cli: Any) -> None:
    cli("api-keys", "create", "--label", "c")
    ok = cli("check", "--verbose")
    assert ok.code == 0 and ok.data["ok"] is True
    assert ok.data["databases"]["security"]["tables"]["api_keys"] == 1


def test_check_reports_invalid_stored_policy_and_orphans(cli: Any, flm_home: Path) -> None:
    import sqlite3

    cli("check")
    conn = sqlite3.connect(flm_home / "security.db")
    conn.execute(
        "INSERT INTO security_policies(id, policy_json, updated_at) "
        "VALUES ('default', '{\"ip_whitelist\": [\"999.0.0.1\"]}', 'x')"
    )
    conn.commit()
    conn.close()
    conn = sqlite3.connect(flm_home / "config.db")
    conn.execute(
        "INSERT INTO proxy_handles VALUES ('h1', ?, 8080, NULL, '127.0.0.1', "
        "'local-http', '{}', 'x')",
        (2**22 + 4242,),
    )
    conn.commit()
    conn.close()
    bad = cli("check")
    assert bad.code == 1
    err = bad.error
    assert err["code"] == "DB_ERROR" and "stored policy is invalid" in err["message"]
    assert any("orphaned proxy handle h1" in w for w in err["details"]["warnings"])


def test_check_detects_corruption(cli: Any, flm_home: Path) -> None:
    for i in range(300):
        cli("config", "set", "proxy.port", str(1000 + i)) if i % 100 == 0 else None
    cli("check")
    path = flm_home / "config.db"
    blob = bytearray(path.read_bytes())
    # Overwrite the middle of the first table page; the header stays valid.
    for i in range(len(blob) // 2, len(blob) // 2 + 2000):
        blob[i] = 0xFF
    path.write_bytes(bytes(blob))
    started = time.monotonic()
    result = cli("check")
    assert result.code in (1, 2)
    assert result.json["error"]["code"] in ("DB_ERROR", "MIGRATION_FAILED")
    assert time.monotonic() - started < 10


def test_directories_the_user_names_keep_their_mode(
    cli: Any, flm_home: Path, tmp_path: Path
) -> None:
    """Files FLM writes where the user says are 0600, but the directory is the user's: a
    shared one (like /tmp, mode 1777) is never narrowed. FLM's own home is made private."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    flm_home.chmod(0o755)
    assert cli("api-keys", "create", "--label", "k").code == 0
    assert stat.S_IMODE(flm_home.stat().st_mode) == 0o700
    assert cli("security", "backup", "create", "--output", str(shared)).code == 0
    assert (
        cli(
            "security",
            "audit-logs",
            "export",
            "--format",
            "csv",
            "--output",
            str(shared / "audit.csv"),
        ).code
        == 0
    )
    assert cli("--db-path-config", str(shared / "c.db"), "config", "list").code == 0
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    written = [f for f in shared.iterdir() if f.is_file()]
    assert {"audit.csv", "c.db"} <= {f.name for f in written}
    assert any(f.name.startswith("security.db.bak.") for f in written)
    for f in written:
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f


def test_backup_of_a_damaged_database_is_refused_and_prunes_nothing(
    cli: Any, flm_home: Path
) -> None:
    """Three backups of a damaged security.db once pushed out every good generation."""
    good = [cli("security", "backup", "create").data["file"] for _ in range(3)]
    path = flm_home / "security.db"
    with sqlite3.connect(path) as db:  # enough rows for several pages of one table
        db.executemany(
            "INSERT INTO ip_blocklist(ip, reason, failure_count, blocked_at, "
            "permanent) VALUES (?, 'x', 1, '2026-01-01T00:00:00Z', 1)",
            [(f"203.0.113.{i % 250}-{i}",) for i in range(3000)],
        )
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cli("check")
    blob = bytearray(path.read_bytes())
    page = 4096
    middle = (len(blob) // page // 2) * page
    for i in range(middle + 100, middle + 300):  # a table page's cells, its header intact
        blob[i] ^= 0x5A
    path.write_bytes(bytes(blob))
    for _ in range(3):
        bad = cli("security", "backup", "create")
        assert bad.code == 1, bad.out
        assert bad.error["code"] == "DB_ERROR" and "integrity" in bad.error["message"]
    assert sorted(str(p) for p in (flm_home / "backups").iterdir()) == sorted(good)
