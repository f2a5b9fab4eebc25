"""Forwarded headers cannot frame a victim (issue 17, finding 7): only the header the trusted
proxy sets is read, and an unparsable hop refuses the request instead of blaming the proxy."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

from tests.security.conftest import Env

BAD_KEY = "flm_0000000000000000_" + "b" * 43


def _via_proxy(
    env: Env, headers: list[tuple[str, str]], *, key: str | None = None, source: str = "127.0.0.7"
) -> tuple[int, bytes]:
    parts = urlsplit(env.gw.url)
    conn = http.client.HTTPConnection(
        parts.hostname, parts.port, timeout=30, source_address=(source, 0)
    )
    try:
        conn.putrequest("GET", "/v1/models")
        conn.putheader("Authorization", f"Bearer {key or env.key}")
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_a_proxy_that_sets_x_real_ip_is_not_overruled_by_x_forwarded_for(env: Env) -> None:
    """The attack: behind a proxy that sets only X-Real-IP, a client sends X-Forwarded-For
    naming a victim; its failures must land on itself, never on the victim."""
    env.policy(
        {
            "trusted_proxies": ["127.0.0.7"],
            "forwarded_header": "x-real-ip",
            "ip_blocklist": {"enabled": True},
        }
    )
    attacker, victim = "203.0.113.66", "198.51.100.9"
    codes = [
        _via_proxy(env, [("X-Forwarded-For", victim), ("X-Real-IP", attacker)], key=BAD_KEY)[0]
        for _ in range(6)
    ]
    assert codes == [401] * 5 + [403]  # the attacker is blocked ...
    assert _via_proxy(env, [("X-Real-IP", victim)])[0] == 200  # ... and the victim is not
    assert env.rt.guard.blocked(attacker) is not None
    assert env.rt.guard.blocked(victim) is None


def test_x_real_ip_is_not_read_when_the_proxy_sets_x_forwarded_for(env: Env) -> None:
    env.policy({"trusted_proxies": ["127.0.0.7"], "ip_blocklist": {"enabled": True}})
    attacker, victim = "203.0.113.67", "198.51.100.10"
    codes = [
        _via_proxy(env, [("X-Real-IP", victim), ("X-Forwarded-For", attacker)], key=BAD_KEY)[0]
        for _ in range(6)
    ]
    assert codes == [401] * 5 + [403]
    assert env.rt.guard.blocked(victim) is None and env.rt.guard.blocked(attacker)


def test_an_unparsable_hop_is_refused_and_does_not_blame_the_proxy(env: Env) -> None:
    env.policy(
        {
            "trusted_proxies": ["127.0.0.7"],
            "ip_blocklist": {"enabled": True, "exempt_loopback": False},
        }
    )
    for _ in range(6):
        status, body = _via_proxy(env, [("X-Forwarded-For", "unknown")], key=BAD_KEY)
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_request"
    assert env.rt.guard.failures == {}
    assert env.rt.guard.blocked("127.0.0.7") is None
    assert _via_proxy(env, [("X-Forwarded-For", "203.0.113.68")])[0] == 200
    assert _via_proxy(env, [])[0] == 200  # (the proxy's own request, no header)


def test_an_untrusted_peer_cannot_use_forwarded_headers_when_proxies_are_trusted(env: Env) -> None:
    """With trusted proxies configured, a peer that is not one of them is its own address,
    whatever it sends."""
    env.policy(
        {
            "trusted_proxies": ["127.0.0.7"],
            "ip_blocklist": {"enabled": True, "exempt_loopback": False},
        }
    )
    env.rt.guard.block("198.51.100.11", "test", 3600)
    status, _ = _via_proxy(
        env,
        [("X-Forwarded-For", "198.51.100.11"), ("X-Real-IP", "198.51.100.11")],
        source="127.0.0.8",
    )
    assert status == 200
    codes = [
        _via_proxy(env, [("X-Forwarded-For", "198.51.100.12")], key=BAD_KEY, source="127.0.0.8")[0]
        for _ in range(5)
    ]
    assert codes == [401] * 5
    assert env.rt.guard.blocked("127.0.0.8") is not None
    assert env.rt.guard.blocked("198.51.100.12") is None
