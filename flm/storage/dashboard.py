"""What the web UI's dashboard reads from ``security.db``: bounded, indexed queries only.

Every audit query is a range scan of ``audit_logs`` from a start time (the last hour or day),
answered from the covering index ``audit_logs_ts_cover`` (security migration 0004), so its cost
follows the window's traffic, never the table's size; latency samples are capped by the
caller. A test checks the plans (tests/ui/test_dashboard_scale.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from flm.storage.db import Database

#: requests and refusals per bucket; the bucket is the ISO timestamp's first ``?`` characters
BUCKETS_SQL = (
    "SELECT substr(ts, 1, ?) AS minute, sum(event_type = 'request') AS total, "
    "sum(event_type = 'request' AND status = 401) AS unauthorized, "
    "sum(event_type = 'request' AND status = 429) AS limited, "
    "sum(event_type = 'request' AND status = 403) AS blocked "
    "FROM audit_logs WHERE ts >= ? GROUP BY minute"
)
LATENCY_SQL = (
    "SELECT substr(ts, 1, ?) AS minute, latency_ms FROM audit_logs "
    "WHERE ts >= ? AND latency_ms IS NOT NULL LIMIT ?"
)
TOP_KEYS_SQL = (
    "SELECT api_key_id AS who, count(*) AS n FROM audit_logs WHERE ts >= ? "
    "AND event_type = 'request' AND api_key_id IS NOT NULL "
    "GROUP BY api_key_id ORDER BY n DESC LIMIT 8"
)
TOP_ENGINES_SQL = (
    "SELECT engine_id AS who, count(*) AS n FROM audit_logs WHERE ts >= ? "
    "AND event_type = 'request' AND engine_id IS NOT NULL "
    "GROUP BY engine_id ORDER BY n DESC LIMIT 8"
)
EVENTS_SQL = (
    "SELECT ts, event_type, severity, client_ip FROM audit_logs "
    "WHERE ts >= ? AND severity IN ('high', 'critical') ORDER BY ts DESC LIMIT 5"
)
LAST_USED_SQL = (
    "SELECT api_key_id, max(ts) AS last FROM audit_logs "
    "WHERE ts >= ? AND api_key_id IS NOT NULL GROUP BY api_key_id"
)


class DashboardRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def explain(self, sql: str, params: Sequence[object]) -> str:
        """SQLite's query plan of one of this module's statements (for the tests)."""
        return " | ".join(
            str(r["detail"]) for r in self.db.query("EXPLAIN QUERY PLAN " + sql, list(params))
        )

    def buckets(self, prefix: int, since: str) -> list[sqlite3.Row]:
        return self.db.query(BUCKETS_SQL, (prefix, since))

    def latencies(self, prefix: int, since: str, cap: int) -> list[sqlite3.Row]:
        return self.db.query(LATENCY_SQL, (prefix, since, cap))

    def top_keys(self, since: str) -> list[sqlite3.Row]:
        return self.db.query(TOP_KEYS_SQL, (since,))

    def top_engines(self, since: str) -> list[sqlite3.Row]:
        return self.db.query(TOP_ENGINES_SQL, (since,))

    def high_events(self, since: str) -> list[sqlite3.Row]:
        return self.db.query(EVENTS_SQL, (since,))

    def key_last_used(self, since: str) -> dict[str, str]:
        return {r["api_key_id"]: r["last"] for r in self.db.query(LAST_USED_SQL, (since,))}

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
