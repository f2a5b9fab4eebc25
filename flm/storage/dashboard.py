"""What the web UI's dashboard reads from ``security.db``: bounded, indexed queries only.

Every audit query is a range scan of ``audit_logs`` from a start time (the last hour or day),
answered from the covering index ``audit_logs_ts_cover`` (security migration 0004), so its cost
follows the window's traffic, never the table's size; latency percentiles come from a
systematic sample (every n-th row, chosen by the caller). A chart may be narrowed to one key
or one engine (both columns are in that index, so the narrowed scan stays covering). Token
figures come from the usage rollups (``usage_minute``, by its primary key or its
``(key_id, minute)`` index). A test checks the plans (tests/ui/test_dashboard_scale.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from flm.storage.db import Database

#: a chart's narrowing: ("key", key id) or ("engine", engine id), or None for all traffic
Scope = tuple[str, str] | None
_AUDIT_COLUMN = {"key": "api_key_id", "engine": "engine_id"}
_USAGE_COLUMN = {"key": "key_id", "engine": "engine_id"}

#: requests and refusals per bucket; the bucket is the ISO timestamp's first ``?`` characters
_BUCKETS = (
    "SELECT substr(ts, 1, ?) AS minute, sum(event_type = 'request') AS total, "
    "sum(event_type = 'request' AND status = 401) AS unauthorized, "
    "sum(event_type = 'request' AND status = 429) AS limited, "
    "sum(event_type = 'request' AND status = 403) AS blocked "
    "FROM audit_logs WHERE ts >= ?{scope} GROUP BY minute"
)
#: latency samples: every ``?``-th row of the window (by rowid, which the index holds), capped
_LATENCY = (
    "SELECT substr(ts, 1, ?) AS minute, latency_ms FROM audit_logs "
    "WHERE ts >= ?{scope} AND latency_ms IS NOT NULL AND rowid % ? = 0 LIMIT ?"
)
_TOP_KEYS = (
    "SELECT api_key_id AS who, count(*) AS n FROM audit_logs WHERE ts >= ?{scope} "
    "AND event_type = 'request' AND api_key_id IS NOT NULL "
    "GROUP BY api_key_id ORDER BY n DESC LIMIT 8"
)
_TOP_ENGINES = (
    "SELECT engine_id AS who, count(*) AS n FROM audit_logs WHERE ts >= ?{scope} "
    "AND event_type = 'request' AND engine_id IS NOT NULL "
    "GROUP BY engine_id ORDER BY n DESC LIMIT 8"
)
#: prompt and completion tokens per minute (unix time // 60) from the usage rollups
_TOKENS = (
    "SELECT minute, sum(requests) AS requests, sum(prompt_tokens) AS prompt, "
    "sum(completion_tokens) AS completion FROM usage_minute "
    "WHERE minute >= ?{scope} GROUP BY minute"
)
BUCKETS_SQL = _BUCKETS.format(scope="")
LATENCY_SQL = _LATENCY.format(scope="")
TOP_KEYS_SQL = _TOP_KEYS.format(scope="")
TOP_ENGINES_SQL = _TOP_ENGINES.format(scope="")
TOKENS_SQL = _TOKENS.format(scope="")
EVENTS_SQL = (
    "SELECT ts, event_type, severity, client_ip FROM audit_logs "
    "WHERE ts >= ? AND severity IN ('high', 'critical') ORDER BY ts DESC LIMIT 5"
)


def scoped(template: str, scope: Scope, *, usage: bool = False) -> tuple[str, tuple[str, ...]]:
    """A statement narrowed to ``scope`` and the extra parameter it takes (the column comes
    from a fixed table, never from the caller's text)."""
    if scope is None:
        return template.format(scope=""), ()
    column = (_USAGE_COLUMN if usage else _AUDIT_COLUMN)[scope[0]]
    return template.format(scope=f" AND {column} = ?"), (scope[1],)


class DashboardRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def explain(self, sql: str, params: Sequence[object]) -> str:
        """SQLite's query plan of one of this module's statements (for the tests)."""
        return " | ".join(
            str(r["detail"]) for r in self.db.query("EXPLAIN QUERY PLAN " + sql, list(params))
        )

    def buckets(self, prefix: int, since: str, scope: Scope = None) -> list[sqlite3.Row]:
        sql, extra = scoped(_BUCKETS, scope)
        return self.db.query(sql, (prefix, since, *extra))

    def latencies(
        self, prefix: int, since: str, stride: int, cap: int, scope: Scope = None
    ) -> list[sqlite3.Row]:
        """Every ``stride``-th latency of the window (at most ``cap``): a systematic sample
        that keeps the percentiles' cost bounded on a busy day."""
        sql, extra = scoped(_LATENCY, scope)
        return self.db.query(sql, (prefix, since, *extra, stride, cap))

    def top_keys(self, since: str, scope: Scope = None) -> list[sqlite3.Row]:
        sql, extra = scoped(_TOP_KEYS, scope)
        return self.db.query(sql, (since, *extra))

    def top_engines(self, since: str, scope: Scope = None) -> list[sqlite3.Row]:
        sql, extra = scoped(_TOP_ENGINES, scope)
        return self.db.query(sql, (since, *extra))

    def tokens(self, since_minute: int, scope: Scope = None) -> list[sqlite3.Row]:
        sql, extra = scoped(_TOKENS, scope, usage=True)
        return self.db.query(sql, (since_minute, *extra))

    def high_events(self, since: str) -> list[sqlite3.Row]:
        return self.db.query(EVENTS_SQL, (since,))

    def active_keys(self) -> int:
        row = self.db.query_one("SELECT count(*) AS n FROM api_keys WHERE revoked_at IS NULL")
        return int(row["n"]) if row else 0

    def blocked_addresses(self) -> int:
        row = self.db.query_one("SELECT count(*) AS n FROM ip_blocklist")
        return int(row["n"]) if row else 0

    def key_labels(self, ids: Sequence[str]) -> dict[str, str]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.query(f"SELECT id, label FROM api_keys WHERE id IN ({marks})", list(ids))
        return {r["id"]: r["label"] for r in rows}
