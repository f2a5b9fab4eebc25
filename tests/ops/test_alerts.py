"""Alert webhooks: deduplicated, off the request path, retried, and audited when undelivered."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flm.core.alerts import AlertSettings, Webhook
from flm.proxy.alerts import Alerter
from tests.conftest import audit_rows
from tests.ops.webhook import Receiver
from tests.security.conftest import Env
from tests.support import free_port

ATTACKER = "127.0.0.20"
OTHER = "127.0.0.21"


def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _policy(url: str, **alerts: Any) -> dict[str, Any]:
    return {
        "honeypot": {"enabled": True},
        # a high threshold: every hit is a honeypot event, none turns into a block
        "intrusion_detection": {
            "enabled": True,
            "score_threshold": 100000,
            "warning_threshold": 100000,
        },
        "alerts": {
            "webhooks": [{"url": url}],
            "allow_private_targets": True,
            "coalesce_seconds": 0.5,
            **alerts,
        },
    }


def _timed_chat(env: Env, source: str) -> float:
    start = time.perf_counter()
    status, _h, body = env.chat(source=source)
    assert status == 200, body
    return time.perf_counter() - start


def test_one_alert_for_a_burst_of_honeypot_hits(env: Env, flm_home: Path) -> None:
    with Receiver(hold_s=3.0) as hook:
        env.policy(_policy(hook.url))
        baseline = statistics.median(_timed_chat(env, OTHER) for _ in range(20))
        started = time.monotonic()
        for _ in range(100):
            status, _h, _b = env.request("GET", "/wp-admin", source=ATTACKER)
            assert status == 404
        # The receiver holds the POST for 3 s: requests from others meanwhile must not wait
        # for it (delivery is off the request path).
        _until(lambda: hook.attempts >= 1, "the webhook POST")
        during = [_timed_chat(env, OTHER) for _ in range(20)]
        assert max(during) < 1.0, during
        assert statistics.median(during) < baseline * 3 + 0.02, (baseline, during)
        hook.release.set()
        posts = hook.wait_posts(1)
        assert posts[0][0] - started < 5.0
        alerts = env.rt.alerts
        assert alerts is not None
        # every event reached the dispatcher: the first bucket's plus the held-back ones
        _until(
            lambda: posts[0][2]["events"]["honeypot"] + alerts.stats["deduplicated"] >= 100,
            "all 100 events dispatched",
        )
        assert len(hook.posts) == 1 and hook.attempts == 1
        body = posts[0][2]
        assert body["client_ip"] == ATTACKER and body["severity"] == "high"
        assert body["source"] == "flm" and "honeypot" in body["text"]
        rows = audit_rows(
            flm_home,
            "SELECT COUNT(*) FROM audit_logs WHERE event_type = 'honeypot'",
            flush=env.rt.audit.flush if env.rt.audit else None,
        )
        assert rows == [(100,)]


def test_receiver_down_retries_then_audits(env: Env, flm_home: Path) -> None:
    with Receiver(status=503) as hook:
        env.policy(_policy(hook.url, retries=3, backoff_seconds=0.05))
        for _ in range(5):
            assert env.request("GET", "/.env", source=ATTACKER)[0] == 404
        flush = env.rt.audit.flush if env.rt.audit else None
        rows = audit_rows(
            flm_home,
            "SELECT details_json FROM audit_logs WHERE event_type = 'alert_delivery_failed'",
            flush=flush,
        )
        assert len(rows) == 1, rows
        assert hook.attempts == 3
        assert '"attempts":3' in rows[0][0] and "HTTP 503" in rows[0][0]
        assert audit_rows(
            flm_home, "SELECT COUNT(*) FROM audit_logs WHERE event_type = 'honeypot'", flush=flush
        ) == [(5,)]


def test_closed_port_counts_as_down(flm_home: Path) -> None:

    port = free_port()
    recorded: list[tuple[str, str, dict[str, Any]]] = []
    alerter = Alerter(lambda k, s, d: recorded.append((k, s, d)))
    alerter.configure(
        AlertSettings(
            (Webhook(f"http://127.0.0.1:{port}/x"),),
            allow_private_targets=True,
            coalesce_seconds=0,
            retries=2,
            backoff_seconds=0.01,
        )
    )
    try:
        alerter.offer("ip_blocked", "high", "127.0.0.30", {"reason": "test"})
        _until(lambda: bool(recorded), "the undelivered alert to be recorded")
        kind, _severity, details = recorded[0]
        assert kind == "alert_delivery_failed" and details["attempts"] == 2
        assert details["alert"]["events"] == {"ip_blocked": 1}
    finally:
        alerter.close()


def test_low_severity_events_do_not_alert_and_outside_events_do(flm_home: Path) -> None:
    from flm.core.paths import Paths
    from flm.services.audit_events import record_security_event
    from flm.services.context import Context

    with Receiver() as hook:
        alerter = Alerter()
        alerter.configure(
            AlertSettings(
                (Webhook(hook.url, "slack"),), allow_private_targets=True, coalesce_seconds=0
            )
        )
        ctx = Context(Paths.resolve())
        try:
            alerter.offer("auth_failure", "low", "127.0.0.31")
            record_security_event(
                ctx.storage, "egress_fail_open_triggered", "medium", {"reason": "socks down"}
            )
            posts = hook.wait_posts(1)
            assert set(posts[0][2]) == {"text"}  # Slack's shape
            assert "egress_fail_open_triggered" in posts[0][2]["text"]
            _until(lambda: alerter.stats["sent"] == 1, "the delivery to be counted")
        finally:
            ctx.close()
            alerter.close()
        assert len(hook.posts) == 1


def test_webhook_targets_are_checked(cli: Any) -> None:
    def policy_set(doc: str) -> Any:
        return cli("security", "policy", "set", stdin=doc)

    bad = policy_set('{"alerts": {"webhooks": ["http://127.0.0.1:9/x"]}}')
    assert bad.code == 1 and bad.error["code"] == "POLICY_INVALID"
    assert "$.alerts.webhooks[0]" in bad.error["message"]
    bad = policy_set('{"alerts": {"webhooks": ["https://10.1.2.3/x"]}}')
    assert bad.code == 1 and "not a public address" in bad.error["message"]
    bad = policy_set('{"alerts": {"webhooks": ["https://localhost/x"]}}')
    assert bad.code == 1
    ok = policy_set(
        '{"alerts": {"webhooks": [{"url": "https://hooks.slack.com/services/x", '
        '"format": "slack"}], "min_severity": "high"}}'
    )
    assert ok.code == 0, ok.out
    ok = policy_set(
        '{"alerts": {"webhooks": ["http://127.0.0.1:9/x"], "allow_private_targets": true}}'
    )
    assert ok.code == 0, ok.out


def test_alerts_test_command(cli: Any) -> None:
    none = cli("security", "alerts", "test")
    assert none.code == 1
    with Receiver() as json_hook, Receiver() as discord_hook:
        doc = json.dumps(
            {
                "alerts": {
                    "allow_private_targets": True,
                    "webhooks": [json_hook.url, {"url": discord_hook.url, "format": "discord"}],
                }
            }
        )
        assert cli("security", "policy", "set", stdin=doc).code == 0
        result = cli("security", "alerts", "test")
        assert result.code == 0, result.out
        assert [r["delivered"] for r in result.data["webhooks"]] == [True, True]
        assert json_hook.posts[0][2]["events"] == {"honeypot": 1}
        assert "test alert" in discord_hook.posts[0][2]["content"]
    with Receiver(status=500) as failing:
        doc = json.dumps(
            {"alerts": {"allow_private_targets": True, "retries": 1, "webhooks": [failing.url]}}
        )
        assert cli("security", "policy", "set", stdin=doc).code == 0
        result = cli("security", "alerts", "test")
        assert result.code == 1 and result.error["code"] == "ALERT_DELIVERY_FAILED"
