"""SQL for operations that work on database files directly: the legacy prototype's SQLite file
(read-only), the migration's one-transaction write into config.db, WAL checkpoints, and the
read-only lookups shell completion makes on every tab press (no migrations, no writer)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LEGACY_TABLES = ("apis", "api_keys", "user_settings")

_COMPLETION_SQL = {
    "keys": ("security", "SELECT id FROM api_keys WHERE revoked_at IS NULL ORDER BY id"),
    "engines": ("config", "SELECT id FROM engines ORDER BY id"),
    "ports": ("config", "SELECT DISTINCT port FROM proxy_handles ORDER BY port"),
}


class LegacyReadError(Exception):
    """The legacy database cannot be opened or read (the message says why)."""


def completion_values(config_db: Path, security_db: Path, kind: str) -> Iterator[str]:
    """Key ids, engine ids or proxy ports, read-only; nothing when the database is absent."""
    which, sql = _COMPLETION_SQL[kind]
    db = config_db if which == "config" else security_db
    if not db.exists():
        return
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return
    try:
        rows = conn.execute(sql).fetchall()
    except sqlite3.Error:
        rows = []
    finally:
        conn.close()
    for (value,) in rows:
        yield str(value)


def read_legacy_tables(db_path: Path) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Rows of the legacy tables as dicts (text as bytes, for the caller to decode), and the
    names of the legacy tables the file does not have. Read-only and immutable."""
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error as exc:
        raise LegacyReadError(f"cannot open {db_path}: {exc}") from None
    conn.text_factory = bytes
    try:
        try:
            names = {
                r[0].decode() if isinstance(r[0], bytes) else r[0]
                for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            raise LegacyReadError(f"{db_path} is not a readable SQLite database: {exc}") from None
        if problems not in ([b"ok"], ["ok"]):
            raise LegacyReadError(f"{db_path} is damaged: {problems[:3]}")
        tables: dict[str, list[dict[str, Any]]] = {}
        missing = []
        for table in LEGACY_TABLES:
            if table not in names:
                missing.append(table)
                tables[table] = []
                continue
            try:
                cursor = conn.execute(f'SELECT * FROM "{table}"')
                columns = [d[0] for d in cursor.description]
                tables[table] = [dict(zip(columns, row, strict=True)) for row in cursor]
            except sqlite3.DatabaseError as exc:
                raise LegacyReadError(f"{db_path}: table {table} cannot be read: {exc}") from None
        return tables, missing
    finally:
        conn.close()


def existing_settings_and_profiles(config_db: Path) -> tuple[dict[str, str], set[str]]:
    """Settings and proxy profile ids already in config.db (read-only; none if absent)."""
    if not config_db.exists():
        return {}, set()
    conn = sqlite3.connect(f"file:{config_db}?mode=ro", uri=True)
    try:
        try:
            settings = dict(conn.execute("SELECT key, value FROM settings").fetchall())
            profiles = {r[0] for r in conn.execute("SELECT id FROM proxy_profiles")}
        except sqlite3.Error:
            return {}, set()
        return settings, profiles
    finally:
        conn.close()


def checkpoint(db: Path) -> None:
    """Fold the WAL into the main file, so copying the file copies the whole database."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def insert_setting(conn: sqlite3.Connection, key: str, value: str, stamp: str) -> None:
    conn.execute(
        "INSERT INTO settings(key, value, updated_at) VALUES (?, ?, ?)", (key, value, stamp)
    )


def upsert_setting_notes(
    conn: sqlite3.Connection, key: str, value: str, stamp: str, notes: str
) -> None:
    conn.execute(
        "INSERT INTO settings(key, value, updated_at, notes) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at, "
        "notes=excluded.notes",
        (key, value, stamp, notes),
    )


def insert_proxy_profile(
    conn: sqlite3.Connection, profile_id: str, config: dict[str, Any], stamp: str
) -> None:
    conn.execute(
        "INSERT INTO proxy_profiles(id, config_json, created_at) VALUES (?, ?, ?)",
        (profile_id, json.dumps(config, ensure_ascii=False), stamp),
    )


def in_one_transaction(db: Path, work: Callable[[sqlite3.Connection], None]) -> None:
    """Run ``work`` inside ``BEGIN IMMEDIATE`` … ``COMMIT`` on its own connection; any
    exception rolls everything back (the file is left as it was) and is raised again."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            work(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()
