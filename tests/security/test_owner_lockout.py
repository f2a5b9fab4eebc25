"""The owner is never locked out (issue 17, finding 4): loopback clients are never blocked by
automatic rules, and a block applies to the listener whose rules made it unless the policy
shares blocks."""

from __future__ import annotations

import http.client
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from flm.core.paths import Paths
from flm.core.policy import EffectivePolicy
from flm.proxy.guard import exempt_from_automatic_blocks
from flm.proxy.runtime import load_block_rows
from flm.services.context import Context
from flm.testing.gateway import Gateway, start_gateway
from tests.security.conftest import Env

BAD_KEY = "flm_0000000000000000_" + "b" * 43


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_loopback_is_exempt_by_default(address: str) -> None:
    assert exempt_from_automatic_blocks(address, EffectivePolicy())
    assert not exempt_from_automatic_blocks(address, EffectivePolicy(exempt_loopback=False))


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1", "192.0.2.7", "2001:db8::1", "2001:db8::/64", "::ffff:10.0.0.1", "not an address"],
)
def test_other_addresses_are_not_exempt(address: str) -> None:
    assert not exempt_from_automatic_blocks(address, EffectivePolicy())


def test_a_web_page_cannot_lock_the_owner_out(env: Env, flm_home: Path) -> None:
    """What any web page the owner visits can make the browser send to localhost: honeypot
    paths, attack-shaped queries, wrong keys, a burst of requests. None of it blocks
    127.0.0.1, with every automatic rule on; the attempts are still recorded."""
    env.policy(
        {
            "ip_blocklist": {"enabled": True, "max_failures": 2, "permanent_block_threshold": 3},
            "intrusion_detection": {"enabled": True},
            "honeypot": {"enabled": True},
            "anomaly_detection": {"enabled": True, "request_rate_threshold": 5},
        }
    )
    for path in ("/.env", "/.env", "/wp-admin", "/v1/models?q=1+UNION+SELECT+a+FROM+b"):
        assert env.request("GET", path, key=None)[0] in (401, 404)
    for _ in range(5):
        assert env.request("GET", "/v1/models", key=BAD_KEY)[0] == 401
    codes = {env.request("GET", "/v1/models")[0] for _ in range(8)}  # past the anomaly rate
    assert codes == {200}
    assert env.chat()[0] == 200
    assert env.rt.guard.blocks == {}
    assert env.rt.audit is not None
    env.rt.audit.flush()
    conn = sqlite3.connect(flm_home / "security.db")
    try:
        kinds = {r[0] for r in conn.execute("SELECT event_type FROM audit_logs")}
        listed = conn.execute("SELECT COUNT(*) FROM ip_blocklist").fetchone()[0]
    finally:
        conn.close()
    assert {"honeypot", "auth_failure", "anomaly"} <= kinds
    assert listed == 0


def test_a_loopback_row_from_before_is_not_applied(env: Env, flm_home: Path) -> None:
    conn = sqlite3.connect(flm_home / "security.db")
    with conn:
        conn.execute(
            "INSERT INTO ip_blocklist(ip, reason, failure_count, blocked_at, permanent)"
            " VALUES ('127.0.0.1', 'auth_failures', 20, '2026-01-01T00:00:00.000Z', 1)"
        )
    conn.close()
    ctx = Context(Paths.resolve())
    try:
        env.gw.call(lambda: env.rt.load_blocks(load_block_rows(ctx, env.rt.settings.handle_id)))
    finally:
        ctx.close()
    assert env.chat()[0] == 200
    # ... while with the exemption turned off the same row blocks
    env.policy({"ip_blocklist": {"exempt_loopback": False}})
    ctx = Context(Paths.resolve())
    try:
        env.gw.call(lambda: env.rt.load_blocks(load_block_rows(ctx, env.rt.settings.handle_id)))
    finally:
        ctx.close()
    assert env.chat()[0] == 403


@pytest.fixture
def two_listeners(env: Env) -> Iterator[tuple[Gateway, Gateway]]:
    """The env's gateway plays the exposed listener; a second one on the same FLM home plays
    the loopback-only one."""
    with start_gateway(handle_id="local") as other:
        yield env.gw, other


def _get(gw: Gateway, key: str, client: str) -> int:
    parts = urlsplit(gw.url)
    conn = http.client.HTTPConnection(
        parts.hostname, parts.port, timeout=30, source_address=("127.0.0.7", 0)
    )
    try:
        conn.request(
            "GET",
            "/v1/models",
            headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": client},
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _reload_blocks(gw: Gateway) -> None:
    """What a reload does: flush the audit (blocks reach the table) and load the rows."""
    rt = gw.runtime
    assert rt.audit is not None
    rt.audit.flush()
    ctx = Context(Paths.resolve())
    try:
        gw.call(lambda: rt.load_blocks(load_block_rows(ctx, rt.settings.handle_id)))
    finally:
        ctx.close()


@pytest.mark.parametrize("shared", [False, True])
def test_a_block_applies_to_its_own_listener_unless_shared(
    env: Env, two_listeners: tuple[Gateway, Gateway], shared: bool
) -> None:
    exposed, local = two_listeners
    policy = {
        "trusted_proxies": ["127.0.0.7"],
        "ip_blocklist": {"enabled": True, "max_failures": 2, "shared": shared},
    }
    for gw in (exposed, local):
        gw.call(lambda gw=gw: gw.runtime.apply_policy(policy))  # type: ignore[misc]
    client = "198.51.100.7"  # (a header value only: nothing is ever sent there)
    assert [_get(exposed, BAD_KEY, client) for _ in range(2)] == [401, 401]
    assert _get(exposed, env.key, client) == 403
    for gw in (exposed, local):
        _reload_blocks(gw)
    assert _get(exposed, env.key, client) == 403
    assert _get(local, env.key, client) == (403 if shared else 200)
    listed = env.cli("security", "ip-blocklist", "list").data
    assert [(b["ip"], b["listener"]) for b in listed] == [
        (client, "*" if shared else exposed.runtime.settings.handle_id)
    ]
    assert json.dumps(listed)  # (the listing stays plain JSON)


#: The honeypot paths, written out (taken from the code, a path dropped there would vanish from
#: the test too).
HONEYPOT_PATHS = ("/admin", "/wp-admin", "/wp-login.php", "/phpmyadmin", "/.env", "/api/v1/users")


@pytest.mark.parametrize("path", HONEYPOT_PATHS)
def test_every_honeypot_path_scores(env: Env, path: str) -> None:
    """Each honeypot path on its own (a test that stops at the first block tries one)."""
    from flm.proxy.guard import HONEYPOT_SCORE

    env.policy({"honeypot": {"enabled": True}, "ip_blocklist": {"exempt_loopback": False}})
    for variant in (path, path.upper() + "/"):
        status, _, body = env.request("GET", variant, source="127.0.0.40", key=None)
        assert status in (403, 404), (variant, body)
    assert env.rt.guard.scores["127.0.0.40"][0] == 2 * HONEYPOT_SCORE
    assert env.request("GET", "/v1/models", source="127.0.0.40")[0] == 403
