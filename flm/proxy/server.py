"""Serving an ASGI app with uvicorn (uvloop + httptools) on a socket FLM binds itself, so
"port in use" is known before anything else starts and several servers share one loop."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from flm.core.errors import ProxyError, ProxyPortInUseError
from flm.proxy.asgi import ASGIApp

log = logging.getLogger("flm.proxy")

#: Largest request head (request line + headers) accepted.
MAX_HEADER_BYTES = 64 * 1024
#: A client must finish sending a request head within this many seconds of starting it.
HEADER_TIMEOUT_S = 10.0


def _plain_response(status: bytes, message: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain\r\ncontent-length: "
            + str(len(message)).encode() + b"\r\nconnection: close\r\n\r\n" + message)


class GuardedHttpProtocol(HttpToolsProtocol):
    """httptools with the two limits it lacks: request-head size (431) and a deadline for
    finishing the head (408), so slow or oversized heads cannot pin connections or memory."""

    max_head_bytes = MAX_HEADER_BYTES
    head_timeout_s = HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = True
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.write(_plain_response(b"408 Request Timeout",
                                                 b"request head not received in time"))
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if size > self.max_head_bytes:
            # A head that arrived in one piece: the app answers 431 before doing anything.
            self.scope["flm_head_too_large"] = True  # type: ignore[typeddict-unknown-key]
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        head = self._in_head
        super().data_received(data)
        if head and self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
                self.transport.write(_plain_response(b"431 Request Header Fields Too Large",
                                                     b"request head too large"))
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


class HttpServer:
    """One uvicorn server on a pre-bound socket, started and stopped from a running loop."""

    def __init__(
        self, app: ASGIApp, sock: socket.socket, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.sock = sock
        kwargs: dict[str, Any] = {}
        if ssl_context is not None:
            kwargs["ssl_context_factory"] = lambda _config, _default: ssl_context
        config = uvicorn.Config(
            app,
            http=GuardedHttpProtocol,
            loop="none",
            lifespan="off",
            access_log=False,
            interface="asgi3",
            log_config=None,
            server_header=False,
            date_header=True,
            proxy_headers=False,
            timeout_keep_alive=15,
            timeout_graceful_shutdown=5,
            backlog=2048,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            **kwargs,
        )
        config.load()
        self.server = uvicorn.Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def start(self) -> None:
        server = self.server
        server.lifespan = server.config.lifespan_class(server.config)
        await server.startup(sockets=[self.sock])
        self._task = asyncio.ensure_future(server.main_loop())

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task
            self._task = None
        await self.server.shutdown(sockets=[self.sock])
        self.sock.close()
