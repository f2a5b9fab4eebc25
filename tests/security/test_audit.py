"""The audit trail: one row per request, nothing secret in it; blocklist and audit commands;
changes reach a running daemon without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flm.testing.emulators import start_emulator
from tests.conftest import flm_subprocess
from tests.security.conftest import Env
from tests.support import free_port, wait_until

SECRET_PROMPT = "the-secret-prompt-text-7f3a9"


def _flush_until(env: Env, home: Path, count: int) -> None:
    """The audit record of a request is queued just after its response is sent: poll (with a
    deadline) until ``count`` request rows are in the table."""
    import time

    deadline = time.monotonic() + 10
    while True:
        env.rt.audit.flush()  # type: ignore[union-attr]
        conn = sqlite3.connect(home / "security.db")
        n = conn.execute("SELECT COUNT(*) FROM audit_logs WHERE event_type='request'").fetchone()
        conn.close()
        if n[0] >= count:
            return
        assert time.monotonic() < deadline, f"only {n[0]} of {count} audit rows"
        time.sleep(0.01)


def test_burst_of_1000_has_exactly_one_row_each(env: Env, flm_home: Path) -> None:
    async def burst() -> list[str]:
        import aiohttp

        body = {"model": "flm://eng/m:1", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
        sem = asyncio.Semaphore(32)
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> str:
                async with sem:
                    if i % 10 == 0:
                        req = session.get(
                            env.gw.url + "/v1/models", headers={"Authorization": "Bearer wrong"}
                        )
                    else:
                        req = session.post(
                            env.gw.url + "/v1/chat/completions",
                            json=body,
                            headers={"Authorization": f"Bearer {env.key}"},
                        )
                    async with req as r:
                        await r.read()
                        return r.headers["X-Request-Id"]

            return await asyncio.gather(*(one(i) for i in range(1000)))

    ids = asyncio.run(burst())
    assert len(set(ids)) == 1000
    _flush_until(env, flm_home, 1000)
    conn = sqlite3.connect(flm_home / "security.db")
    conn.row_factory = sqlite3.Row
    rows = conn.execute("SELECT * FROM audit_logs WHERE event_type = 'request'").fetchall()
    by_id: dict[str, list[Any]] = {}
    for row in rows:
        by_id.setdefault(row["request_id"], []).append(row)
    assert set(by_id) == set(ids)
    assert all(len(v) == 1 for v in by_id.values())
    chat = next(r[0] for r in by_id.values() if r[0]["endpoint"] == "/v1/chat/completions")
    for field in (
        "ts",
        "request_id",
        "client_ip",
        "api_key_id",
        "endpoint",
        "engine_id",
        "model",
        "status",
        "latency_ms",
        "prompt_tokens",
        "completion_tokens",
    ):
        assert chat[field] is not None, field
    assert chat["status"] == 200 and chat["engine_id"] == "eng"
    assert chat["model"] == "flm://eng/m:1" and chat["client_ip"] == "127.0.0.1"
    refused = [r[0] for r in by_id.values() if r[0]["status"] == 401]
    assert len(refused) == 100 and all(r["error_type"] == "invalid_api_key" for r in refused)
    events = conn.execute(
        "SELECT COUNT(*) FROM audit_logs WHERE event_type = 'auth_failure'"
    ).fetchone()[0]
    assert events == 100
    with pytest.raises(sqlite3.DatabaseError):
        conn.execute("UPDATE audit_logs SET status = 0")
    with pytest.raises(sqlite3.DatabaseError):
        conn.execute("DELETE FROM audit_logs")
    conn.close()
    # neither the key nor the prompt is stored anywhere: database, WAL, JSON Lines logs
    secret = env.key.split("_", 2)[2].encode()
    files = [p for p in flm_home.rglob("*") if p.is_file()]
    assert any(p.name == "audit.jsonl" for p in files)
    assert any(p.name == "security.db-wal" for p in files)
    for path in files:
        blob = path.read_bytes()
        assert secret not in blob, path
        assert SECRET_PROMPT.encode() not in blob, path
    lines = (flm_home / "logs" / "audit.jsonl").read_text().splitlines()
    assert sum(1 for line in lines if json.loads(line)["event_type"] == "request") == 1000


def test_a_key_pasted_into_the_model_is_not_recorded(env: Env, flm_home: Path) -> None:
    status, _, _ = env.request(
        "POST",
        "/v1/chat/completions",
        body={"model": f"flm://eng/{env.key}", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 404
    _flush_until(env, flm_home, 1)
    conn = sqlite3.connect(flm_home / "security.db")
    [(model,)] = conn.execute("SELECT model FROM audit_logs WHERE event_type = 'request'")
    conn.close()
    assert model.startswith("flm://eng/") and "[redacted]" in model
    # ... and one pasted where the engine id goes (flm://<key>/m) is not recorded either
    status, _, _ = env.request(
        "POST",
        "/v1/chat/completions",
        body={"model": f"flm://{env.key}/m", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status in (400, 404)
    _flush_until(env, flm_home, 2)
    secret = env.key.split("_", 2)[2].encode()
    for path in (p for p in flm_home.rglob("*") if p.is_file()):
        assert secret not in path.read_bytes(), path


def test_export_and_archive(env: Env, tmp_path: Path, flm_home: Path) -> None:
    for _ in range(3):
        env.chat()
    _flush_until(env, flm_home, 3)
    cli = env.cli
    listed = cli("security", "audit-logs", "--event-type", "request", "--limit", "2").data
    assert len(listed) == 2
    out = tmp_path / "audit.csv"
    exported = cli("security", "audit-logs", "export", "--format", "csv", "--output", str(out))
    assert exported.data["rows"] >= 3 and out.read_text().startswith("id,")
    assert (out.stat().st_mode & 0o777) == 0o600
    js = tmp_path / "audit.json"
    cli("security", "audit-logs", "export", "--format", "json", "--output", str(js))
    assert len(json.loads(js.read_text())) >= 3
    # the whole trail unless --limit/--offset say otherwise
    everything = [r["id"] for r in json.loads(js.read_text())]
    assert (
        cli(
            "security",
            "audit-logs",
            "export",
            "--format",
            "json",
            "--output",
            str(js),
            "--limit",
            "2",
            "--offset",
            "1",
        ).data["rows"]
        == 2
    )
    assert [r["id"] for r in json.loads(js.read_text())] == everything[1:3]
    for command in (["intrusion"], ["anomaly"], ["audit-logs"]):
        refused = cli("security", *command, "--limit", "-1")
        assert refused.code == 1 and refused.error["code"] == "INVALID_ARGUMENT", command
    # a year before 1000 is still before every row (dates compare as text: "0999" < "2026")
    early = cli("security", "audit-logs", "archive", "--before", "0999-01-01").data
    assert early["archived"] == 0
    assert cli("security", "audit-logs", "--since", "0999-01-01").data != []
    archived = cli("security", "audit-logs", "archive", "--before", "2999-01-01").data
    assert archived["archived"] >= 3
    assert len(Path(archived["file"]).read_text().splitlines()) == archived["archived"]
    assert cli("security", "audit-logs").data == []


def _get(url: str, key: str, source: str = "127.0.0.1") -> int:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(
        parts.hostname, parts.port, timeout=10, source_address=(source, 0)
    )
    try:
        conn.request("GET", parts.path, headers={"Authorization": f"Bearer {key}"})
        return conn.getresponse().status
    finally:
        conn.close()


def test_blocklist_commands_reach_the_daemon(flm_home: Path, tmp_path: Path) -> None:
    port = free_port()
    with start_emulator("vllm", models=["m"]) as emu:
        flm_subprocess("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "v")
        key = json.loads(flm_subprocess("api-keys", "create", "--label", "k").stdout)["data"]
        policy = tmp_path / "p.json"
        policy.write_text(
            json.dumps(
                {"ip_blocklist": {"enabled": True, "max_failures": 2, "exempt_loopback": False}}
            )
        )
        assert flm_subprocess("security", "policy", "set", "--file", str(policy)).returncode == 0
        assert flm_subprocess("proxy", "start", "--port", str(port)).returncode == 0
        try:
            url = f"http://127.0.0.1:{port}/v1/models"
            assert _get(url, "bad", "127.0.0.20") == 401
            assert _get(url, "bad", "127.0.0.20") == 401  # 2nd failure blocks
            assert _get(url, key["key"], "127.0.0.20") == 403
            flm_subprocess("proxy", "reload")  # flushes the block to the table
            listed = json.loads(flm_subprocess("security", "ip-blocklist", "list").stdout)
            assert [b["ip"] for b in listed["data"]] == ["127.0.0.20"]
            unblocked = flm_subprocess("security", "ip-blocklist", "unblock", "127.0.0.20")
            assert unblocked.returncode == 0
            assert _get(url, key["key"], "127.0.0.20") == 200  # no restart, no wait
            assert _get(url, "bad", "127.0.0.21") == 401
            assert _get(url, "bad", "127.0.0.21") == 401
            flm_subprocess("proxy", "reload")
            cleared = json.loads(flm_subprocess("security", "ip-blocklist", "clear").stdout)
            assert cleared["data"]["cleared"] == 1
            assert _get(url, key["key"], "127.0.0.21") == 200
            # a policy change applies at once too
            policy.write_text(json.dumps({"ip_whitelist": ["10.0.0.0/8"]}))
            flm_subprocess("security", "policy", "set", "--file", str(policy))
            assert _get(url, key["key"]) == 403
            missing = flm_subprocess("security", "ip-blocklist", "unblock", "1.2.3.4")
            assert missing.returncode == 1
        finally:
            flm_subprocess("proxy", "stop", "--all")


def test_json_lines_roll_over_without_losing_records(tmp_path: Path) -> None:
    from flm.proxy.audit import AuditSink

    sink = AuditSink(None, tmp_path / "audit.jsonl", interval=60)
    sink.rotate_bytes = 4096
    try:
        for i in range(200):
            sink.request(
                1.0,
                f"r{i}",
                "127.0.0.1",
                None,
                "/v1/models",
                "GET",
                None,
                None,
                200,
                1.0,
                None,
                None,
                None,
            )
            if i % 20 == 19:
                sink.flush()
        sink.flush()
    finally:
        sink.close()
    files = sorted(tmp_path.glob("audit*.jsonl"))
    assert len(files) > 2
    ids = [json.loads(line)["request_id"] for f in files for line in f.read_text().splitlines()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(200))
    assert all((f.stat().st_mode & 0o777) == 0o600 for f in files)


def test_retention_archives_old_rows_only(cli: Any, flm_home: Path) -> None:
    from datetime import UTC, datetime

    from flm.core.paths import Paths
    from flm.services.security_records import SecurityEvents
    from flm.storage import Storage

    cli("check")
    conn = sqlite3.connect(flm_home / "security.db")
    conn.executemany(
        "INSERT INTO audit_logs(ts, endpoint, status) VALUES (?, '/x', 200)",
        [
            ("2026-01-01T00:00:00.000Z",),
            ("2026-01-02T00:00:00.000Z",),
            ("2026-01-09T00:00:00.000Z",),
        ],
    )
    conn.commit()
    conn.close()
    storage = Storage(Paths.resolve())
    try:
        events = SecurityEvents(storage)
        now = datetime(2026, 1, 10, tzinfo=UTC)
        result = events.apply_retention(7, now)
        assert result is not None and result["archived"] == 2
        assert len(Path(result["file"]).read_text().splitlines()) == 2
        assert events.apply_retention(7, now) is None  # nothing old is left
        assert [r["ts"] for r in events.audit_logs()] == ["2026-01-09T00:00:00.000Z"]
    finally:
        storage.close()


def test_flusher_slices_keep_every_record_in_order_with_exact_timestamps(tmp_path: Path) -> None:
    from flm.proxy.audit import SLICE, AuditSink

    sink = AuditSink(None, tmp_path / "audit.jsonl", interval=60)
    count = SLICE * 5 + 3
    try:
        for i in range(count):
            sink.request(
                1_700_000_000 + i / 7,
                f"r{i}",
                "127.0.0.1",
                None,
                "/v1/models",
                "GET",
                None,
                None,
                200,
                1.0,
                None,
                None,
                None,
            )
        assert sink.flush(pause=True) == count
    finally:
        sink.close()
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["request_id"] for r in records] == [f"r{i}" for i in range(count)]
    for i, r in enumerate(records):
        ts = 1_700_000_000 + i / 7
        expected = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
        )
        assert r["ts"] == expected


def _count_pauses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from flm.proxy import audit

    pauses = [0]

    def pause() -> bool:
        pauses[0] += 1
        return True

    monkeypatch.setattr(audit, "_pause", pause)
    return pauses


def test_flusher_pauses_every_slice_for_a_normal_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flm.proxy.audit import SLICE, AuditSink

    pauses = _count_pauses(monkeypatch)
    sink = AuditSink(None, tmp_path / "audit.jsonl", interval=60)
    try:
        for i in range(SLICE * 5 + 3):
            sink.event("intrusion", "low", "127.0.0.1", {"n": i})
        sink.flush(pause=True)
    finally:
        sink.close()
    assert pauses[0] == 5  # the loop never waits longer than one slice for the GIL


@pytest.mark.parametrize("verdict", [True, False], ids=["idle-loop", "saturated-loop"])
def test_a_paced_batch_is_written_in_short_statements_with_pauses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verdict: bool
) -> None:
    """SQLite's work on a batch is milliseconds of CPU: a batch formatted with pauses is
    written a few dozen rows a statement with a pause between statements, until a pause
    reports a saturated loop; every row is written, in order, either way."""
    from flm.core import threads
    from flm.proxy import audit
    from flm.proxy.audit import SLICE, AuditSink
    from flm.storage.db import Database
    from flm.storage.records import MAX_PACED_STATEMENTS, PACED_ROWS

    calls: list[str] = []

    def pause() -> bool:
        calls.append("pause")
        return verdict

    monkeypatch.setattr(audit, "_pause", pause)
    # (the writer at its normal priority: in the idle class it hands the GIL over without a
    # pause, see test_a_calm_batch_is_written_in_the_idle_class)
    monkeypatch.setattr(threads, "_may_idle", False)
    db = Database(tmp_path / "security.db", "security").open()
    count = PACED_ROWS * 4 + 5
    sink = AuditSink(db, tmp_path / "audit.jsonl", interval=60)
    try:
        for i in range(count):
            sink.event("intrusion", "low", "127.0.0.1", {"n": i})
        assert sink.flush(pause=True) == count
        formatting = count // SLICE if verdict else 1
        writing = (-(-count // PACED_ROWS) - 1) if verdict else 0
        assert len(calls) == formatting + writing
        assert -(-count // PACED_ROWS) <= MAX_PACED_STATEMENTS
        rows = db.query("SELECT details_json FROM audit_logs ORDER BY id")
        assert [json.loads(r[0])["n"] for r in rows] == list(range(count))
        calls.clear()
        for i in range(count):
            sink.event("intrusion", "low", "127.0.0.1", {"n": i})
        assert sink.flush() == count  # (not the flusher thread: no pauses at all)
        assert calls == []
    finally:
        sink.close()
        db.close()


def test_flusher_stops_pausing_once_a_pause_shows_a_saturated_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pause that gets the GIL back only after a switch interval means the loop is busy
    all the time: the rest of the batch is formatted without pauses (each would cost the
    flusher another switch interval), and every record is still written, in order."""
    from flm.proxy import audit
    from flm.proxy.audit import SLICE, AuditSink

    pauses = [0]

    def slow_pause() -> bool:  # what a pause reports when the loop holds the GIL
        pauses[0] += 1
        return False

    monkeypatch.setattr(audit, "_pause", slow_pause)
    count = SLICE * 5 + 3
    sink = AuditSink(None, tmp_path / "audit.jsonl", interval=60)
    try:
        for i in range(count):
            sink.event("intrusion", "low", "127.0.0.1", {"n": i})
        assert sink.flush(pause=True) == count
    finally:
        sink.close()
    assert pauses[0] == 1
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [json.loads(json.loads(line)["details_json"])["n"] for line in lines] == list(
        range(count)
    )


