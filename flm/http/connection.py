"""A lean pooled HTTP/1.1 client connection for engine traffic.

One :class:`Connection` is an asyncio protocol around one TCP (or TLS) connection to an engine,
parsed with the httptools (llhttp) C parser. It carries one request at a time and keeps the
response's parts as the parser hands them over: status and headers, body chunks in arrival order,
the end of the message, or the error that ended the connection. Nothing here knows about pools,
timeouts or FLM's errors beyond what the callers in :mod:`flm.http.client` need; they own those.

Why not a general-purpose client: engine traffic is one upstream, small JSON requests and long
streamed replies, on the proxy's hot path. A general client spends most of a short request's time
on features this traffic never uses (cookies, redirects, proxies, tracing, multi-part encoding),
which the benchmark showed as about a third of FLM's CPU per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

import httptools

from flm.core.errors import EngineApiError, EngineError, EngineNetworkError

#: Pause reading from the engine while this many bytes wait for a slow consumer.
HIGH_WATER = 256 * 1024

#: The response headers the connection itself looks at (lower case).
_CONTENT_LENGTH, _TRANSFER_ENCODING, _CONTENT_ENCODING, _FLM_PROXY = 1, 2, 3, 4
_WATCHED = {
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"content-encoding": _CONTENT_ENCODING,
    b"x-flm-proxy": _FLM_PROXY,
}


class Headers:
    """Response headers: raw ``(name, value)`` pairs in order, looked up case-insensitively."""

    __slots__ = ("_map", "_raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._map: dict[str, str] | None = None

    def _lookup(self) -> dict[str, str]:
        if self._map is None:
            m: dict[str, str] = {}
            for k, v in self._raw:
                m.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
            self._map = m
        return self._map

    def raw(self) -> list[tuple[bytes, bytes]]:
        return self._raw

    def items(self) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self._raw]

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._lookup().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup()

    def __len__(self) -> int:
        return len(self._raw)


class Connection(asyncio.Protocol):
    """One keep-alive connection to an engine (see the module docstring)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        #: Set once the connection is gone (by either side).
        self.closed = False
        #: Used for an earlier request (a failure before any byte may be a stale keep-alive).
        self.reused = False
        #: ``loop.time()`` when it went back to the pool.
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None
        #: ``loop.time()`` by which the current wait must end (see :class:`Deadlines`).
        self.deadline = 0.0
        self._paused = False
        self._active = False
        self._head_only = False
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.content_encoding: bytes | None = None
        self.headers_done = False
        self.complete = False
        self.error: EngineError | None = None
        self.got_bytes = False
        self.flm_listener = False
        self._length_known = False
        self._keep_alive = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0

    # -- used by the client -------------------------------------------------------------------

    def begin(self, head_only: bool) -> None:
        """Reset the per-response state before a request is written."""
        self._active = True
        self._head_only = head_only
        self.status = 0
        self.raw_headers = []
        self.content_length = None
        self.content_encoding = None
        self.headers_done = False
        self.complete = False
        self.error = None
        self.got_bytes = False
        self.flm_listener = False
        self._length_known = False
        self._keep_alive = False
        self._chunks.clear()
        self._buffered = 0

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            self.closed = True
            self.error = EngineNetworkError("connection closed before the request was sent")
            return
        transport.write(data)

    def reusable(self) -> bool:
        """After a complete response: may this connection carry the next request?"""
        return (
            self.complete
            and self._keep_alive
            and not self.closed
            and not self._head_only
            and self.error is None
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def finish(self) -> None:
        """The response is done with (before the connection goes back to the pool)."""
        self._active = False
        self.reused = True

    def abort(self) -> None:
        self.closed = True
        self._active = False
        if self.transport is not None:
            self.transport.abort()

    def has_data(self) -> bool:
        return self._buffered > 0

    def take(self) -> bytes:
        """All body bytes received so far (may be empty); reading resumes if it was paused."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def wait(
        self, loop: asyncio.AbstractEventLoop, deadline: float, deadlines: Deadlines
    ) -> None:
        """Until the parser reports progress or the connection ends; ``TimeoutError`` once
        ``loop.time()`` passes ``deadline`` first (checked by ``deadlines``)."""
        fut: asyncio.Future[None] = loop.create_future()
        self._waiter = fut
        self.deadline = deadline
        deadlines.add(loop, self)
        try:
            await fut
        finally:
            self._waiter = None
            deadlines.waiting.discard(self)

    def expire(self) -> None:
        fut = self._waiter
        if fut is not None:
            expire(fut)

    def _wake(self) -> None:
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- asyncio protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._active:
            # Bytes on an idle connection: nothing asked for them; the connection is unusable.
            self.abort()
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.error is None:
                self.error = EngineApiError(f"engine sent a malformed HTTP response: {exc}")
            self.abort()
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._active and not self.complete and self.error is None:
            if self.headers_done and not self._length_known:
                self.complete = True  # a body delimited by the end of the connection
            else:
                detail = f": {exc}" if exc else ""
                if self.headers_done:  # it answered, then broke: a bad reply (502), not down
                    self.error = EngineApiError(
                        f"engine closed the connection mid-response{detail}"
                    )
                else:
                    self.error = EngineNetworkError(
                        f"engine closed the connection before answering{detail}"
                    )
        self._wake()

    # -- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # A second reply right behind the one asked for: the stream is out of step.
            self._keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))
        kind = _WATCHED.get(name.lower())
        if kind is None:
            return
        if kind == _CONTENT_LENGTH:
            self._length_known = True
            try:
                self.content_length = int(value)
            except ValueError:
                self.content_length = None
        elif kind == _TRANSFER_ENCODING:
            self._length_known = True
        elif kind == _CONTENT_ENCODING:
            self.content_encoding = value
        else:
            self.flm_listener = True

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if 100 <= self.status < 200:
            # An interim response (we never send Expect, but an engine may still say 100):
            # forget it and wait for the real one.
            self.raw_headers = []
            self.content_length = None
            self._length_known = False
            return
        self.headers_done = True
        # Read now: the parser forgets it once the message is complete.
        self._keep_alive = self._parser.should_keep_alive()
        if self._head_only:
            self.complete = True

    def on_body(self, body: bytes) -> None:
        # (called per chunk of a chunked body: a stream's read can hold dozens; whether to
        # pause reading is decided once per read, in data_received)
        self._chunks.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.complete = True


class Deadlines:
    """The deadlines of the connections waiting for an engine, checked together every
    ``TICK_S`` while any is waiting: a wait costs a set insertion instead of a loop timer
    created and cancelled (which showed in the per-request profile). Timeouts fire up to one
    tick late, which is nothing next to their size (seconds)."""

    TICK_S = 0.05

    def __init__(self) -> None:
        self.waiting: set[Connection] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, loop: asyncio.AbstractEventLoop, conn: Connection) -> None:
        if loop is not self._loop:  # the client is used from another loop now
            self._loop = loop
            self._handle = None
            self.waiting = set()
        self.waiting.add(conn)
        if self._handle is None:
            self._handle = loop.call_later(self.TICK_S, self._tick)

    def _tick(self) -> None:
        self._handle = None
        loop = self._loop
        if not self.waiting or loop is None:
            return
        now = loop.time()
        for conn in [c for c in self.waiting if c.deadline <= now]:
            self.waiting.discard(conn)
            conn.expire()
        if self.waiting:
            self._handle = loop.call_later(self.TICK_S, self._tick)


def expire(fut: asyncio.Future[None]) -> None:
    """Timer callback: fail a waiter that is still waiting with ``TimeoutError``."""
    if not fut.done():
        fut.set_exception(TimeoutError())
