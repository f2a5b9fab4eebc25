"""The audit trail: one JSON Lines record and one ``audit_logs`` row per request and per
security event, written in batches by a background thread (never on the request path).

The request path only appends a tuple to a deque. The flusher turns them into rows and lines
every ``interval`` seconds (or sooner when a batch fills) and hands the rows to the database's
single writer in one transaction; a crash loses at most the batch in flight.

Formatting holds the GIL, and a thread that holds it delays the event loop by up to the
interpreter's switch interval (5 ms) — a visible stall at the tail of request latency. The
flusher therefore formats in slices of :data:`SLICE` items and sleeps briefly between them, so
the loop never waits more than one slice (~0.1 ms) for the GIL.

Each pause costs the flusher a GIL hand-off, and on a saturated loop it gets the GIL back only
at the switch interval: at 16 items a slice it wrote about 3,500 items/s, fewer than the
gateway answers, and the queue (memory) grew for as long as the load lasted. So a batch is
formatted in at most :data:`MAX_PAUSES` slices (slices grow with the batch), and a batch above
:data:`HIGH_WATER` items, a backlog only a saturated loop builds, is formatted without pauses:
the flusher then shares the GIL with the loop at the switch interval and catches up, which
bounds the queue without dropping a record. The same holds from the first pause that takes
most of a switch interval (:func:`flm.core.threads.pause` says so) to end: the flusher got the
GIL (or a CPU) back only when the interpreter or the system forced a switch, so the loop (or
the machine) is busy all the time, and each further pause would only cost the flusher as
much again (64 of them could take a third of a second per batch, long enough for the
records' age to trip the back-pressure below).

Writing the batch costs the CPU more than formatting it (SQLite's work on a few hundred rows
is a millisecond or more), and the GIL is no help there: the module gives it up around each
statement, but where the loop and the writer share one CPU the loop still waits until the
system preempts the writer. A batch formatted with pauses is therefore also written with
them: a few dozen rows a statement, a pause between statements (at most
:data:`flm.storage.records.MAX_PACED_STATEMENTS` of them), until a pause finds the loop busy.
At c=1 this took the p99 latency from about 2 ms to under 1 ms (``bench/run.py``).

Even so, the writer, once it has the CPU, keeps it for the rest of its time slice when a
request arrives: the kernel does not preempt a running thread of normal priority for another
at once, niced or not. So a paced batch is written (and committed) with the writer in the
idle scheduling class (:class:`flm.core.threads.Idling`), which the kernel preempts the moment
the loop wakes; SQLite gives the GIL up while it works, so the loop runs on at once. (The
formatting holds the GIL throughout a slice, so there the idle class would only add a
hand-off: the flusher stays at its niced normal priority.) A thread in the idle class runs
only on a CPU with nothing else to do, so a loop that becomes saturated would starve it: the
flusher and the writer note their progress at every pause, and the loop's room check puts
the writer back at normal priority once a batch has shown none for :data:`STARVED_S`, or
once the oldest unwritten record is :data:`BEHIND_S` old. The second rule is for a loop
that leaves the CPU only brief gaps (a machine fast enough that one client keeps its core
busy): the writer progresses there, but slowly, and without the rule the age bound below
held requests back every second or so (``bench/run.py --guest-halt-poll-ns 200000`` at c=1:
p99 1.1-5 ms). (The flusher, waiting for the writer, applies both rules too, every
:data:`flm.storage.records.WATCH_S`: a CPU may also be kept busy by another process, an
engine generating on every core, while no request comes in to make the loop look.) The
flusher starts a batch an interval after the start of the last one, not after its end, so
that a normal batch's oldest record is committed well before :data:`BEHIND_S`.
Only where the process may bring a thread back from the idle class (CAP_SYS_NICE, or an
``RLIMIT_NICE`` that allows it); elsewhere the writer keeps its niced normal priority.
``bench/cpu_cost.py`` at c=1, three sessions of 20 rounds: p99 0.597 -> 0.525, 0.618 -> 0.629
and 0.655 -> 0.593 ms; the other points unchanged within noise.

A request's record is best not left to the flusher at all when the loop has time to spare:
its formatting is a few microseconds of the loop's CPU, while in the flusher it costs the
loop a GIL hand-off and a cold cache whenever a slice is under way as a request arrives.
So the outermost middleware tells :meth:`AuditSink.request` whether the request was the only
one in flight from its start to its end (``spare``); then the record is formatted on the loop
at once, after the response was sent and while the client reads it, and queued formatted: the
flusher only collects it. A request that met another in flight (a loaded loop, where the
flusher's batches are the cheaper way, their caches warm) has its record queued as it is, as
before. Measured with ``bench/cpu_cost.py`` in four sessions: at c=1 the recorded p99 −0.04
to −0.10 ms, CPU per request −1 to −7 %; at c=8 and c=64 unchanged within noise
(``docs/architecture.md``). A batch of records formatted already still asks one pause, the
probe that decides whether it is written paced (a saturated loop).

Bounded, with back-pressure. Records not yet committed (queued plus the batch being written)
are counted; at :data:`QUEUE_LIMIT` the gateway stops taking new requests until the flusher
has written a batch (:meth:`AuditSink.room`, awaited by the outermost middleware before a
request is handled): a loop that starves the flusher of the GIL then idles, the flusher runs,
and the queue — memory — stays bounded whatever the load. A request that waited
:data:`ROOM_WAIT_S` in vain (the audit cannot be written at all: disk full) is refused with
503 ``audit_unavailable``; refusals are counted, never queued.

A full disk (or any failing write) keeps the batch for the next attempt instead of dropping
it; records kept count against the same bound, so a long outage turns into back-pressure,
never into lost records. The cause and the count are logged, shown by :meth:`status`
(``flm proxy status``, ``/metrics``), and once a write succeeds again an ``audit_gap`` event
records how many records were delayed, how many JSON Lines were lost from the file and how
many requests were refused meanwhile.

A bad record never takes its neighbours with it: client texts are escaped when formatted
(a lone surrogate becomes ``\\udXXX``), and a batch the database refuses is written row by
row, each row it still refuses in an escaped form (or, failing that, counted and logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flm.core import threads
from flm.core.errors import RepoError
from flm.core.jsonlog import scrub
from flm.core.memo import remember
from flm.core.threads import background_thread
from flm.storage.db import Database
from flm.storage.records import AUDIT_COLUMNS, write_batch

log = logging.getLogger("flm.audit")

MAX_BATCH = 1024
#: Items formatted between two pauses of the flusher thread (see the module docstring).
SLICE = 16
#: At most this many pauses per batch (a backlog gets longer slices, see the docstring).
MAX_PAUSES = 64
#: A batch this long is formatted without pauses (see the docstring).
HIGH_WATER = 20_000
#: At most this many records are unwritten (queued or in the batch being written) before the
#: gateway stops taking new requests (see the docstring). Requests in flight when the bound is
#: reached still add their record, so the true bound is this plus the connections open.
QUEUE_LIMIT = 4096
#: A request waits at most this long for room in the audit before it is refused with 503.
ROOM_WAIT_S = 5.0
#: New requests also wait while the oldest unwritten record is older than this, so that at
#: any rate at most about a second of requests is unwritten (the flusher starts a batch every
#: 0.2 s).
MAX_AGE_S = 0.5
#: The database writer writes a paced batch in the idle scheduling class (see the module
#: docstring); once the batch has shown no progress for this long, the loop has starved the
#: writer, and it is put back at normal priority.
STARVED_S = 0.05
#: The writer is also put back at normal priority once the oldest unwritten record is this
#: old, well before :data:`MAX_AGE_S` holds requests back: a loop that leaves the CPU only
#: brief gaps (a fast machine at c=1) does not starve the writer, but slows it until the
#: age bound stops the gateway for milliseconds at a time.
BEHIND_S = 0.35
#: A failing write is retried after this long (the flusher keeps the batch meanwhile).
RETRY_S = 1.0
#: A failing write is logged at most once per this many seconds (with the count).
LOG_EVERY_S = 10.0


#: A pause between two slices of the flusher's work; False when it found the loop saturated
#: (see the module docstring).
_pause = threads.pause


_AUDIT_COLUMNS = AUDIT_COLUMNS


#: The last whole second formatted and its text, replaced as one tuple (safe across threads).
_second: tuple[int, str] = (-1, "")


def iso_ts(ts: float) -> str:
    global _second
    whole = int(ts)
    cached = _second
    if whole != cached[0]:
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{cached[1]}.{int((ts - whole) * 1000):03d}Z"


#: One encoder for every JSON line (``json.dumps`` with options builds a new one per call).
_LINE = json.JSONEncoder(ensure_ascii=False)
#: ``"column": `` of each audit column, in order, for :func:`_line`.
_KEYS = tuple(f"{json.dumps(c)}: " for c in _AUDIT_COLUMNS)
_quote = json.encoder.encode_basestring  # (JSON string, non-ASCII kept: the C one)


def _line(row: tuple[Any, ...]) -> str:
    """The JSON Lines record of an audit row: what ``_LINE`` makes of the column → value
    object, character for character, built directly (half the time; the flusher formats
    one per request)."""
    parts = []
    for key, value in zip(_KEYS, row, strict=True):
        kind = type(value)
        if value is None:
            parts.append(key + "null")
        elif kind is str:
            parts.append(key + _quote(value))
        elif kind is int:
            parts.append(key + int.__repr__(value))
        elif kind is float and math.isfinite(value):
            parts.append(key + float.__repr__(value))
        else:  # anything else (never made by this module) the general way
            return _LINE.encode(dict(zip(_AUDIT_COLUMNS, row, strict=True)))
    return "{" + ", ".join(parts) + "}"


def _text(value: str | None) -> str:
    return "null" if value is None else _quote(value)  # (not a text: TypeError)


def _count(value: int | None) -> str:
    if value is None:
        return "null"
    if type(value) is not int:  # (a bool among them: the general way writes true/false)
        raise TypeError(value)
    return int.__repr__(value)


def _request_line(row: tuple[Any, ...]) -> str:
    """:func:`_line` of a request's row (one per request: its columns' types are known, so
    the line is one format instead of a loop over the columns). Anything unexpected takes
    :func:`_line`."""
    ts, rid, ip, key, endpoint, method, engine, model, status, latency, p, c, err, *rest = row
    if (
        rest != ["request", "info", None]
        or type(status) is not int
        or type(latency) is not float
        or not math.isfinite(latency)
    ):
        return _line(row)
    try:
        return (
            f'{{"ts": {_quote(ts)}, "request_id": {_quote(rid)}, "client_ip": {_quote(ip)}, '
            f'"api_key_id": {_text(key)}, "endpoint": {_quote(endpoint)}, '
            f'"method": {_quote(method)}, "engine_id": {_text(engine)}, "model": {_text(model)}, '
            f'"status": {int.__repr__(status)}, "latency_ms": {float.__repr__(latency)}, '
            f'"prompt_tokens": {_count(p)}, "completion_tokens": {_count(c)}, '
            f'"error_type": {_text(err)}, "event_type": "request", "severity": "info", '
            f'"details_json": null}}'
        )
    except TypeError:  # (a value of another type than its column's)
        return _line(row)


#: Texts :func:`scrub` left unchanged (paths, engine ids and model names repeat from request
#: to request; a text that held a secret is never kept here). Short texts only, so the memo
#: stays under a megabyte whatever clients send.
_clean: dict[str, None] = {}
_CLEAN_MAX = 4096
_CLEAN_TEXT_MAX = 256


def escaped(text: str) -> str:
    """``text`` as valid UTF-8: a lone surrogate (JSON lets a client send ``"\\ud800"``)
    becomes its ``\\udXXX`` escape; anything else is kept as it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _escape_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(escaped(v) if isinstance(v, str) else v for v in row)


