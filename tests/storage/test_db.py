"""The storage layer on real SQLite files: migrations, WAL, permissions, safe mode, the writer."""

from __future__ import annotations

import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from flm.core.errors import MigrationFailedError, RepoError
from flm.storage.db import Database, Migration, load_migrations, split_sql


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_open_creates_private_files_in_wal_mode(tmp_path: Path) -> None:
    db_path = tmp_path / "nested" / "security.db"
    with Database(db_path, "security") as db:
        assert db.schema_version == db.expected_version == len(load_migrations("security"))
        assert db.safe_mode is None
        db.execute("INSERT INTO rate_limit_states(bucket, tokens, updated_at) VALUES ('b', 1, 0)")
        assert _mode(db_path) == 0o600
        assert _mode(db_path.parent) == 0o700
        wal = db_path.with_name("security.db-wal")
        assert wal.exists() and _mode(wal) == 0o600
        assert db.query_one("PRAGMA journal_mode")[0] == "wal"  # type: ignore[index]


def test_the_writer_syncs_every_commit(tmp_path: Path) -> None:
    """Writes are durable once acknowledged: the writer's connection keeps SQLite's FULL
    synchronous setting (NORMAL would sync the WAL only at checkpoints, so a commit could
    be lost to a power cut after the caller was told it was done)."""
    with Database(tmp_path / "security.db", "security") as db:
        assert db.write(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]) == 2


def test_migrations_are_applied_once(tmp_path: Path) -> None:
    path = tmp_path / "config.db"
    Database(path, "config").open().close()
    with Database(path, "config") as db:
        rows = db.query("SELECT version FROM schema_migrations")
        assert [r[0] for r in rows] == list(range(1, db.expected_version + 1))


def test_split_sql_keeps_triggers_whole() -> None:
    script = (
        "CREATE TABLE t(a);\n-- comment\n"
        "CREATE TRIGGER x BEFORE DELETE ON t\nBEGIN\n  SELECT RAISE(ABORT, 'no');\nEND;\n"
    )
    parts = split_sql(script)
    assert len(parts) == 2 and parts[1].startswith("CREATE TRIGGER") and parts[1].endswith("END;")


def _with_broken(db_name: str) -> list[Migration]:
    good = load_migrations(db_name)
    broken = Migration(len(good) + 1, "broken", "CREATE TABLE extra(a);\nTHIS IS NOT SQL;\n")
    return [*good, broken]


def test_failed_migration_enters_safe_mode_reads_work_writes_refused(tmp_path: Path) -> None:
    path = tmp_path / "security.db"
    with Database(path, "security") as db:
        db.execute(
            "INSERT INTO api_keys(id, label, hash, created_at) VALUES "
            "('0123456789abcdef', 'kept', 'h', '2026-01-01T00:00:00.000Z')"
        )
    with Database(path, "security", migrations=_with_broken("security")) as db:
        assert db.safe_mode is not None
        assert db.schema_version == db.expected_version - 1
        # reads still work on the old schema
        assert db.query_one("SELECT label FROM api_keys")[0] == "kept"  # type: ignore[index]
        # the half-applied migration was rolled back as a whole
        assert db.query_one("SELECT name FROM sqlite_master WHERE name='extra'") is None
        with pytest.raises(MigrationFailedError) as err:
            db.execute("DELETE FROM rate_limit_states")
        message = err.value.message
        assert "safe mode" in message and f"{db.expected_version:04d}_broken" in message
        assert "flm security backup restore" in message and "flm check" in message


def test_newer_schema_than_code_is_safe_mode(tmp_path: Path) -> None:
    path = tmp_path / "config.db"
    with Database(path, "config", migrations=_with_broken("config")[:-1]) as db:
        db.execute(
            "INSERT INTO schema_migrations(version, name, applied_at) VALUES (99, 'future', 'x')"
        )
    with Database(path, "config") as db:
        assert db.safe_mode is not None and "newer" in db.safe_mode.reason
        with pytest.raises(MigrationFailedError):
            db.execute("DELETE FROM settings")


