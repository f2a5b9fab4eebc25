"""FLM's HTTP/1.1 server: ASGI 3 (``http`` scopes) over an asyncio protocol and the httptools
(llhttp) request parser, on a socket FLM binds itself, so "port in use" is known before
anything else starts and several servers share one loop.

Why not a general-purpose server: the gateway's added latency is mostly per-request Python
work, and a server that only has to serve FLM's own apps can skip what they never need
(WebSockets, lifespan, per-header validation of what FLM itself produced) and send a small
reply's head and body in one write, which saves the client a wake-up. What it keeps:

- keep-alive (15 s idle) and pipelining (one request runs at a time; reading pauses while
  more requests wait);
- limits: a request head over 64 KB gets 431, a head not finished within 10 s gets 408, a body
  not finished within ``body_timeout_s`` makes ``receive()`` raise :class:`RequestBodyTimeout`
  (the gateway turns it into its 408 error), and reading pauses while 64 KB of body wait for the
  app;
- its own refusals (400, 408, 431, 500: the app never saw the request, or failed before
  answering) are rendered by the ``refusal`` function it is given (the gateway's renders its
  error contract); it knows nothing of the apps it serves;
- ``Expect: 100-continue`` answered when the app first asks for the body;
- chunked responses when the app gives no ``Content-Length``; no body for ``HEAD``;
- a reply cut short by an app error closes the connection; a response sent before the request
  body was read whole closes it too (the rest of the body is never read);
- a client that goes away: ``receive()`` returns ``http.disconnect``, the callback an app gave
  the scope's ``DISCONNECT_HOOK`` runs (so an app need not keep a task waiting on
  ``receive()`` to learn of it), and later sends are dropped;
- graceful stop: no new connections, idle ones closed, running requests get
  ``timeout_graceful_shutdown_s`` to finish;
- connection caps (:class:`ConnectionLimits`): per client address and in total, with a
  reserve of the total that only privileged clients (the owner, on loopback) may use; a
  connection over a cap gets a 503 and is closed before anything of it is read. The soft
  ``RLIMIT_NOFILE`` is raised toward the hard limit when a server starts, and the listen
  backlog is :data:`LISTEN_BACKLOG`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import http
import logging
import re
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote

import httptools

from flm.core.clients import subject
from flm.core.errors import ProxyError, ProxyPortInUseError
from flm.http.asgi import DISCONNECT_HOOK, HEADER_LINES, ASGIApp, Message, RequestBodyTimeout, Scope

log = logging.getLogger("flm.proxy")

#: Renders one of the server's own refusals: ``(status, code, message)`` to the response
#: headers (content type included; no length or framing) and the body.
Refusal = Callable[[int, str, str], tuple[Sequence[tuple[bytes, bytes]], bytes]]

#: Largest request head (request line + headers) accepted.
MAX_HEADER_BYTES = 64 * 1024
#: A client must finish sending a request head within this many seconds of starting it.
HEADER_TIMEOUT_S = 10.0
#: Default deadline for a request body, from the end of its head.
BODY_TIMEOUT_S = 30.0
KEEPALIVE_TIMEOUT_S = 15.0
#: A client that reads nothing of a reply for this long is cut.
SEND_TIMEOUT_S = 60.0
GRACEFUL_SHUTDOWN_S = 5.0
#: Reading pauses while this much request body waits for the app.
BODY_HIGH_WATER = 64 * 1024
#: Replies up to this size are sent as one write with their head.
COALESCE_MAX = 256 * 1024

#: The listen() backlog of every socket FLM binds (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 2048
#: File descriptors kept out of the connection budget: the admin API, the databases, log
#: files and connections to engines need them.
FD_HEADROOM = 256
#: A connection closed with a request body unread discards what still comes for at most this
#: long and this much before it closes (so the client can read the refusal).
LINGER_S = 2.0
LINGER_BYTES = 8 * 1024 * 1024
#: The soft RLIMIT_NOFILE is raised toward the hard limit, but not past this.
NOFILE_TARGET = 1 << 20

_ASGI = {"version": "3.0", "spec_version": "2.3"}
_STATUS_LINES = {int(s): f"HTTP/1.1 {int(s)} {s.phrase}\r\n".encode() for s in http.HTTPStatus}
_NO_BODY_STATUSES = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Response header names the server looks at (lower case); the empty name is refused.
_LENGTH, _CONNECTION, _TRANSFER, _EMPTY = 1, 2, 3, 4
_FRAMING = {
    b"content-length": _LENGTH,
    b"connection": _CONNECTION,
    b"transfer-encoding": _TRANSFER,
    b"": _EMPTY,
}

_date_cache: tuple[int, bytes] = (0, b"")

#: A ``Host`` value: a bracketed IP literal or a registered name / IPv4 address (RFC 3986
#: characters), then an optional port; empty is allowed (RFC 9112 §3.2).
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")


class _BadHead(Exception):
    """A head that parses but must be refused (raised from a parser callback)."""


class _HeadTooLarge(_BadHead):
    """A head over the size limit that arrived whole (refused with 431)."""


def _check_host(
    index: dict[bytes, bytes], headers: list[tuple[bytes, bytes]], version: str
) -> None:
    """RFC 9112 §3.2: an HTTP/1.1 request has exactly one ``Host``, and a valid one. (A
    second or a malformed one is how requests are made to mean different things to the
    proxies along their way.)"""
    host = index.get(b"host")
    if host is None:
        if version == "1.1":
            raise _BadHead("missing Host header")
        return
    if len(index) != len(headers) and sum(name == b"host" for name, _ in headers) > 1:
        raise _BadHead("more than one Host header")
    if _HOST.fullmatch(host.rstrip(b" \t")) is None:  # (llhttp strips only the leading OWS)
        raise _BadHead("invalid Host header")


#: Request targets already split into (raw path, path, query): clients repeat a few of them.
_TARGETS: dict[bytes, tuple[bytes, str, bytes]] = {}


def _parse_target(url: bytes) -> tuple[bytes, str, bytes]:
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        raise httptools.HttpParserError("invalid request target") from None
    raw_path: bytes = parsed.path or b"/"
    path = raw_path.decode("latin-1")
    if "%" in path:
        path = unquote(path, errors="replace")
    target = (raw_path, path, parsed.query or b"")
    if len(url) <= 256:  # the usual short targets; a flood of distinct ones is not kept
        if len(_TARGETS) >= 1024:
            _TARGETS.clear()
        _TARGETS[url] = target
    return target


def _date_line() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, b"date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n")
    return _date_cache[1]


def plain_refusal(
    status: int, code: str, message: str
) -> tuple[Sequence[tuple[bytes, bytes]], bytes]:
    """The default rendering of a refusal: the message as plain text."""
    return [(b"content-type", b"text/plain; charset=utf-8")], message.encode() + b"\n"


def _error_response(state: _ServerState, status: int, code: str, message: str) -> bytes:
    """The server's own refusal (the app never saw the request), rendered by the server's
    ``refusal`` function, with the fixed headers; the connection closes after it."""
    headers, body = state.refusal(status, code, message)
    return (
        _STATUS_LINES[status]
        + _render_headers(headers)
        + b"content-length: %d\r\n%sconnection: close\r\n\r\n%s" % (len(body), state.fixed, body)
    )


def _render_headers(headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Header lines, checked once: a name or value that could split a line is refused."""
    lines = []
    for name, value in headers:
        if not name or any(c in name for c in b"\r\n: ") or b"\r" in value or b"\n" in value:
            raise ValueError(f"bad response header {name!r}: {value!r}")
        lines.append(name + b": " + value + b"\r\n")
    return b"".join(lines)


