"""The pooled upstream HTTP client: engine requests, their limits and timeouts, and the one
place connection failures become FLM errors (the wire protocol itself is in
:mod:`flm.http.connection`)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import ssl
import urllib.parse
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from flm.core.errors import (
    EngineApiError,
    EngineError,
    EngineNetworkError,
    EngineNotFoundError,
    EngineRequestRejectedError,
    EngineTimeoutError,
)
from flm.core.memo import remember
from flm.http.connection import HIGH_WATER, Connection, Deadlines, Headers, expire

#: Largest non-streamed JSON body accepted from an engine.
MAX_JSON_BYTES = 64 * 1024 * 1024
#: Compact JSON for request bodies (one encoder: ``json.dumps`` with options builds one a call).
_compact = json.JSONEncoder(separators=(",", ":")).encode
#: Header FLM's own listeners always send, so detection never mistakes FLM for an engine.
FLM_PROXY_HEADER = "X-FLM-Proxy"
#: Idle pooled connections older than this are not reused, and are closed (a sweep runs while
#: any connection is idle), so FLM never holds an engine's connections it no longer uses.
KEEPALIVE_S = 30.0


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 5.0
    first_byte_s: float = 60.0
    idle_s: float = 60.0
    #: A stream longer than this is cut (protects against engines that never stop).
    max_stream_s: float = 3600.0
    max_stream_bytes: int = 512 * 1024 * 1024


class FlmListenerError(EngineApiError):
    """The endpoint is one of FLM's own proxies, not an engine."""


def _proxy_exceptions() -> tuple[type[Exception], ...]:
    """What a SOCKS opener (python-socks, see :func:`flm.egress.connector.opener_for`) raises
    when the proxy fails or refuses the connection; imported only when a connection failed."""
    import python_socks

    return (
        python_socks.ProxyError,
        python_socks.ProxyConnectionError,
        python_socks.ProxyTimeoutError,
    )


def _status_error(status: int, message: str) -> EngineError:
    text = f"engine answered HTTP {status}: {message}"[:2000]
    err: EngineError
    if status == 404:
        err = EngineNotFoundError(text)
    elif status in (429, 503):
        err = EngineNetworkError(text)
    elif status == 504 or status == 408:
        err = EngineTimeoutError(text)
    else:
        err = EngineRequestRejectedError(text) if 400 <= status < 500 else EngineApiError(text)
    err.details = {"upstream_status": status}
    return err


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:500].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            return str(err.get("message") or err)
        if err is not None:
            return str(err)
    return str(data)[:500]


