"""CORS: preflight answered here without a key; headers added to every response."""

from __future__ import annotations

from flm.proxy.asgi import ASGIApp, Message, Receive, Scope, Send, header
from flm.proxy.runtime import ProxyRuntime

_ALLOW_HEADERS = b"authorization, content-type, x-request-id"
_ALLOW_METHODS = b"GET, POST, OPTIONS"


class CorsMiddleware:
    def __init__(self, app: ASGIApp, runtime: ProxyRuntime) -> None:
        self.app = app
        self.runtime = runtime

    def _allowed(self, origin: bytes) -> bytes | None:
        origins = self.runtime.effective.allowed_origins
        if not origins or "*" in origins:
            return b"*"
        text = origin.decode("latin-1")
        return origin if text in origins else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = header(scope, b"origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        allowed = self._allowed(origin)
        if (scope["method"] == "OPTIONS"
                and header(scope, b"access-control-request-method") is not None):
            headers = [(b"vary", b"origin"), (b"content-length", b"0")]
            status = 403
            if allowed is not None:
                status = 204
                headers += [(b"access-control-allow-origin", allowed),
                            (b"access-control-allow-methods", _ALLOW_METHODS),
                            (b"access-control-allow-headers", _ALLOW_HEADERS),
                            (b"access-control-max-age", b"600")]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if allowed is None:
            await self.app(scope, receive, send)
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()),
                                      (b"access-control-allow-origin", allowed),
                                      (b"access-control-expose-headers", b"x-request-id"),
                                      (b"vary", b"origin")]
            await send(message)

        await self.app(scope, receive, with_cors)
