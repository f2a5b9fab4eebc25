"""The proxy daemon through the real CLI: start, status, stop, busy port, kill -9."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from flm.services.runstate import pid_alive
from tests.conftest import audit_rows, flm_subprocess
from tests.support import foreground_proxy, free_port


def _data(proc: object) -> dict:  # type: ignore[type-arg]
    out = proc.stdout  # type: ignore[attr-defined]
    body = json.loads(out)
    assert "data" in body, body
    return body["data"]  # type: ignore[no-any-return]


def test_start_status_stop(flm_home: Path) -> None:
    port = free_port()
    started = time.monotonic()
    start = flm_subprocess("proxy", "start", "--port", str(port))
    assert start.returncode == 0, start.stdout + start.stderr
    assert time.monotonic() - started < 5  # includes two interpreter start-ups
    described = _data(start)
    assert described["port"] == port and described["mode"] == "local-http"
    assert described["endpoints"] == [f"http://localhost:{port}"]
    info = json.loads((flm_home / "run" / "proxy-daemon.json").read_text())
    assert (flm_home / "run" / "proxy-daemon.json").stat().st_mode & 0o777 == 0o600
    assert len(info["token"]) == 64 and pid_alive(info["pid"])
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    status = _data(flm_subprocess("proxy", "status"))
    assert [p["port"] for p in status["proxies"]] == [port]
    assert status["proxies"][0]["uptime_s"] >= 0
    stop = flm_subprocess("proxy", "stop", "--port", str(port))
    assert _data(stop)["stopped"] == [f"proxy-{port}"]
    assert _data(flm_subprocess("proxy", "status"))["proxies"] == []
    deadline = time.monotonic() + 10
    while pid_alive(info["pid"]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not (flm_home / "run" / "proxy-daemon.json").exists()


def test_busy_port_leaves_nothing_behind(flm_home: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        result = flm_subprocess("proxy", "start", "--port", str(port))
        assert result.returncode == 1
        assert json.loads(result.stdout)["error"]["code"] == "PROXY_PORT_IN_USE"
    deadline = time.monotonic() + 10
    daemon_file = flm_home / "run" / "proxy-daemon.json"
    while daemon_file.exists():  # the daemon started for this call exits on its own
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status = _data(flm_subprocess("proxy", "status"))
    assert status["daemon"] is None and status["proxies"] == []


def test_kill_9_of_daemon_is_cleaned_up(flm_home: Path) -> None:
    port = free_port()
    assert flm_subprocess("proxy", "start", "--port", str(port)).returncode == 0
    info = json.loads((flm_home / "run" / "proxy-daemon.json").read_text())
    os.kill(info["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(info["pid"]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status = _data(flm_subprocess("proxy", "status"))
    assert status["proxies"] == [] and status["cleaned"]["removed_daemon_file"] is True
    assert status["cleaned"]["removed_handles"] == [f"proxy-{port}"]
    check = flm_subprocess("check")
    assert check.returncode == 0, check.stdout
    again = flm_subprocess("proxy", "start", "--port", str(port))
    assert again.returncode == 0, again.stdout
    assert flm_subprocess("proxy", "stop", "--all").returncode == 0


def test_stop_needs_a_target() -> None:
    result = flm_subprocess("proxy", "stop")
    assert result.returncode == 1 and "--all" in json.loads(result.stdout)["error"]["message"]


def test_run_file_naming_a_live_unrelated_pid_is_stale(flm_home: Path) -> None:
    """After a crash or reboot the run file survives and its pid may belong to another live
    process by now (here: this test's own): the daemon's lock says no daemon runs."""
    run = flm_home / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    (run / "proxy-daemon.json").write_text(
        json.dumps({"port": 1, "token": "x" * 64, "pid": os.getpid(), "started_at": "2026-01-01"})
    )
    status = _data(flm_subprocess("proxy", "status"))
    assert status["daemon"] is None and status["cleaned"]["removed_daemon_file"] is True
    port = free_port()
    start = flm_subprocess("proxy", "start", "--port", str(port))
    assert start.returncode == 0, start.stdout + start.stderr
    assert flm_subprocess("proxy", "stop", "--all").returncode == 0
    (run / "proxy-daemon.json").write_text(
        '{"port": 1, "token": "x", "pid": 1e400, "started_at": "x"}'
    )
    result = flm_subprocess("proxy", "status")
    assert result.returncode == 0, result.stdout + result.stderr


def test_bad_admin_tokens_block_guessers_but_never_the_owner(flm_home: Path) -> None:
    import urllib.error
    import urllib.request

    port = free_port()
    assert flm_subprocess("proxy", "start", "--port", str(port)).returncode == 0
    try:
        info = json.loads((flm_home / "run" / "proxy-daemon.json").read_text())
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def health(token: str) -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{info['port']}/admin/health",
                headers={"Authorization": f"Bearer {token}"},
            )
            try:
                with opener.open(request, timeout=10) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)

        assert [health("wrong") for _ in range(5)] == [401] * 5
        assert health("wrong") == 429  # blocked from now on...
        assert health(info["token"]) == 200  # ...but the owner is not locked out
        assert _data(flm_subprocess("proxy", "status"))["proxies"][0]["port"] == port
        [(severity, details)] = audit_rows(
            flm_home,
            "SELECT severity, details_json FROM audit_logs WHERE event_type = 'admin_auth_blocked'",
        )
        assert severity == "high" and json.loads(details)["failures"] == 5
    finally:
        if flm_subprocess("proxy", "stop", "--all").returncode != 0:  # (owner locked out)
            os.kill(info["pid"], signal.SIGKILL)


def test_admin_api_errors_keep_the_contract_and_the_books(flm_home: Path) -> None:
    """Malformed admin requests are 400 with the CLI's codes; a policy refused on reload is
    shown, and cleared by the next good one."""
    import sqlite3
    import urllib.error
    import urllib.request

    port = free_port()
    assert flm_subprocess("proxy", "start", "--port", str(port)).returncode == 0
    try:
        info = json.loads((flm_home / "run" / "proxy-daemon.json").read_text())
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for body in (b"not json", b'{"port": "abc"}'):
            request = urllib.request.Request(
                f"http://127.0.0.1:{info['port']}/admin/start",
                data=body,
                method="POST",
                headers={"Authorization": f"Bearer {info['token']}"},
            )
            try:
                opener.open(request, timeout=10)
                raise AssertionError("accepted")
            except urllib.error.HTTPError as exc:
                assert (
                    exc.code == 400
                    and json.loads(exc.read())["error"]["code"] == "INVALID_ARGUMENT"
                ), body
        conn = sqlite3.connect(flm_home / "security.db")
        with conn:
            conn.execute(
                "INSERT OR REPLACE INTO security_policies(id, policy_json, updated_at)"
                ' VALUES (\'default\', \'{"rate_limit": {"rpm": "lots"}}\', '
                "'2026-01-01T00:00:00Z')"
            )
        conn.close()
        assert flm_subprocess("proxy", "reload").returncode == 0
        [proxy] = _data(flm_subprocess("proxy", "status"))["proxies"]
        assert proxy["last_error"].startswith("policy refused on reload")
        good = flm_home / "good.json"
        good.write_text("{}")
        assert flm_subprocess("security", "policy", "set", "--file", str(good)).returncode == 0
        assert flm_subprocess("proxy", "reload").returncode == 0
        [proxy] = _data(flm_subprocess("proxy", "status"))["proxies"]
        assert proxy["last_error"] is None and proxy["port"] == port
    finally:
        assert flm_subprocess("proxy", "stop", "--all").returncode == 0


def test_a_proxy_that_fails_to_close_is_still_stopped(flm_home: Path) -> None:
    import asyncio
    from types import SimpleNamespace

    from flm.core.paths import Paths
    from flm.daemon.main import Daemon

    class Broken:
        settings = SimpleNamespace(port=1, https_port=None, handle_id="proxy-1")

        async def close(self) -> None:
            raise OSError(28, "No space left on device")

    async def run() -> None:
        daemon = Daemon(Paths.resolve())
        daemon.instances["proxy-1"] = Broken()  # type: ignore[assignment]
        assert await daemon.stop_proxies(all_=True) == (["proxy-1"], [])
        assert daemon.instances == {}

    asyncio.run(run())


def test_a_start_racing_the_stop_of_the_last_proxy_stays_up(flm_home: Path) -> None:
    """The daemon leaves when its last proxy stops, but not under a start queued behind that
    stop: a start that reports success is serving.

    The start must be in flight before the stop ends (a start that arrives after the daemon
    left is the CLI's to retry, not this test's): it is sent with ``Expect: 100-continue`` and
    without its body, and the daemon's ``100 Continue`` — sent when the admin API asks for the
    body, after it has counted the request — is the sign it is. Then the stop runs to its end,
    then the start's body goes."""
    import urllib.request

    first, second = free_port(), free_port()
    assert flm_subprocess("proxy", "start", "--port", str(first)).returncode == 0
    info = json.loads((flm_home / "run" / "proxy-daemon.json").read_text())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        body = json.dumps({"port": second}).encode()
        with socket.create_connection(("127.0.0.1", info["port"]), timeout=30) as start:
            start.sendall(
                b"POST /admin/start HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
                b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                % (info["token"].encode(), len(body))
            )
            reply = b""
            while b"\r\n\r\n" not in reply:
                data = start.recv(4096)
                assert data, "the daemon closed the start's connection"
                reply += data
            assert reply.startswith(b"HTTP/1.1 100 "), reply
            stop = urllib.request.Request(
                f"http://127.0.0.1:{info['port']}/admin/stop",
                data=json.dumps({"port": first}).encode(),
                method="POST",
                headers={"Authorization": f"Bearer {info['token']}"},
            )
            with opener.open(stop, timeout=30) as resp:
                assert resp.status == 200
            start.sendall(body)
            reply = reply.partition(b"\r\n\r\n")[2]
            while b"\r\n\r\n" not in reply:
                data = start.recv(4096)
                assert data, "the daemon closed the start's connection"
                reply += data
            assert reply.startswith(b"HTTP/1.1 200 "), reply
        status = _data(flm_subprocess("proxy", "status"))
        assert [p["port"] for p in status["proxies"]] == [second]
        with socket.create_connection(("127.0.0.1", second), timeout=5):
            pass
    finally:
        flm_subprocess("proxy", "stop", "--all")


def test_a_start_naming_other_databases_than_the_daemons_is_refused(
    flm_home: Path, tmp_path: Path
) -> None:
    port = free_port()
    assert flm_subprocess("proxy", "start", "--port", str(port)).returncode == 0
    try:
        info = json.loads((flm_home / "run" / "proxy-daemon.json").read_text())
        assert info["security_db"] == str(flm_home / "security.db")
        other = tmp_path / "other-security.db"
        refused = flm_subprocess(
            "proxy", "start", "--port", str(free_port()), "--db-path-security", str(other)
        )
        assert refused.returncode == 1, refused.stdout
        error = json.loads(refused.stdout)["error"]
        assert error["code"] == "PROXY_INVALID_CONFIG"
        assert str(other) in error["message"] and "--db-path-security" in error["message"]
        assert [p["port"] for p in _data(flm_subprocess("proxy", "status"))["proxies"]] == [port]
        # the same databases, named explicitly, are fine
        same = flm_subprocess(
            "proxy",
            "start",
            "--port",
            str(free_port()),
            "--db-path-security",
            str(flm_home / "security.db"),
        )
        assert same.returncode == 0, same.stdout
    finally:
        assert flm_subprocess("proxy", "stop", "--all").returncode == 0


def test_a_foreground_proxy_picks_up_a_revoke_at_once(flm_home: Path) -> None:
    """`--no-daemon` proxies reload like the daemon's: the CLI signals them after a key,
    policy or blocklist change, and `flm proxy reload` names them."""
    import urllib.error
    import urllib.request

    from flm.testing.emulators import start_emulator

    with start_emulator("vllm", models=["m:1"]) as emu:
        assert (
            flm_subprocess(
                "engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "eng"
            ).returncode
            == 0
        )
        key = _data(flm_subprocess("api-keys", "create", "--label", "fg"))
        port = free_port()
        proc = foreground_proxy(port)
        try:

            def status() -> int:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/models",
                    headers={"Authorization": f"Bearer {key['key']}"},
                )
                try:
                    with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
                        return int(resp.status)
                except urllib.error.HTTPError as exc:
                    return int(exc.code)
                except OSError:
                    return 0

            deadline = time.monotonic() + 15
            while status() != 200:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            assert flm_subprocess("api-keys", "revoke", key["id"]).returncode == 0
            deadline = time.monotonic() + 5  # (a signal and one reload, not the 30 s poll)
            while status() != 401:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert _data(flm_subprocess("proxy", "reload"))["reloaded"] == [f"proxy-{port}"]
        finally:
            proc.terminate()
            assert proc.wait(timeout=15) == 0


