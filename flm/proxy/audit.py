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
bounds the queue without dropping a record.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from flm.core.jsonlog import scrub
from flm.core.memo import remember
from flm.core.threads import background_thread
from flm.storage.db import Database
from flm.storage.records import AUDIT_COLUMNS, write_batch

log = logging.getLogger("flm.audit")

MAX_BATCH = 1024
#: Items formatted between two pauses of the flusher thread (see the module docstring).
SLICE = 16
#: The pause: long enough that the event loop, if it waits for the GIL, surely gets it.
_PAUSE_S = 0.0001
#: At most this many pauses per batch (a backlog gets longer slices, see the docstring).
MAX_PAUSES = 64
#: A batch this long is formatted without pauses (see the docstring).
HIGH_WATER = 20_000


def _pause() -> None:
    time.sleep(_PAUSE_S)


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


#: Texts :func:`scrub` left unchanged (paths, engine ids and model names repeat from request
#: to request; a text that held a secret is never kept here). Short texts only, so the memo
#: stays under a megabyte whatever clients send.
_clean: dict[str, None] = {}
_CLEAN_MAX = 4096
_CLEAN_TEXT_MAX = 256


def _scrub(text: str) -> str:
    if text in _clean:
        return text
    out = scrub(text)
    if out == text and len(text) <= _CLEAN_TEXT_MAX:
        remember(_clean, text, None, _CLEAN_MAX)
    return out


class AuditSink:
    def __init__(self, db: Database | None, jsonl_path: Path | None,
                 interval: float = 0.2) -> None:
        self._db = db
        self._path = jsonl_path
        self._interval = interval
        self._items: deque[tuple[str, tuple[Any, ...]]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()
        self._file: Any = None
        self._thread = threading.Thread(target=self._run, name="flm-audit", daemon=True)
        self._thread.start()

    # --- producers (request path: O(1), no I/O) --------------------------------------------

    def request(self, ts: float, request_id: str, client_ip: str, api_key_id: str | None,
                endpoint: str, method: str, engine_id: str | None, model: str | None,
                status: int, latency_ms: float, prompt_tokens: int | None,
                completion_tokens: int | None, error_type: str | None) -> None:
        self._items.append(("request", (ts, request_id, client_ip, api_key_id, endpoint, method,
                                        engine_id, model, status, latency_ms, prompt_tokens,
                                        completion_tokens, error_type)))
        if len(self._items) >= MAX_BATCH:
            self._wake.set()

    def event(self, event_type: str, severity: str, client_ip: str,
              details: dict[str, Any] | None = None, request_id: str | None = None,
              endpoint: str | None = None) -> None:
        self._items.append(("event", (time.time(), event_type, severity, client_ip,
                                      details or {}, request_id, endpoint)))

    def block(self, ip: str, reason: str, since: float, until: float | None,
              failures: int, listener: str = "*") -> None:
        self._items.append(("block", (ip, reason, since, until, failures, listener)))

    def intrusion(self, ip: str, points: int, total: int, reasons: tuple[str, ...],
                  path: str, user_agent: str, request_id: str) -> None:
        self._items.append(("intrusion", (time.time(), ip, points, total, reasons, path,
                                          user_agent, request_id)))

    def anomaly(self, ip: str, kind: str, value: float, threshold: float,
                request_id: str | None) -> None:
        self._items.append(("anomaly", (time.time(), ip, kind, value, threshold, request_id)))

    # --- the flusher -------------------------------------------------------------------------

    def _run(self) -> None:
        background_thread()
        while not self._stop:
            self._wake.wait(self._interval)
            self._wake.clear()
            try:
                self.flush(pause=True)
            except Exception:  # pragma: no cover - logged, never fatal for the proxy
                log.exception("audit flush failed")

    def flush(self, *, pause: bool = False) -> int:
        """Write everything queued so far; returns the number of items written. With
        ``pause`` (the flusher thread), the GIL is given up between slices."""
        with self._lock:
            batch: list[tuple[str, tuple[Any, ...]]] = []
            while self._items:
                batch.append(self._items.popleft())
            if not batch:
                return 0
            audit_rows: list[tuple[Any, ...]] = []
            lines: list[str] = []
            blocks: list[tuple[Any, ...]] = []
            intrusions: list[tuple[Any, ...]] = []
            anomalies: list[tuple[Any, ...]] = []
            step = max(SLICE, len(batch) // MAX_PAUSES)
            pause = pause and len(batch) <= HIGH_WATER
            for n, (kind, item) in enumerate(batch, 1):
                if pause and n % step == 0:
                    _pause()
                row: tuple[Any, ...]
                if kind == "request":
                    (ts, rid, ip, key_id, endpoint, method, engine, model, status, latency,
                     p_tok, c_tok, err) = item
                    # (the model is the client's text: a key pasted there is redacted too)
                    row = (iso_ts(ts), rid, ip, key_id, _scrub(endpoint)[:512], method,
                           None if engine is None else _scrub(engine)[:128],
                           None if model is None else _scrub(model)[:512], status,
                           round(latency, 3), p_tok, c_tok, err, "request", "info", None)
                elif kind == "event":
                    ts, event_type, severity, ip, details, rid, endpoint = item
                    row = (iso_ts(ts), rid, ip, None, scrub(endpoint or "")[:512] or None, None,
                           None, None, None, None, None, None, None, event_type, severity,
                           scrub(json.dumps(details, default=str)))
                elif kind == "block":
                    ip, reason, since, until, failures, listener = item
                    blocks.append((ip, listener, reason, failures, iso_ts(since),
                                   None if until is None else iso_ts(until),
                                   1 if until is None else 0))
                    continue
                elif kind == "intrusion":
                    ts, ip, points, total, reasons, path, agent, rid = item
                    intrusions.append((iso_ts(ts), ip, points, total, json.dumps(list(reasons)),
                                       scrub(path)[:512], scrub(agent)[:256], rid))
                    continue
                else:
                    ts, ip, kind_name, value, threshold, rid = item
                    anomalies.append((iso_ts(ts), ip, kind_name, value, threshold, None, rid))
                    continue
                audit_rows.append(row)
                lines.append(_line(row))
            try:
                self._write_lines(lines)
            finally:
                # The database gets the batch even when the JSON Lines file cannot (disk full):
                # the table is the record of truth.
                if self._db is not None:
                    self._write_db(audit_rows, blocks, intrusions, anomalies)
            return len(batch)

    def _write_lines(self, lines: list[str]) -> None:
        if self._path is None or not lines:
            return
        if self._file is None:
            self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self._path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()
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

    def _write_db(self, audit_rows: list[tuple[Any, ...]], blocks: list[tuple[Any, ...]],
                  intrusions: list[tuple[Any, ...]], anomalies: list[tuple[Any, ...]]) -> None:
        assert self._db is not None
        write_batch(self._db, audit_rows, blocks, intrusions, anomalies)

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
