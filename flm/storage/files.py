"""Database files as a whole: row counts per table (``flm check --verbose``), whether a backup
file is a healthy SQLite database with the tables it should have, and copies (SQLite's online
backup) for ``flm backup``."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from flm.storage.db import Database


def table_counts(db: Database) -> dict[str, int]:
    """Rows per table (SQLite's own tables left out), by table name."""
    tables = [
        r[0]
        for r in db.query(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name"
        )
    ]
    counts = {}
    for table in tables:
        row = db.query_one(f'SELECT COUNT(*) FROM "{table}"')
        counts[table] = int(row[0]) if row is not None else 0
    return counts


def inspect_backup(file: Path) -> tuple[bool, set[str]]:
    """(integrity check passed, table names) of a backup file, opened read-only and immutable
    (a backup is never written: no lock, -wal or -shm file is made beside it). Raises
    ``sqlite3.Error`` when it is not a readable SQLite database."""
    src = _open_immutable(file)
    try:
        ok = src.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {str(r[0]) for r in src.execute("SELECT name FROM sqlite_master")}
    finally:
        src.close()
    return ok, tables


def integrity_problems(
    file: Path, *, immutable: bool = False, quick: bool = False, limit: int = 100
) -> list[str]:
    """What SQLite's ``integrity_check`` (``quick``: ``quick_check``, one pass without the
    index cross-check) finds in ``file``, opened read-only (``immutable``: a file nobody
    writes, e.g. a backup); empty when healthy, at most ``limit`` messages."""
    check = "quick_check" if quick else "integrity_check"
    try:
        conn = sqlite3.connect(
            f"file:{file}?mode=ro" + ("&immutable=1" if immutable else ""), uri=True
        )
        try:
            rows = [str(r[0]) for r in conn.execute(f"PRAGMA {check}({int(limit)})")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return [f"{file} cannot be read as SQLite: {exc}"]
    return [] if rows == ["ok"] else rows


def _open_immutable(file: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{file}?mode=ro&immutable=1", uri=True)


def copy_database(source: Path, target: Path, *, immutable_source: bool = False) -> None:
    """Copy database ``source`` into ``target`` with SQLite's online backup (consistent while
    others write to ``source``). ``immutable_source``: open it read-only and immutable (a
    backup file). Raises ``sqlite3.Error``."""
    src = _open_immutable(source) if immutable_source else sqlite3.connect(source)
    try:
        dst = sqlite3.connect(target, timeout=30)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