def _refuse_handle_writes(home: Path, when: str) -> None:
    """config.db refuses writes to the handle table (as a full disk would)."""
    import sqlite3

    with sqlite3.connect(home / "config.db") as db:
        db.execute(
            f"CREATE TRIGGER refuse_{when.lower()} BEFORE {when} ON proxy_handles "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_a_start_whose_handle_cannot_be_recorded_is_rolled_back(flm_home: Path) -> None:
    """It once exited 1 while the gateway was up and serving, unseen by status and stop."""
    assert flm_subprocess("check").returncode == 0  # (the databases exist)
    _refuse_handle_writes(flm_home, "INSERT")
    port = free_port()
    start = flm_subprocess("proxy", "start", "--port", str(port))
    assert start.returncode != 0
    error = json.loads(start.stdout)["error"]
    assert "not started" in error["message"] and "disk is full" in error["message"]
    assert not _listening(port)
    flm_subprocess("proxy", "stop", "--all")


def test_a_stop_that_happened_is_reported_done_with_a_warning(flm_home: Path) -> None:
    port = free_port()
    assert flm_subprocess("proxy", "start", "--port", str(port)).returncode == 0
    _refuse_handle_writes(flm_home, "DELETE")
    stop = flm_subprocess("proxy", "stop", "--all")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    data = _data(stop)
    assert data["stopped"] == [f"proxy-{port}"]
    assert any("could not be removed" in w for w in data["warnings"])
    assert not _listening(port)


def test_a_database_deleted_under_the_daemon_is_noticed_and_never_written_blindly(
    flm_home: Path,
) -> None:
    """It once went unnoticed: the CLI made a new empty file, the daemon kept the old one."""
    import urllib.request

    port = free_port()
    assert flm_subprocess("proxy", "start", "--port", str(port)).returncode == 0
    try:
        for name in ("security.db", "security.db-wal", "security.db-shm"):
            (flm_home / name).unlink(missing_ok=True)
        assert flm_subprocess("api-keys", "create", "--label", "new").returncode == 0
        assert flm_subprocess("proxy", "reload").returncode == 0
        proxy = _data(flm_subprocess("proxy", "status"))["proxies"][0]
        # (the CLI made a new file in its place: replaced)
        assert "security.db was replaced by another file" in (proxy["last_error"] or "")
        # the request's audit record is refused, not written to the deleted file
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            assert resp.status == 200
        deadline = time.monotonic() + 10
        while True:
            audit = _data(flm_subprocess("proxy", "status"))["proxies"][0]["audit"]
            if audit["failing"]:
                break
            assert time.monotonic() < deadline, audit
        assert "was replaced" in audit["last_error"] and audit["unwritten"] >= 1
    finally:
        flm_subprocess("proxy", "stop", "--all")


def test_a_damaged_security_db_is_reported_when_a_proxy_starts(flm_home: Path) -> None:
    import sqlite3

    assert flm_subprocess("check").returncode == 0
    path = flm_home / "security.db"
    with sqlite3.connect(path) as db:
        # (a table a start does not read: the damage is found by the check, not by chance)
        db.executemany(
            "INSERT INTO intrusion_attempts(ts, ip, score, total_score, "
            "reasons_json, path, user_agent, request_id) VALUES "
            "('2026-01-01T00:00:00Z', ?, 1, 1, '[]', '/x', 'a', 'r')",
            [(f"198.51.100.{i % 250}",) for i in range(3000)],
        )
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    blob = bytearray(path.read_bytes())
    middle = (len(blob) // 4096 // 2) * 4096
    for i in range(middle + 100, middle + 300):
        blob[i] ^= 0x5A
    path.write_bytes(bytes(blob))
    port = free_port()
    start = flm_subprocess("proxy", "start", "--port", str(port))
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        described = _data(start)
        assert any("quick_check" in n for n in described["notes"])
        assert "quick_check" in (described["last_error"] or "")
    finally:
        flm_subprocess("proxy", "stop", "--all")


def test_settle_heap_takes_what_lives_out_of_the_collectors_scans() -> None:
    """What a proxy's start built is frozen: a full collection no longer walks it."""
    import gc

    from flm.core.heap import release_heap, settle_heap

    keep = [[i] for i in range(1000)]  # containers alive at the moment of the start
    assert any(o is keep for o in gc.get_objects())
    try:
        settle_heap()
        assert gc.get_freeze_count() >= 1000
        assert not any(o is keep for o in gc.get_objects())
        release_heap()  # (a proxy stopped: what it left can be collected again)
        assert gc.get_freeze_count() == 0
        assert any(o is keep for o in gc.get_objects())
    finally:
        gc.unfreeze()


def test_serving_raises_the_young_generations_threshold_until_the_last_proxy_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a proxy serves, a young collection waits for YOUNG_THRESHOLD net allocations
    (not CPython's 700, which the requests in flight at c=64 alone exceed); with two proxies
    in one process, the first to stop leaves it raised; the last restores what it found."""
    import gc

    from flm.core import heap
    from flm.core.heap import YOUNG_THRESHOLD, release_heap, settle_heap

    monkeypatch.setattr(heap, "_serving", 0)  # (no proxy of another test counted)
    monkeypatch.setattr(heap, "_found", None)
    found = gc.get_threshold()
    gc.set_threshold(700, found[1], found[2])
    try:
        settle_heap()
        assert gc.get_threshold() == (YOUNG_THRESHOLD, found[1], found[2])
        assert YOUNG_THRESHOLD > 700
        settle_heap()  # a second proxy in the same process
        release_heap()
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        release_heap()
        assert gc.get_threshold() == (700, found[1], found[2])
        release_heap()  # (one stop too many changes nothing)
        assert gc.get_threshold() == (700, found[1], found[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*found)
