"""Allow-list, trusted proxies, rate limits, auto-block, intrusion, honeypots, anomalies,
resource protection, CORS — each against the running gateway."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import pytest

from flm.proxy.guard import NOT_FOUND_SCORE
from tests.security.conftest import OUTSIDE, Env
from tests.support import FakeClock


def test_allow_list_and_spoofed_forwarded_for(env: Env) -> None:
    env.policy({"ip_whitelist": ["127.0.0.1/32", "10.0.0.0/8"]})
    before = len(env.emu.requests)
    status, _, body = env.chat(source="127.0.0.9")
    assert status == 403 and json.loads(body)["error"]["code"] == "ip_not_allowed"
    # claiming to be an allowed address from an untrusted peer changes nothing
    status, _, _ = env.chat(
        source="127.0.0.9", headers={"X-Forwarded-For": "10.1.2.3", "X-Real-IP": "10.1.2.3"}
    )
    assert status == 403
    assert len(env.emu.requests) == before  # the engine saw nothing
    assert env.chat(source="127.0.0.1")[0] == 200

    # a spoofed header neither moves the rate-limit bucket ...
    env.policy({"ip_rate_limit": {"enabled": True, "rpm": 60, "burst": 3}})
    fake = FakeClock()
    env.rt.guard.clock = fake
    codes = [
        env.request(
            "GET", "/v1/models", source="127.0.0.5", headers={"X-Forwarded-For": f"10.0.0.{i}"}
        )[0]
        for i in range(5)
    ]
    assert codes == [200, 200, 200, 429, 429]
    # ... nor anyone's block status
    env.rt.guard.block("10.9.9.9", "test", 3600)
    assert (
        env.request(
            "GET", "/v1/models", source="127.0.0.6", headers={"X-Forwarded-For": "10.9.9.9"}
        )[0]
        == 200
    )
    # from a trusted proxy the forwarded client is honoured
    env.policy({"trusted_proxies": ["127.0.0.7"]})
    status, _, body = env.request(
        "GET", "/v1/models", source="127.0.0.7", headers={"X-Forwarded-For": "10.9.9.9"}
    )
    assert status == 403 and json.loads(body)["error"]["code"] == "ip_blocked"


def test_key_rate_limit_under_concurrency(env: Env) -> None:
    fake = FakeClock()
    env.rt.guard.clock = fake
    env.policy({"rate_limit": {"rpm": 60, "burst": 10}})

    async def burst(n: int) -> list[tuple[int, str | None]]:
        import aiohttp

        async with aiohttp.ClientSession() as session:

            async def one() -> tuple[int, str | None]:
                async with session.get(
                    env.gw.url + "/v1/models", headers={"Authorization": f"Bearer {env.key}"}
                ) as r:
                    await r.read()
                    return r.status, r.headers.get("Retry-After")

            return await asyncio.gather(*(one() for _ in range(n)))

    first = asyncio.run(burst(50))
    allowed = sum(1 for s, _ in first if s == 200)
    assert allowed == 10  # the burst, exactly, with the clock frozen
    retry = {r for s, r in first if s == 429}
    assert retry == {"1"}  # one token per second at 60 rpm: an honest Retry-After
    fake.now += 60  # a minute later: 60 more tokens (capped at the burst), so ≤ rpm + burst
    second = asyncio.run(burst(50))
    assert sum(1 for s, _ in second if s == 200) == 10
    # over a whole window at real pace, the total stays within rpm + burst ± 1
    total = 0
    for _ in range(60):
        fake.now += 1
        total += sum(1 for s, _ in asyncio.run(burst(3)) if s == 200)
    assert abs(total - 60) <= 1


def test_auto_block_escalation_and_cost(env: Env) -> None:
    fake = FakeClock()
    env.rt.guard.clock = fake
    env.policy({"ip_blocklist": {"enabled": True, **OUTSIDE}})
    lookups: list[str] = []
    original = env.rt.keys._lookup

    def counting(key_id: str) -> Any:
        lookups.append(key_id)
        return original(key_id)

    env.rt.keys._lookup = counting
    bad = "flm_00000000000000{:02d}_" + "Z" * 43

    def attempt(i: int) -> int:
        return env.request("GET", "/v1/models", key=bad.format(i), source="127.0.0.3")[0]

    assert [attempt(i) for i in range(4)] == [401] * 4
    assert attempt(4) == 401  # the 5th failure is answered, and blocks
    status, headers, _ = env.request("GET", "/v1/models", source="127.0.0.3")
    assert status == 403 and int(headers["retry-after"]) == 30 * 60
    # a blocked client costs no key lookup (no DB read, no Argon2)
    n = len(lookups)
    for i in range(20):
        assert attempt(50 + i) == 403
    assert len(lookups) == n
    fake.now += 30 * 60 + 1  # block over
    assert env.request("GET", "/v1/models", source="127.0.0.3")[0] == 200
    for i in range(5):
        attempt(10 + i)  # failures 6..10
    status, headers, _ = env.request("GET", "/v1/models", source="127.0.0.3")
    assert status == 403 and int(headers["retry-after"]) == 24 * 3600
    fake.now += 24 * 3600 + 1
    for i in range(10):
        attempt(20 + i)  # failures 11..20: permanent
    status, headers, _ = env.request("GET", "/v1/models", source="127.0.0.3")
    assert status == 403 and "retry-after" not in headers
    fake.now += 365 * 24 * 3600
    assert env.request("GET", "/v1/models", source="127.0.0.3")[0] == 403
    # other addresses are unaffected
    assert env.request("GET", "/v1/models", source="127.0.0.4")[0] == 200


ATTACKS = [
    ("/v1/models?id=1%27%20OR%20%271%27=%271", "sql_injection"),
    ("/v1/models?q=1+UNION+SELECT+password+FROM+users", "sql_injection"),
    ("/v1/models?file=../../etc/passwd", "path_traversal"),
    ("/v1/%2e%2e/%2e%2e/etc/passwd", "path_traversal"),
    ("/v1/models?x=%252e%252e%252f", "path_traversal"),
    ("/v1/models?sleep=1;SELECT%20SLEEP(5)", "sql_injection"),
]


@pytest.mark.parametrize(("path", "reason"), ATTACKS)
def test_intrusion_scoring_blocks(env: Env, path: str, reason: str) -> None:
    env.policy(
        {"intrusion_detection": {"enabled": True, "score_threshold": 100}, "ip_blocklist": OUTSIDE}
    )
    status, _, _ = env.request("GET", path, source="127.0.0.8")
    assert status in (401, 404, 200)
    total, _ = env.rt.guard.scores["127.0.0.8"]
    assert total >= 50
    env.request("GET", path, source="127.0.0.8")  # a second attempt crosses 100
    assert env.rt.guard.blocked("127.0.0.8") is not None
    assert env.request("GET", "/v1/models", source="127.0.0.8")[0] == 403
    env.rt.audit.flush()  # type: ignore[union-attr]
    rows = env.cli("security", "intrusion", "--ip", "127.0.0.8").data
    assert rows and reason in rows[-1]["reasons"]


def test_only_paths_the_gateway_lacks_count_as_probing(env: Env) -> None:
    """An engine's own 404 through the pass-through and an unknown model are answers to an
    authenticated client, not probes; a path FLM does not serve is."""
    env.policy({"intrusion_detection": {"enabled": True}})
    ip = "127.0.0.16"
    for _ in range(15):  # 30 scored 404s would have been 300 points: a block
        assert env.request("GET", "/engine/eng/no/such/engine/route", source=ip)[0] == 404
        status, _, body = env.request(
            "POST",
            "/v1/chat/completions",
            source=ip,
            body={"model": "flm://eng/missing:1", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert status == 404, body
    assert ip not in env.rt.guard.scores and env.rt.guard.blocked(ip) is None
    assert ("GET", "/no/such/engine/route") in env.emu.requests
    # OpenAI routes an SDK user may call: retrieve a model (served), batches (not)
    for _ in range(15):
        status, _, body = env.request("GET", "/v1/models/flm://eng/m:1", source=ip)
        assert status == 200 and json.loads(body)["id"] == "flm://eng/m:1"
        assert env.request("GET", "/v1/models/flm://eng/gone:1", source=ip)[0] == 404
        status, _, body = env.request("POST", "/v1/batches", source=ip, body={})
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    assert ip not in env.rt.guard.scores and env.rt.guard.blocked(ip) is None
    status, _, body = env.request("GET", "/no-such-route", source=ip)
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    assert env.rt.guard.scores[ip][0] == NOT_FOUND_SCORE


def test_scanner_user_agent_and_honeypots(env: Env) -> None:
    env.policy(
        {
            "intrusion_detection": {"enabled": True},
            "honeypot": {"enabled": True},
            "ip_blocklist": OUTSIDE,
        }
    )
    status, _, _ = env.request(
        "GET", "/v1/models", headers={"User-Agent": "sqlmap/1.7"}, source="127.0.0.10"
    )
    assert env.rt.guard.scores["127.0.0.10"][0] == 50
    for path in ("/wp-admin", "/.env", "/phpmyadmin", "/wp-login.php", "/admin", "/api/v1/users"):
        status, _, body = env.request("GET", path, source="127.0.0.11", key=None)
        if status == 403:
            break
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    assert env.rt.guard.blocked("127.0.0.11") is not None


BENIGN = [
    "How do I write SELECT * FROM users WHERE id = 1 OR 1=1 safely?",
    "Explain why ../../etc/passwd is dangerous in a path",
    "'; DROP TABLE students; -- is a famous joke",
    "UNION SELECT explained for beginners",
]


def test_benign_requests_are_never_blocked(env: Env) -> None:
    env.policy(
        {
            "intrusion_detection": {"enabled": True},
            "honeypot": {"enabled": True},
            "anomaly_detection": {"enabled": True},
            "ip_blocklist": {"enabled": True},
        }
    )
    for _ in range(5):
        for prompt in BENIGN:
            status, _, body = env.chat(prompt, source="127.0.0.12")
            assert status == 200, body
    assert "127.0.0.12" not in env.rt.guard.scores
    status, _, _ = env.request(
        "POST",
        "/v1/embeddings",
        source="127.0.0.12",
        body={"model": "flm://eng/m:1", "input": BENIGN},
    )
    assert status != 403 and ("POST", "/v1/embeddings") in env.emu.requests


def test_anomaly_rate_and_body_size(env: Env) -> None:
    fake = FakeClock()
    env.rt.guard.clock = fake
    env.policy(
        {
            "ip_blocklist": OUTSIDE,
            "anomaly_detection": {
                "enabled": True,
                "request_rate_threshold": 5,
                "max_body_bytes": 1000,
                "auto_block": True,
            },
        }
    )
    # a health checker polling /health is not a request-rate anomaly
    health = [env.request("GET", "/health", source="127.0.0.13", key=None)[0] for _ in range(8)]
    assert health == [200] * 8
    # (a client without a valid key: one with a key is never anomaly-blocked for its rate)
    codes = [env.request("GET", "/v1/models", source="127.0.0.13", key=None)[0] for _ in range(7)]
    assert codes[:5] == [401] * 5 and codes[5] == 403
    env.request(
        "POST",
        "/v1/chat/completions",
        source="127.0.0.14",
        body={"model": "flm://eng/m:1", "messages": [{"role": "user", "content": "x" * 5000}]},
    )
    env.rt.audit.flush()  # type: ignore[union-attr]
    kinds = {r["anomaly_type"] for r in env.cli("security", "anomaly").data}
    assert {"request_rate", "body_size"} <= kinds


def test_overload_refuses_new_requests_only(env: Env) -> None:
    env.policy({"resource_protection": {"enabled": True, "max_connections": 1}})
    env.emu.behaviour.chunk_interval_s = 0.2
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(env.gw.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(
            {
                "model": "flm://eng/m:1",
                "stream": True,
                "messages": [{"role": "user", "content": "long story"}],
            }
        ),
        headers={"Authorization": f"Bearer {env.key}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.read1(65536)
    status, headers, body = env.request("GET", "/v1/models")
    assert status == 503 and json.loads(body)["error"]["code"] == "overloaded"
    assert headers["retry-after"]
    rest = first + resp.read()  # the stream already running finishes normally
    conn.close()
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert env.request("GET", "/health", key=None)[0] == 200
    env.rt.guard.overloaded = True  # CPU or memory above threshold
    assert env.request("GET", "/v1/models")[0] == 503
    env.rt.guard.overloaded = False


def test_cors_preflight_without_key_and_headers(env: Env) -> None:
    env.policy({"cors": {"allowed_origins": ["https://app.example"]}})
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    status, headers, _ = env.request("OPTIONS", "/v1/chat/completions", headers=pre, key=None)
    assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
    status, _, _ = env.request(
        "OPTIONS",
        "/v1/chat/completions",
        key=None,
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert status == 403
    status, headers, _ = env.request("GET", "/v1/models", headers={"Origin": "https://app.example"})
    assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"]
    # a simple (non-preflight) request from an origin not on the list gets no CORS headers
    status, headers, _ = env.request(
        "GET", "/v1/models", headers={"Origin": "https://evil.example"}
    )
    assert status == 200 and "access-control-allow-origin" not in headers
    # no list, no CORS: a web page can read nothing
    env.policy({})
    _, headers, _ = env.request("GET", "/v1/models", headers={"Origin": "https://any.example"})
    assert "access-control-allow-origin" not in headers
    status, headers, _ = env.request(
        "OPTIONS",
        "/v1/models",
        key=None,
        headers={"Origin": "https://any.example", "Access-Control-Request-Method": "GET"},
    )
    assert status == 403 and "access-control-allow-origin" not in headers
    # "*" only when listed, and never on /metrics
    env.policy({"cors": {"allowed_origins": ["*"]}})
    _, headers, _ = env.request("GET", "/v1/models", headers={"Origin": "https://any.example"})
    assert headers["access-control-allow-origin"] == "*"
    status, headers, _ = env.request(
        "GET", "/metrics", key=None, headers={"Origin": "https://any.example"}
    )
    assert status == 200 and "access-control-allow-origin" not in headers
    status, headers, _ = env.request(
        "OPTIONS",
        "/metrics",
        key=None,
        headers={"Origin": "https://any.example", "Access-Control-Request-Method": "GET"},
    )
    assert status == 403 and "access-control-allow-origin" not in headers


def test_refusals_carry_cors_headers(env: Env) -> None:
    """A browser client (the web UI's chat tester) can read a 401/404 and its request id."""
    env.policy({"cors": {"allowed_origins": ["https://app.example"]}})
    origin = {"Origin": "https://app.example"}
    for key, path in (("flm_00000000_wrong", "/v1/models"), ("default", "/no-such-route")):
        status, headers, body = env.request("GET", path, headers=origin, key=key)
        assert status in (401, 404), body
        assert headers["access-control-allow-origin"] == "https://app.example"
        assert headers["access-control-expose-headers"] == "x-request-id"
        assert headers["x-request-id"] in body.decode()
    status, headers, _ = env.request(
        "GET", "/v1/models", key="flm_00000000_wrong", headers={"Origin": "https://evil.example"}
    )
    assert status == 401 and "access-control-allow-origin" not in headers


def test_invalid_policy_keeps_the_old_one(env: Env) -> None:
    from flm.core.errors import PolicyInvalidError

    env.policy({"rate_limit": {"rpm": 5}})
    with pytest.raises(PolicyInvalidError):
        env.policy({"ip_whitelist": ["300.1.1.1/8"]})
    assert env.rt.effective.key_rpm == 5


def test_retry_after_matches_refill(env: Env) -> None:
    fake = FakeClock()
    env.rt.guard.clock = fake
    env.policy({"rate_limit": {"rpm": 6, "burst": 1}})
    assert env.request("GET", "/v1/models")[0] == 200
    status, headers, _ = env.request("GET", "/v1/models")
    assert status == 429 and int(headers["retry-after"]) == math.ceil(60 / 6)
    fake.now += 10
    assert env.request("GET", "/v1/models")[0] == 200


def test_probing_missing_routes_scores(env: Env) -> None:
    env.policy(
        {"intrusion_detection": {"enabled": True, "score_threshold": 100}, "ip_blocklist": OUTSIDE}
    )
    for i in range(9):
        assert env.request("GET", f"/probe-{i}", source="127.0.0.15")[0] == 404
    assert env.rt.guard.scores["127.0.0.15"][0] == 90
    assert env.request("GET", "/probe-x", source="127.0.0.15")[0] == 404  # reaches 100
    assert env.request("GET", "/v1/models", source="127.0.0.15")[0] == 403


def test_forwarded_for_lines_ports_and_mapped_addresses() -> None:
    import ipaddress

    from flm.proxy.middleware.security import forwarded_client

    trusted = (ipaddress.ip_network("127.0.0.7/32"), ipaddress.ip_network("10.0.0.0/8"))
    # the client's own line first, the proxy's below it: the proxy's line decides
    assert forwarded_client("127.0.0.7", [b"6.6.6.6", b"203.0.113.9"], [], trusted) == "203.0.113.9"
    # hops with ports, bracketed IPv6 with a port, IPv4-mapped IPv6
    assert (
        forwarded_client("127.0.0.7", [b"203.0.113.9:4711, 10.0.0.2:80"], [], trusted)
        == "203.0.113.9"
    )
    assert forwarded_client("127.0.0.7", [b"[2001:db8::1]:443"], [], trusted) == "2001:db8::1"
    assert forwarded_client("127.0.0.7", [b"::ffff:203.0.113.9"], [], trusted) == "203.0.113.9"
    # an unparsable hop: the proxy's client is unknown (None: refused), never the proxy
    assert forwarded_client("127.0.0.7", [b"unknown"], [], trusted) is None
    assert forwarded_client("127.0.0.7", [b"203.0.113.9, unknown"], [], trusted) is None
    # X-Real-IP is read only when the policy says the proxy sets it (its last line counts)
    assert forwarded_client("127.0.0.7", [], [b"6.6.6.6", b"203.0.113.9"], trusted) == "127.0.0.7"
    assert (
        forwarded_client(
            "127.0.0.7", [b"6.6.6.6"], [b"6.6.6.6", b"203.0.113.9"], trusted, "x-real-ip"
        )
        == "203.0.113.9"
    )
    assert forwarded_client("127.0.0.7", [], [b"nonsense"], trusted, "x-real-ip") is None


def test_a_second_forwarded_for_line_decides_who_is_blocked(env: Env) -> None:
    """Behind a trusted proxy that adds its own X-Forwarded-For line, the client's forged
    first line must not be taken for its address (or its failures land on someone else)."""
    import http.client
    from urllib.parse import urlsplit

    env.policy({"trusted_proxies": ["127.0.0.7"], "ip_blocklist": {"enabled": True}})
    parts = urlsplit(env.gw.url)

    def bad_key(forged: str) -> int:
        conn = http.client.HTTPConnection(
            parts.hostname, parts.port, timeout=30, source_address=("127.0.0.7", 0)
        )
        try:
            conn.putrequest("GET", "/v1/models")
            conn.putheader("Authorization", "Bearer flm_0000000000000000_" + "b" * 43)
            conn.putheader("X-Forwarded-For", forged)  # what the client sent
            conn.putheader("X-Forwarded-For", "203.0.113.50")  # what the proxy added
            conn.endheaders()
            return conn.getresponse().status
        finally:
            conn.close()

    codes = [bad_key(f"198.51.100.{i}") for i in range(6)]
    assert codes == [401] * 5 + [403]
    assert env.rt.guard.blocked("203.0.113.50") is not None
    assert all(env.rt.guard.blocked(f"198.51.100.{i}") is None for i in range(6))


@pytest.mark.parametrize(
    ("address", "tracked_as"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2::5", "2001:db8:1:2::/64"),
        ("2001:0db8:0001:0002:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::5", "2001:db8:1:3::/64"),
        ("2001:db8:1:2::/64", "2001:db8:1:2::/64"),  # the /64 as the blocklist lists it
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("::1", "::1"),  # this machine, its link and its unique-local network: one host each
        ("fe80::1", "fe80::1"),
        ("fd12:3456:789a:1::7", "fd12:3456:789a:1::7"),
        ("unknown", "unknown"),
    ],
)
def test_an_ipv6_client_is_its_64(address: str, tracked_as: str) -> None:
    from flm.core.clients import subject

    assert subject(address) == tracked_as


def test_rotating_ipv6_addresses_share_one_limit_count_and_block(env: Env) -> None:
    """A client with a /64 cannot escape the per-address rate limit, the failure count or a
    block by sending from another of its addresses; its neighbour /64 is not affected, and
    unblocking any address of the /64 lifts the block."""
    from flm.core.paths import Paths
    from flm.proxy.runtime import load_block_rows
    from flm.services.context import Context

    env.policy(
        {
            "trusted_proxies": ["127.0.0.7"],
            "ip_rate_limit": {"enabled": True, "rpm": 60, "burst": 3},
        }
    )

    def via_proxy(client: str, key: str | None = "default") -> int:
        return env.request(
            "GET", "/v1/models", source="127.0.0.7", key=key, headers={"X-Forwarded-For": client}
        )[0]

    fake = FakeClock()
    env.rt.guard.clock = fake
    codes = [via_proxy(f"2001:db8:1:2::{i}") for i in range(1, 6)]
    assert codes == [200, 200, 200, 429, 429]
    assert via_proxy("2001:db8:1:3::1") == 200  # the next /64 has its own bucket

    env.rt.guard.clock = time.time
    env.policy({"trusted_proxies": ["127.0.0.7"], "ip_blocklist": {"enabled": True}})
    bad = "flm_0000000000000000_" + "b" * 43
    codes = [via_proxy(f"2001:db8:5:6:{i}::1", key=bad) for i in range(1, 6)]
    assert codes == [401] * 5  # five failures, five addresses: the fifth blocks the /64
    status, _, body = env.request(
        "GET", "/v1/models", source="127.0.0.7", headers={"X-Forwarded-For": "2001:db8:5:6::99"}
    )
    assert status == 403 and json.loads(body)["error"]["code"] == "ip_blocked"
    assert via_proxy("2001:db8:5:7::1") == 200

    assert env.rt.audit is not None
    env.rt.audit.flush()
    listed = env.cli("security", "ip-blocklist", "list").data
    assert [b["ip"] for b in listed] == ["2001:db8:5:6::/64"]
    assert env.cli("security", "ip-blocklist", "unblock", "2001:db8:5:6:abcd::1").data == {
        "ip": "2001:db8:5:6::/64",
        "unblocked": True,
    }
    ctx = Context(Paths.resolve())
    env.gw.call(lambda: env.rt.load_blocks(load_block_rows(ctx, env.rt.settings.handle_id)))
    assert via_proxy("2001:db8:5:6::99") == 200


@pytest.mark.parametrize("order", [1, -1])
def test_blocklist_rows_of_single_ipv6_addresses_block_their_64(order: int) -> None:
    """Rows written before IPv6 clients were keyed by /64 still apply, to the whole /64; of
    two rows in one /64 the longer block holds, whatever their order."""
    from flm.proxy.guard import GuardState

    fake = FakeClock()
    guard = GuardState(clock=fake)
    rows: list[tuple[str, str, float | None, float, int]] = [
        ("2001:db8:1:2::5", "auth_failures", None, fake.now - 10, 20),
        ("2001:db8:1:2::6", "intrusion", fake.now + 60, fake.now - 5, 0),
    ]
    guard.load_blocks(rows[::order])
    block = guard.blocked("2001:db8:1:2::99")
    assert block is not None and block.permanent and block.reason == "auth_failures"
    assert guard.failures["2001:db8:1:2::/64"][0] == 20
    assert guard.blocked("2001:db8:1:3::5") is None
    guard.load_blocks([])  # unblocked by the owner: the /64 is free again
    assert guard.blocked("2001:db8:1:2::5") is None
