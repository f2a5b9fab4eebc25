"""The dashboard at scale: 100k audit rows over a week and 1,000 keys. Its queries stay
indexed range scans over the window (never a scan of the whole audit table), its figures
count every row, and the pages answer over real sockets. (Its render time is a bench figure:
bench/ui_dashboard.py.)"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from flm.core.paths import Paths
from flm.core.timeutil import iso, utc_now
from flm.storage import Storage
from flm.storage import dashboard as dash
from flm.storage.dashboard import DashboardRepo
from flm.testing import busy
from flm.ui import stats
from tests.ui.conftest import Ui

ROWS = 100_000
KEYS = 1_000
LAST_HOUR = 6_000


@pytest.fixture
def busy_storage(flm_home: Path) -> Storage:
    storage = Storage(Paths.resolve())
    busy.fill(storage, ROWS, KEYS, recent=LAST_HOUR)
    return storage


def _plan(storage: Storage, sql: str, params: tuple[object, ...]) -> str:
    return DashboardRepo(storage.security).explain(sql, params)


def test_dashboard_queries_use_the_covering_index(busy_storage: Storage) -> None:
    since = iso(utc_now() - timedelta(hours=1))
    covering = "USING COVERING INDEX audit_logs_ts_cover (ts>?)"
    for scope in (None, ("key", busy.key_id(3)), ("engine", "emu-b")):
        for template, params in (
            (dash._BUCKETS, (16, since)),
            (dash._LATENCY, (16, since, 2, stats.MAX_LATENCY_SAMPLES)),
            (dash._TOP_KEYS, (since,)),
            (dash._TOP_ENGINES, (since,)),
        ):
            sql, extra = dash.scoped(template, scope)
            plan = _plan(busy_storage, sql, (*params[:2], *extra, *params[2:]))
            assert covering in plan, (scope, plan)
            assert "SCAN audit_logs" not in plan, (scope, plan)
        sql, extra = dash.scoped(dash._TOKENS, scope, usage=True)
        plan = _plan(busy_storage, sql, (1, *extra))
        assert plan.startswith("SEARCH usage_minute USING"), (scope, plan)
        assert "minute>?)" in plan, (scope, plan)
    plan = _plan(busy_storage, dash.EVENTS_SQL, (since,))
    assert "INDEX audit_logs_ts_cover (ts>?)" in plan and "SCAN audit_logs" not in plan, plan


def test_a_plan_check_sees_a_full_scan(busy_storage: Storage) -> None:
    # the check above would notice a query that lost its range (a broken window)
    plan = _plan(busy_storage, "SELECT count(*) FROM audit_logs WHERE status = ?", (200,))
    assert "SCAN audit_logs" in plan


def test_last_hour_counts_every_recent_row(busy_storage: Storage) -> None:
    minutes = stats.last_hour(busy_storage.security)
    assert len(minutes) == stats.WINDOW_MIN
    # rows at the window's first seconds may fall before its first whole minute
    total = sum(m.total for m in minutes)
    assert LAST_HOUR - 200 <= total <= LAST_HOUR
    refusals = sum(m.unauthorized + m.limited + m.blocked for m in minutes)
    assert 0.05 * total < refusals < 0.3 * total
    assert all(m.p95 is None or m.p50 is None or m.p95 >= m.p50 for m in minutes)
    # the sampled percentiles still cover almost every minute and sit inside the data's range
    assert sum(m.p50 is not None for m in minutes) >= 55
    assert all(5 <= m.p50 <= m.p95 <= 500 for m in minutes if m.p50 and m.p95)
    assert sum(m.prompt_tokens for m in minutes) > 0
    day = stats.last_hour(busy_storage.security, "day")
    assert len(day) == 24 and sum(m.total for m in day) >= total
    top = stats.top_users(busy_storage.security)
    assert len(top["keys"]) == 8 and top["engines"][0][0] == "emu"
    assert sum(n for _, n in top["engines"]) == total


def test_figures_narrow_to_one_key_or_engine(busy_storage: Storage) -> None:
    db = busy_storage.security
    everything = sum(m.total for m in stats.last_hour(db))
    by_engine = {
        e: sum(m.total for m in stats.last_hour(db, scope=("engine", e))) for e in ("emu", "emu-b")
    }
    assert by_engine["emu"] + by_engine["emu-b"] == everything
    assert 0.05 * everything < by_engine["emu-b"] < 0.15 * everything
    one = stats.last_hour(db, "day", ("key", busy.key_id(3)))
    rows = db.query(
        "SELECT count(*) AS n FROM audit_logs WHERE api_key_id = ? AND ts >= ?",
        (busy.key_id(3), stats.window_start("day")),
    )
    assert sum(m.total for m in one) == rows[0]["n"] > 0
    top = stats.top_users(db, "hour", ("engine", "emu-b"))
    # emu-b serves request i when i % 10 == 9, from key i % 1000
    assert top["keys"] and all(int(k, 16) % 10 == 9 for k, _ in top["keys"])
    assert top["engines"] == []  # one engine's own list is not read


def _chart_sum(html: str, kind: str) -> float:
    svg = re.search(rf'<svg class="chart" data-chart="{kind}".*?</svg>', html, re.S)
    assert svg, kind
    return sum(float(v) for v in re.findall(r'data-value="([0-9.e+]+)"', svg.group(0)))


def test_pages_answer_at_scale(busy_storage: Storage, ui: Ui) -> None:
    busy_storage.close()
    session = ui.login()
    page = session.get("/")
    assert page.status == 200
    assert 'data-summary="active_keys">1000<' in page.text
    assert LAST_HOUR - 200 <= _chart_sum(page.text, "requests") <= LAST_HOUR
    assert _chart_sum(page.text, "tokens") > 0
    day = session.get("/?range=day")
    assert day.status == 200 and _chart_sum(day.text, "requests") >= LAST_HOUR - 200
    data = session.get("/data/dashboard?range=day", Accept="application/json")
    assert data.status == 200 and 'data-chart="requests"' in data.json["fragments"]["charts"]  # type: ignore[index]
    engine = session.get("/?engine=emu-b")
    assert 'data-scope="engine:emu-b"' in engine.text
    assert _chart_sum(engine.text, "requests") < 0.15 * LAST_HOUR
    api = session.get("/api")
    assert api.status == 200 and api.text.count("data-key-id=") == 50
    assert f"50 of {KEYS} keys shown" in api.text
    found = session.get("/api?kq=key+999")
    assert found.text.count("data-key-id=") == 1 and "key 999" in found.text
    last = session.get("/api?kpage=20")
    assert last.text.count("data-key-id=") == 50 and 'rel="next"' not in last.text
    key = session.get(f"/api/key?id={busy.key_id(3)}&range=day")
    assert key.status == 200 and "flm://emu/*" in key.text
    assert 0 < _chart_sum(key.text, "requests") < 100