def _scrub(text: str) -> str:
    if text in _clean:
        return text
    out = escaped(scrub(text))
    if out == text and len(text) <= _CLEAN_TEXT_MAX:
        remember(_clean, text, None, _CLEAN_MAX)
    return out


def _event_row(
    ts: float,
    event_type: str,
    severity: str,
    details_json: str,
    ip: str = "",
    rid: str | None = None,
    endpoint: str | None = None,
) -> tuple[Any, ...]:
    """An ``audit_logs`` row for an event (no key, engine, model, status or tokens)."""
    return (
        iso_ts(ts),
        rid,
        ip,
        None,
        endpoint,
        *(None,) * 8,
        event_type,
        severity,
        details_json,
    )


def _request_row(item: tuple[Any, ...]) -> tuple[Any, ...]:
    """The ``audit_logs`` row of a request's queued record."""
    (
        ts,
        rid,
        ip,
        key_id,
        endpoint,
        method,
        engine,
        model,
        status,
        latency,
        p_tok,
        c_tok,
        err,
    ) = item
    # (the model is the client's text: a key pasted there is redacted too)
    return (
        iso_ts(ts),
        rid,
        ip,
        key_id,
        _scrub(endpoint)[:512],
        method,
        None if engine is None else _scrub(engine)[:128],
        None if model is None else _scrub(model)[:512],
        status,
        round(latency, 3),
        p_tok,
        c_tok,
        err,
        "request",
        "info",
        None,
    )


