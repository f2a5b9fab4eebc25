"""Repositories over security.db's records: the IP blocklist, the audit trail (and its
archive), intrusion attempts, anomalies, certificates — and the one batch write of the audit
sink, which adds to four of them in one transaction."""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flm.core.paths import write_private_file
from flm.core.timeutil import now_iso
from flm.storage.db import Database

log = logging.getLogger("flm.audit")

#: The columns of an ``audit_logs`` row as the audit sink builds it, in order.
AUDIT_COLUMNS = (
    "ts",
    "request_id",
    "client_ip",
    "api_key_id",
    "endpoint",
    "method",
    "engine_id",
    "model",
    "status",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "error_type",
    "event_type",
    "severity",
    "details_json",
)
_INSERT_AUDIT = (
    f"INSERT INTO audit_logs({', '.join(AUDIT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in AUDIT_COLUMNS)})"
)
_UPSERT_BLOCK = (
    "INSERT INTO ip_blocklist(ip, listener, reason, failure_count, blocked_at, expires_at,"
    " permanent) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(ip, listener) DO UPDATE SET "
    "reason=excluded.reason, failure_count=excluded.failure_count, "
    "blocked_at=excluded.blocked_at, expires_at=excluded.expires_at, "
    "permanent=excluded.permanent"
)
_INSERT_INTRUSION = (
    "INSERT INTO intrusion_attempts(ts, ip, score, total_score, reasons_json, "
    "path, user_agent, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_ANOMALY = (
    "INSERT INTO anomaly_detections(ts, ip, anomaly_type, value, threshold, "
    "details_json, request_id) VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def and_equal(sql: str, params: list[Any], **columns: Any) -> str:
    """``sql`` with `` AND column = ?`` for each column given a value (its value appended
    to ``params``); columns given ``None`` or ``""`` do not filter."""
    for column, value in columns.items():
        if value:
            sql += f" AND {column} = ?"
            params.append(value)
    return sql


#: How often the caller of a paced :func:`write_batch` looks at the writer while it waits. The
#: event loop looks sooner, before each request; this is for a CPU kept busy by something else
#: (an engine generating on every core) while no request comes in to look.
WATCH_S = 0.25


def write_batch(
    db: Database,
    audit_rows: Sequence[tuple[Any, ...]],
    blocks: Sequence[tuple[Any, ...]],
    intrusions: Sequence[tuple[Any, ...]],
    anomalies: Sequence[tuple[Any, ...]],
    escape: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None,
    pause: Callable[[], bool] | None = None,
    watch: Callable[[], None] | None = None,
) -> dict[str, int]:
    """The audit sink's batch, in one transaction: audit rows (:data:`AUDIT_COLUMNS`), block
    upserts (ip, listener, reason, failure_count, blocked_at, expires_at, permanent), intrusion and
    anomaly rows. A row the database refuses costs only itself (see :func:`_insert_isolated`);
    returns how many rows were written ``escaped`` and how many ``dropped``. A failure of the
    disk or the lock raises (``RepoError``): the caller keeps the batch for a retry.

    ``pause``: called between two statements of audit rows, which are then short (see
    :data:`PACED_ROWS`), so that another thread gets the CPU in between; the pauses stop
    once it returns False. Such a batch is written in the idle scheduling class;
    ``watch`` is then called every :data:`WATCH_S` until the write is done (the caller puts
    the writer back at normal priority if it finds it starved)."""
    counts = {"escaped": 0, "dropped": 0}

    def run(conn: sqlite3.Connection) -> None:
        # (a paced batch is written, and committed, in the idle scheduling class: see
        # flm.core.threads.Idling; the writer leaves it after the commit, and the audit's
        # loop side puts it back at normal priority sooner if it falls behind)
        if pause is not None:
            db.idling.enter()
        for sql, rows in (
            (_INSERT_AUDIT, audit_rows),
            (_UPSERT_BLOCK, blocks),
            (_INSERT_INTRUSION, intrusions),
            (_INSERT_ANOMALY, anomalies),
        ):
            if rows:
                _insert_isolated(conn, sql, rows, counts, escape, pause)

    future = db.submit(run)
    if pause is not None and watch is not None:
        while not concurrent.futures.wait((future,), timeout=WATCH_S).done:
            watch()
    future.result()
    return counts


def _is_storage_error(exc: BaseException) -> bool:
    """A failure of the disk or the lock (retry the whole batch later), not of one row."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    text = str(exc).lower()
    return any(
        w in text
        for w in (
            "full",
            "disk",
            "i/o",
            "locked",
            "busy",
            "readonly",
            "read-only",
            "unable to open",
        )
    )


#: Audit rows per INSERT statement (within SQLite's limit on bound variables).
_ROWS_PER_INSERT = 256
#: With pauses between statements: audit rows per statement (a fraction of a millisecond of
#: SQLite's work), and at most this many statements (and pauses) per batch.
PACED_ROWS = 32
MAX_PACED_STATEMENTS = 32
_AUDIT_VALUES = f"({', '.join('?' for _ in AUDIT_COLUMNS)})"


def _insert_many(
    conn: sqlite3.Connection,
    rows: Sequence[tuple[Any, ...]],
    pause: Callable[[], bool] | None = None,
) -> None:
    """Audit rows inserted a few hundred per statement: each statement is one step of
    SQLite's, and the module gives the GIL up around each step, so ``executemany`` (a step
    per row) made the writer wait for the GIL once per row while the event loop was busy.
    All or nothing, as ``executemany``: the caller's savepoint takes a failure back."""
    width = len(AUDIT_COLUMNS)
    most = _ROWS_PER_INSERT
    if pause is not None:
        most = max(PACED_ROWS, -(-len(rows) // MAX_PACED_STATEMENTS))
    per = min(most, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width)
    if per < 2:
        conn.executemany(_INSERT_AUDIT, rows)
        return
    head = f"INSERT INTO audit_logs({', '.join(AUDIT_COLUMNS)}) VALUES "
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        if set(map(len, chunk)) != {width}:  # (a malformed row: the caller isolates it)
            raise sqlite3.ProgrammingError("an audit row has the wrong number of values")
        if start and pause is not None and not pause():
            pause = None
        conn.execute(
            head + ", ".join([_AUDIT_VALUES] * len(chunk)),
            list(itertools.chain.from_iterable(chunk)),
        )


def _insert_isolated(
    conn: sqlite3.Connection,
    sql: str,
    rows: Sequence[tuple[Any, ...]],
    counts: dict[str, int],
    escape: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None,
    pause: Callable[[], bool] | None = None,
) -> None:
    """Insert ``rows`` in one statement; if a row is refused, row by row, so that a bad row
    costs only itself: it is written as ``escape`` makes it if that helps, otherwise counted
    and logged."""
    conn.execute("SAVEPOINT audit_rows")
    try:
        if sql is _INSERT_AUDIT and len(rows) > 1:
            _insert_many(conn, rows, pause)
        else:
            conn.executemany(sql, rows)
    except Exception as exc:
        conn.execute("ROLLBACK TO audit_rows")
        if _is_storage_error(exc):
            conn.execute("RELEASE audit_rows")
            raise
    else:
        conn.execute("RELEASE audit_rows")
        return
    for row in rows:
        try:
            conn.execute(sql, row)
            continue
        except Exception as exc:
            if _is_storage_error(exc):
                conn.execute("RELEASE audit_rows")
                raise
        try:
            if escape is None:
                raise ValueError("refused")
            conn.execute(sql, escape(row))
            counts["escaped"] += 1
        except Exception as exc:
            if _is_storage_error(exc):
                conn.execute("RELEASE audit_rows")
                raise
            counts["dropped"] += 1
            log.error("audit row refused by the database (%s): %s", exc, ascii(row)[:1000])
    conn.execute("RELEASE audit_rows")


class BlocklistRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def all(self, *, newest_first: bool = True, listener: str | None = None) -> list[sqlite3.Row]:
        """Every row (ip, listener, reason, failure_count, blocked_at, expires_at, permanent),
        or with ``listener`` those that apply to it: its own and the shared ones (``'*'``)."""
        sql = (
            "SELECT ip, listener, reason, failure_count, blocked_at, expires_at, permanent "
            "FROM ip_blocklist"
        )
        params: tuple[str, ...] = ()
        if listener is not None:
            sql += " WHERE listener IN ('*', ?)"
            params = (listener,)
        return self.db.query(sql + " ORDER BY blocked_at DESC" if newest_first else sql, params)

    def remove_matching(self, target: str, key: Callable[[str], str]) -> int:
        """Remove the rows whose ``key(ip)`` is ``target`` (an IPv4 address is its own key, so
        only IPv6 rows are looked at when ``target`` is IPv6); how many went."""

        def run(conn: sqlite3.Connection) -> int:
            if ":" not in target:
                return conn.execute("DELETE FROM ip_blocklist WHERE ip=?", (target,)).rowcount
            listed = [
                r[0] for r in conn.execute("SELECT ip FROM ip_blocklist WHERE instr(ip, ':') > 0")
            ]
            gone = [x for x in listed if key(x) == target]
            conn.executemany("DELETE FROM ip_blocklist WHERE ip=?", [(x,) for x in gone])
            return len(gone)

        removed: int = self.db.write(run)
        return removed

    def clear_temporary(self) -> int:
        return self.db.execute("DELETE FROM ip_blocklist WHERE permanent = 0")


class AuditRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def insert_event(self, stamp: str, event_type: str, severity: str, details_json: str) -> int:
        """One event row, committed; its id."""

        def run(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "INSERT INTO audit_logs(ts, event_type, severity, details_json) "
                "VALUES (?, ?, ?, ?)",
                (stamp, event_type, severity, details_json),
            )
            return int(cursor.lastrowid or 0)

        row_id: int = self.db.write(run)
        return row_id

    def query(
        self,
        *,
        event_type: str | None = None,
        severity: str | None = None,
        ip: str | None = None,
        since: str | None = None,
        limit: int | None = 100,
        offset: int = 0,
    ) -> list[sqlite3.Row]:
        """Newest first; ``limit=None`` is every row."""
        params: list[Any] = []
        sql = "SELECT * FROM audit_logs WHERE 1=1"
        if since:
            sql += " AND ts >= ?"
            params.append(since)
        sql = and_equal(sql, params, event_type=event_type, severity=severity, client_ip=ip)
        sql += " ORDER BY id DESC LIMIT ? OFFSET ?"
        return self.db.query(sql, [*params, -1 if limit is None else limit, offset])

    def oldest_ts(self) -> str | None:
        row = self.db.query_one("SELECT MIN(ts) FROM audit_logs")
        return None if row is None or row[0] is None else str(row[0])

    def archive(self, cutoff: str, target: Path) -> tuple[int, str]:
        """Rows older than ``cutoff`` to ``target`` (JSON Lines, 0600), then out of the table
        through the archive gate, and the archive recorded — one transaction; (rows, sha256)."""

        def run(conn: sqlite3.Connection) -> tuple[int, str]:
            rows = conn.execute(
                "SELECT * FROM audit_logs WHERE ts < ? ORDER BY id", (cutoff,)
            ).fetchall()
            lines = "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows)
            write_private_file(target, lines.encode())
            digest = hashlib.sha256(lines.encode()).hexdigest()
            conn.execute("UPDATE audit_archive_gate SET open = 1 WHERE id = 1")
            deleted = conn.execute("DELETE FROM audit_logs WHERE ts < ?", (cutoff,)).rowcount
            conn.execute("UPDATE audit_archive_gate SET open = 0 WHERE id = 1")
            conn.execute(
                "INSERT INTO audit_archives(archived_at, before, row_count, file_path,"
                " sha256) VALUES (?, ?, ?, ?, ?)",
                (now_iso(), cutoff, deleted, str(target), digest),
            )
            return deleted, digest

        result: tuple[int, str] = self.db.write(run)
        return result


class IntrusionsRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def query(
        self, *, ip: str | None, min_score: int, limit: int, offset: int = 0
    ) -> list[sqlite3.Row]:
        params: list[Any] = [min_score]
        sql = and_equal("SELECT * FROM intrusion_attempts WHERE total_score >= ?", params, ip=ip)
        return self.db.query(
            sql + " ORDER BY id DESC LIMIT ? OFFSET ?", [*params, limit, max(0, offset)]
        )


class AnomaliesRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def query(
        self, *, ip: str | None, anomaly_type: str | None, limit: int, offset: int = 0
    ) -> list[sqlite3.Row]:
        params: list[Any] = []
        sql = and_equal(
            "SELECT * FROM anomaly_detections WHERE 1=1", params, ip=ip, anomaly_type=anomaly_type
        )
        return self.db.query(
            sql + " ORDER BY id DESC LIMIT ? OFFSET ?", [*params, limit, max(0, offset)]
        )


class CertificatesRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def upsert(self, row: dict[str, Any]) -> None:
        """Insert or replace (by ``id``) one row; the keys are its columns."""
        columns = list(row)
        updates = ", ".join(f"{c}=excluded.{c}" for c in columns if c != "id")
        sql = (
            f"INSERT INTO certificates({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)}) "
            f"ON CONFLICT(id) DO UPDATE SET {updates}"
        )
        self.db.execute(sql, [row[c] for c in columns])

    def all(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.query("SELECT * FROM certificates ORDER BY id")]


class DnsCredentialsRepo:
    """``dns_credentials``: DNS-01 profiles (non-secret settings and a reference to where the
    secret is; the secret itself never enters the database)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def upsert(
        self, name: str, provider: str, secret_ref: str, created_at: str, settings_json: str
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO dns_credentials(id, provider, label, secret_ref, created_at, "
                "settings_json) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "provider=excluded.provider, label=excluded.label, "
                "secret_ref=excluded.secret_ref, created_at=excluded.created_at, "
                "settings_json=excluded.settings_json",
                (name, provider, name, secret_ref, created_at, settings_json),
            )

        self._db.write(run)

    def all(self) -> list[sqlite3.Row]:
        return self._db.query("SELECT * FROM dns_credentials ORDER BY id")

    def get(self, name: str) -> sqlite3.Row | None:
        return self._db.query_one("SELECT * FROM dns_credentials WHERE id = ?", (name,))

    def delete(self, name: str) -> int:
        return self._db.execute("DELETE FROM dns_credentials WHERE id = ?", (name,))
