"""The audit under pressure: a bounded queue with back-pressure, a bad record that costs only
itself, and a ``kill -9`` under load that loses at most the last batch."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from flm.services.runstate import pid_alive
from tests.conftest import flm_subprocess, small_tmpfs
from tests.security.conftest import Env
from tests.support import free_port


def _request(sink: Any, rid: str, model: str | None = "m", endpoint: str = "/v1/models") -> None:
    sink.request(
        1_700_000_000.0,
        rid,
        "127.0.0.1",
        None,
        endpoint,
        "POST",
        None,
        model,
        200,
        0.5,
        None,
        None,
        None,
    )


def test_a_bad_record_is_written_escaped_and_keeps_its_neighbours(tmp_path: Path) -> None:
    """A lone surrogate (JSON lets a client send ``"\\ud800"`` as a model name) cannot be
    encoded as UTF-8: it once failed the whole batch, blocklist rows included."""
    from flm.proxy.audit import AuditSink
    from flm.storage.db import Database

    db = Database(tmp_path / "security.db", "security").open()
    sink = AuditSink(db, tmp_path / "audit.jsonl", interval=60)
    try:
        _request(sink, "before")
        _request(sink, "bad-model", model="gpt\ud800x")
        _request(sink, "bad-path", endpoint="/v1/\udcff")
        sink.block("203.0.113.9", "auth_failures", 1_700_000_000.0, None, 5)
        sink.intrusion("203.0.113.9", 5, 5, ("scan",), "/wp-\ud800", "agent\udfff", "rid")
        _request(sink, "after")
        assert sink.flush() == 6
        rows = {r["request_id"]: r for r in db.query("SELECT * FROM audit_logs")}
        assert set(rows) == {"before", "bad-model", "bad-path", "after"}
        assert rows["bad-model"]["model"] == "gpt\\ud800x"
        assert rows["bad-path"]["endpoint"] == "/v1/\\udcff"
        assert [r["ip"] for r in db.query("SELECT ip FROM ip_blocklist")] == ["203.0.113.9"]
        intrusion = db.query_one("SELECT path, user_agent FROM intrusion_attempts")
        assert intrusion is not None and intrusion["path"] == "/wp-\\ud800"
        lines = (tmp_path / "audit.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["request_id"] for line in lines] == [
            "before",
            "bad-model",
            "bad-path",
            "after",
        ]
    finally:
        sink.close()
        db.close()


def test_a_large_batch_is_written_whole_in_order_by_multi_row_inserts(tmp_path: Path) -> None:
    """A batch longer than one multi-row INSERT (and not a multiple of it) is written whole,
    every row in order with its values, and a bad row in its middle still costs only
    itself."""
    from flm.proxy.audit import AuditSink
    from flm.storage import records
    from flm.storage.db import Database

    count = records._ROWS_PER_INSERT * 2 + 37
    db = Database(tmp_path / "security.db", "security").open()
    sink = AuditSink(db, tmp_path / "audit.jsonl", interval=60)
    try:
        for i in range(count):
            _request(sink, f"r{i}", model="bad\ud800" if i == count // 2 else f"m{i}")
        assert sink.flush() == count
        rows = db.query("SELECT request_id, model, status FROM audit_logs ORDER BY id")
        assert [r["request_id"] for r in rows] == [f"r{i}" for i in range(count)]
        assert [r["model"] for r in rows] == [
            "bad\\ud800" if i == count // 2 else f"m{i}" for i in range(count)
        ]
        assert {r["status"] for r in rows} == {200}
    finally:
        sink.close()
        db.close()


def test_a_record_that_cannot_be_formatted_or_stored_costs_only_itself(tmp_path: Path) -> None:
    """Whatever a record holds that breaks formatting or the database, its neighbours are
    written; the broken one leaves an ``audit_record_invalid`` event or a count."""
    from flm.proxy.audit import AuditSink
    from flm.storage.db import Database

    db = Database(tmp_path / "security.db", "security").open()
    sink = AuditSink(db, None, interval=60)
    try:
        _request(sink, "one")
        sink.request(
            1_700_000_000.0,
            "two",
            "127.0.0.1",
            None,
            "/x",
            "GET",
            None,
            None,
            object(),
            0.5,
            None,
            None,
            None,
        )  # type: ignore[arg-type]
        # (formats, but SQLite's integers stop at 2**63)
        sink.request(
            1_700_000_000.0,
            "huge",
            "127.0.0.1",
            None,
            "/x",
            "GET",
            None,
            None,
            200,
            0.5,
            2**70,
            None,
            None,
        )
        _request(sink, "three")
        assert sink.flush() == 4
        ids = [
            r["request_id"]
            for r in db.query("SELECT request_id FROM audit_logs WHERE event_type = 'request'")
        ]
        assert ids == ["one", "three"]
        invalid = db.query(
            "SELECT details_json FROM audit_logs WHERE event_type = 'audit_record_invalid'"
        )
        assert len(invalid) == 1 and "'two'" in json.loads(invalid[0][0])["record"]
        status = sink.status()
        assert status["rows_dropped"] == 1 and status["rows_invalid"] == 1
    finally:
        sink.close()
        db.close()


@contextmanager
def _writer_blocked(db_path: Path) -> Iterator[None]:
    """Another connection holds security.db's write lock: the audit's writer waits."""
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=5)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


async def _load(url: str, key: str, total: int, concurrency: int) -> list[tuple[int, str, str]]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(i: int) -> tuple[int, str, str]:
            async with (
                sem,
                session.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r,
            ):
                body = await r.read()
                code = json.loads(body)["error"]["code"] if r.status != 200 else ""
                return r.status, r.headers["X-Request-Id"], code

        return await asyncio.gather(*(one(i) for i in range(total)))


def _wait_for(what: str, check: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _request_ids(home: Path) -> set[str]:
    conn = sqlite3.connect(home / "security.db")
    try:
        return {
            r[0]
            for r in conn.execute("SELECT request_id FROM audit_logs WHERE event_type = 'request'")
        }
    finally:
        conn.close()


def test_a_blocked_writer_brings_back_pressure_and_the_queue_stays_bounded(
    env: Env, flm_home: Path
) -> None:
    sink = env.rt.audit
    assert sink is not None
    sink.limit = 64
    concurrency = 16
    results: list[tuple[int, str, str]] = []
    with _writer_blocked(flm_home / "security.db"):
        runner = threading.Thread(
            target=lambda: results.extend(asyncio.run(_load(env.gw.url, env.key, 600, concurrency)))
        )
        runner.start()
        # the gateway stops taking requests: they wait for room instead of queueing records
        _wait_for("requests waiting for audit room", lambda: sink.waits > 0)
        held = sink.unwritten()
        assert sink.limit <= held <= sink.limit + concurrency
        assert runner.is_alive()  # nobody is answered while the audit is full
    runner.join(timeout=60)
    assert not runner.is_alive()
    assert [s for s, _, _ in results] == [200] * 600
    # the queue never held more than the bound plus the requests already in flight
    assert sink.peak_queued <= sink.limit + concurrency
    _wait_for(
        "every answered request's row",
        lambda: sink.flush() >= 0 and {rid for _, rid, _ in results} <= _request_ids(flm_home),
    )


def test_a_slow_writer_makes_requests_wait_before_a_second_of_them_is_unwritten(
    env: Env, flm_home: Path
) -> None:
    """At a low rate the count bound is far away: the age bound (MAX_AGE_S) holds instead."""
    import http.client

    from flm.proxy.audit import MAX_AGE_S

    sink = env.rt.audit
    assert sink is not None
    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:  # one request at a time, until told to stop
        conn = http.client.HTTPConnection("127.0.0.1", env.gw.port, timeout=30)
        while not stop.is_set():
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {env.key}"})
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
        conn.close()

    runner = threading.Thread(target=client)
    with _writer_blocked(flm_home / "security.db"):
        runner.start()
        _wait_for("a request waiting for audit room", lambda: sink.waits > 0)
        assert sink.unwritten() < sink.limit  # (the count bound is not what stopped it)
        assert MAX_AGE_S < sink.oldest_age() < 1.0 + MAX_AGE_S
        assert runner.is_alive()
    stop.set()
    runner.join(timeout=60)
    assert statuses and set(statuses) == {200}


def test_a_request_that_waited_too_long_is_refused_and_counted(env: Env, flm_home: Path) -> None:
    sink = env.rt.audit
    assert sink is not None
    sink.limit = 16
    sink.room_wait_s = 0.2
    with _writer_blocked(flm_home / "security.db"):
        results = asyncio.run(_load(env.gw.url, env.key, 200, 32))
    refused = [r for r in results if r[0] == 503]
    assert refused and all(code == "audit_unavailable" for _, _, code in refused)
    assert sink.refused == len(refused)
    answered = {rid for status, rid, _ in results if status == 200}
    assert answered

    def recorded() -> bool:
        sink.flush()
        conn = sqlite3.connect(flm_home / "security.db")
        try:
            row = conn.execute(
                "SELECT details_json FROM audit_logs WHERE event_type = 'audit_overload'"
            ).fetchall()
        finally:
            conn.close()
        counts = sum(json.loads(r[0])["refused_requests"] for r in row)
        return counts == len(refused) and answered <= _request_ids(flm_home)

    _wait_for("the refusals' count and every answered request's row", recorded)
    metrics = env.request("GET", "/metrics")[2].decode()
    assert f"flm_audit_refused_requests_total {float(len(refused))}" in metrics


def test_kill_9_under_load_loses_at_most_the_last_batch(flm_home: Path, cli: Any) -> None:
    """Every request answered more than a second before a ``kill -9`` of the daemon has its
    audit row (the flusher commits at least every 0.2 s, and the bound caps the batch)."""
    key = cli("api-keys", "create", "--label", "load").data["key"]
    port = free_port()
    start = flm_subprocess("proxy", "start", "--port", str(port))
    assert start.returncode == 0, start.stdout + start.stderr
    info = json.loads((flm_home / "run" / "proxy-daemon.json").read_text())
    url = f"http://127.0.0.1:{port}"
    answered: list[tuple[float, str]] = []

    async def load(stop_at: float) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:

            async def client() -> None:
                while time.monotonic() < stop_at:
                    try:
                        async with session.get(
                            url + "/v1/models", headers={"Authorization": f"Bearer {key}"}
                        ) as r:
                            await r.read()
                            if r.status == 200:
                                answered.append((time.monotonic(), r.headers["X-Request-Id"]))
                    except aiohttp.ClientError:
                        return

            await asyncio.gather(*(client() for _ in range(16)))

    runner = threading.Thread(target=lambda: asyncio.run(load(time.monotonic() + 30)))
    runner.start()

    def settled_load() -> bool:
        # (answers more than a second old are the ones the bound is about: wait for many of
        # them, however fast or slow the machine answers)
        settled = time.monotonic() - 1.2
        return sum(1 for at, _ in list(answered) if at < settled) >= 1000

    try:
        _wait_for("load answered more than a second ago", settled_load, timeout=30)
    finally:
        killed_at = time.monotonic()
        os.kill(info["pid"], signal.SIGKILL)
    runner.join(timeout=30)
    _wait_for("the daemon to die", lambda: not pid_alive(info["pid"]))
    recorded = _request_ids(flm_home)
    old = [rid for at, rid in answered if at < killed_at - 1.0]
    missing = [rid for rid in old if rid not in recorded]
    assert old and not missing, f"{len(missing)} of {len(old)} answered requests lost"
    flm_subprocess("proxy", "status")  # (cleans the dead daemon's files up)


@pytest.mark.parametrize("row_count", [3])
def test_status_reports_a_failing_database_and_the_gap_once_it_works(
    tmp_path: Path, row_count: int
) -> None:
    """A write that fails keeps the batch (bounded, see the back-pressure tests), and once
    writes work again one ``audit_gap`` event records how many records were delayed."""
    from flm.proxy.audit import AuditSink
    from flm.storage.db import Database

    db = Database(tmp_path / "security.db", "security").open()
    sink = AuditSink(db, None, interval=60)
    try:
        db.write(lambda conn: None)  # (the writer thread is up)
        with _writer_blocked(tmp_path / "security.db"):
            import flm.storage.db as dbmod

            old = dbmod.LOCK_DEADLINE_S
            dbmod.LOCK_DEADLINE_S = 0.05
            try:
                for i in range(row_count):
                    _request(sink, f"r{i}")
                assert sink.flush() == 0
            finally:
                dbmod.LOCK_DEADLINE_S = old
        status = sink.status()
        assert status["failing"] and status["unwritten"] == row_count
        assert "locked" in status["last_error"]
        assert sink.flush() == row_count  # the kept batch, written
        assert not sink.status()["failing"]
        sink.flush()  # the gap event
        gap = db.query("SELECT details_json FROM audit_logs WHERE event_type = 'audit_gap'")
        assert len(gap) == 1 and json.loads(gap[0][0])["delayed_records"] == row_count
        ids = [
            r[0] for r in db.query("SELECT request_id FROM audit_logs WHERE event_type = 'request'")
        ]
        assert ids == [f"r{i}" for i in range(row_count)]
    finally:
        sink.close()
        db.close()


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until the file system is full."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError:
                break
        while True:  # the last few bytes
            try:
                f.write(b"\0" * 512)
            except OSError:
                break


def test_a_full_disk_delays_records_counts_the_gap_and_loses_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Any
) -> None:
    import http.client

    from flm.testing.emulators import start_emulator
    from flm.testing.gateway import start_gateway

    with small_tmpfs(tmp_path / "small", "8m") as disk:
        home = disk / "home"
        home.mkdir(mode=0o700)
        monkeypatch.setenv("FLM_HOME", str(home))
        with start_emulator("vllm", models=["m:1"]) as emu:
            cli("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "eng")
            key = cli("api-keys", "create", "--label", "disk").data["key"]
            with start_gateway() as gw:
                sink = gw.runtime.audit
                assert sink is not None
                conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)

                def one() -> tuple[int, str]:
                    conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
                    response = conn.getresponse()
                    response.read()
                    return response.status, response.headers["X-Request-Id"]

                answered = [one()[1]]
                _wait_for("the first row", lambda: sink.flush() >= 0 and bool(_request_ids(home)))
                filler = disk / "filler"
                _fill(filler)
                deadline = time.monotonic() + 60
                while sink.status()["delayed_records"] == 0:
                    assert time.monotonic() < deadline, sink.status()
                    status, rid = one()
                    assert status == 200
                    answered.append(rid)
                status = sink.status()
                assert status["failing"] and "full" in (status["last_error"] or "").lower()
                conn.request("GET", "/metrics")
                metrics = conn.getresponse().read().decode()
                assert "flm_audit_failing 1.0" in metrics
                filler.unlink()  # space returns

                def gap() -> list[Any]:
                    sink.flush()
                    db = sqlite3.connect(home / "security.db")
                    try:
                        return db.execute(
                            "SELECT details_json FROM audit_logs WHERE event_type = 'audit_gap'"
                        ).fetchall()
                    finally:
                        db.close()

                _wait_for("the audit_gap event", lambda: bool(gap()), timeout=30)
                details = json.loads(gap()[0][0])
                assert details["delayed_records"] >= 1 and "full" in details["cause"].lower()
                assert set(answered) <= _request_ids(home)  # nothing lost
                assert not sink.status()["failing"]
                conn.close()
