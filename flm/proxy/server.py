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

from flm.core.errors import ProxyError, ProxyPortInUseError
from flm.proxy.asgi import ASGIApp

log = logging.getLogger("flm.proxy")

#: Largest request head (request line + headers) accepted.
MAX_HEADER_BYTES = 64 * 1024


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
            http="httptools",
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
