"""The dashboard's figures: buckets, percentiles and the busiest keys and engines of the last
hour or day, from :class:`flm.storage.dashboard.DashboardRepo` (indexed range scans; the latency
samples capped at ``MAX_LATENCY_SAMPLES``), so their cost follows the window's traffic."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flm.core.timeutil import iso, utc_now
from flm.storage.dashboard import DashboardRepo
from flm.storage.db import Database

WINDOW_MIN = 60
MAX_LATENCY_SAMPLES = 20_000
#: the two windows the dashboard shows: (buckets, bucket length in minutes, ISO prefix length)
RANGES = {"hour": (60, 1, 16), "day": (24, 60, 13)}


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


def window_start(span: str) -> str:
    count, length, _ = RANGES[span]
    now = utc_now().replace(second=0, microsecond=0)
    if length == 60:
        now = now.replace(minute=0)
    return iso(now - timedelta(minutes=length * (count - 1)))


def last_hour(db: Database, span: str = "hour") -> list[Minute]:
    """Requests, refusals and latency percentiles per bucket: 60 minutes or 24 hours (UTC)."""
    count, length, prefix = RANGES[span]
    since = window_start(span)
    start = datetime.fromisoformat(since.replace("Z", "+00:00"))
    minutes = {
        iso(start + timedelta(minutes=i * length))[:prefix]: Minute(
            (start + timedelta(minutes=i * length)).strftime("%H:%M")
        )
        for i in range(count)
    }
    for row in DashboardRepo(db).buckets(prefix, since):
        m = minutes.get(row["minute"])
        if m is not None:
            m.total += int(row["total"] or 0)
            m.unauthorized += int(row["unauthorized"] or 0)
            m.limited += int(row["limited"] or 0)
            m.blocked += int(row["blocked"] or 0)
    samples: dict[str, list[float]] = {}
    for row in DashboardRepo(db).latencies(prefix, since, MAX_LATENCY_SAMPLES):
        samples.setdefault(row["minute"], []).append(float(row["latency_ms"]))
    for key, values in samples.items():
        m = minutes.get(key)
        if m is not None and values:
            m.p50 = _percentile(values, 0.5)
            m.p95 = _percentile(values, 0.95)
    return list(minutes.values())


def top_users(db: Database, span: str = "hour") -> dict[str, list[tuple[str, int]]]:
    """The busiest keys and engines in the window (at most 8 of each)."""
    since = window_start(span)
    repo = DashboardRepo(db)
    return {
        "keys": [(r["who"], int(r["n"])) for r in repo.top_keys(since)],
        "engines": [(r["who"], int(r["n"])) for r in repo.top_engines(since)],
    }


def recent_high_events(db: Database) -> list[dict[str, Any]]:
    since = iso(utc_now() - timedelta(days=1))
    return [dict(r) for r in DashboardRepo(db).high_events(since)]


def key_last_used(db: Database, days: int = 7) -> dict[str, str]:
    """The last audit record per key within ``days`` (the retention window by default)."""
    since = iso(utc_now() - timedelta(days=days))
    return DashboardRepo(db).key_last_used(since)