def raise_nofile_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` toward its hard limit (the common soft
    limit of 1,024 lets a few hundred idle connections starve everything else); returns the
    soft limit in force."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_TARGET if hard == resource.RLIM_INFINITY else min(hard, NOFILE_TARGET)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):  # pragma: no cover - refused by the system
            log.warning("could not raise the open-file limit from %d to %d", soft, want)
    return int(soft) if soft != resource.RLIM_INFINITY else NOFILE_TARGET


def default_connection_total() -> int:
    """Connections one listener accepts by default: what the open-file limit allows, less
    :data:`FD_HEADROOM`."""
    return max(64, raise_nofile_limit() - FD_HEADROOM)


def _nobody(ip: str) -> bool:
    return False


@dataclass
class ConnectionLimits:
    """Caps on a listener's open connections; the gateway updates them when its policy
    changes. ``per_address`` (0: none) counts a client's connections by address (an IPv6
    client by its /64); ``total`` (None: :func:`default_connection_total`) counts all, and the
    last ``reserve`` of them (None: a sixteenth, at least 2) only ``privileged`` clients may
    take, who are never held to ``per_address`` either."""

    per_address: int = 0
    total: int | None = None
    reserve: int | None = None
    privileged: Callable[[str], bool] = _nobody
    #: connections open now, in all and per address
    open: int = 0
    by_address: dict[str, int] = field(default_factory=dict)

    def budget(self) -> tuple[int, int]:
        total = self.total if self.total is not None else default_connection_total()
        self.total = total if self.total is None else self.total
        reserve = self.reserve if self.reserve is not None else max(2, total // 16)
        return total, min(reserve, total)

    def admit(self, ip: str) -> str | None:
        """Count a new connection from ``ip``; None when admitted, else why it is refused
        (then it is not counted)."""
        total, reserve = self.budget()
        if self.privileged(ip):
            if self.open >= total:
                return "the gateway has no connection left"
        else:
            if self.open >= total - reserve:
                return "the gateway has no connection left"
            who = subject(ip)
            if self.per_address and self.by_address.get(who, 0) >= self.per_address:
                return "too many connections from this address"
        who = subject(ip)
        self.open += 1
        self.by_address[who] = self.by_address.get(who, 0) + 1
        return None

    def release(self, ip: str) -> None:
        who = subject(ip)
        self.open -= 1
        left = self.by_address.get(who, 1) - 1
        if left > 0:
            self.by_address[who] = left
        else:
            self.by_address.pop(who, None)


class _ServerState:
    """What one server knows about its live connections and running requests."""

    def __init__(
        self,
        app: ASGIApp,
        scheme: str,
        body_timeout_s: float,
        headers: Sequence[tuple[bytes, bytes]] = (),
        refusal: Refusal = plain_refusal,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.app = app
        self.refusal = refusal
        self.limits = limits
        self.scheme = scheme
        self.body_timeout_s = body_timeout_s
        #: The lines of the headers every response carries, rendered once.
        self.fixed = _render_headers(headers)
        self.connections: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False


class _Cycle:
    """One request and its response."""

    __slots__ = (
        "body",
        "body_size",
        "chunked",
        "complete",
        "disconnected",
        "expect_100",
        "failed",
        "gone_callback",
        "head_only",
        "keep_alive",
        "last_delivered",
        "more_body",
        "pending_head",
        "proto",
        "running",
        "scope",
        "started",
        "timed_out",
        "waiter",
    )

    def __init__(
        self, proto: HttpProtocol, scope: Scope, keep_alive: bool, head_only: bool
    ) -> None:
        self.proto = proto
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect_100 = True  # until checked: the first receive() that must wait looks
        self.head_only = head_only
        self.body: list[bytes] = []
        self.body_size = 0
        self.more_body = True
        self.last_delivered = False
        self.disconnected = False
        #: The request's body could not be parsed: the app sees a disconnect, the client the
        #: server's 400.
        self.failed = False
        self.timed_out = False
        self.running = False
        self.started = False
        self.complete = False
        self.chunked = False
        self.pending_head: bytes | None = None
        self.waiter: asyncio.Future[None] | None = None
        #: Called once when the client goes away (the scope's DISCONNECT_HOOK sets it).
        self.gone_callback: Callable[[], None] | None = None

    def on_disconnect(self, callback: Callable[[], None] | None) -> asyncio.Task[None] | None:
        """The scope's :data:`~flm.http.asgi.DISCONNECT_HOOK`: ``callback`` is called once
        when the client goes away (at once if it has); None withdraws it. Returns the task
        that runs the app (the connection's worker)."""
        self.gone_callback = callback
        if callback is not None and self.disconnected:
            self._call_gone()
        return self.proto.worker

    def lose(self) -> None:
        """The client went away (or its request cannot be read any further): ``receive()``
        returns ``http.disconnect`` from now on, and the disconnect hook's callback runs."""
        self.disconnected = True
        self.wake()
        if self.gone_callback is not None:
            self._call_gone()

    def _call_gone(self) -> None:
        callback, self.gone_callback = self.gone_callback, None
        if callback is not None:
            try:
                callback()
            except Exception:  # (an app's callback never breaks the connection's cleanup)
                log.exception("error in a disconnect callback")

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def run(self) -> None:
        proto = self.proto
        try:
            await proto.state.app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            proto.abort_cycle(self)
            raise
        except BaseException:
            log.exception("error while serving %s %s", self.scope["method"], self.scope["path"])
            proto.abort_cycle(self)
        else:
            if not self.complete:
                if not self.started and not self.disconnected:
                    log.error(
                        "the app returned without a response to %s %s",
                        self.scope["method"],
                        self.scope["path"],
                    )
                proto.abort_cycle(self)
        finally:
            # The scope holds this cycle's bound method and the cycle holds the scope: a
            # reference cycle per request, which only the garbage collector could free (and
            # did, a collection every ~70 requests). Broken here, the request's objects go
            # as soon as the last reference does.
            self.scope.pop(DISCONNECT_HOOK, None)
            self.gone_callback = None

    # -- ASGI receive / send ----------------------------------------------------------------

    async def receive(self) -> Message:
        proto = self.proto
        parts = self.body
        if parts and not (self.more_body or self.disconnected or self.complete):
            # the usual case: the whole body is here
            self.body = []
            self.body_size = 0
            self.last_delivered = True
            proto.body_consumed()
            return {
                "type": "http.request",
                "body": parts[0] if len(parts) == 1 else b"".join(parts),
                "more_body": False,
            }
        if self.expect_100 and self.more_body and not self.body:
            self.expect_100 = False
            if (
                not self.started
                and not proto.transport_closing()
                and self.scope["http_version"] != "1.0"
                and any(
                    name == b"expect" and value.lower() == b"100-continue"
                    for name, value in self.scope["headers"]
                )
            ):  # (1.0 clients: RFC 9110 §10.1.1)
                proto.write(_CONTINUE)
        while not (
            self.disconnected
            or self.complete
            or self.timed_out
            or self.body
            or (not self.more_body and not self.last_delivered)
        ):
            waiter = self.waiter = proto.loop.create_future()
            await waiter
        if self.timed_out and self.more_body:
            raise RequestBodyTimeout("request body not received in time")
        if self.disconnected or self.complete or (self.last_delivered and not self.body):
            return {"type": "http.disconnect"}
        body = b"".join(self.body)
        self.body = []
        self.body_size = 0
        more = self.more_body
        if not more:
            self.last_delivered = True
        proto.body_consumed()
        return {"type": "http.request", "body": body, "more_body": more}

    async def send(self, message: Message) -> None:
        proto = self.proto
        if proto.write_paused and not self.disconnected:
            await proto.drain()
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {kind!r}")
            self._start(message["status"], message.get("headers"), message.get(HEADER_LINES))
            self.started = True
            return
        if kind != "http.response.body" or self.complete:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if self.head_only:
            body = b""
        elif self.chunked:
            if body:
                body = b"%x\r\n%b\r\n" % (len(body), body)
            if not more:
                body += b"0\r\n\r\n"
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            if len(body) <= COALESCE_MAX:
                body = head + body
            elif not self.disconnected:
                proto.write(head)
        if body and not self.disconnected:
            proto.write(body)
        if not more:
            self.complete = True
            proto.response_complete(self)

    def _start(self, status: int, headers: Any, ready: bytes | None) -> None:
        line = _STATUS_LINES.get(status)
        if line is None:
            line = b"HTTP/1.1 %d \r\n" % status
        parts = [line, _date_line()]
        has_length = False
        if headers:
            # Every header line in one pass of C code. The framing headers are found by the
            # start of their line, in any case (a CR or LF inside a name or value, which could
            # fake a line start, is refused below); a reply that names connection or
            # transfer-encoding, or has an empty name, takes the header-by-header way.
            block = b"\r\n".join(map(b": ".join, headers))
            low = b"\n" + block.lower()
            if b"\nconnection:" in low or b"\ntransfer-encoding:" in low or b"\n:" in low:
                has_length = self._header_lines(headers, parts)
            else:
                has_length = b"\ncontent-length:" in low
                # One line per header: a CR or LF inside a name or value would add one.
                joins = len(headers) - 1
                if block.count(b"\n") != joins or block.count(b"\r") != joins:
                    self._check_headers(headers)
                parts += (block, b"\r\n")
        if ready:
            parts.append(ready)  # (the app's own header lines: see flm.http.asgi.HEADER_LINES)
        state = self.proto.state
        if state.fixed:
            parts.append(state.fixed)
        if (
            not has_length
            and not self.head_only
            and status >= 200
            and status not in _NO_BODY_STATUSES
        ):
            self.chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive or state.stopping or self.more_body:
            # (A reply that starts before the request body was read whole ends the
            # connection: the rest of that body is never read.)
            self.keep_alive = False
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self.pending_head = b"".join(parts)
        # Sent with the first body part, or on the next loop turn if that takes longer.
        self.proto.loop.call_soon(self._flush_head)

    def _header_lines(self, headers: Any, parts: list[bytes]) -> bool:
        """The header lines of a reply that names a framing header, added to ``parts``
        (connection and transfer-encoding are left out: framing is this server's choice);
        returns whether it has a length."""
        has_length = False
        start = len(parts)
        for name, value in headers:
            kind = _FRAMING.get(name if name.islower() else name.lower())
            if kind is not None:
                if kind == _LENGTH:
                    has_length = True
                elif kind == _EMPTY:
                    raise RuntimeError("response header with an empty name")
                else:  # connection, transfer-encoding: framing is this server's choice
                    if kind == _CONNECTION and value.lower() == b"close":
                        self.keep_alive = False
                    continue
            parts += (name, b": ", value, b"\r\n")
        added = b"".join(parts[start:])
        lines = (len(parts) - start) // 4
        if added.count(b"\n") != lines or added.count(b"\r") != lines:
            self._check_headers(headers)
        return has_length

    @staticmethod
    def _check_headers(headers: Any) -> None:
        for name, value in headers:
            if b"\r" in name or b"\n" in name or b"\r" in value or b"\n" in value or b":" in name:
                raise RuntimeError("response header with CR, LF or ':' in its name or value")

    def _flush_head(self) -> None:
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            if not self.disconnected:
                self.proto.write(head)


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    max_head_bytes = MAX_HEADER_BYTES
    head_timeout_s = HEADER_TIMEOUT_S
    keepalive_timeout_s = KEEPALIVE_TIMEOUT_S
    send_timeout_s = SEND_TIMEOUT_S

    def __init__(self, state: _ServerState) -> None:
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.in_head = True
        self.head_bytes = 0
        self.chunk_size = 0
        # One deadline at a time (head, body or keep-alive), checked by the server's sweep:
        # no timer is created or cancelled per request.
        self.deadline = 0.0
        self.on_deadline: Any = None
        self.parsing: _Cycle | None = None  # the request whose body is being read
        #: A request whose head was parsed in the current read: dispatched once the read has
        #: parsed cleanly (bytes that break the framing right after a head stop it).
        self.starting: _Cycle | None = None
        self.active: _Cycle | None = None  # the request the app is serving
        #: The server's refusal, sent once the requests read before the bad bytes are answered.
        self.refusal: bytes | None = None
        self.pipeline: deque[_Cycle] = deque()
        self.read_paused = False
        self.write_paused = False
        self.drain_waiters: list[asyncio.Future[None]] = []
        self.worker: asyncio.Task[None] | None = None
        self.next_request: asyncio.Future[None] | None = None
        #: the address this connection is counted under in the server's limits
        self.counted: str | None = None
        #: bytes still discarded before a closing connection closes (None: not closing)
        self.lingering: int | None = None

    # -- connection events ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.state.connections.add(self)
        sockname = transport.get_extra_info("sockname")
        peername = transport.get_extra_info("peername")
        if isinstance(sockname, tuple):
            self.server = (str(sockname[0]), int(sockname[1]))
        if isinstance(peername, tuple):
            host = str(peername[0])
            if host.startswith("::ffff:") and "." in host:
                host = host[7:]  # an IPv4 client of a dual-stack socket is that IPv4 address
            self.client = (host, int(peername[1]))
        limits = self.state.limits
        if limits is not None:
            ip = self.client[0] if self.client else ""
            refused = limits.admit(ip)
            if refused is not None:
                transport.write(_error_response(self.state, 503, "overloaded", refused))
                transport.close()
                return
            self.counted = ip
        self._arm(self.head_timeout_s, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        if self.counted is not None and self.state.limits is not None:
            self.state.limits.release(self.counted)
            self.counted = None
        self._disarm()
        for cycle in (self.active, self.parsing, *self.pipeline):
            if cycle is not None:
                cycle.lose()
        self.pipeline.clear()
        self._wake_drain()
        self._wake_worker()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        waiters, self.drain_waiters = self.drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        """Until the client has read enough of what was written; a client that reads nothing
        for ``send_timeout_s`` is cut (a reader that never reads must not hold a connection,
        and through it a stream and an engine slot, forever)."""
        waiter = self.loop.create_future()
        self.drain_waiters.append(waiter)
        try:
            async with asyncio.timeout(self.send_timeout_s):
                await waiter
        except TimeoutError:
            log.info(
                "client %s read nothing for %g s: connection cut",
                self.client[0] if self.client else "?",
                self.send_timeout_s,
            )
            self.abort()

    def _linger(self, transport: asyncio.Transport) -> None:
        transport.write_eof()
        self.lingering = LINGER_BYTES
        self._arm(LINGER_S, self._linger_done)
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()

    def _linger_done(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None:
            self.lingering -= len(data)
            if self.lingering <= 0:
                self._linger_done()
            return
        # Bytes that arrive between two requests start the next head.
        in_head = self.in_head or self.parsing is None
        self.chunk_size = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._no_upgrade()
            return
        except httptools.HttpParserError as exc:
            bad = exc.__context__
            if isinstance(bad, _HeadTooLarge):
                self._fail(431, "headers_too_large", "request head too large")
            else:
                self._fail(
                    400,
                    "invalid_request",
                    str(bad) if isinstance(bad, _BadHead) else "invalid HTTP request",
                )
            return
        cycle = self.starting
        if cycle is not None:  # a head parsed cleanly, with what followed it in this read
            self.starting = None
            self._start(cycle)
        cycle = self.parsing
        if cycle is not None and cycle is self.active and self.on_deadline is None:
            self._arm(self.state.body_timeout_s, self._body_too_slow)
        if self.in_head:
            if self.active is None and self.on_deadline != self._head_too_slow:
                # A head still incomplete: from now on it must be finished in time. (A head that
                # arrives whole, the usual case, never needs this timer.)
                self._arm(self.head_timeout_s, self._head_too_slow)
            if in_head:
                self.head_bytes += len(data)
                if self.head_bytes > self.max_head_bytes:
                    # (Counted by reads: a read that also carried the end of the request
                    # before may count a little high; that request is still answered first.)
                    self._fail(431, "headers_too_large", "request head too large")

    def _no_upgrade(self) -> None:
        """llhttp stopped at a request that asks for another protocol (``Upgrade``, or
        CONNECT). There is no switching here: the request is answered as plain HTTP and the
        connection closed after it; what follows its head is never read as requests. A body
        it declares cannot be read (llhttp leaves it unparsed), so such a request is
        refused instead of served without it."""
        self._pause_reading()
        cycle = self.pipeline[-1] if self.pipeline else (self.starting or self.active)
        if cycle is None:
            self._fail(400, "invalid_request", "invalid HTTP request")
            return
        cycle.keep_alive = False
        declares_body = any(
            name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0")
            for name, value in cycle.scope["headers"]
        )
        if declares_body:
            if cycle is self.starting:
                self.starting = None  # never dispatched
            else:
                self.parsing = cycle  # refused by _fail like a request with a broken body
            self._fail(
                400,
                "invalid_request",
                "a request asking for a protocol upgrade cannot carry a body here",
            )
            return
        if cycle is self.starting:
            self.starting = None
            self._start(cycle)

    def _fail(self, status: int, code: str, message: str) -> None:
        """The bytes cannot be parsed any further: the requests read whole before them are
        answered, then this refusal is sent and the connection closed. A request whose head
        was read but whose body is broken is never dispatched if it had not started yet; if
        it is running, its app sees a disconnect and the client this refusal."""
        self._pause_reading()
        self._disarm()
        if self.refusal is not None:
            return
        self.refusal = _error_response(self.state, status, code, message)
        starting = self.starting
        if starting is not None:
            self.starting = None
            if not starting.more_body:  # read whole before the bad bytes: it is answered
                self._start(starting)
        broken = self.parsing  # (a request read whole is no longer ``parsing``)
        self.parsing = None
        if broken is not None:
            broken.failed = True
            broken.more_body = False
            if broken in self.pipeline:
                self.pipeline.remove(broken)
            broken.lose()
        if self.active is None and not self.pipeline:
            self._send_refusal()

    def _send_refusal(self) -> None:
        transport = self.transport
        refusal, self.refusal = self.refusal, None
        if transport is not None and not transport.is_closing():
            if refusal:
                transport.write(refusal)
            transport.close()

    # -- parser callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.in_head = True
        self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a chunked body's trailer fields: never merged into the request's headers
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        url = self.url
        headers = self.headers
        raw_path, path, query = _TARGETS.get(url) or _parse_target(url)
        method: str = parser.get_method().decode("ascii")
        version = parser.get_http_version()
        index = dict(reversed(headers))  # (see flm.http.asgi.header_index)
        _check_host(index, headers, version)
        scope: Scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.state.scheme,
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": headers,
            "flm.headers": index,
            HEADER_LINES: True,
        }
        if self.head_bytes + self.chunk_size > self.max_head_bytes:
            # Possibly too large (a head that came in one piece is not cut while reading it):
            # measured, and if so refused with 431 before the app sees it.
            size = len(url) + sum(len(name) + len(value) + 4 for name, value in headers)
            if size > self.max_head_bytes:
                raise _HeadTooLarge("request head too large")
        cycle = _Cycle(self, scope, parser.should_keep_alive(), method == "HEAD")
        scope[DISCONNECT_HOOK] = cycle.on_disconnect
        self.parsing = cycle
        if self.active is None and self.starting is None:
            self._disarm()
            self.starting = cycle  # dispatched by data_received once the read parses cleanly
        else:
            self.pipeline.append(cycle)
            self._pause_reading()

    def on_body(self, body: bytes) -> None:
        cycle = self.parsing
        if cycle is None or cycle.complete or cycle.disconnected:
            return
        cycle.body.append(body)
        cycle.body_size += len(body)
        if cycle.body_size > BODY_HIGH_WATER:
            self._pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self.parsing
        if cycle is None:
            return
        self.parsing = None
        cycle.more_body = False
        if cycle is self.active and self.on_deadline == self._body_too_slow:
            self._disarm()
        cycle.wake()

    # -- cycles ---------------------------------------------------------------------------------

    def _start(self, cycle: _Cycle) -> None:
        """Hand ``cycle`` to the connection's worker task (made for the first request; later
        requests reuse it instead of creating a task each)."""
        self.active = cycle
        if self.worker is None:
            task = self.worker = self.loop.create_task(self._serve())
            self.state.tasks.add(task)
            task.add_done_callback(self._worker_done)
        else:
            self._wake_worker()

    def _wake_worker(self) -> None:
        fut = self.next_request
        if fut is not None:
            self.next_request = None
            if not fut.done():
                fut.set_result(None)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self.state.tasks.discard(task)
        if self.worker is task:
            self.worker = None

    async def _serve(self) -> None:
        """Runs the connection's requests one after the other; ends with the connection."""
        while True:
            cycle = self.active
            if cycle is None or cycle.running:
                if self.transport_closing():
                    return
                fut = self.next_request = self.loop.create_future()
                await fut
                continue
            cycle.running = True
            await cycle.run()

    def body_consumed(self) -> None:
        if self.read_paused and not self.pipeline:
            self.read_paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    def response_complete(self, cycle: _Cycle) -> None:
        if cycle is not self.active:
            return
        self.active = None
        cycle.wake()  # a receive() waiting for the disconnect ends with one
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.refusal is not None and not self.pipeline:
            if cycle.failed and cycle.started:
                self.refusal = None  # its own response was cut: no refusal after it
            self._send_refusal()
            return
        if cycle.more_body and transport.can_write_eof():
            # An unread body (e.g. refused with 413) is never parsed; the connection closes
            # after a short linger that discards what the client still sends, so that its
            # kernel does not answer with a reset that destroys the response before the
            # client reads it.
            self._linger(transport)
            return
        if not cycle.keep_alive or cycle.more_body or self.state.stopping:
            transport.close()
            return
        if self.pipeline:
            nxt = self.pipeline.popleft()
            if nxt.more_body:
                self._arm(self.state.body_timeout_s, self._body_too_slow)
            self._start(nxt)
            if not self.pipeline:
                self.body_consumed()
            return
        if self.parsing is None and not self.in_head:
            self._arm(self.keepalive_timeout_s, self._idle_too_long)
        elif self.parsing is None:
            self._arm(self.head_timeout_s, self._head_too_slow)

    def abort_cycle(self, cycle: _Cycle) -> None:
        """The app failed or returned early: answer 500 if nothing was sent, else cut."""
        transport = self.transport
        if cycle.complete or transport is None or transport.is_closing():
            return
        cycle.complete = True
        if cycle.failed and not cycle.started and self.refusal is not None:
            transport.write(self.refusal)  # the request's body broke: the server's 400
            self.refusal = None
        elif not cycle.started and not cycle.disconnected:
            transport.write(_error_response(self.state, 500, "internal_error", "internal error"))
        elif cycle.pending_head is not None:
            cycle.pending_head = None
        if cycle is self.active:
            self.active = None
        transport.close()

    def shutdown(self) -> None:
        """Graceful stop: idle connections close now, busy ones after their response."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.active is None:
            transport.close()
        else:
            self.active.keep_alive = False

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- helpers --------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def transport_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _arm(self, delay: float, callback: Any) -> None:
        self.deadline = self.loop.time() + delay
        self.on_deadline = callback

    def _disarm(self) -> None:
        self.on_deadline = None

    def check_deadline(self, now: float) -> None:
        callback = self.on_deadline
        if callback is not None and now >= self.deadline:
            self.on_deadline = None
            callback()

    def _head_too_slow(self) -> None:
        if self.in_head and self.active is None:
            self._fail(408, "request_timeout", "request head not received in time")

    def _body_too_slow(self) -> None:
        cycle = self.active
        if cycle is not None and cycle.more_body:
            cycle.timed_out = True
            cycle.wake()

    def _idle_too_long(self) -> None:
        if self.active is None and self.parsing is None and self.transport is not None:
            self.transport.close()


def reuse_port_supported() -> bool:
    """Whether listeners can share a port with the kernel spreading connections among them:
    Linux's ``SO_REUSEPORT`` (elsewhere the option either is missing or hands every
    connection to one socket)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def bind_socket(
    host: str, port: int, *, reuse_port: bool = False, listen: bool = True
) -> socket.socket:
    """A socket bound to ``host:port``, listening unless told not to (the server listens when
    it starts). ``reuse_port``: joins the other listeners of this user on that port
    (``SO_REUSEPORT``), which share its connections (``--workers``); such a socket gets
    connections from the moment it listens, so a worker listens only once it serves."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        if not reuse_port_supported():
            sock.close()
            raise ProxyError("sharing a port between processes (SO_REUSEPORT) needs Linux")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            raise ProxyPortInUseError(
                f"port {port} on {host} is already in use (or not permitted); choose another "
                "with --port"
            ) from None
        raise ProxyError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    if listen:
        sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(False)
    return sock


class HttpServer:
    """One server on a pre-bound socket, started and stopped from a running loop.

    ``headers`` go on every response it sends, its own refusals (400, 408, 431, 500)
    included; they are checked and rendered once, here. ``refusal`` renders those refusals
    (by default as plain text)."""

    timeout_graceful_shutdown_s = GRACEFUL_SHUTDOWN_S

    def __init__(
        self,
        app: ASGIApp,
        sock: socket.socket,
        ssl_context: ssl.SSLContext | None = None,
        *,
        body_timeout_s: float = BODY_TIMEOUT_S,
        headers: Sequence[tuple[bytes, bytes]] = (),
        refusal: Refusal = plain_refusal,
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.sock = sock
        self.ssl_context = ssl_context
        self.state = _ServerState(
            app,
            "https" if ssl_context is not None else "http",
            body_timeout_s,
            headers,
            refusal,
            limits,
        )
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._port = int(sock.getsockname()[1])

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        state = self.state
        raise_nofile_limit()
        # (create_server listens again, with its own default backlog of 100 unless told)
        self._server = await loop.create_server(
            lambda: HttpProtocol(state),
            sock=self.sock,
            ssl=self.ssl_context,
            backlog=LISTEN_BACKLOG,
            ssl_handshake_timeout=HEADER_TIMEOUT_S if self.ssl_context is not None else None,
        )
        self._sweep()

    def _sweep(self) -> None:
        """Enforce the connections' deadlines; runs a few times per shortest timeout."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in list(self.state.connections):
            conn.check_deadline(now)
        shortest = min(
            HttpProtocol.head_timeout_s, HttpProtocol.keepalive_timeout_s, self.state.body_timeout_s
        )
        self._sweeper = loop.call_later(max(0.05, min(1.0, shortest / 4)), self._sweep)

    async def stop(self) -> None:
        state = self.state
        state.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            self._server.close()
        for conn in list(state.connections):
            conn.shutdown()
        if state.tasks:
            await asyncio.wait(set(state.tasks), timeout=self.timeout_graceful_shutdown_s)
        for task in list(state.tasks):
            task.cancel()
        if state.tasks:
            await asyncio.wait(set(state.tasks), timeout=1.0)
        for conn in list(state.connections):
            conn.abort()
        with contextlib.suppress(OSError):
            self.sock.close()
        self._server = None
