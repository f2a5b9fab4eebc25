"""docs/grafana/flm.json: every metric the dashboard queries is in a live /metrics, with
samples, after traffic that exercises each of them."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.security.conftest import Env

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "flm.json"


def _queried_metrics() -> set[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in board["templating"]["list"] if "query" in v]
    assert len(exprs) >= 10
    return {m for e in exprs for m in re.findall(r"\bflm_[a-z_]+\b", e)}


def _samples(env: Env) -> dict[str, int]:
    status, _h, body = env.request("GET", "/metrics")
    assert status == 200
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            counts[sample.name] = counts.get(sample.name, 0) + 1
    return counts


def test_every_dashboard_metric_is_exposed(env: Env) -> None:
    wanted = _queried_metrics()
    assert {
        "flm_requests_total",
        "flm_request_duration_seconds_bucket",
        "flm_time_to_first_token_seconds_bucket",
        "flm_tokens_total",
        "flm_engine_healthy",
        "flm_blocked_requests_total",
    } <= wanted
    env.policy(
        {
            "ip_blocklist": {"enabled": True, "max_failures": 1, "exempt_loopback": False},
            "ip_rate_limit": {"enabled": True, "rpm": 1, "burst": 1},
        }
    )
    assert env.chat(source="127.0.0.40")[0] == 200
    status, _h, body = env.request(
        "POST",
        "/v1/chat/completions",
        source="127.0.0.41",
        body={
            "model": "flm://eng/m:1",
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert status == 200 and b"[DONE]" in body
    assert env.chat(source="127.0.0.40")[0] == 429  # rate limited
    assert env.chat(source="127.0.0.42", key="flm_0000000000000000_bad")[0] == 401
    assert env.chat(source="127.0.0.42")[0] == 403  # blocked after one failure
    env.policy({})  # (so the scrapes below are not rate limited)
    deadline = time.monotonic() + 20
    while True:
        samples = _samples(env)  # (the first scrape starts the engine health watch)
        missing = sorted(m for m in wanted if not samples.get(m))
        if not missing:
            break
        assert time.monotonic() < deadline, f"not in /metrics: {missing}"
        time.sleep(0.05)


def test_engine_down_is_a_gauge_and_an_event(env: Env, flm_home: Path) -> None:
    from flm.proxy.health import probe_all
    from tests.conftest import audit_rows

    state = env.gw.call(lambda: probe_all(env.rt, {}))
    assert state["eng"] is True
    env.emu.behaviour.status_override = 500
    state = env.gw.call(lambda: probe_all(env.rt, state))
    assert state["eng"] is False
    assert b'flm_engine_healthy{engine="eng"} 0.0' in env.request("GET", "/metrics")[2]
    flush = env.rt.audit.flush if env.rt.audit else None
    rows = audit_rows(
        flm_home,
        "SELECT severity, details_json FROM audit_logs WHERE event_type = 'engine_down'",
        flush=flush,
    )
    assert [(s, json.loads(d)) for s, d in rows] == [("high", {"engine_id": "eng"})]
    env.emu.behaviour.status_override = None
    assert env.gw.call(lambda: probe_all(env.rt, state))["eng"] is True