@pytest.mark.parametrize("size", ["backlog", "above_high_water"])
def test_flusher_keeps_up_with_a_backlog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: str
) -> None:
    """Each pause costs a GIL hand-off (up to the 5 ms switch interval on a busy loop): a
    backlog gets at most MAX_PAUSES of them, and one above HIGH_WATER none, so the queue
    cannot outgrow what the flusher writes; every record is still written, in order."""
    from flm.proxy.audit import HIGH_WATER, MAX_PAUSES, SLICE, AuditSink

    pauses = _count_pauses(monkeypatch)
    count = SLICE * MAX_PAUSES * 4 if size == "backlog" else HIGH_WATER + 1
    sink = AuditSink(None, tmp_path / "audit.jsonl", interval=60)
    try:
        for i in range(count):  # (event() does not wake the flusher: this test flushes)
            sink.event("intrusion", "low", "127.0.0.1", {"n": i})
        assert sink.flush(pause=True) == count
    finally:
        sink.close()
    assert pauses[0] == (MAX_PAUSES if size == "backlog" else 0)
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert [json.loads(json.loads(line)["details_json"])["n"] for line in lines] == list(
        range(count)
    )


@pytest.mark.parametrize(
    "row",
    [
        (
            "2026-01-01T00:00:00.000Z",
            "r1",
            "::1",
            None,
            '/v1/\u00e9"\\\n\x01\u2028',
            "POST",
            None,
            "m\U0001f600",
            200,
            0.412,
            5,
            None,
            "engine_error",
            "request",
            "info",
            None,
        ),
        (
            "t",
            "r",
            "ip",
            "key",
            "/p",
            "GET",
            "e",
            "m",
            599,
            1e-07,
            0,
            2**70,
            None,
            "event",
            "high",
            '{"a": [1, "x"]}',
        ),
        (
            "t",
            "r",
            "ip",
            "key",
            "/p",
            "GET",
            "e",
            "m",
            True,
            float("nan"),
            -1,
            0,
            None,
            "e",
            "s",
            None,
        ),
        (
            "t",
            "r",
            "ip",
            "key",
            "/p",
            "GET",
            "e",
            "m",
            200,
            float("inf"),
            1.5,
            0,
            None,
            "e",
            "s",
            None,
        ),
    ],
)
def test_audit_lines_are_what_the_json_encoder_makes(row: tuple[Any, ...]) -> None:
    from flm.proxy.audit import _AUDIT_COLUMNS, _LINE, _line

    assert _line(row) == _LINE.encode(dict(zip(_AUDIT_COLUMNS, row, strict=True)))


