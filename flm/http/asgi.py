"""The ASGI 3 types FLM's HTTP server speaks, and the request-header index it builds once per
request (the gateway's helpers on top of them are in :mod:`flm.proxy.asgi`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


#: Scope key of the server's disconnect hook, where the server offers one:
#: ``scope[DISCONNECT_HOOK](callback)`` has ``callback()`` called once, on the event loop, when
#: the client goes away while the request runs (at once if it has already gone);
#: ``scope[DISCONNECT_HOOK](None)`` withdraws it. It tells what ``receive()`` returning
#: ``http.disconnect`` tells, without a task waiting on ``receive()``. It returns the task
#: that runs the app for this request (the one to cancel when the client has gone), so that
#: the app need not ask asyncio for it (``asyncio.current_task()`` makes a ``getpid()``
#: system call on Python 3.11).
DISCONNECT_HOOK = "flm.on_disconnect"
#: The hook's type: ``(callback or None) -> the task running the app``.
DisconnectHook = Callable[[Callable[[], None] | None], asyncio.Task[Any] | None]


#: Scope key set (to True) by a server that takes ready-made header lines: an
#: ``http.response.start`` message may then carry, under the same key, ``bytes`` of complete
#: ``name: value\r\n`` lines that are sent after the message's ``headers`` as they are. The
#: app vouches for them (no CR or LF inside a name or value, no framing header:
#: content-length, transfer-encoding, connection); the server does not look into them. It
#: saves the per-header work for headers the app renders itself every time.
HEADER_LINES = "flm.header_lines"


def header_pairs(lines: bytes) -> list[tuple[bytes, bytes]]:
    """Ready-made header lines (see :data:`HEADER_LINES`) as ``(name, value)`` pairs, for a
    server that does not take them."""
    pairs = []
    for line in lines.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b": ")
            pairs.append((name, value))
    return pairs


class RequestBodyTimeout(Exception):
    """Raised by the server's ``receive()`` when the client did not finish sending the request
    body within the server's body deadline (see :mod:`flm.http.server`)."""


def header_index(scope: Scope) -> dict[bytes, bytes]:
    """The request headers by name, the first of a repeated one winning; made once per
    request (one C call) and kept in the scope."""
    index: dict[bytes, bytes] | None = scope.get("flm.headers")
    if index is None:
        index = scope["flm.headers"] = dict(reversed(scope["headers"]))
    return index


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case), if any."""
    value = header_index(scope).get(name)
    return None if value is None else bytes(value)
