"""Two FLM gateways, each with its own data directory, sharing their state through one real
redis-server (``flm proxy start --state-backend``): keys, policy, rate limits, auth-failure
blocks and revocations hold across both; a Redis outage fails closed (or open, when asked)
and shared state resumes when Redis returns, without restarting FLM."""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from flm.testing.emulators import start_emulator
from tests.conftest import audit_rows, flm_subprocess
from tests.support import free_port, wait_until

pytestmark = pytest.mark.slow  # (FLM daemons and redis-server processes)

#: the per-key limit the policy sets for every key
POLICY = {
    "rate_limit": {"rpm": 60, "burst": 10},
    "ip_blocklist": {"enabled": True, "exempt_loopback": False},
    "honeypot": {"enabled": True},
}


class Node:
    """One FLM installation (its own FLM_HOME, daemon and proxy)."""

    def __init__(self, home: Path) -> None:
        home.mkdir(mode=0o700)
        self.home = home
        self.env = {"FLM_HOME": str(home)}
        self.port = free_port()

    def flm(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return flm_subprocess(*args, env=self.env, input=input)

    def data(self, *args: str, input: str | None = None) -> Any:
        done = self.flm(*args, input=input)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)["data"]

    def start(self, redis_url: str, *extra: str) -> None:
        done = self.flm(
            "proxy", "start", "--port", str(self.port), "--state-backend", redis_url, *extra
        )
        assert done.returncode == 0, done.stdout + done.stderr

    def stop(self) -> None:
        self.flm("proxy", "stop", "--all")

    def request(
        self, path: str, key: str | None, source: str = "127.0.0.1"
    ) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=30, source_address=(source, 0)
        )
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {}
        return resp.status, parsed if isinstance(parsed, dict) else {}

    def models(self, key: str | None, source: str = "127.0.0.1") -> int:
        return self.request("/v1/models", key, source)[0]

    def events(self, kind: str, *, at_least: int = 1, timeout: float = 15) -> list[Any]:
        sql = f"SELECT details_json FROM audit_logs WHERE event_type = '{kind}'"
        deadline = time.monotonic() + timeout
        while True:
            rows = audit_rows(self.home, sql, timeout=0)
            if len(rows) >= at_least or time.monotonic() > deadline:
                return [json.loads(r[0]) for r in rows]
            time.sleep(0.05)