def test_scrub_memo_keeps_clean_texts_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from flm.proxy import audit

    monkeypatch.setattr(audit, "_clean", {})
    key = "flm_0123456789abcdef_" + "A" * 43
    for _ in range(2):  # the second time answers from the memo (clean) or scrubs again
        assert audit._scrub("/v1/models") == "/v1/models"
        assert audit._scrub(f"flm://{key}/m") == "flm://[redacted]/m"
    assert list(audit._clean) == ["/v1/models"]  # a text that held a key is never kept
    long_path = "/" + "a" * audit._CLEAN_TEXT_MAX
    assert audit._scrub(long_path) == long_path
    assert long_path not in audit._clean  # long texts are not kept: the memo stays small
    for i in range(audit._CLEAN_MAX + 100):
        audit._scrub(f"/p{i}")
    assert len(audit._clean) <= audit._CLEAN_MAX


def test_a_pause_reports_a_loop_that_keeps_the_gil() -> None:
    """A helper's pause while another thread runs Python without a break gets the GIL back
    only when the interpreter forces a switch: the pause says so (False), and the helper
    then works on without pauses."""
    from flm.core import threads

    started = threading.Event()
    stop = threading.Event()

    def busy_loop() -> None:
        started.set()
        while not stop.is_set():
            sum(range(100))  # Python work that never gives the GIL up of itself

    spinner = threading.Thread(target=busy_loop, daemon=True)
    spinner.start()
    try:
        assert started.wait(5)
        # (a busy machine may not run the spinner within one pause, or many: it holds the GIL
        # in most, so the first few usually tell; the deadline only bounds a failing run)
        deadline = time.monotonic() + 10
        while threads.pause() is not False:
            assert time.monotonic() < deadline, "no pause found the GIL held"
    finally:
        stop.set()
        spinner.join(5)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priority is Linux only")