class UpstreamResponse:
    """A response whose headers arrived; the body is read with limits and timeouts.

    Its connection goes back to the pool only when the body was read to its end
    (:meth:`finish` with ``complete=True``, or :meth:`release` after a full read); anything else
    closes it, so an engine generating for a client that went away stops at once.
    """

    def __init__(self, conn: Connection, client: EngineClient, timeouts: Timeouts) -> None:
        self._conn = conn
        self._client = client
        self._timeouts = timeouts
        self._done = False
        self.status = conn.status
        self.headers = Headers(conn.raw_headers)

    async def read_json(self, limit: int = MAX_JSON_BYTES) -> Any:
        body = await self.read(limit)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise EngineApiError(f"engine sent invalid JSON: {exc}") from exc

    async def read(self, limit: int = MAX_JSON_BYTES) -> bytes:
        conn = self._conn
        if conn.complete and not self._done:
            body = conn.take()  # the common case: a JSON reply already here whole
            if len(body) > limit:
                raise EngineApiError(f"engine response exceeded {limit} bytes")
        else:
            body = b"".join([chunk async for chunk in self.iter_chunks(max_bytes=limit)])
        if conn.content_encoding:
            body = _decompress(body, conn.content_encoding.decode("latin-1"), limit)
        return body

    async def iter_chunks(self, *, max_bytes: int | None = None) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (whatever arrived since the last step, in one piece), with
        the idle timeout between them and the overall stream limits."""
        conn = self._conn
        limit = self._timeouts.max_stream_bytes if max_bytes is None else max_bytes
        loop = self._client._running_loop()
        end = loop.time() + self._timeouts.max_stream_s
        idle = self._timeouts.idle_s
        total = 0
        try:
            while True:
                if conn.has_data():
                    chunk = conn.take()
                    total += len(chunk)
                    if total > limit:
                        raise EngineApiError(f"engine response exceeded {limit} bytes")
                    yield chunk
                    continue
                if conn.complete:
                    return
                if conn.error is not None:
                    raise conn.error
                now = loop.time()
                try:
                    await conn.wait(loop, min(now + idle, end), self._client.deadlines)
                except TimeoutError:
                    if loop.time() >= end:
                        raise EngineTimeoutError(
                            f"engine stream exceeded {self._timeouts.max_stream_s:.0f} s"
                        ) from None
                    raise EngineTimeoutError(
                        f"engine sent nothing for {idle:g} s (idle timeout)"
                    ) from None
        except BaseException:
            self.close()
            raise

    def release(self) -> None:
        """Done with the response: pooled again if it was read to its end, else closed."""
        self.finish(self._conn.complete and not self._conn.has_data())

    def close(self) -> None:
        """Drop the connection (used when the client went away mid-stream)."""
        self.finish(False)

    def finish(self, complete: bool) -> None:
        """A body read to its end goes back to the pool; anything else drops the connection,
        so the engine stops generating at once."""
        if self._done:
            return
        self._done = True
        self._client._put_back(self._conn, complete)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A compressed JSON reply (FLM never asks for one, but an engine may send it anyway)."""
    enc = encoding.strip().lower()
    if enc in ("identity", ""):
        return body
    if enc not in ("gzip", "x-gzip", "deflate"):
        raise EngineApiError(f"engine sent an unsupported content encoding {encoding!r}")
    wbits = 31 if "gzip" in enc else 15
    try:
        d = zlib.decompressobj(wbits)
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        if enc != "deflate":
            raise EngineApiError(f"engine sent a broken {enc} body: {exc}") from exc
        try:  # some servers send raw deflate without the zlib wrapper
            d = zlib.decompressobj(-15)
            out = d.decompress(body, limit + 1)
        except zlib.error as exc2:
            raise EngineApiError(f"engine sent a broken deflate body: {exc2}") from exc2
    if len(out) > limit:
        raise EngineApiError(f"engine response exceeded {limit} bytes")
    return out


#: Opens a socket to ``(host, port)`` by some other route (the egress layer's SOCKS5 proxy); the
#: client bounds it in time and then speaks HTTP (and TLS) over it.
Opener = Callable[[str, int], Awaitable[socket.socket]]


