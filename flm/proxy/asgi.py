"""The gateway's ASGI helpers: the request state the layers share, body reading with limits,
JSON responses (the ASGI types themselves are :mod:`flm.http.asgi`'s, re-exported here)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from flm.http.asgi import (
    DISCONNECT_HOOK,
    ASGIApp,
    DisconnectHook,
    Message,
    Receive,
    RequestBodyTimeout,
    Scope,
    Send,
    header,
    header_index,
)
from flm.openai.errors import HttpError

# The gateway's modules take the ASGI types from here, with the helpers below.
__all__ = [
    "JSON_HEADERS",
    "ASGIApp",
    "Message",
    "Receive",
    "RequestBodyTimeout",
    "RequestState",
    "Scope",
    "Send",
    "header",
    "header_index",
    "parse_json",
    "read_body",
    "read_json",
    "send_bytes",
    "send_json",
    "state_of",
    "watch_disconnect",
]

JSON_HEADERS = [(b"content-type", b"application/json")]


class RequestState:
    """Per-request facts the layers share (and the audit layer records)."""

    __slots__ = (
        "api_key_id",
        "client_ip",
        "completion_tokens",
        "engine_id",
        "error_code",
        "first_byte_at",
        "key",
        "key_lines",
        "model",
        "overhead_s",
        "prompt_tokens",
        "request_id",
        "route",
        "started",
        "status",
        "streaming",
        "usage_estimated",
        "warnings",
    )

    def __init__(self, request_id: str, client_ip: str, started: float) -> None:
        self.request_id = request_id
        self.client_ip = client_ip
        self.started = started
        self.api_key_id: str | None = None
        #: The key's scope (a ``flm.core.keyscope.KeyScope``) once it is admitted; its usage
        #: is accounted when the request ends.
        self.key: Any = None
        #: The header lines the key's limits add to the reply (``x-ratelimit-*``, rendered
        #: ``name: value\r\n`` lines), if any.
        self.key_lines = b""
        self.usage_estimated = False
        self.route = "unmatched"
        self.engine_id: str | None = None
        self.model: str | None = None
        self.status = 0
        self.error_code: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.streaming = False
        self.warnings: list[str] = []
        self.first_byte_at: float | None = None
        self.overhead_s: float | None = None


def state_of(scope: Scope) -> RequestState:
    state: RequestState = scope["flm"]
    return state


async def read_body(receive: Receive, scope: Scope, limit: int) -> bytes:
    """The whole request body, refusing (413) before reading past ``limit``; a client that
    sends too slowly gets 408 (the server enforces the deadline)."""
    declared = header(scope, b"content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise HttpError(413, "payload_too_large", f"request body exceeds {limit} bytes")
        except ValueError:
            raise HttpError(400, "invalid_request", "bad Content-Length") from None
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise asyncio.CancelledError("client disconnected")
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise HttpError(413, "payload_too_large", f"request body exceeds {limit} bytes")
                parts.append(chunk)
            if not message.get("more_body", False):
                break
    except RequestBodyTimeout:
        raise HttpError(408, "request_timeout", "request body not received in time") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


#: The C scanner of a default decoder (an instance attribute the stubs do not declare).
_scan_json: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def parse_json(body: bytes) -> Any:
    """A JSON request body, or 400; the same value (or refusal) as ``json.loads``.

    UTF-8 without a BOM, the usual case, goes straight to the decoder's C scanner:
    ``json.loads`` on bytes first guesses the encoding in Python code, and on text adds
    Python layers that cost as much as scanning a small body. A body the scanner alone does
    not settle (leading whitespace, anything after the value) takes the ``json.loads`` way."""
    try:
        if body[:3] != b"\xef\xbb\xbf":
            try:
                text = body.decode()
            except UnicodeDecodeError:
                return json.loads(body)
            try:
                value, end = _scan_json(text, 0)
            except StopIteration:
                return json.loads(text)
            if end == len(text) or not text[end:].strip(" \t\n\r"):
                return value
            return json.loads(text)
        return json.loads(body)
    except ValueError:
        raise HttpError(400, "invalid_request", "request body is not valid JSON") from None
    except RecursionError:
        raise HttpError(400, "invalid_request", "request body is nested too deeply") from None


async def read_json(receive: Receive, scope: Scope, limit: int) -> Any:
    return parse_json(await read_body(receive, scope, limit))


async def send_bytes(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*(headers or JSON_HEADERS), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, data: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    await send_bytes(send, status, body, [*JSON_HEADERS, *(headers or [])])


class watch_disconnect:
    """While the block runs, a client that goes away cancels it (and so the upstream request
    it awaits: the engine connection is dropped, the engine stops). Enter it (``with``) once
    the request body has been read. On a disconnect the request ends as 499
    ``client_disconnected`` (nobody is there to read it; the audit records it), or quietly
    once a response started.

    The server's disconnect hook (:data:`~flm.http.asgi.DISCONNECT_HOOK`) tells of the client
    leaving from the connection's own ``connection_lost``: no task per request. Under a server
    without it, a task waits on ``receive()`` for ``http.disconnect``. ``start()`` and
    ``stop()`` are the two halves of the block for code that handles the cancellation itself
    (``gone`` says whether the client left).
    """

    __slots__ = ("_hook", "_receive", "_state", "_task", "_watcher", "gone")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self._state: RequestState = scope["flm"]
        self._hook: DisconnectHook | None = scope.get(DISCONNECT_HOOK)
        self._receive = receive
        self.gone = False
        self._task: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None

    def _left(self) -> None:
        self.gone = True
        task = self._task
        if task is not None:  # (else start() cancels it, once it knows the task)
            task.cancel()

    async def _watch(self) -> None:
        try:
            while (await self._receive())["type"] != "http.disconnect":
                pass
        except Exception:  # (nothing more to learn from this request's messages)
            return
        self._left()

    def start(self) -> None:
        hook = self._hook
        if hook is not None:
            # (the hook names the task running the request: no asyncio.current_task(),
            # which makes a getpid() system call per request on Python 3.11)
            task = self._task = hook(self._left) or asyncio.current_task()
            if self.gone and task is not None:  # the client had gone already
                task.cancel()
        else:
            self._task = asyncio.current_task()
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> None:
        if self._hook is not None:
            self._hook(None)
        elif self._watcher is not None:
            self._watcher.cancel()

    def __enter__(self) -> None:
        self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        self.stop()
        if not (self.gone and kind is not None and issubclass(kind, asyncio.CancelledError)):
            return False
        assert self._task is not None
        self._task.uncancel()
        self._state.error_code = "client_disconnected"
        if self._state.status:  # a response has started: it just ends
            return True
        raise HttpError(499, "client_disconnected", "the client closed the connection")
