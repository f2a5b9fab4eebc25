"""The few ASGI pieces the UI needs (request parsing, responses), kept here so the UI depends
on nothing but the ASGI interface the daemon's server speaks."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_FORM_BYTES = 256 * 1024


class BodyTooLarge(Exception):
    pass


class Request:
    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self._receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            key = name.decode("latin-1").lower()
            if key not in self.headers:
                self.headers[key] = value.decode("latin-1")
        raw_query = scope.get("query_string", b"").decode("latin-1")
        self.query = {k: v[0] for k, v in parse_qs(raw_query, max_num_fields=50).items()}
        self.cookies: dict[str, str] = {}
        cookie = SimpleCookie()
        with contextlib.suppress(CookieError):
            cookie.load(self.headers.get("cookie", ""))
        for name, morsel in cookie.items():
            self.cookies[name] = morsel.value
        self._body: bytes | None = None

    @property
    def wants_json(self) -> bool:
        return "application/json" in self.headers.get("accept", "")

    async def body(self) -> bytes:
        if self._body is None:
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > MAX_FORM_BYTES:
                    raise BodyTooLarge
                chunks.append(chunk)
                if not message.get("more_body"):
                    break
            self._body = b"".join(chunks)
        return self._body

    async def form(self) -> dict[str, str]:
        raw = await self.body()
        kind = self.headers.get("content-type", "")
        if kind.startswith("application/json"):
            try:
                data = json.loads(raw or b"{}")
            except ValueError:
                return {}
            return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        parsed = parse_qs(
            raw.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=200
        )
        return {k: v[0] for k, v in parsed.items()}


async def respond(
    send: Send, status: int, body: bytes, content_type: str, headers: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