def test_audit_logs_refuse_update_and_delete(tmp_path: Path) -> None:
    with Database(tmp_path / "security.db", "security") as db:
        db.execute("INSERT INTO audit_logs(ts, endpoint, status) VALUES ('t', '/v1/models', 200)")
        with pytest.raises(RepoError, match="append-only"):
            db.execute("UPDATE audit_logs SET status = 500")
        with pytest.raises(RepoError, match="archive"):
            db.execute("DELETE FROM audit_logs")
        # the same holds for a raw connection that bypasses FLM entirely
        raw = sqlite3.connect(tmp_path / "security.db")
        with pytest.raises(sqlite3.DatabaseError):
            raw.execute("DELETE FROM audit_logs")
        raw.close()
        assert db.query_one("SELECT status FROM audit_logs")[0] == 200  # type: ignore[index]


def test_writer_isolates_failing_job_in_a_batch(tmp_path: Path) -> None:
    with Database(tmp_path / "config.db", "config") as db:
        ok = [
            db.submit(
                lambda c, i=i: (
                    c.execute(
                        "INSERT INTO settings(key, value, updated_at) VALUES (?, 'v', 't')",
                        (f"k{i}",),
                    ).rowcount
                )
            )
            for i in range(50)
        ]
        bad = db.submit(lambda c: c.execute("INSERT INTO settings(key) VALUES ('x')"))
        assert [f.result(timeout=10) for f in ok] == [1] * 50
        with pytest.raises(RepoError):
            bad.result(timeout=10)
        assert db.query_one("SELECT COUNT(*) FROM settings")[0] == 50  # type: ignore[index]


def test_concurrent_threads_share_one_writer(tmp_path: Path) -> None:
    with Database(tmp_path / "config.db", "config") as db:
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(40):
                    db.execute(
                        "INSERT INTO settings(key, value, updated_at) VALUES (?, 'v', 't')",
                        (f"t{n}-{i}",),
                    )
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert db.query_one("SELECT COUNT(*) FROM settings")[0] == 320  # type: ignore[index]


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "config.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RepoError, match=r"not a usable SQLite database|cannot"):
        Database(path, "config").open()


def test_engine_kinds_migration_keeps_rows_and_lets_any_kind_in(tmp_path: Path) -> None:
    """The engines table stops listing kinds (they are described in code): registered rows
    survive the rebuild unchanged, and a kind the old CHECK did not know is accepted."""
    path = tmp_path / "config.db"
    migrations = load_migrations("config")
    at = next(i for i, m in enumerate(migrations) if m.name.endswith("engine_kinds_open"))
    row = ("llamacpp", "llamacpp", "http://127.0.0.1:8080", 1, 1, 42, "/m.gguf", "t0", "secret")
    insert = (
        "INSERT INTO engines(id, kind, base_url, enabled, managed, pid, model_path, "
        "created_at, api_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    with Database(path, "config", migrations=migrations[:at]) as db:
        db.execute(insert, row)
        with pytest.raises(RepoError):
            db.execute(insert, ("x", "tgi", "http://127.0.0.1:3000", 1, 0, None, None, "t", None))
    with Database(path, "config") as db:
        assert db.schema_version == db.expected_version
        assert [
            tuple(r)
            for r in db.query(
                "SELECT id, kind, base_url, enabled, managed, pid, model_path, created_at, api_key "
                "FROM engines"
            )
        ] == [row]
        db.execute(insert, ("x", "tgi", "http://127.0.0.1:3000", 1, 0, None, None, "t", None))


def test_writes_to_a_file_deleted_or_replaced_under_an_open_database_are_refused(
    tmp_path: Path,
) -> None:
    import os

    from flm.core.errors import RepoError
    from flm.storage.db import Database

    for how in ("deleted", "replaced"):
        path = tmp_path / f"{how}.db"
        db = Database(path, "security").open()
        try:
            db.write(lambda conn: None)
            assert db.identity_problem() is None
            os.unlink(path)
            if how == "replaced":
                Database(path, "security").open().close()
            with pytest.raises(RepoError, match=f"was {how}"):
                db.write(lambda conn: None)
        finally:
            db.close()
