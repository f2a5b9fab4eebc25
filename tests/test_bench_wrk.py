"""The bench harness's reading of wrk: the c=1 latencies as recorded, without wrk's
coordinated-omission samples (``bench/run.py``'s ``WRK_LUA``), against a server whose slow
answers are known."""

from __future__ import annotations

import contextlib
import importlib
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tests.support import require_tool

BENCH = Path(__file__).resolve().parent.parent / "bench"
#: Every this many requests, the server answers after :data:`STALL_S`.
EVERY = 200
STALL_S = 0.04


def _bench_run() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("run")
    finally:
        sys.path.remove(str(BENCH))


class _Server:
    """HTTP/1.1 keep-alive on loopback: a tiny answer to each request, every
    :data:`EVERY`-th one after a stall."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.served = 0
        self.stalled = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # (wrk resets its connections at the end)
            self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(rest) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                rest += chunk
            buf = rest[length:]
            self.served += 1
            if self.served % EVERY == 0:
                self.stalled += 1
                time.sleep(STALL_S)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    def close(self) -> None:
        self.sock.close()


def _load(tmp_path: Path, conc: int, seconds: int) -> tuple[dict[str, Any], _Server]:
    """bench/run.py's wrk point against a fresh :class:`_Server`."""
    wrk = require_tool("wrk", "wrk")
    run = _bench_run()
    server = _Server()
    try:
        target = SimpleNamespace(name="t", port=server.port, model="m", headers={})
        r = run.run_wrk(wrk, target, tmp_path, conc, seconds)
    finally:
        server.close()
    assert r["errors"] == 0
    return r, server


def test_recorded_latencies_leave_out_wrks_omission_samples(tmp_path: Path) -> None:
    r, server = _load(tmp_path, 1, 2)
    assert server.stalled >= 2, "the run was too short to see a stall"
    rec = r["latency_recorded_ms"]  # (present only when it accounts for every request)
    # wrk's own p99 counts samples for requests a stalled client never sent: with a stall
    # of 40 ms every 200 answers of well under a millisecond, most of its tail is made up.
    assert r["omission_samples"] > server.stalled * 10
    assert r["latency_ms"]["p99"] >= 5.0
    # As recorded, 0.5 % of the requests were slow: the p99 is a fast one, the p99.9 a stall.
    assert rec["p99"] < 5.0
    assert rec["p99.9"] >= STALL_S * 1000 * 0.95
    assert rec["p50"] <= r["latency_ms"]["p50"]


def test_no_recorded_figures_above_one_connection(tmp_path: Path) -> None:
    r, _ = _load(tmp_path, 2, 1)
    assert "latency_recorded_ms" not in r