def test_helper_threads_run_at_lower_cpu_priority_than_the_loop(tmp_path: Path) -> None:
    from flm.core.threads import BACKGROUND_NICE
    from flm.proxy.audit import AuditSink
    from flm.storage.db import Database

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if base >= 19:
        pytest.skip("the test runs at the lowest CPU priority already (nice 19)")
    want = min(19, base + BACKGROUND_NICE)  # niceness stops at 19
    db = Database(tmp_path / "t.db", "security").open()
    sink = AuditSink(db, None, interval=60)
    try:
        db.write(lambda conn: None)  # starts the writer thread
        deadline = time.monotonic() + 5
        nice = {}
        while time.monotonic() < deadline:
            nice = {
                t.name: os.getpriority(os.PRIO_PROCESS, t.native_id or 0)
                for t in threading.enumerate()
                if t.name.startswith("flm-")
            }
            if nice.get("flm-audit") == nice.get("flm-writer-security") == want:
                break
            time.sleep(0.01)
        assert want > base and nice.get("flm-audit") == want, nice
        assert nice.get("flm-writer-security") == want, nice
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    finally:
        sink.close()
        db.close()


def test_database_keeps_the_batch_when_the_json_lines_file_cannot(tmp_path: Path) -> None:
    from flm.proxy.audit import AuditSink
    from flm.storage.db import Database

    db = Database(tmp_path / "security.db", "security").open()
    blocked = tmp_path / "audit.jsonl"
    blocked.mkdir()  # a directory where the file should be: every write fails
    sink = AuditSink(db, blocked, interval=60)
    try:
        for i in range(3):
            sink.request(
                1.0,
                f"r{i}",
                "127.0.0.1",
                None,
                "/v1/models",
                "GET",
                None,
                None,
                200,
                0.1,
                None,
                None,
                None,
            )
        assert sink.flush() == 3  # (the failure is reported, not raised)
        rows = db.query("SELECT request_id FROM audit_logs ORDER BY request_id")
        assert [r["request_id"] for r in rows] == ["r0", "r1", "r2"]
        status = sink.status()
        assert status["lines_lost"] == 3 and status["failing"]
        assert "Is a directory" in status["last_error"]
    finally:
        sink._path = None  # (let close() finish)
        sink.close()
        db.close()


