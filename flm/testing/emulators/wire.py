"""Wire helpers every emulator uses: compact JSON, JSON responses, SSE frames, timestamps,
request ids and the request body as a JSON object."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from aiohttp import web

JSONDict = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def unix_now() -> int:
    return int(time.time())


def iso_now() -> str:
    """RFC 3339 UTC timestamp with sub-second digits, as Go servers print them."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def json_response(
    obj: object, status: int = 200, content_type: str = "application/json"
) -> web.Response:
    return web.Response(
        body=dumps(obj).encode(), status=status, headers={"Content-Type": content_type}
    )


def sse(obj: object) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
GARBAGE_BODY = b'{"object": "list", "data": [{"id": "oops", <<< not json'


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"status {status}"


async def read_json_object(request: web.Request) -> JSONDict | None:
    """The request body as a JSON object, or None when it is not one."""
    try:
        raw = await request.read()
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + secrets.token_hex(length // 2)
