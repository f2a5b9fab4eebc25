"""What the dashboard reads from ``security.db``: bounded, indexed queries only.

Every audit query is a range scan over ``audit_logs(ts, ...)`` for the last hour (the covering
index added by migration 0002 holds the columns these queries read, so SQLite never touches the
table rows), and the latency samples are capped at ``MAX_LATENCY_SAMPLES``. The cost therefore
follows the last hour's traffic, never the table's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from flm.core.timeutil import iso, utc_now
from flm.storage.db import Database

WINDOW_MIN = 60
MAX_LATENCY_SAMPLES = 20_000

#: the dashboard's audit query (also checked by a test against EXPLAIN QUERY PLAN)
BUCKETS_SQL = (
    "SELECT substr(ts, 1, 16) AS minute, sum(event_type = 'request') AS total, "
    "sum(event_type = 'request' AND status = 401) AS unauthorized, "
    "sum(event_type = 'request' AND status = 429) AS limited, "
    "sum(event_type = 'request' AND status = 403) AS blocked "
    "FROM audit_logs WHERE ts >= ? GROUP BY minute")
LATENCY_SQL = ("SELECT substr(ts, 1, 16) AS minute, latency_ms FROM audit_logs "
               "WHERE ts >= ? AND latency_ms IS NOT NULL LIMIT ?")
EVENTS_SQL = ("SELECT ts, event_type, severity, client_ip FROM audit_logs "
              "WHERE ts >= ? AND severity IN ('high', 'critical') ORDER BY ts DESC LIMIT 5")


@dataclass
class Minute:
    label: str  # "HH:MM" UTC
    total: int = 0
    unauthorized: int = 0
    limited: int = 0
    blocked: int = 0
    p50: float | None = None
    p95: float | None = None


def _percentile(values: list[float], q: float) -> float:
    values.sort()
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[index]


def last_hour(db: Database) -> list[Minute]:
    now = utc_now().replace(second=0, microsecond=0)
    start = now - timedelta(minutes=WINDOW_MIN - 1)
    since = iso(start)
    minutes = {iso(start + timedelta(minutes=i))[:16]: Minute(
        (start + timedelta(minutes=i)).strftime("%H:%M")) for i in range(WINDOW_MIN)}
    for row in db.query(BUCKETS_SQL, (since,)):
        m = minutes.get(row["minute"])
        if m is not None:
            m.total += int(row["total"] or 0)
            m.unauthorized += int(row["unauthorized"] or 0)
            m.limited += int(row["limited"] or 0)
            m.blocked += int(row["blocked"] or 0)
    samples: dict[str, list[float]] = {}
    for row in db.query(LATENCY_SQL, (since, MAX_LATENCY_SAMPLES)):
        samples.setdefault(row["minute"], []).append(float(row["latency_ms"]))
    for key, values in samples.items():
        m = minutes.get(key)
        if m is not None and values:
            m.p50 = _percentile(values, 0.5)
            m.p95 = _percentile(values, 0.95)
    return list(minutes.values())


def recent_high_events(db: Database) -> list[dict[str, Any]]:
    since = iso(utc_now() - timedelta(days=1))
    return [dict(r) for r in db.query(EVENTS_SQL, (since,))]


def key_last_used(db: Database, days: int = 7) -> dict[str, str]:
    """The last audit record per key within ``days`` (the retention window by default)."""
    since = iso(utc_now() - timedelta(days=days))
    rows = db.query("SELECT api_key_id, max(ts) AS last FROM audit_logs "
                    "WHERE ts >= ? AND api_key_id IS NOT NULL GROUP BY api_key_id", (since,))
    return {r["api_key_id"]: r["last"] for r in rows}
