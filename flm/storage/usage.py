"""The usage rollups in security.db: ``usage_minute`` (kept 48 hours) and ``usage_hour``
(kept 90 days), per key × model × engine."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from flm.storage.db import Database

DAY_S = 86_400
MINUTE_ROWS_KEPT_S = 48 * 3600
HOUR_ROWS_KEPT_S = 90 * DAY_S

_ADD = (
    "INSERT INTO {table}({unit}, key_id, model, engine_id, requests, prompt_tokens, "
    "completion_tokens, estimated) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT({unit}, key_id, model, engine_id) DO UPDATE SET "
    "requests=requests+excluded.requests, "
    "prompt_tokens=prompt_tokens+excluded.prompt_tokens, "
    "completion_tokens=completion_tokens+excluded.completion_tokens, "
    "estimated=estimated+excluded.estimated"
)
_ADD_MINUTE = _ADD.format(table="usage_minute", unit="minute")
_ADD_HOUR = _ADD.format(table="usage_hour", unit="hour")

Sums = dict[tuple[int, str, str, str], list[int]]


def add_rollups(db: Database, minutes: Sums, hours: Sums, last_used: dict[str, str]) -> None:
    """Add summed requests and tokens to the minute and hour rows, and move each key's
    ``last_used_at`` forward, in one transaction."""

    def run(conn: sqlite3.Connection) -> None:
        conn.executemany(_ADD_MINUTE, [(*k, *v) for k, v in minutes.items()])
        conn.executemany(_ADD_HOUR, [(*k, *v) for k, v in hours.items()])
        conn.executemany(
            "UPDATE api_keys SET last_used_at=? WHERE id=? AND "
            "(last_used_at IS NULL OR last_used_at < ?)",
            [(stamp, key_id, stamp) for key_id, stamp in last_used.items()],
        )

    db.write(run)


def prune_rollups(db: Database, now: float) -> None:
    """Delete minute rows past 48 hours and hour rows past 90 days."""

    def run(conn: sqlite3.Connection) -> None:
        conn.execute(
            "DELETE FROM usage_minute WHERE minute < ?", (int((now - MINUTE_ROWS_KEPT_S) // 60),)
        )
        conn.execute(
            "DELETE FROM usage_hour WHERE hour < ?", (int((now - HOUR_ROWS_KEPT_S) // 3600),)
        )

    db.write(run)


def today_totals(
    db: Database, now: float | None = None, key_id: str | None = None
) -> dict[str, tuple[int, int]]:
    """(requests, tokens) per key since 00:00 UTC, from the minute rollups (of one key when
    ``key_id`` is given)."""
    now = time.time() if now is None else now
    start = int((now - now % DAY_S) // 60)
    one = " AND key_id = ?" if key_id is not None else ""
    rows: list[Any] = db.query(
        "SELECT key_id, SUM(requests) AS r, SUM(prompt_tokens + completion_tokens) AS t "
        f"FROM usage_minute WHERE minute >= ?{one} GROUP BY key_id",
        (start,) if key_id is None else (start, key_id),
    )
    return {str(r["key_id"]): (int(r["r"]), int(r["t"])) for r in rows}


_GROUP_COLUMN = {"key": "u.key_id", "model": "u.model", "engine": "u.engine_id"}


def usage_rows(
    db: Database,
    start: float,
    now: float,
    by: str,
    *,
    key: str | None = None,
    model: str | None = None,
) -> list[Any]:
    """Sums since ``start`` grouped ``by`` key, model, engine or hour (the hour as unix
    time // 3600): rows of grp, label (the key's), requests, prompt_tokens,
    completion_tokens, estimated. Minute rows are read for the last 48 hours (exact), hour
    rows before that (whole hours)."""
    if start >= now - MINUTE_ROWS_KEPT_S + 60:
        table, unit, column = "usage_minute", 60, "minute"
    else:
        table, unit, column = "usage_hour", 3600, "hour"
    where = [f"u.{column} >= ?"]
    params: list[Any] = [int(start // unit)]
    if key:
        where.append("u.key_id = ?")
        params.append(key)
    if model:
        where.append("u.model = ?")
        params.append(model)
    group = f"(u.{column} * {unit}) / 3600" if by == "hour" else _GROUP_COLUMN[by]
    rows: list[Any] = db.query(
        f"SELECT {group} AS grp, MAX(k.label) AS label, SUM(u.requests) AS requests, "
        "SUM(u.prompt_tokens) AS prompt_tokens, "
        "SUM(u.completion_tokens) AS completion_tokens, SUM(u.estimated) AS estimated "
        f"FROM {table} u LEFT JOIN api_keys k ON k.id = u.key_id "
        f"WHERE {' AND '.join(where)} GROUP BY grp ORDER BY grp",
        params,
    )
    return rows
