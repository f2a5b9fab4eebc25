"""A small, fast HTTP/1.1 load client for what wrk cannot measure: SSE streams.

Raw asyncio protocol (run it on uvloop) with the httptools response parser, one keep-alive
connection per worker. Per stream it records the time to the first ``data:`` event (TTFT),
the time to the end of the response, the number of ``data:`` events (``[DONE]`` excluded)
and whether ``[DONE]`` arrived. It also has a plain (non-streaming) mode, used only when
wrk is not installed.

Counting is done on the raw body bytes (``bytes.count``), never per byte in Python, so the
client stays cheap enough not to be the bottleneck; the harness checks that by running the
same test straight against the mock engine.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httptools

_DATA = b"data:"
_DONE = b"[DONE]"
_ERR = b'"error"'


class ConnectionDropped(Exception):
    pass


class _Conn(asyncio.Protocol):
    """One client connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.keep_alive = True
        self.lost = False
        # Called once when the first "data:" event of a response arrives.
        self.on_first: Callable[[], None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.t_first: float | None = None
        self.t_end = 0.0
        self.events = 0
        self.done = 0
        self.error_event = False
        self.nbytes = 0
        self.body = bytearray()
        self.keep_body = False
        self.carry = b""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(exc or ConnectionDropped("connection closed"))

    def _fail(self, exc: BaseException) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not 200 <= self.status < 300:
            self.keep_body = True  # so that an error can be reported with its body

    def on_body(self, body: bytes) -> None:
        self.nbytes += len(body)
        if self.keep_body:
            self.body += body
        data = self.carry + body
        n = data.count(_DATA)
        if n:
            if self.t_first is None:
                self.t_first = time.perf_counter()
                if self.on_first is not None:
                    self.on_first()
            self.events += n
            self.done += data.count(_DONE)
            if _ERR in data:
                self.error_event = True
        # Keep the last bytes so that a marker split across two reads is still seen
        # (4 bytes: too short to hold a whole "data:" that was already counted).
        self.carry = body[-4:] if len(body) >= 4 else (self.carry + body)[-4:]

    def on_message_complete(self) -> None:
        self.t_end = time.perf_counter()
        self.keep_alive = self.parser.should_keep_alive()
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def request(self, raw: bytes, keep_body: bool = False) -> None:
        assert self.transport is not None
        self._reset()
        self.keep_body = keep_body
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def build_request(
    host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None
) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: */*",
        f"Content-Length: {len(body)}",
    ]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def connect(host: str, port: int) -> _Conn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_Conn, host, port)
    return proto


@dataclass
class Sample:
    start: float
    ttft: float | None
    total: float
    events: int
    done: bool
    status: int


@dataclass
class RunResult:
    elapsed: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)

    def note_error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 5:
            self.error_examples.append(what)


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100.0 * len(s) + 0.5) - 1))
    return s[k]


async def run_load(
    host: str,
    port: int,
    raw: bytes,
    concurrency: int,
    duration: float,
    stream: bool,
    expect_events: int | None = None,
) -> RunResult:
    """``concurrency`` workers, each on its own keep-alive connection, for ``duration`` s."""
    res = RunResult()
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        conn: _Conn | None = None
        try:
            while time.perf_counter() < deadline:
                if conn is None or conn.lost or not conn.keep_alive:
                    if conn is not None:
                        conn.close()
                    try:
                        conn = await connect(host, port)
                    except OSError as exc:
                        res.note_error(f"connect: {exc}")
                        await asyncio.sleep(0.01)
                        continue
                t0 = time.perf_counter()
                try:
                    await conn.request(raw)
                except (ConnectionDropped, OSError, httptools.HttpParserError) as exc:
                    res.note_error(f"request: {exc!r}")
                    conn = None
                    continue
                ok = 200 <= conn.status < 300
                if stream:
                    ok = ok and conn.done >= 1 and not conn.error_event
                    if expect_events is not None:
                        # A gateway may split the finish_reason/usage off into one more chunk.
                        ok = ok and expect_events <= conn.events - conn.done <= expect_events + 2
                if not ok:
                    res.note_error(
                        f"status {conn.status}, events {conn.events}, done {conn.done}"
                        + (f": {bytes(conn.body[:300])!r}" if conn.body else "")
                    )
                    continue
                res.samples.append(
                    Sample(
                        start=t0,
                        ttft=(conn.t_first - t0) if conn.t_first is not None else None,
                        total=conn.t_end - t0,
                        events=conn.events - conn.done,
                        done=conn.done >= 1,
                        status=conn.status,
                    )
                )
        finally:
            if conn is not None:
                conn.close()

    t_start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.elapsed = time.perf_counter() - t_start
    return res


def summarize(res: RunResult, stream: bool) -> dict[str, Any]:
    n = len(res.samples)
    totals = [s.total * 1000 for s in res.samples]
    out: dict[str, Any] = {
        "completed": n,
        "errors": res.errors,
        "elapsed_s": round(res.elapsed, 3),
        "per_s": round(n / res.elapsed, 1) if res.elapsed > 0 else None,
        "latency_ms": {
            "p50": _r(pct(totals, 50)),
            "p90": _r(pct(totals, 90)),
            "p99": _r(pct(totals, 99)),
            "mean": _r(statistics.fmean(totals)) if totals else None,
        },
    }
    if stream:
        ttfts = [s.ttft * 1000 for s in res.samples if s.ttft is not None]
        chunks = sum(s.events for s in res.samples)
        out["ttft_ms"] = {"p50": _r(pct(ttfts, 50)), "p99": _r(pct(ttfts, 99))}
        out["chunks"] = chunks
        out["chunks_per_s"] = round(chunks / res.elapsed, 1) if res.elapsed > 0 else None
    if res.error_examples:
        out["error_examples"] = res.error_examples
    return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


async def hold_streams(
    host: str,
    port: int,
    raw: bytes,
    n: int,
    sample: Callable[[], float],
    max_seconds: float = 60.0,
) -> dict[str, Any]:
    """Open ``n`` slow streams at once and call ``sample()`` (the target's RSS in MB) every
    100 ms until they have all ended. Reports the peak RSS, the peak while all ``n`` were
    open at once, how many were open at most, and how many finished cleanly."""
    state = {"open": 0, "max_open": 0, "ok": 0}
    failures: list[str] = []

    async def one() -> None:
        conn: _Conn | None = None
        counted = False

        def opened() -> None:
            nonlocal counted
            counted = True
            state["open"] += 1
            state["max_open"] = max(state["max_open"], state["open"])

        try:
            conn = await connect(host, port)
            conn.on_first = opened
            await conn.request(raw)
            if 200 <= conn.status < 300 and conn.done >= 1 and not conn.error_event:
                state["ok"] += 1
            else:
                failures.append(
                    f"status {conn.status} events {conn.events}: {bytes(conn.body[:300])!r}"
                )
        except (OSError, ConnectionDropped, httptools.HttpParserError) as exc:
            failures.append(repr(exc))
        finally:
            if counted:
                state["open"] -= 1
            if conn is not None:
                conn.close()

    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    gathered = asyncio.gather(*tasks, return_exceptions=True)
    peak = peak_all_open = 0.0
    all_open_at: float | None = None
    while not gathered.done() and time.perf_counter() - t0 < max_seconds:
        rss = sample()
        peak = max(peak, rss)
        if state["open"] >= n:
            peak_all_open = max(peak_all_open, rss)
            if all_open_at is None:
                all_open_at = time.perf_counter() - t0
        await asyncio.sleep(0.1)
    if not gathered.done():
        for t in tasks:
            t.cancel()
    await asyncio.gather(gathered, return_exceptions=True)
    return {
        "streams": n,
        "max_open": state["max_open"],
        "seconds_until_all_open": None if all_open_at is None else round(all_open_at, 3),
        "rss_peak_mb": round(peak, 1),
        "rss_peak_all_open_mb": round(peak_all_open, 1) if all_open_at is not None else None,
        "finished_ok": state["ok"],
        "failures": failures[:5],
    }
