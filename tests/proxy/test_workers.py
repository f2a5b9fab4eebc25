"""``flm proxy start --workers N``: N gateway processes on one port (SO_REUSEPORT) under one
supervisor: both serve, reloads reach every worker, ``kill -9`` of one is noticed and it comes
back, ``proxy stop`` stops them all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flm.core.errors import ProxyError
from flm.core.paths import Paths
from flm.services.context import Context
from flm.services.proxy import ProxyService
from flm.services.proxy_config import StartConfig
from flm.services.runstate import pid_alive
from flm.testing.emulators import start_emulator
from tests.conftest import audit_rows, flm_subprocess
from tests.support import free_port, wait_until

#: (integration tests: they start daemons, workers and redis-server)
pytestmark = pytest.mark.slow

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, key: str) -> int:
    """One request on a connection of its own (so the kernel picks a worker for each)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})  # noqa: S310
    try:
        with _OPENER.open(request, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _start(*args: str) -> dict[str, Any]:
    """``flm proxy start ARGS`` (through the CLI, in a process of its own); its data."""
    started = flm_subprocess("proxy", "start", *args)
    assert started.returncode == 0, started.stdout + started.stderr
    data: dict[str, Any] = json.loads(started.stdout)["data"]
    return data


class Workers:
    """A daemon-run proxy with ``--workers 2`` in front of an emulator, and a key."""

    def __init__(self, service: ProxyService, port: int, key: str, key_id: str) -> None:
        self.service = service
        self.port = port
        self.key = key
        self.key_id = key_id
        self.url = f"http://127.0.0.1:{port}/v1/models"

    def workers(self) -> list[dict[str, Any]]:
        [proxy] = self.service.status()["proxies"]
        rows: list[dict[str, Any]] = proxy["workers"]
        return rows


@pytest.fixture
def two_workers(flm_home: Path, redis_server: Any) -> Iterator[Workers]:
    with start_emulator("vllm", models=["m"]) as emu:
        added = flm_subprocess("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "v")
        assert added.returncode == 0, added.stdout
        created = json.loads(flm_subprocess("api-keys", "create", "--label", "k").stdout)["data"]
        ctx = Context(Paths.resolve())
        service = ProxyService(ctx.storage)
        port = free_port()
        described = _start(
            "--port", str(port), "--workers", "2", "--state-backend", redis_server.url
        )
        try:
            assert [w["index"] for w in described["workers"]] == [0, 1]
            yield Workers(service, port, created["key"], created["id"])
        finally:
            service.stop(all_=True)
            ctx.close()


def _port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def test_two_workers_serve_and_stop_together(two_workers: Workers, flm_home: Path) -> None:
    """Both processes answer (their request counts in `proxy status`), each writes its own
    audit rows into the one security.db (WAL, concurrent writers: none is lost), and
    `proxy stop` ends both and closes the port."""
    total = 120
    results: list[int] = []

    def client() -> None:
        for _ in range(total // 4):
            results.append(_get(two_workers.url, two_workers.key))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * total
    wait_until(
        lambda: sum(w["served"] for w in two_workers.workers()) == total,
        timeout=10,
        what="both workers to report their request counts",
    )
    workers = two_workers.workers()
    pids = [w["pid"] for w in workers]
    assert len(set(pids)) == 2 and all(w["alive"] for w in workers)
    assert all(w["served"] > 0 for w in workers), workers  # both processes answered
    assert pids[0] == two_workers.service.daemon().pid  # type: ignore[union-attr]
    rows = audit_rows(
        flm_home,
        "SELECT COUNT(*) FROM audit_logs WHERE endpoint = '/v1/models' AND status = 200"
        f" HAVING COUNT(*) >= {total}",
    )
    assert rows == [(total,)]
    two_workers.service.stop(port=two_workers.port)
    for pid in pids:
        wait_until(lambda pid=pid: not pid_alive(pid), timeout=20, what=f"pid {pid} to exit")
    assert _port_closed(two_workers.port)


def test_kill_9_of_a_worker_is_noticed_and_it_is_restarted(
    two_workers: Workers, flm_home: Path
) -> None:
    """Under load from 4 clients: once the death is noticed (= reaped: every thread gone, so
    its socket is closed and out of the port's group) no request fails while it is down; only
    requests that were on it when it died may. It comes back (a new pid, restarts=1, audited)
    and serves again."""
    [_, worker] = two_workers.workers()
    results: list[tuple[float, bool]] = []  # (when it started, answered 200)
    done = threading.Event()

    def client() -> None:
        while not done.is_set():
            began = time.monotonic()
            try:
                ok = _get(two_workers.url, two_workers.key) == 200
            except Exception:  # (reset, refused: what this test counts)
                ok = False
            results.append((began, ok))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 20, timeout=20, what="the load to run")
        os.kill(worker["pid"], signal.SIGKILL)
        wait_until(
            lambda: two_workers.workers()[1]["last_exit"] == "signal 9",
            timeout=10,
            what="the supervisor to notice the death",
        )
        noticed = time.monotonic()
        wait_until(
            lambda: sum(1 for began, _ in results if began > noticed) >= 20,
            timeout=30,
            what="requests after the death was noticed",
        )
        # (those were served while it was down: its restart waits 0.25 s, then starts Python)
        assert not two_workers.workers()[1]["alive"]

        def restarted() -> bool:
            row = two_workers.workers()[1]
            return bool(row["alive"] and row["pid"] != worker["pid"] and row["restarts"] == 1)

        wait_until(restarted, timeout=20, what="the supervisor to restart the killed worker")
        back = len(results)
        wait_until(lambda: len(results) >= back + 20, timeout=20, what="load after the restart")
    finally:
        done.set()
        for t in threads:
            t.join()
    after = [ok for began, ok in results if began > noticed]
    assert all(after), f"{after.count(False)} of {len(after)} failed after the notice"
    again = two_workers.workers()[1]
    assert again["last_exit"] == "signal 9"
    [(details,)] = audit_rows(
        flm_home, "SELECT details_json FROM audit_logs WHERE event_type = 'proxy_worker_exited'"
    )
    exited = json.loads(details)
    assert exited["pid"] == worker["pid"] and exited["exit"] == "signal 9"
    assert exited["worker"] == 1 and exited["handle"] == f"proxy-{two_workers.port}"
    [(details,)] = audit_rows(
        flm_home,
        "SELECT details_json FROM audit_logs WHERE event_type = 'proxy_worker_restarted'",
    )
    assert json.loads(details)["pid"] == again["pid"]

    def new_one_serves() -> bool:
        assert _get(two_workers.url, two_workers.key) == 200
        return bool(two_workers.workers()[1]["served"] > 0)

    wait_until(new_one_serves, timeout=20, what="the restarted worker to answer requests")


def test_a_revoked_key_is_refused_by_every_worker_at_once(two_workers: Workers) -> None:
    """The key commands' reload notice reaches the siblings before the command returns."""

    def total(expected: int) -> list[int]:
        # (a worker reports its count every 0.5 s: wait for this exact total to be known)
        counts: list[int] = []

        def known() -> bool:
            counts[:] = [w["served"] for w in two_workers.workers()]
            return sum(counts) == expected

        wait_until(known, timeout=10, what=f"the workers' counts to reach {expected}")
        return counts

    assert [_get(two_workers.url, two_workers.key) for _ in range(20)] == [200] * 20
    before = total(20)
    revoked = flm_subprocess("api-keys", "revoke", two_workers.key_id)
    assert revoked.returncode == 0, revoked.stdout
    assert [_get(two_workers.url, two_workers.key) for _ in range(40)] == [401] * 40
    after = total(60)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def test_kill_9_of_the_supervisor_takes_its_workers_along(two_workers: Workers) -> None:
    """A worker whose supervisor died (its stdin closed) stops: nothing keeps the port."""
    daemon = two_workers.service.daemon()
    assert daemon is not None
    [_, worker] = two_workers.workers()
    os.kill(daemon.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(worker["pid"]), timeout=20, what="the orphaned worker to go")
    wait_until(lambda: _port_closed(two_workers.port), timeout=10, what="the port to close")


def test_workers_above_one_need_a_state_backend(flm_home: Path) -> None:
    port = free_port()
    result = flm_subprocess("proxy", "start", "--port", str(port), "--workers", "2")
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "PROXY_INVALID_CONFIG" and "--state-backend" in error["message"]
    assert not (flm_home / "run" / "proxy-daemon.json").exists()  # refused before the daemon
    for bad in ("0", "65"):
        result = flm_subprocess("proxy", "start", "--port", str(port), "--workers", bad)
        assert result.returncode == 1 and "--workers must be 1-64" in result.stdout
    assert StartConfig.from_dict({"port": port}).workers == 1


def test_workers_above_one_need_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(ProxyError, match="needs Linux"):
        StartConfig.from_dict({"workers": 2, "state_backend": "redis://127.0.0.1:1/0"})


def test_a_port_held_elsewhere_is_refused_with_workers(flm_home: Path, redis_server: Any) -> None:
    """SO_REUSEPORT would share a port with another listener of this user: the start checks
    first that nobody holds it."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        port = other.getsockname()[1]
        refused = flm_subprocess(
            "proxy",
            "start",
            "--port",
            str(port),
            "--workers",
            "2",
            "--state-backend",
            redis_server.url,
        )
    assert json.loads(refused.stdout)["error"]["code"] == "PROXY_PORT_IN_USE", refused.stdout


def test_restart_back_off_doubles_and_is_bounded_per_minute() -> None:
    from flm.proxy.supervisor import (
        BACKOFF_INITIAL_S,
        BACKOFF_MAX_S,
        MAX_RESTARTS_PER_MINUTE,
        WorkerGroup,
        WorkerSlot,
    )

    group = WorkerGroup(None, "proxy-1", {}, 2)  # type: ignore[arg-type]
    slot = WorkerSlot(1)
    delays = []
    for failures in range(4):
        slot.failures_in_a_row = failures
        delays.append(group._delay(slot))
    assert delays == [BACKOFF_INITIAL_S * 2**n for n in range(4)]
    slot.failures_in_a_row = 30
    assert group._delay(slot) == BACKOFF_MAX_S
    # the restarts of the last minute are full: the next waits until the oldest is a minute old
    slot.failures_in_a_row = 0
    now = time.monotonic()
    slot.recent.extend(now - 10.0 + i for i in range(MAX_RESTARTS_PER_MINUTE))
    assert 49.0 <= group._delay(slot) <= 50.0
    slot.recent.clear()
    slot.recent.extend(now - 61.0 for _ in range(MAX_RESTARTS_PER_MINUTE))
    assert group._delay(slot) == BACKOFF_INITIAL_S  # (older than a minute: forgotten)
    assert not slot.recent


@pytest.mark.parametrize("how", ["proxy stop", "ctrl-c"])
def test_no_daemon_workers_stop_with_their_supervisor(
    how: str, flm_home: Path, redis_server: Any
) -> None:
    """`--no-daemon --workers 2`: `flm proxy stop` (SIGTERM) and Ctrl-C (SIGINT to the whole
    process group) both stop the two processes, and no worker is restarted on the way out."""
    import psutil

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flm",
            "proxy",
            "start",
            "--no-daemon",
            "--port",
            str(port),
            "--workers",
            "2",
            "--state-backend",
            redis_server.url,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:

        def workers() -> list[int]:
            return [
                c.pid
                for c in psutil.Process(proc.pid).children()
                if "flm.proxy.worker" in " ".join(c.cmdline())
            ]

        wait_until(lambda: len(workers()) == 1, timeout=60, what="the foreground's worker")
        [worker] = workers()
        wait_until(lambda: not _port_closed(port), timeout=30, what="the port to open")
        assert _get(f"http://127.0.0.1:{port}/v1/models", "nokey") == 401

        def recorded() -> bool:
            listed = json.loads(flm_subprocess("proxy", "status").stdout)["data"]["proxies"]
            return [p["port"] for p in listed] == [port]

        wait_until(recorded, timeout=30, what="the proxy's handle")
        [listed] = json.loads(flm_subprocess("proxy", "status").stdout)["data"]["proxies"]
        assert [(w["pid"], w["role"]) for w in listed["workers"]] == [
            (proc.pid, "supervisor"),
            (worker, "worker"),
        ]
        if how == "proxy stop":
            stopped = flm_subprocess("proxy", "stop", "--port", str(port))
            assert stopped.returncode == 0, stopped.stdout
        else:
            os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=30)
        assert proc.stderr is not None
        assert code == 0, proc.stderr.read().decode()[-3000:]
        wait_until(lambda: not pid_alive(worker), timeout=20, what="the worker to exit")
        assert _port_closed(port)
        assert not audit_rows(
            flm_home,
            "SELECT id FROM audit_logs WHERE event_type LIKE 'proxy_worker_%'",
            timeout=0,
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_tls_workers_share_the_https_port(flm_home: Path, redis_server: Any) -> None:
    """dev-selfsigned with 2 workers: both answer on HTTPS with the one certificate; the plain
    port (redirects) is worker 0's alone."""
    import http.client
    import ssl

    port = free_port()
    started = _start(
        "--port",
        str(port),
        "--mode",
        "dev-selfsigned",
        "--workers",
        "2",
        "--state-backend",
        redis_server.url,
    )
    ctx = Context(Paths.resolve())
    service = ProxyService(ctx.storage)
    try:
        https_port = started["https_port"]
        root = flm_home / "certs" / "dev-selfsigned" / "ca.pem"
        tls = ssl.create_default_context(cafile=str(root))
        for _ in range(40):
            conn = http.client.HTTPSConnection("localhost", https_port, context=tls, timeout=10)
            try:
                conn.request("GET", "/v1/models")
                assert conn.getresponse().status == 401
            finally:
                conn.close()
        [proxy] = service.status()["proxies"]
        wait_until(
            lambda: all(w["served"] > 0 for w in service.status()["proxies"][0]["workers"]),
            timeout=10,
            what="both workers to have answered over HTTPS",
        )
        conn2 = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn2.request("GET", "/v1/models")
            assert conn2.getresponse().status == 301
        finally:
            conn2.close()
        assert len({w["pid"] for w in proxy["workers"]}) == 2
    finally:
        service.stop(all_=True)
        ctx.close()


def test_a_worker_that_keeps_dying_waits_for_the_minute(
    two_workers: Workers, flm_home: Path
) -> None:
    """Five restarts within a minute, then the sixth waits for the window (audited once as
    `proxy_worker_restart_limit`) while worker 0 serves on."""
    from flm.proxy.supervisor import MAX_RESTARTS_PER_MINUTE

    for restarts in range(MAX_RESTARTS_PER_MINUTE + 1):

        def up(restarts: int = restarts) -> bool:
            row = two_workers.workers()[1]
            return bool(row["alive"] and row["restarts"] == restarts)

        wait_until(up, timeout=40, what=f"the worker after {restarts} restarts")
        os.kill(two_workers.workers()[1]["pid"], signal.SIGKILL)
    [(details,)] = audit_rows(
        flm_home,
        "SELECT details_json FROM audit_logs WHERE event_type = 'proxy_worker_restart_limit'",
        timeout=20,
    )
    limited = json.loads(details)
    assert limited["restarts_last_minute"] == MAX_RESTARTS_PER_MINUTE
    assert limited["wait_s"] > 10  # (the rest of the minute, not the back-off)
    row = two_workers.workers()[1]
    assert not row["alive"] and row["restarts"] == MAX_RESTARTS_PER_MINUTE
    assert [_get(two_workers.url, two_workers.key) for _ in range(10)] == [200] * 10


def test_status_text_lists_the_workers() -> None:
    from flm.cli.proxy import _status_text

    proxy = {
        "id": "proxy-8080",
        "mode": "local-http",
        "port": 8080,
        "listen": "127.0.0.1",
        "endpoints": ["http://localhost:8080"],
        "uptime_s": 3.0,
        "pid": 10,
        "workers": [
            {"index": 0, "pid": 10, "alive": True, "served": 3, "restarts": 0, "last_exit": None},
            {
                "index": 1,
                "pid": 11,
                "alive": False,
                "served": 0,
                "restarts": 2,
                "last_exit": "signal 9",
            },
        ],
    }
    text = _status_text({"proxies": [proxy]})
    assert (
        "proxy-8080 workers: 0 pid 10 alive served=3 restarts=0; "
        "1 pid 11 DOWN served=0 restarts=2 last_exit=signal 9"
    ) in text


def _get_from(url: str, key: str, source: str) -> int:
    """One request from the loopback address ``source`` (its own connection)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(
        parts.hostname or "", parts.port, timeout=10, source_address=(source, 0)
    )
    try:
        conn.request("GET", parts.path, headers={"Authorization": f"Bearer {key}"})
        response = conn.getresponse()
        response.read()
        return int(response.status)
    finally:
        conn.close()


def test_shared_limits_hold_across_workers(flm_home: Path, redis_server: Any) -> None:
    """`--workers 2 --state-backend`: a per-key limit of 60 rpm with burst 10 holds over both
    workers together (burst ± 1), and 5 auth failures spread over them block the address on
    both."""
    policy = {
        "rate_limit": {"rpm": 60, "burst": 10},
        "ip_blocklist": {"enabled": True, "exempt_loopback": False},
    }
    with start_emulator("vllm", models=["m"]) as emu:
        added = flm_subprocess("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "v")
        assert added.returncode == 0, added.stdout
        done = flm_subprocess("security", "policy", "set", input=json.dumps(policy))
        assert done.returncode == 0, done.stdout + done.stderr
        port = free_port()
        _start("--port", str(port), "--workers", "2", "--state-backend", redis_server.url)
        ctx = Context(Paths.resolve())
        service = ProxyService(ctx.storage)
        try:
            created = json.loads(flm_subprocess("api-keys", "create", "--label", "k").stdout)
            key = created["data"]["key"]
            url = f"http://127.0.0.1:{port}/v1/models"

            def served() -> list[int]:
                return [w["served"] for w in service.status()["proxies"][0]["workers"]]

            before = served()
            begun = time.monotonic()
            statuses = [_get(url, key) for _ in range(24)]
            elapsed = time.monotonic() - begun
            assert set(statuses) == {200, 429}, statuses
            ok = statuses.count(200)
            # (one token comes back a second: a slow run may earn that many more)
            assert 10 - 1 <= ok <= 10 + 1 + int(elapsed), (ok, elapsed, statuses)
            wait_until(
                lambda: sum(served()) - sum(before) == 24,
                timeout=10,
                what="the workers' request counts",
            )
            after = served()
            assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)

            attacker = "127.0.0.31"
            assert [_get_from(url, "not-a-key", attacker) for _ in range(5)] == [401] * 5
            fresh = json.loads(flm_subprocess("api-keys", "create", "--label", "f").stdout)
            fresh_key = fresh["data"]["key"]
            # (20 connections: the chance that all met the same worker is 2 ** -19)
            assert [_get_from(url, fresh_key, attacker) for _ in range(20)] == [403] * 20
            assert _get(url, fresh_key) == 200  # (only that address)
        finally:
            service.stop(all_=True)
            ctx.close()