def _format_one(kind: str, item: tuple[Any, ...], batch: _Batch) -> tuple[Any, ...] | None:
    """The audit row of one queued record (``None``: the record went to another table)."""
    if kind == "request":
        return _request_row(item)
    if kind == "event":
        ts, event_type, severity, ip, details, rid, endpoint = item
        return _event_row(
            ts,
            event_type,
            severity,
            scrub(json.dumps(details, default=str)),
            ip,
            rid,
            _scrub(endpoint or "")[:512] or None,
        )
    if kind == "block":
        ip, reason, since, until, failures, listener = item
        batch.blocks.append(
            (
                ip,
                listener,
                reason,
                failures,
                iso_ts(since),
                None if until is None else iso_ts(until),
                1 if until is None else 0,
            )
        )
    elif kind == "intrusion":
        ts, ip, points, total, reasons, path, agent, rid = item
        batch.intrusions.append(
            (
                iso_ts(ts),
                ip,
                points,
                total,
                json.dumps(list(reasons)),
                _scrub(path)[:512],
                _scrub(agent)[:256],
                rid,
            )
        )
    else:
        ts, ip, kind_name, value, threshold, rid = item
        batch.anomalies.append((iso_ts(ts), ip, kind_name, value, threshold, None, rid))
    return None


@dataclass
class _Batch:
    """Formatted records on their way to disk (kept for a retry while a write fails)."""

    count: int = 0
    audit_rows: list[tuple[Any, ...]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    blocks: list[tuple[Any, ...]] = field(default_factory=list)
    intrusions: list[tuple[Any, ...]] = field(default_factory=list)
    anomalies: list[tuple[Any, ...]] = field(default_factory=list)
    #: The batch is written with pauses too (formatting it did not find the loop saturated).
    paced: bool = False

    def extend(self, other: _Batch) -> None:
        self.count += other.count
        self.audit_rows += other.audit_rows
        self.lines += other.lines
        self.blocks += other.blocks
        self.intrusions += other.intrusions
        self.anomalies += other.anomalies


class AuditSink:
    def __init__(
        self,
        db: Database | None,
        jsonl_path: Path | None,
        interval: float = 0.2,
        limit: int = QUEUE_LIMIT,
    ) -> None:
        self._db = db
        self._path = jsonl_path
        self._interval = interval
        self.limit = limit
        self._items: deque[tuple[str, tuple[Any, ...]]] = deque()
        #: Records taken from the queue and not yet committed (set by the flusher only).
        self._inflight = 0
        # When the oldest record of the queue, of the batch being written and of the kept
        # batch was queued (``time.monotonic()``): the age bound of ``full()``.
        self._queued_since = 0.0
        self._batch_since: float | None = None
        self._kept_since: float | None = None
        #: A batch whose database write failed, kept for the next attempt.
        self._kept: _Batch | None = None
        self._wake = threading.Event()
        #: When the flusher (or the database writer, on its batch) last showed progress; 0
        #: when no batch is under way.
        self._beat = 0.0
        self._stop = False
        self._lock = threading.Lock()
        self._file: Any = None
        #: Called with every security event as it is recorded (the alerter's O(1) offer).
        self.listener: Callable[[str, str, str, dict[str, Any]], None] | None = None
        # The condition, for ``status()`` (written by the flusher, read anywhere).
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self.write_failures = 0
        self.delayed = 0  # records whose write failed at least once (since the last gap event)
        self.lines_lost = 0  # JSON Lines records the file could not take
        self.rows_escaped = 0  # rows the database took only in escaped form
        self.rows_dropped = 0  # rows the database refused even escaped (logged)
        self.rows_invalid = 0  # records not formattable (an audit_record_invalid event each)
        self.gaps_recorded = 0
        # Back-pressure (the loop side).
        self.refused = 0
        self._refused_reported = 0
        self.waits = 0
        self.room_wait_s = ROOM_WAIT_S
        #: The longest the queue has been (memory), for tests and the bench.
        self.peak_queued = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_log = 0.0
        self._thread = threading.Thread(target=self._run, name="flm-audit", daemon=True)
        self._thread.start()

    # --- producers (request path: O(1), no I/O) --------------------------------------------

    def request(
        self,
        ts: float,
        request_id: str,
        client_ip: str,
        api_key_id: str | None,
        endpoint: str,
        method: str,
        engine_id: str | None,
        model: str | None,
        status: int,
        latency_ms: float,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        error_type: str | None,
        spare: bool = False,
    ) -> None:
        """One finished request. ``spare``: it was the only request in flight from start to
        end, so the loop formats its record now (see the module docstring); else the flusher
        does."""
        if not self._items:
            self._queued_since = time.monotonic()
        record = (
            ts,
            request_id,
            client_ip,
            api_key_id,
            endpoint,
            method,
            engine_id,
            model,
            status,
            latency_ms,
            prompt_tokens,
            completion_tokens,
            error_type,
        )
        item: tuple[str, tuple[Any, ...]] = ("request", record)
        if spare:
            try:
                row = _request_row(record)
                item = ("row", (row, _request_line(row)))
            except Exception:  # noqa: S110 - the flusher formats it again and reports the fault
                pass
        self._items.append(item)
        queued = len(self._items)
        if queued > self.peak_queued:
            self.peak_queued = queued
        if queued >= MAX_BATCH:
            self._wake.set()

    def event(
        self,
        event_type: str,
        severity: str,
        client_ip: str,
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        self._put(
            (
                "event",
                (time.time(), event_type, severity, client_ip, details or {}, request_id, endpoint),
            )
        )
        if self.listener is not None:
            self.listener(event_type, severity, client_ip, details or {})

    def block(
        self,
        ip: str,
        reason: str,
        since: float,
        until: float | None,
        failures: int,
        listener: str = "*",
    ) -> None:
        self._put(("block", (ip, reason, since, until, failures, listener)))

    def intrusion(
        self,
        ip: str,
        points: int,
        total: int,
        reasons: tuple[str, ...],
        path: str,
        user_agent: str,
        request_id: str,
    ) -> None:
        self._put(
            ("intrusion", (time.time(), ip, points, total, reasons, path, user_agent, request_id))
        )

    def anomaly(
        self, ip: str, kind: str, value: float, threshold: float, request_id: str | None
    ) -> None:
        self._put(("anomaly", (time.time(), ip, kind, value, threshold, request_id)))

    def _put(self, item: tuple[str, tuple[Any, ...]]) -> None:
        if not self._items:
            self._queued_since = time.monotonic()
        self._items.append(item)

    # --- back-pressure (the event loop) ------------------------------------------------------

    def unwritten(self) -> int:
        """Records not yet committed: queued, in the batch being written, or kept."""
        kept = self._kept
        return len(self._items) + self._inflight + (kept.count if kept is not None else 0)

    def oldest_age(self) -> float:
        """Seconds since the oldest unwritten record was queued (0 when there is none). Kept
        records are older than the batch being written, which is older than the queue."""
        since = (
            self._kept_since or self._batch_since or (self._queued_since if self._items else None)
        )
        return 0.0 if since is None else time.monotonic() - since

    def full(self, *, hard: bool = False) -> bool:
        """At the bound: :data:`QUEUE_LIMIT` records or a record :data:`MAX_AGE_S` old
        (``hard``: twice the count, for the routes that must stay observable)."""
        if hard:
            return self.unwritten() >= 2 * self.limit
        # (asked before every request: unwritten() and oldest_age() inline)
        kept = self._kept
        items = self._items
        if len(items) + self._inflight + (kept.count if kept is not None else 0) >= self.limit:
            return True
        since = self._kept_since or self._batch_since or (self._queued_since if items else None)
        if since is None:
            return False
        now = time.monotonic()
        beat = self._beat
        if beat and (now - beat > STARVED_S or now - since > BEHIND_S):
            self._behind()
        return now - since > MAX_AGE_S

    def _behind(self) -> None:
        """(On the loop) a batch under way has shown no progress for :data:`STARVED_S`, or
        the oldest record waiting for it is :data:`BEHIND_S` old: if the database writer is
        writing it in the idle class, put it back at normal priority."""
        if self._db is not None:
            self._db.idling.normal()

    async def room(self, wait_s: float | None = None, *, hard: bool = False) -> bool:
        """Wait (on the event loop) until the audit has room; ``False`` after ``wait_s``
        (the caller refuses the request, counted in ``refused``)."""
        if not self.full(hard=hard):
            return True
        self.waits += 1
        loop = asyncio.get_running_loop()
        self._loop = loop
        deadline = loop.time() + (self.room_wait_s if wait_s is None else wait_s)
        self._wake.set()
        while self.full(hard=hard):
            left = deadline - loop.time()
            if left <= 0:
                self.refused += 1
                return False
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                # (woken by the flusher after each batch; the timeout only re-checks)
                await asyncio.wait({waiter}, timeout=min(left, 0.05))
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return True

    def _release(self) -> None:
        """(On the loop) wake the requests waiting for room."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _notify(self) -> None:
        loop = self._loop
        if loop is not None and self._waiters:
            with contextlib.suppress(RuntimeError):  # (the loop has closed)
                loop.call_soon_threadsafe(self._release)

    def status(self) -> dict[str, Any]:
        """The audit's condition for ``flm proxy status`` and ``/metrics``."""
        return {
            "unwritten": self.unwritten(),
            "limit": self.limit,
            "oldest_unwritten_s": round(self.oldest_age(), 3),
            "failing": self.failing_since is not None,
            "failing_since": None if self.failing_since is None else iso_ts(self.failing_since),
            "last_error": self.last_error,
            "write_failures": self.write_failures,
            "delayed_records": self.delayed,
            "lines_lost": self.lines_lost,
            "rows_escaped": self.rows_escaped,
            "rows_dropped": self.rows_dropped,
            "rows_invalid": self.rows_invalid,
            "refused_requests": self.refused,
            "backpressure_waits": self.waits,
            "gaps_recorded": self.gaps_recorded,
            "idle_promotions": self._db.idling.promotions if self._db is not None else 0,
        }

    # --- the flusher -------------------------------------------------------------------------

    def _run(self) -> None:
        background_thread()
        started = time.monotonic()
        while not self._stop:
            self._wake.wait(self._until_next(started))
            self._wake.clear()
            started = time.monotonic()
            try:
                self.flush(pause=True)
            except Exception:  # pragma: no cover - logged, never fatal for the proxy
                log.exception("audit flush failed")
            finally:
                self._notify()

    def _until_next(self, started: float) -> float:
        """Seconds until the next flush: an interval from the start of the last one (which
        began at ``started``), so that a record waits at most about one interval for its
        batch to begin however long the last batch took to write; :data:`RETRY_S` after a
        failed write."""
        if self.failing_since is not None:
            return RETRY_S
        return max(0.0, started + self._interval - time.monotonic())

    def flush(self, *, pause: bool = False) -> int:
        """Write everything queued so far (and any batch kept from a failed write); returns
        the number of records written. With ``pause`` (the flusher thread), the GIL is given
        up between slices. A failing database write keeps the batch and raises nothing: the
        condition is in :meth:`status`."""
        with self._lock:
            if pause:
                self._beat = time.monotonic()
            items: list[tuple[str, tuple[Any, ...]]] = []
            if self._items:
                self._batch_since = self._queued_since
            while self._items:
                items.append(self._items.popleft())
            self._inflight = len(items)
            try:
                batch = self._format(items, pause)
                kept = self._kept
                if kept is not None:
                    kept.extend(batch)
                    batch = kept
                    self._inflight = batch.count
                    self._batch_since = self._kept_since
                    self._kept = self._kept_since = None
                if not batch.count:
                    return 0
                self._note_refusals(batch)
                lines, batch.lines = batch.lines, []
                lines_ok = True
                try:
                    self._write_lines(lines)
                except OSError as exc:
                    # (the table is the record of truth: it still gets the batch)
                    lines_ok = False
                    self.lines_lost += len(lines)
                    self._failed(f"{self._path}: {exc}", len(lines), "JSON Lines records lost")
                if self._db is None:
                    if lines_ok:
                        self._recovered()
                    return batch.count
                try:
                    self._write_db(batch)
                except (RepoError, sqlite3.Error, OSError) as exc:
                    # (disk full, I/O error, locked too long): keep the batch, retry later
                    self._kept, self._kept_since = batch, self._batch_since
                    self.delayed += len(items)  # (kept ones were counted when they failed)
                    self._failed(str(exc), batch.count, "records kept for a retry")
                    return 0
                if lines_ok:
                    self._recovered()
                return batch.count
            finally:
                self._inflight = 0
                self._batch_since = None
                self._beat = 0.0

    def _format(self, items: list[tuple[str, tuple[Any, ...]]], pause: bool) -> _Batch:
        batch = _Batch(count=len(items))
        audit_rows, lines = batch.audit_rows, batch.lines
        step = max(SLICE, len(items) // MAX_PAUSES)
        pause = pause and len(items) <= HIGH_WATER
        paused = False
        for n, (kind, item) in enumerate(items, 1):
            if kind == "row":  # (formatted on the loop already)
                audit_rows.append(item[0])
                lines.append(item[1])
                continue
            if pause and n % step == 0:
                pause = self._pause()
                paused = True
            try:
                row = _format_one(kind, item, batch)
                if row is None:
                    continue
                line = _request_line(row) if kind == "request" else _line(row)
            except Exception as exc:  # a record this code cannot format: it costs only itself
                self.rows_invalid += 1
                log.error("audit record not formattable (%s): %s", exc, ascii(item)[:1000])
                row = _event_row(
                    time.time(),
                    "audit_record_invalid",
                    "high",
                    json.dumps(
                        {"kind": kind, "error": str(exc)[:200], "record": ascii(item)[:2000]}
                    ),
                )
                line = _line(row)
            audit_rows.append(row)
            lines.append(line)
        if pause and not paused and len(items) >= step:
            # (a batch formatted on the loop already: one pause still tells a calm loop, where
            # the batch is written paced, from a saturated one)
            pause = self._pause()
        batch.paced = pause
        return batch

    def _pause(self, idling: threads.Idling | None = None) -> bool:
        """A pause between two slices of a paced batch (:data:`_pause`), noted as progress.
        A thread in the idle class keeps pausing whatever the pause found: it runs only when
        the loop leaves CPU to spare, and :meth:`_behind` sees to it if the loop never does."""
        self._beat = time.monotonic()
        calm = _pause()
        return calm or (
            idling is not None and idling.idle and idling.tid == threading.get_native_id()
        )

    def _watch_writer(self) -> None:
        """(The flusher, waiting for the writer) the loop's check of :meth:`full`, for when
        no request comes in to make it: the CPU may be kept busy by another process."""
        beat = self._beat
        if beat and (time.monotonic() - beat > STARVED_S or self.oldest_age() > BEHIND_S):
            self._behind()

    def _writer_pause(self) -> bool:
        assert self._db is not None
        return self._pause(self._db.idling)

    def _note_refusals(self, batch: _Batch) -> None:
        """Requests refused for want of room since the last note: one event with the count."""
        refused = self.refused - self._refused_reported
        if refused <= 0:
            return
        self._refused_reported += refused
        row = _event_row(
            time.time(),
            "audit_overload",
            "high",
            json.dumps({"refused_requests": refused, "limit": self.limit}),
        )
        batch.audit_rows.append(row)
        batch.lines.append(_line(row))

    def _failed(self, cause: str, count: int, what: str) -> None:
        self.write_failures += 1
        self.last_error = cause[:500]
        now = time.time()
        if self.failing_since is None:
            self.failing_since = now
        if now - self._last_log >= LOG_EVERY_S or self._stop:
            self._last_log = now
            log.error(
                "audit write failed (%s): %d %s; %d unwritten",
                self.last_error,
                count,
                what,
                self.unwritten(),
            )

    def _recovered(self) -> None:
        """After a write that worked: record the gap the failure left, once."""
        if self.failing_since is None:
            return
        details = {
            "since": iso_ts(self.failing_since),
            "until": iso_ts(time.time()),
            "delayed_records": self.delayed,
            "lines_lost": self.lines_lost,
            "refused_requests": self.refused,
            "write_failures": self.write_failures,
            "cause": self.last_error,
        }
        self.failing_since = None
        log.warning("audit writes work again: %s", json.dumps(details))
        self.event("audit_gap", "high", "", details)
        self.gaps_recorded += 1
        self._wake.set()

    def _write_lines(self, lines: list[str]) -> None:
        if self._path is None or not lines:
            return
        if self._file is None:
            self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self._path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
            # (texts are escaped when formatted; the handler is a last line of defence)
            self._file = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
        try:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
        except OSError:
            # (a partly written buffer must not be written again later: start afresh)
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
            raise
        if self._file.tell() >= self.rotate_bytes:
            self._rotate()

    #: The JSON Lines file is rolled over (renamed, never deleted) past this size.
    rotate_bytes = 64 * 1024 * 1024

    def _rotate(self) -> None:
        assert self._path is not None and self._file is not None
        self._file.close()
        self._file = None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self._path.with_name(f"{self._path.stem}-{stamp}{self._path.suffix}")
        n = 1
        while target.exists():
            target = self._path.with_name(f"{self._path.stem}-{stamp}-{n}{self._path.suffix}")
            n += 1
        os.replace(self._path, target)

    def _write_db(self, batch: _Batch) -> None:
        assert self._db is not None
        counts = write_batch(
            self._db,
            batch.audit_rows,
            batch.blocks,
            batch.intrusions,
            batch.anomalies,
            escape=_escape_row,
            pause=self._writer_pause if batch.paced else None,
            watch=self._watch_writer,
        )
        self.rows_escaped += counts["escaped"]
        self.rows_dropped += counts["dropped"]

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.flush()
        if self._kept is not None:
            log.error(
                "audit closed with %d records unwritten (%s)", self._kept.count, self.last_error
            )
        if self._file is not None:
            self._file.close()
            self._file = None