@pytest.fixture
def nodes(tmp_path: Path, redis_server: Any) -> Iterator[tuple[Node, Node, Any]]:
    with ExitStack() as stack:
        emu = stack.enter_context(start_emulator("vllm", models=["m"]))
        a, b = Node(tmp_path / "a"), Node(tmp_path / "b")
        for node in (a, b):
            node.data("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "v")
            stack.callback(node.stop)
        yield a, b, redis_server


def test_two_gateways_share_keys_limits_blocks_and_revocations(
    nodes: tuple[Node, Node, Any],
) -> None:
    a, b, redis = nodes
    a.data("security", "policy", "set", input=json.dumps(POLICY))
    a.start(redis.url)
    b.start(redis.url)  # (an empty data directory: keys and policy come from Redis)
    assert (
        b.data("security", "policy", "show")["policy"]
        == a.data("security", "policy", "show")["policy"]
    )

    # a key created through A is served by B (and A), at once
    made = a.data("api-keys", "create", "--label", "through-a")
    assert b.models(made["key"]) == 200
    assert a.models(made["key"]) == 200

    # a key created through B: 60 rpm with a burst of 10 over both gateways together
    other = b.data("api-keys", "create", "--label", "through-b")
    started = time.monotonic()
    statuses = [(a if i % 2 else b).models(other["key"]) for i in range(24)]
    elapsed = time.monotonic() - started
    served = statuses.count(200)
    assert set(statuses) == {200, 429}, statuses
    # (one token comes back a second: a slow run may earn that many more)
    assert 10 - 1 <= served <= 10 + 1 + int(elapsed), (served, elapsed, statuses)
    assert statuses.index(429) >= 9  # the burst first, then refusals

    # five auth failures spread over both block the address on both
    attacker = "127.0.0.31"
    for i in range(5):
        assert (b if i % 2 else a).models("not-a-key", attacker) == 401
    assert a.models(made["key"], attacker) == 403
    assert b.models(made["key"], attacker) == 403
    assert a.models(made["key"]) == 200  # (only that address)
    # B lists the block made through A; lifting it there lifts it on both
    wait_until(
        lambda: any(r["ip"] == attacker for r in b.data("security", "ip-blocklist", "list")),
        timeout=15,
        what="B to list the shared block",
    )
    b.data("security", "ip-blocklist", "unblock", attacker)
    assert b.models(made["key"], attacker) == 200
    # (an unblock reaches the other processes by pub/sub, within milliseconds)
    wait_until(lambda: a.models(made["key"], attacker) == 200, timeout=10, what="A to unblock")

    # intrusion scores add up over both: one honeypot hit on each (75 + 75 >= 100) blocks
    prober = "127.0.0.32"
    assert a.request("/wp-admin", None, prober)[0] == 404
    assert b.models(made["key"], prober) == 200  # (75 points: not yet)
    assert b.request("/.env", None, prober)[0] == 404
    assert a.models(made["key"], prober) == 403
    assert b.models(made["key"], prober) == 403

    # a key revoked through B (whose database got it from Redis) is refused by A at once
    wait_until(
        lambda: any(k["id"] == made["id"] for k in b.data("api-keys", "list")),
        timeout=15,
        what="B to store the key created through A",
    )
    b.data("api-keys", "revoke", made["id"])
    assert a.models(made["key"]) == 401
    assert b.models(made["key"]) == 401
    stored = sqlite3.connect(a.home / "security.db")
    try:
        wait_until(
            lambda: (
                stored.execute(
                    "SELECT revoked_at FROM api_keys WHERE id = ?", (made["id"],)
                ).fetchone()[0]
                is not None
            ),
            timeout=15,
            what="A to store the revocation made through B",
        )
    finally:
        stored.close()
    secret = made["key"].split("_", 2)[2]  # flm_<hex id>_<secret; may hold "_">
    with redis.client() as c:  # only hashes are shared, never a key
        assert all(secret not in v for v in c.hgetall("flm:keys").values())


def test_outage_fails_closed_or_open_and_state_resumes(nodes: tuple[Node, Node, Any]) -> None:
    a, b, redis = nodes
    a.start(redis.url)
    b.start(redis.url, "--state-fail-open")
    made = a.data("api-keys", "create", "--label", "k")
    assert a.models(made["key"]) == 200 and b.models(made["key"]) == 200
    status = a.data("proxy", "status")["proxies"][0]["state"]
    assert status["backend"] == "redis" and status["reachable"] is True
    # one Redis call per request, no more
    with redis.client() as c:
        before = c.info("commandstats")
        for _ in range(10):
            assert a.models(made["key"]) == 200
        after = c.info("commandstats")
    calls = {
        name: after[name]["calls"] - before.get(name, {"calls": 0})["calls"]
        for name in after
        if name not in ("cmdstat_ping", "cmdstat_info")  # (the supervisor's liveness check)
    }
    assert calls.pop("cmdstat_evalsha") == 10
    # (commandstats counts the commands a script runs too: only those may appear)
    inside = {"cmdstat_" + n for n in ("hget", "sismember", "hmget", "hset", "pexpire")}
    assert {n for n, c in calls.items() if c} <= inside, calls
    assert 'flm_state_backend_up{backend="redis"} 1.0' in _metrics(a)

    redis.stop()
    # A fails closed: 503 with the contract's error, one audit event for the outage
    wait_until(lambda: a.models(made["key"]) == 503, timeout=15, what="A to fail closed")
    code, body = a.request("/v1/models", made["key"])
    assert code == 503 and body["error"]["code"] == "state_backend_unavailable"
    for _ in range(5):
        assert a.models(made["key"]) == 503
    assert a.request("/health", None)[0] == 200  # (nothing guarded there)
    events = a.events("state_backend_unavailable")
    assert len(events) == 1 and events[0]["mode"] == "fail_closed"
    assert "redis://127.0.0.1" in events[0]["backend"]
    assert a.data("proxy", "status")["proxies"][0]["state"]["reachable"] is False
    assert 'flm_state_backend_up{backend="redis"} 0.0' in _metrics(a)

    # B fails open: served on its own state, and that is audited (once)
    for _ in range(5):
        assert b.models(made["key"]) == 200
    opened = b.events("state_backend_fail_open")
    assert len(opened) == 1
    assert len(b.events("state_backend_unavailable")) == 1

    # Redis comes back (empty: no persistence): both resume without a restart, and what
    # they hold is shared again (a key made through B while Redis was down reaches A)
    during = b.data("api-keys", "create", "--label", "made-during-the-outage")
    redis.start()
    wait_until(lambda: a.models(made["key"]) == 200, timeout=30, what="A to resume")
    assert a.events("state_backend_restored")
    wait_until(
        lambda: b.data("proxy", "status")["proxies"][0]["state"]["reachable"],
        timeout=30,
        what="B to resume",
    )
    assert a.models(during["key"]) == 200
    a.data("api-keys", "revoke", made["id"])
    assert b.models(made["key"]) == 401  # revocations are shared again


def test_start_fails_closed_or_open_when_redis_is_unreachable(tmp_path: Path) -> None:
    with start_emulator("vllm", models=["m"]) as emu:
        node = Node(tmp_path / "n")
        try:
            node.data("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "v")
            nowhere = f"redis://127.0.0.1:{free_port()}/0"
            refused = node.flm(
                "proxy", "start", "--port", str(node.port), "--state-backend", nowhere
            )
            assert refused.returncode != 0
            assert "--state-fail-open" in refused.stdout + refused.stderr
            [event] = node.events("state_backend_unavailable")
            assert event["action"] == "start_refused"
            node.start(nowhere, "--state-fail-open")
            state = node.data("proxy", "status")["proxies"][0]["state"]
            assert state["reachable"] is False and state["fail_open"] is True
            key = node.data("api-keys", "create", "--label", "k")["key"]
            assert node.models(key) == 200  # (served on local state)
            assert node.events("state_backend_fail_open")
            assert len(node.events("state_backend_unavailable", at_least=2)) == 2
        finally:
            node.stop()


def _metrics(node: Node) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_password_from_a_file_never_shown(tmp_path: Path) -> None:
    from tests.redis_server import running_redis

    secret = "pw-" + os.urandom(8).hex()
    with ExitStack() as stack:
        redis = stack.enter_context(running_redis(tmp_path / "redis", password=secret))
        emu = stack.enter_context(start_emulator("vllm", models=["m"]))
        node = Node(tmp_path / "n")
        stack.callback(node.stop)
        node.data("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "v")
        password_file = tmp_path / "redis-password"
        password_file.write_text(secret + "\n")
        os.chmod(password_file, 0o600)
        node.start(redis.url, "--state-password-file", str(password_file))
        made = node.data("api-keys", "create", "--label", "k")
        assert node.models(made["key"]) == 200
        with redis.client() as c:
            assert c.hexists("flm:keys", made["id"])  # (it did reach the protected Redis)
        shown = node.flm("proxy", "status").stdout
        assert "redis://127.0.0.1" in shown and secret not in shown
        for log in (node.home / "logs").iterdir():
            assert secret not in log.read_text(errors="replace")


def test_rediss_with_a_private_ca(tmp_path: Path) -> None:
    from tests.redis_server import running_redis

    with ExitStack() as stack:
        redis = stack.enter_context(running_redis(tmp_path / "redis", tls=True))
        emu = stack.enter_context(start_emulator("vllm", models=["m"]))
        node = Node(tmp_path / "n")
        stack.callback(node.stop)
        node.data("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "v")
        assert redis.url.startswith("rediss://")
        # (Redis's certificate is not signed by a CA the system trusts: refused, fail closed)
        untrusted = node.flm(
            "proxy", "start", "--port", str(node.port), "--state-backend", redis.url
        )
        assert untrusted.returncode != 0
        assert "cannot be reached" in untrusted.stdout + untrusted.stderr
        node.start(redis.url, "--state-ca-file", str(redis.ca_file))
        made = node.data("api-keys", "create", "--label", "k")
        assert node.models(made["key"]) == 200
        with redis.client() as c:
            assert c.hexists("flm:keys", made["id"])


def test_a_password_on_the_command_line_is_refused(tmp_path: Path) -> None:
    node = Node(tmp_path / "n")
    done = node.flm(
        "proxy", "start", "--port", str(node.port), "--state-backend", "redis://:s3cret@h:1/0"
    )
    assert done.returncode != 0
    assert "--state-password-file" in done.stdout + done.stderr
    assert "s3cret" not in done.stdout + done.stderr
    loose = tmp_path / "pw"
    loose.write_text("pw\n")
    os.chmod(loose, 0o644)
    done = node.flm(
        "proxy",
        "start",
        "--port",
        str(node.port),
        "--state-backend",
        "redis://127.0.0.1:1/0",
        "--state-password-file",
        str(loose),
    )
    assert done.returncode != 0 and "chmod 600" in done.stdout + done.stderr
