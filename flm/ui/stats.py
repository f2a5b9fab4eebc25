"""The dashboard's figures: buckets, percentiles and the busiest keys and engines of the last
hour or day, from :class:`flm.storage.dashboard.DashboardRepo` (indexed range scans; the latency
percentiles from every n-th row, about ``LATENCY_SAMPLES`` of them), so their cost follows the
window's traffic, never the table's size. Each
may be narrowed to one key or one engine (a :data:`~flm.storage.dashboard.Scope`); tokens come
from the usage rollups."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from flm.core.timeutil import iso, utc_now
from flm.storage.dashboard import DashboardRepo, Scope
from flm.storage.db import Database

WINDOW_MIN = 60
#: about this many latencies are read per window for the percentiles (every n-th row)
LATENCY_SAMPLES = 4_000
MAX_LATENCY_SAMPLES = 2 * LATENCY_SAMPLES
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
    prompt_tokens: int = 0
    completion_tokens: int = 0


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


def last_hour(db: Database, span: str = "hour", scope: Scope = None) -> list[Minute]:
    """Requests, refusals, latency percentiles and tokens per bucket: 60 minutes or 24 hours
    (UTC), of all traffic or of one key or engine (``scope``)."""
    count, length, prefix = RANGES[span]
    since = window_start(span)
    start = datetime.fromisoformat(since.replace("Z", "+00:00"))
    minutes = {
        iso(start + timedelta(minutes=i * length))[:prefix]: Minute(
            (start + timedelta(minutes=i * length)).strftime("%H:%M")
        )
        for i in range(count)
    }
    for row in DashboardRepo(db).buckets(prefix, since, scope):
        m = minutes.get(row["minute"])
        if m is not None:
            m.total += int(row["total"] or 0)
            m.unauthorized += int(row["unauthorized"] or 0)
            m.limited += int(row["limited"] or 0)
            m.blocked += int(row["blocked"] or 0)
    samples: dict[str, list[float]] = {}
    requests = sum(m.total for m in minutes.values())
    stride = max(1, -(-requests // LATENCY_SAMPLES))
    for row in DashboardRepo(db).latencies(prefix, since, stride, MAX_LATENCY_SAMPLES, scope):
        samples.setdefault(row["minute"], []).append(float(row["latency_ms"]))
    for key, values in samples.items():
        m = minutes.get(key)
        if m is not None and values:
            m.p50 = _percentile(values, 0.5)
            m.p95 = _percentile(values, 0.95)
    for row in DashboardRepo(db).tokens(int(start.timestamp()) // 60, scope):
        stamp = datetime.fromtimestamp(int(row["minute"]) * 60, UTC)
        m = minutes.get(iso(stamp)[:prefix])
        if m is not None:
            m.prompt_tokens += int(row["prompt"] or 0)
            m.completion_tokens += int(row["completion"] or 0)
    return list(minutes.values())


def top_users(
    db: Database, span: str = "hour", scope: Scope = None
) -> dict[str, list[tuple[str, int]]]:
    """The busiest keys and engines in the window (at most 8 of each), of all traffic or of
    one key or engine (whose own list, of one, is not read)."""
    since = window_start(span)
    repo = DashboardRepo(db)
    kind = scope[0] if scope else None
    return {
        "keys": []
        if kind == "key"
        else [(r["who"], int(r["n"])) for r in repo.top_keys(since, scope)],
        "engines": []
        if kind == "engine"
        else [(r["who"], int(r["n"])) for r in repo.top_engines(since, scope)],
    }


def recent_high_events(db: Database) -> list[dict[str, Any]]:
    since = iso(utc_now() - timedelta(days=1))
    return [dict(r) for r in DashboardRepo(db).high_events(since)]