def test_csv_export_never_hands_a_spreadsheet_a_formula(
    env: Env, tmp_path: Path, flm_home: Path
) -> None:
    import csv

    for path in ("/=HYPERLINK(1)", "/+cmd", "/plain"):
        env.request("GET", "/v1/models" + path)
    # (a client can no longer put a formula in the engine part of a model id: it is refused
    # as an invalid model, so the row that carries one is handed to the sink directly)
    status, _, _ = env.request(
        "POST",
        "/v1/chat/completions",
        body={"model": 'flm://=HYPERLINK("x")/m', "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 400
    env.rt.audit.request(
        time.time(),
        "req_formula",
        "127.0.0.1",
        None,  # type: ignore[union-attr]
        "/v1/chat/completions",
        "POST",
        '=HYPERLINK("x")',
        "flm://x/m",
        404,
        1.0,
        None,
        None,
        "model_not_found",
    )
    _flush_until(env, flm_home, 5)
    out = tmp_path / "audit.csv"
    env.cli("security", "audit-logs", "export", "--format", "csv", "--output", str(out))
    with out.open(newline="") as fh:
        cells = [cell for row in csv.reader(fh) for cell in row]
    assert any(cell.startswith("'=HYPERLINK") for cell in cells)
    assert not any(cell[:1] in ("=", "+", "@") for cell in cells)


def test_a_request_line_is_written_as_the_general_way_writes_it() -> None:
    """The request's JSON line, built by one format, equals the general line of its row for
    every kind of value (texts needing escapes, None, odd floats; unexpected types take the
    general way)."""
    from flm.proxy import audit

    rng = random.Random(5)
    texts = ["", "é", 'a"b', "\\", "\u2028", "日本", "x" * 300, "\ud800"]
    batch = audit._Batch()
    for _ in range(5000):
        item = (
            time.time() + rng.random() * 1e6,
            rng.choice(texts),
            rng.choice(texts),
            rng.choice([None, "0123456789abcdef", 5]),
            rng.choice(texts),
            rng.choice(["GET", "POST"]),
            rng.choice([None, *texts]),
            rng.choice([None, *texts]),
            rng.choice([200, 401, 500]),
            rng.choice([0.0, 1e-7, 12.3456, 1e20, float("inf"), float("nan")]),
            rng.choice([None, 0, 5, 10**15, True]),
            rng.choice([None, 3]),
            rng.choice([None, "engine_error"]),
        )
        row = audit._format_one("request", item, batch)
        assert row is not None
        line = audit._request_line(row)
        assert line == audit._line(row)
        assert json.loads(line)["event_type"] == "request"


needs_idle_class = pytest.mark.skipif(
    not __import__("flm.core.threads", fromlist=["may_idle"]).may_idle(),
    reason="this process may not move a thread out of the idle scheduling class "
    "(Linux with CAP_SYS_NICE or RLIMIT_NICE >= 15 needed)",
)


@needs_idle_class
def test_a_calm_batch_is_written_in_the_idle_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paced batch is written, and committed, by a database writer in the idle class (the
    loop gets the CPU the moment it wakes); the writer is back at its normal priority, nice
    value kept, for the jobs after it, and every row is there."""
    from flm.core.threads import BACKGROUND_NICE
    from flm.proxy import audit
    from flm.proxy.audit import AuditSink
    from flm.storage import records
    from flm.storage.db import Database

    seen: list[int] = []
    insert = records._insert_isolated

    def watched(*args: Any, **kwargs: Any) -> None:
        seen.append(os.sched_getscheduler(0))
        insert(*args, **kwargs)

    monkeypatch.setattr(records, "_insert_isolated", watched)
    # (a calm loop, whatever else this machine runs: the batch is paced)
    monkeypatch.setattr(audit, "_pause", lambda: True)
    db = Database(tmp_path / "security.db", "security").open()
    sink = AuditSink(db, tmp_path / "audit.jsonl", interval=60)
    try:
        for i in range(100):
            sink.event("intrusion", "low", "127.0.0.1", {"n": i})
        assert sink.flush(pause=True) == 100
        assert seen == [os.SCHED_IDLE]
        after = db.write(
            lambda conn: (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))
        )
        assert after[0] == os.SCHED_OTHER
        assert after[1] >= BACKGROUND_NICE
        assert db.idling.idle is False
        seen.clear()
        for i in range(100):
            sink.event("intrusion", "low", "127.0.0.1", {"n": 100 + i})
        assert sink.flush() == 100  # (no pauses asked: the writer stays at normal priority)
        assert seen == [os.SCHED_OTHER]
        assert db.query("SELECT COUNT(*) FROM audit_logs")[0][0] == 200
    finally:
        sink.close()
        db.close()


@contextlib.contextmanager
def _writer_held_mid_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watch_s: float
) -> Iterator[tuple[Any, Any, threading.Event]]:
    """A paced batch of 50 records (a calm loop, whatever else this machine runs) whose
    writer, in the idle class, is held inside its first insert until the yielded event is
    set: (sink, db, go_on). The flusher looks at the writer every ``watch_s``."""
    from flm.proxy import audit
    from flm.proxy.audit import AuditSink
    from flm.storage import records
    from flm.storage.db import Database

    inside = threading.Event()
    go_on = threading.Event()
    insert = records._insert_isolated

    def held(*args: Any, **kwargs: Any) -> None:
        inside.set()
        assert go_on.wait(10)
        insert(*args, **kwargs)

    monkeypatch.setattr(records, "_insert_isolated", held)
    monkeypatch.setattr(records, "WATCH_S", watch_s)
    monkeypatch.setattr(audit, "_pause", lambda: True)
    db = Database(tmp_path / "security.db", "security").open()
    sink = AuditSink(db, tmp_path / "audit.jsonl", interval=60)
    flusher = threading.Thread(target=lambda: sink.flush(pause=True), daemon=True)
    try:
        for i in range(50):
            sink.event("intrusion", "low", "127.0.0.1", {"n": i})
        flusher.start()
        assert inside.wait(10)
        assert db.idling.tid is not None
        yield sink, db, go_on
    finally:
        go_on.set()
        if flusher.is_alive():
            flusher.join(10)
        sink.close()
        db.close()


def _written(db: Any) -> list[int]:
    return [
        json.loads(r[0])["n"] for r in db.query("SELECT details_json FROM audit_logs ORDER BY id")
    ]


def _promoted_then_written(db: Any, go_on: threading.Event) -> None:
    """The held writer is back at normal priority (one promotion); released, it writes the
    whole batch."""
    assert os.sched_getscheduler(db.idling.tid) == os.SCHED_OTHER
    assert db.idling.promotions == 1
    go_on.set()
    wait_until(lambda: len(_written(db)) == 50, timeout=10, what="the held batch")
    assert _written(db) == list(range(50))


@needs_idle_class
def test_the_loop_puts_a_starved_writer_back_at_normal_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A saturated loop would starve a writer in the idle class, and the audit with it: the
    loop's room check (before every request) puts the writer back at normal priority once
    the batch under way has shown no progress for STARVED_S. Every row is written."""
    from flm.proxy.audit import STARVED_S

    # (the flusher's own look is the next test's)
    with _writer_held_mid_batch(tmp_path, monkeypatch, watch_s=60.0) as (sink, db, go_on):
        assert os.sched_getscheduler(db.idling.tid) == os.SCHED_IDLE
        sink.event("intrusion", "low", "127.0.0.1", {"n": 50})
        assert sink.full() is False  # (progress a moment ago: left as it is)
        assert db.idling.idle is True
        sink._beat = time.monotonic() - 2 * STARVED_S
        assert sink.full() is False
        assert db.idling.idle is False
        assert os.sched_getscheduler(db.idling.tid) == os.SCHED_OTHER
        assert db.idling.promotions == 1
        assert sink.status()["idle_promotions"] == 1
        go_on.set()
        wait_until(lambda: len(_written(db)) == 50, timeout=10, what="the held batch")
        assert sink.flush() == 1
        assert _written(db) == list(range(51))


@needs_idle_class
def test_a_writer_starved_while_no_request_comes_in_is_put_back_by_the_flusher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process may keep the CPU busy (an engine generating on every core) while no
    request comes in to run the loop's check: the flusher, waiting for the writer, looks
    every WATCH_S and puts a writer that has shown no progress for STARVED_S back at normal
    priority itself."""
    with _writer_held_mid_batch(tmp_path, monkeypatch, watch_s=0.02) as (_sink, db, go_on):
        wait_until(
            lambda: not db.idling.idle, timeout=10, what="the flusher to put the writer back"
        )
        _promoted_then_written(db, go_on)


@needs_idle_class
def test_the_loop_puts_a_writer_that_falls_behind_back_at_normal_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop that leaves the CPU only brief gaps does not starve the writer, it slows it:
    the batch keeps showing progress while its records age towards MAX_AGE_S, where every
    request would wait. The room check puts the writer back at normal priority once the
    oldest record is BEHIND_S old, while no request has been held back yet."""
    from flm.proxy.audit import BEHIND_S, MAX_AGE_S

    assert BEHIND_S < MAX_AGE_S
    with _writer_held_mid_batch(tmp_path, monkeypatch, watch_s=60.0) as (sink, db, go_on):
        sink._beat = time.monotonic()  # (progress a moment ago)
        assert sink.full() is False
        assert db.idling.idle is True  # (a young batch: left in the idle class)
        sink._batch_since = time.monotonic() - (BEHIND_S + MAX_AGE_S) / 2
        sink._beat = time.monotonic()
        assert sink.full() is False  # (no request is held back for it)
        assert db.idling.idle is False
        assert sink.status()["idle_promotions"] == 1
        _promoted_then_written(db, go_on)


@needs_idle_class
def test_the_flusher_puts_a_writer_that_falls_behind_back_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flusher's own look (no request coming in) applies the age rule as well: here the
    writer never looks starved (STARVED_S is out of reach), only its batch grows old."""
    from flm.proxy import audit

    monkeypatch.setattr(audit, "STARVED_S", 3600.0)
    with _writer_held_mid_batch(tmp_path, monkeypatch, watch_s=0.02) as (sink, db, go_on):
        assert db.idling.idle is True
        sink._batch_since = time.monotonic() - audit.BEHIND_S
        wait_until(
            lambda: not db.idling.idle, timeout=10, what="the flusher to put the writer back"
        )
        _promoted_then_written(db, go_on)


def test_the_flusher_keeps_its_cadence_after_a_slow_batch(tmp_path: Path) -> None:
    """The next batch is due an interval after the start of the last one, not after its end:
    a batch that took most of an interval to write leaves only the rest to wait, and one
    that took longer is followed at once. After a failed write, RETRY_S."""
    from flm.proxy.audit import RETRY_S, AuditSink

    sink = AuditSink(None, None, interval=0.2)
    try:
        now = time.monotonic()
        assert 0.15 < sink._until_next(now) <= 0.2
        assert sink._until_next(now - 0.15) <= 0.05
        assert sink._until_next(now - 0.5) == 0.0
        sink.failing_since = time.time()
        assert sink._until_next(now - 0.5) == RETRY_S
    finally:
        sink.failing_since = None
        sink.close()


def test_no_idle_class_where_a_thread_could_not_leave_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leaving the idle class needs a right the process may not have (CAP_SYS_NICE, or an
    RLIMIT_NICE allowing it): where the probe finds it missing, the helpers never enter it
    and keep their niced normal priority."""
    from flm.core import threads

    real = os.sched_setscheduler

    def no_way_back(tid: int, policy: int, param: Any) -> None:
        if policy != os.SCHED_IDLE:
            raise PermissionError(1, "Operation not permitted")
        real(tid, policy, param)

    monkeypatch.setattr(os, "sched_setscheduler", no_way_back)
    assert threads._probe_idle() is False
    monkeypatch.setattr(threads, "_may_idle", False)
    idling = threads.Idling()
    idling.bind()
    idling.enter()
    assert idling.idle is False
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def _request_args(i: int, rng: random.Random) -> tuple[Any, ...]:
    texts = [
        "",
        "é",
        'a"b',
        "\\",
        "\u2028",
        "日本",
        "x" * 600,
        "\ud800",
        "flm_0123456789abcdef_" + "A" * 40,
    ]
    return (
        1_700_000_000 + i / 7,
        f"r{i}",
        "127.0.0.1",
        rng.choice([None, "0123456789abcdef"]),
        "/v1/chat/" + rng.choice(texts),
        rng.choice(["GET", "POST"]),
        rng.choice([None, *texts]),
        rng.choice([None, *texts]),
        rng.choice([200, 401, 500]),
        rng.choice([0.0, 12.34567, float("inf")]),
        rng.choice([None, 0, 7]),
        rng.choice([None, 3]),
        rng.choice([None, "engine_error"]),
    )


def test_a_record_formatted_on_the_loop_is_the_one_the_flusher_writes(tmp_path: Path) -> None:
    """``spare`` (the request was the only one in flight): the record is formatted at once,
    on the calling thread, and queued formatted; the JSON line and the table row written for
    it are the very ones the flusher writes for the same request (secrets redacted, long
    texts cut, lone surrogates escaped)."""
    from flm.proxy.audit import AuditSink
    from flm.storage.db import Database

    written: dict[bool, tuple[str, list[Any]]] = {}
    for spare in (False, True):
        rng = random.Random(11)
        home = tmp_path / str(spare)
        home.mkdir()
        db = Database(home / "security.db", "security").open()
        sink = AuditSink(db, home / "audit.jsonl", interval=60)
        try:
            for i in range(300):
                sink.request(*_request_args(i, rng), spare=spare)
            kinds = {kind for kind, _ in sink._items}
            assert kinds == ({"row"} if spare else {"request"})
            assert sink.flush(pause=True) == 300
            rows = db.query("SELECT * FROM audit_logs ORDER BY id")
        finally:
            sink.close()
            db.close()
        written[spare] = ((home / "audit.jsonl").read_text(), [tuple(r) for r in rows])
    assert written[True] == written[False]
    text, rows = written[True]
    assert "[redacted]" in text and "AAAA" not in text and len(rows) == 300


def test_a_record_the_loop_cannot_format_is_left_to_the_flusher(tmp_path: Path) -> None:
    """A record whose formatting fails on the loop costs the request nothing: it is queued
    as it came, and the flusher reports it as it reports any record it cannot format."""
    from flm.proxy.audit import AuditSink

    sink = AuditSink(None, tmp_path / "audit.jsonl", interval=60)
    try:
        args = list(_request_args(0, random.Random(1)))
        args[9] = "not a number"  # (the latency)
        sink.request(*args, spare=True)
        sink.request(*_request_args(1, random.Random(1)), spare=True)
        assert [kind for kind, _ in sink._items] == ["request", "row"]
        assert sink.flush() == 2
        assert sink.rows_invalid == 1
    finally:
        sink.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [line["event_type"] for line in lines] == ["audit_record_invalid", "request"]


def test_a_batch_formatted_on_the_loop_still_probes_the_loop_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records formatted on the loop need no slices, but one pause still decides whether
    the batch is written paced (a calm loop) or at once (a saturated one)."""
    from flm.proxy import audit
    from flm.proxy.audit import SLICE, AuditSink

    pauses = _count_pauses(monkeypatch)
    sink = AuditSink(None, tmp_path / "audit.jsonl", interval=60)
    try:
        rng = random.Random(3)
        for i in range(SLICE * 5):
            sink.request(*_request_args(i, rng), spare=True)
        items = list(sink._items)
        sink._items.clear()
        batch = sink._format(items, True)
        assert pauses[0] == 1 and batch.paced and len(batch.lines) == SLICE * 5
        monkeypatch.setattr(audit, "_pause", lambda: False)  # a saturated loop
        assert not sink._format(items, True).paced
        assert sink._format(items[: SLICE - 1], True).paced  # (too few to ask)
    finally:
        sink.close()


def test_the_gateway_formats_a_record_on_the_loop_only_for_a_request_alone_in_flight(
    cli: Any, flm_home: Path
) -> None:
    """A request that was the only one in flight from start to end has its record formatted
    by the loop; one that met another request in flight, at its start or at its end, leaves
    it to the flusher. Every record is written either way."""
    from flm.testing.gateway import start_gateway
    from tests.conftest import audit_rows

    key = cli("api-keys", "create", "--label", "t").data["key"]
    with start_gateway() as gw:
        audit = gw.runtime.audit
        assert audit is not None
        seen: list[tuple[str, bool]] = []
        record = audit.request

        def spy(*args: Any, spare: bool = False) -> None:
            seen.append((args[4], spare))
            record(*args, spare=spare)

        audit.request = spy  # type: ignore[method-assign]
        port = gw.port

        def get() -> int:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(
                    f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            return int(reply.split(b" ", 2)[1])

        def hold() -> socket.socket:
            """A request kept in flight: its body never comes."""
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}"
                "\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
            )
            return sock

        def in_flight(n: int) -> None:
            wait_until(lambda: gw.runtime.in_flight == n, timeout=10, what=f"{n} in flight")

        chat = "/v1/chat/completions"
        assert get() == 200  # alone
        first = hold()
        in_flight(1)
        assert get() == 200  # beside the first
        second = hold()
        in_flight(2)
        first.close()  # it began alone, and ends beside the second
        in_flight(1)
        second.close()  # it ends alone, and began beside the first
        in_flight(0)
        assert get() == 200  # alone again
        assert seen == [
            ("/v1/models", True),
            ("/v1/models", False),
            (chat, False),
            (chat, False),
            ("/v1/models", True),
        ]
        wait_until(
            lambda: (
                len(
                    audit_rows(
                        flm_home,
                        "SELECT id FROM audit_logs WHERE event_type = 'request'",
                        flush=audit.flush,
                    )
                )
                >= 5
            ),
            timeout=10,
            what="five request rows",
        )
        rows = audit_rows(
            flm_home,
            "SELECT endpoint FROM audit_logs WHERE event_type = 'request' ORDER BY id",
        )
        assert [r[0] for r in rows] == [e for e, _ in seen]