class EngineClient:
    """Pooled keep-alive connections to one engine base URL.

    At most ``limit`` connections are open at once (more requests wait for one); idle ones are
    kept for :data:`KEEPALIVE_S` seconds, then closed. ``opener`` (from the egress layer) makes
    the TCP connections when the engine must be reached through a SOCKS5 proxy.
    """

    def __init__(
        self,
        base_url: str,
        timeouts: Timeouts | None = None,
        limit: int = 256,
        opener: Opener | None = None,
        api_key: str | None = None,
        name: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        #: How errors name the engine: by its id when it has one (these messages reach API
        #: clients, who have no business learning the engine's address), else by its URL.
        self.where = f"engine {name!r}" if name else f"engine at {self.base_url}"
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"engine URL must be http(s)://host[:port]: {base_url!r}")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        default_port = self._port == (443 if self._tls else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        host_header = host if default_port else f"{host}:{self._port}"
        #: Header lines every request carries, right after the request line.
        self._fixed = f"Host: {host_header}\r\n"
        if api_key:
            _check_header("Authorization", api_key)
            self._fixed += f"Authorization: Bearer {api_key}\r\n"
        self.timeouts = timeouts or Timeouts()
        self._opener = opener
        self._limit = limit
        self._open = 0
        self._idle: list[Connection] = []
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._sweep: asyncio.TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = None
        self.deadlines = Deadlines()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Request heads up to Content-Length, by (method, path, headers): they repeat.
        self._heads: dict[tuple[str, str, tuple[tuple[str, str], ...]], bytes] = {}

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, remembered: on Python 3.11 every ``asyncio.get_running_loop()``
        makes a ``getpid()`` system call (to notice a fork), twice per request here."""
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()

    # -- the pool ---------------------------------------------------------------------------

    def _put_back(self, conn: Connection, complete: bool) -> None:
        conn.finish()
        if complete and not self._closed and conn.reusable():
            loop = self._running_loop()
            conn.idle_since = loop.time()
            self._idle.append(conn)
            if self._sweep is None:
                self._sweep = loop.call_later(KEEPALIVE_S, self._close_expired)
        else:
            conn.abort()
        self._release_slot()

    def _close_expired(self) -> None:
        """Close the idle connections past :data:`KEEPALIVE_S`; run again while any is idle
        (the oldest are first in the list: connections are taken from its end)."""
        self._sweep = None
        now = self._running_loop().time()
        idle = self._idle
        expired = 0
        while expired < len(idle) and (
            idle[expired].closed or now - idle[expired].idle_since >= KEEPALIVE_S
        ):
            idle[expired].abort()
            expired += 1
        del idle[:expired]
        if idle and not self._closed:
            wait = max(0.0, idle[0].idle_since + KEEPALIVE_S - now)
            self._sweep = self._running_loop().call_later(wait, self._close_expired)

    def _release_slot(self) -> None:
        self._open -= 1
        self._wake_slot_waiter()

    def _wake_slot_waiter(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def _acquire(self, loop: asyncio.AbstractEventLoop, deadline: float) -> Connection:
        """A connection (from the pool or new) with one slot of ``limit`` taken for it."""
        while self._open >= self._limit:
            fut: asyncio.Future[None] = loop.create_future()
            self._slot_waiters.append(fut)
            handle = loop.call_at(deadline, expire, fut)
            try:
                await fut
            except TimeoutError:
                raise EngineTimeoutError(
                    f"all {self._limit} connections to the {self.where} stayed busy"
                ) from None
            except BaseException:
                # Woken for a free slot just as we gave up: the next waiter gets it.
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._wake_slot_waiter()
                raise
            finally:
                handle.cancel()
        self._open += 1
        try:
            idle = self._idle
            now = loop.time()
            while idle:
                conn = idle.pop()
                if conn.closed or now - conn.idle_since > KEEPALIVE_S:
                    conn.abort()
                    continue
                return conn
            return await self._connect(loop, deadline)
        except BaseException:
            self._release_slot()
            raise

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> Connection:
        wait = max(0.0, min(self.timeouts.connect_s, deadline - loop.time()))
        ssl_ctx = self._ssl_context() if self._tls else None
        server_hostname = self._host if self._tls else None
        try:
            async with asyncio.timeout(wait):
                if self._opener is not None:
                    sock = await self._opener(self._host, self._port)
                    transport, conn = await loop.create_connection(
                        Connection, sock=sock, ssl=ssl_ctx, server_hostname=server_hostname
                    )
                    # uvloop may call connection_made only on the next loop iteration.
                    conn.transport = conn.transport or transport
                else:
                    _, conn = await loop.create_connection(
                        Connection,
                        self._host,
                        self._port,
                        ssl=ssl_ctx,
                        server_hostname=server_hostname,
                    )
        except TimeoutError:
            raise EngineTimeoutError(f"cannot connect to {self.where} within {wait:g} s") from None
        except OSError as exc:
            # (the errno's text: the exception's own text names the address)
            reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
            raise EngineNetworkError(f"cannot connect to {self.where}: {reason}") from exc
        except Exception as exc:
            if isinstance(exc, _proxy_exceptions()):
                raise EngineNetworkError(
                    f"cannot reach {self.where} through the egress proxy: {exc}"
                ) from exc
            raise
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    # -- requests ---------------------------------------------------------------------------

    def _head(
        self, method: str, path: str, headers: dict[str, str] | None, length: int | None
    ) -> bytes:
        key = (method, path, tuple(headers.items()) if headers else ())
        start = self._heads.get(key)
        if start is None:
            start = remember(self._heads, key, self._head_start(method, path, headers), 256)
        if length is None:
            return start + b"\r\n"
        return b"%bContent-Length: %d\r\n\r\n" % (start, length)

    def _head_start(self, method: str, path: str, headers: dict[str, str] | None) -> bytes:
        """The request head up to its framing, checked once per distinct request shape."""
        target = self._prefix + path
        if not target.startswith("/") or _BAD_TARGET.search(target):
            raise EngineApiError(f"refusing to send a malformed request target {target!r}")
        lines = [f"{method} {target} HTTP/1.1\r\n", self._fixed]
        if headers:
            for name, value in headers.items():
                _check_header(name, value)
                lines.append(f"{name}: {value}\r\n")
        return "".join(lines).encode("latin-1")

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        first_byte_s: float | None = None,
        check_status: bool = True,
        read: bool = False,
    ) -> UpstreamResponse:
        """Send a request and wait (bounded) for the response headers; with ``read``, a body
        of known length (up to ``HIGH_WATER``) is read under the same deadline."""
        body = data or b""
        if json_body is not None:
            body = _compact(json_body).encode()
            headers = dict(headers or {})
            headers["Content-Type"] = "application/json"
        conn = await self._send(method, path, body, headers, first_byte_s, read)
        return await self._response(conn, check_status)

    async def fetch(
        self, method: str, path: str, data: bytes, headers: dict[str, str] | None = None
    ) -> bytes:
        """A small request's whole response body, the status checked as :meth:`request`
        does, the connection pooled again. The usual reply (whole, plain, 2xx) is taken
        straight off the connection; anything else goes through :class:`UpstreamResponse`."""
        conn = await self._send(method, path, data, headers, None, True)
        if (
            conn.complete
            and conn.status < 400
            and not conn.flm_listener
            and not conn.content_encoding
        ):
            body = conn.take()
            if len(body) > MAX_JSON_BYTES:
                self._put_back(conn, False)
                raise EngineApiError(f"engine response exceeded {MAX_JSON_BYTES} bytes")
            self._put_back(conn, True)
            return body
        resp = await self._response(conn, True)
        try:
            return await resp.read()
        finally:
            resp.release()

    async def _send(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str] | None,
        first_byte_s: float | None,
        read: bool,
    ) -> Connection:
        """Write the request on a pooled connection and wait for the response head (and, with
        ``read``, a body of known length up to ``HIGH_WATER``); the connection, still
        holding its pool slot."""
        if self._closed:
            raise EngineNetworkError(f"the client for {self.where} was closed")
        length = len(body) if body or method not in _NO_BODY else None
        head = self._head(method, path, headers, length)
        wait = self.timeouts.first_byte_s if first_byte_s is None else first_byte_s
        loop = self._running_loop()
        deadline = loop.time() + wait
        deadlines = self.deadlines
        for attempt in (0, 1):
            conn = await self._acquire(loop, deadline)
            try:
                conn.begin(method == "HEAD")
                if len(body) < 65536:
                    conn.write(head + body)  # one segment for the usual small request
                else:
                    conn.write(head)
                    conn.write(body)
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(loop, deadline, deadlines)
                # (Only what fits under the connection's read pause: a larger body is read
                # by the caller, which drains it.)
                if read and conn.content_length is not None and conn.content_length <= HIGH_WATER:
                    while not conn.complete:
                        if conn.error is not None:
                            raise conn.error
                        await conn.wait(loop, deadline, deadlines)
            except EngineNetworkError:
                stale = conn.reused and not conn.got_bytes and attempt == 0
                self._put_back(conn, False)
                if stale and loop.time() < deadline:
                    continue  # a keep-alive connection the engine had just closed: once more
                raise
            except TimeoutError:
                self._put_back(conn, False)
                raise EngineTimeoutError(f"{self.where} did not answer within {wait:g} s") from None
            except BaseException:
                self._put_back(conn, False)
                raise
            return conn
        raise AssertionError("unreachable")  # (the second attempt returns or raises)

    async def _response(self, conn: Connection, check_status: bool) -> UpstreamResponse:
        upstream = UpstreamResponse(conn, self, self.timeouts)
        if conn.flm_listener:
            upstream.close()
            raise FlmListenerError(f"{self.where} is an FLM proxy, not an engine")
        if check_status and conn.status >= 400:
            try:
                body_bytes = await upstream.read(64 * 1024)
            except EngineError:
                body_bytes = b""
            finally:
                upstream.release()
            raise _status_error(conn.status, _error_message(body_bytes))
        return upstream

    async def get_json(
        self, path: str, *, first_byte_s: float | None = None, limit: int = MAX_JSON_BYTES
    ) -> Any:
        resp = await self.request("GET", path, first_byte_s=first_byte_s)
        try:
            return await resp.read_json(limit)
        finally:
            resp.release()

    async def post_json(self, path: str, body: Any, *, limit: int = MAX_JSON_BYTES) -> Any:
        resp = await self.request("POST", path, json_body=body)
        try:
            return await resp.read_json(limit)
        finally:
            resp.release()


_NO_BODY = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


_BAD_TARGET = re.compile(r"[\s\x00-\x1f\x7f]")
_BAD_NAME = re.compile(r"[\s:\x00-\x1f\x7f]")
_BAD_VALUE = re.compile(r"[\r\n\x00]")


def _check_header(name: str, value: str) -> None:
    if not name or _BAD_NAME.search(name) or _BAD_VALUE.search(value):
        raise EngineApiError(f"refusing to send a malformed header {name!r}")
