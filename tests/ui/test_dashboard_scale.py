"""The dashboard's audit queries stay indexed and bounded: 100k audit rows and 1,000 keys."""

from __future__ import annotations

import random
import time
from datetime import timedelta
from pathlib import Path

import pytest

from flm.core.paths import Paths
from flm.core.timeutil import iso, utc_now
from flm.storage import Storage
from flm.storage import dashboard as dash
from flm.storage.dashboard import DashboardRepo
from flm.ui import stats

ROWS = 100_000
KEYS = 1_000
LAST_HOUR = 6_000


@pytest.fixture
def busy_storage(flm_home: Path) -> Storage:
    storage = Storage(Paths.resolve())
    db = storage.security
    rng = random.Random(7)
    now = utc_now()
    keys = [(f"{i:08x}", f"key {i}", f"hash-{i}", iso(now)) for i in range(KEYS)]
    rows = []
    for i in range(ROWS):
        recent = i < LAST_HOUR
        age = (
            timedelta(seconds=rng.uniform(0, 3500))
            if recent
            else timedelta(seconds=rng.uniform(3700, 7 * 86400))
        )
        status = rng.choice([200] * 17 + [401, 429, 403])
        rows.append(
            (
                iso(now - age),
                f"r{i}",
                "192.0.2.1",
                f"{i % KEYS:08x}",
                "/v1/chat/completions",
                "POST",
                "emu",
                "m",
                status,
                rng.uniform(5, 500),
                "request",
                "info",
            )
        )

    def fill(conn: object) -> None:
        conn.executemany(
            "INSERT INTO api_keys(id, label, hash, created_at) "  # type: ignore[attr-defined]
            "VALUES (?, ?, ?, ?)",
            keys,
        )
        conn.executemany(  # type: ignore[attr-defined]
            "INSERT INTO audit_logs(ts, request_id, client_ip, api_key_id, endpoint, method, "
            "engine_id, model, status, latency_ms, event_type, severity) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    db.write(fill)
    return storage


def _plan(storage: Storage, sql: str, params: tuple[object, ...]) -> str:
    return DashboardRepo(storage.security).explain(sql, params)


def test_dashboard_queries_use_the_covering_index(busy_storage: Storage) -> None:
    since = iso(utc_now() - timedelta(hours=1))
    for sql, params in (
        (dash.BUCKETS_SQL, (16, since)),
        (dash.LATENCY_SQL, (16, since, stats.MAX_LATENCY_SAMPLES)),
        (dash.TOP_KEYS_SQL, (since,)),
        (dash.TOP_ENGINES_SQL, (since,)),
    ):
        plan = _plan(busy_storage, sql, params)
        assert "USING COVERING INDEX audit_logs_ts_cover (ts>?)" in plan, plan
    plan = _plan(busy_storage, dash.LAST_USED_SQL, (since,))
    assert "USING COVERING INDEX audit_logs_ts_cover (ts>?)" in plan, plan
    plan = _plan(busy_storage, dash.EVENTS_SQL, (since,))
    assert "INDEX audit_logs_ts_cover (ts>?)" in plan and "SCAN audit_logs" not in plan, plan


def test_last_hour_counts_every_recent_row(busy_storage: Storage, record_property: object) -> None:
    started = time.perf_counter()
    minutes = stats.last_hour(busy_storage.security)
    elapsed_ms = (time.perf_counter() - started) * 1000
    record_property("last_hour_ms", round(elapsed_ms, 1))  # type: ignore[operator]
    assert len(minutes) == stats.WINDOW_MIN
    # rows at the window's first seconds may fall before its first whole minute
    total = sum(m.total for m in minutes)
    assert LAST_HOUR - 200 <= total <= LAST_HOUR
    refusals = sum(m.unauthorized + m.limited + m.blocked for m in minutes)
    assert 0.05 * total < refusals < 0.3 * total
    assert all(m.p95 is None or m.p50 is None or m.p95 >= m.p50 for m in minutes)
    assert any(m.p50 is not None for m in minutes)
    day = stats.last_hour(busy_storage.security, "day")
    assert len(day) == 24 and sum(m.total for m in day) >= total
    top = stats.top_users(busy_storage.security)
    assert len(top["keys"]) == 8 and top["engines"][0][0] == "emu"
    assert top["engines"][0][1] >= total
