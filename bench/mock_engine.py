"""A fast mock OpenAI-compatible engine (vLLM-like) for the benchmark.

It answers from precomputed bytes on a raw asyncio protocol (uvloop when available, the
httptools C parser for HTTP/1.1 with keep-alive), so that the gateways measured in front
of it are the bottleneck, not it:

- ``POST /v1/chat/completions``: a fixed ``chat.completion`` JSON; when the body contains
  ``"stream": true``, a fixed SSE stream of 20 ``chat.completion.chunk`` events (the last
  one with ``finish_reason`` and ``usage``) and ``data: [DONE]``, sent with chunked
  transfer encoding.
- ``POST /v1/completions``, ``POST /v1/embeddings``: fixed JSON.
- ``GET /v1/models``, ``GET /health`` (200, empty), ``GET /version``, ``GET /ping``: what
  vLLM answers, with one model ``bench-model``.

Pacing: by default the whole stream goes out in one write. A body that contains
``mock-pace-ms=N`` (for example in a message's content) gets its chunks N ms apart (first
chunk at once), and ``--pace-ms`` sets a default for every stream. The harness uses this
for the time-to-first-token test (a gateway that buffers shows up as a TTFT close to the
whole stream) and to hold 100 streams open while it samples a gateway's memory.

Run: ``python bench/mock_engine.py --port 18000`` (prints ``READY <port>`` when listening).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any, cast

import httptools

MODEL = "bench-model"
CHUNKS = 20
CREATED = 1_700_000_000

_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_PACE_RE = re.compile(rb"mock-pace-ms=(\d+(?:\.\d+)?)")
_CLOSE_RE = re.compile(rb"close", re.IGNORECASE)


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\n"
        b"Content-Type: " + content_type + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"\r\n" + body
    )


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}".encode() + b"\r\n" + data + b"\r\n"


CHAT_JSON = _json(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! A fixed benchmark reply."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    }
)

COMPLETION_JSON = _json(
    {
        "id": "cmpl-bench",
        "object": "text_completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {"index": 0, "text": " fixed reply", "logprobs": None, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
)

EMBEDDINGS_JSON = _json(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3, 0.4]}],
        "model": MODEL,
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
)

MODELS_JSON = _json(
    {
        "object": "list",
        "data": [
            {
                "id": MODEL,
                "object": "model",
                "created": CREATED,
                "owned_by": "vllm",
                "root": MODEL,
                "parent": None,
                "max_model_len": 4096,
                "permission": [],
            }
        ],
    }
)


def _sse_events() -> list[bytes]:
    events = []
    for i in range(CHUNKS):
        delta: dict[str, object] = {"content": f"tok{i} "}
        if i == 0:
            delta = {"role": "assistant", "content": "tok0 "}
        chunk: dict[str, object] = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": "stop" if i == CHUNKS - 1 else None,
                }
            ],
        }
        if i == CHUNKS - 1:
            chunk["usage"] = {"prompt_tokens": 12, "completion_tokens": CHUNKS, "total_tokens": 32}
        events.append(b"data: " + _json(chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


SSE_EVENTS = _sse_events()
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)
SSE_CHUNKS = [_chunked(e) for e in SSE_EVENTS]
SSE_TERMINATOR = b"0\r\n\r\n"
# The whole stream in one buffer: head, every event as its own HTTP chunk, terminator.
SSE_WHOLE = SSE_HEAD + b"".join(SSE_CHUNKS) + SSE_TERMINATOR

RESP_CHAT = _response("200 OK", CHAT_JSON)
RESP_COMPLETION = _response("200 OK", COMPLETION_JSON)
RESP_EMBEDDINGS = _response("200 OK", EMBEDDINGS_JSON)
RESP_MODELS = _response("200 OK", MODELS_JSON)
RESP_HEALTH = _response("200 OK", b"", b"text/plain")
RESP_VERSION = _response("200 OK", _json({"version": "0.6.3.post1"}))
RESP_NOT_FOUND = _response("404 Not Found", _json({"detail": "Not Found"}))
RESP_BAD = _response("400 Bad Request", _json({"detail": "bad request"}))

GET_ROUTES = {
    b"/v1/models": RESP_MODELS,
    b"/health": RESP_HEALTH,
    b"/ping": RESP_HEALTH,
    b"/version": RESP_VERSION,
}
POST_ROUTES = {
    b"/v1/completions": RESP_COMPLETION,
    b"/v1/embeddings": RESP_EMBEDDINGS,
}


def write_ready(path: str, port: int) -> None:
    with open(path, "w") as f:
        f.write(str(port))


class Stats:
    requests = 0
    streams = 0


class MockProtocol(asyncio.Protocol):
    """One connection. Responses go out in request order (pipelining is safe)."""

    __slots__ = (
        "_body",
        "_close",
        "_parser",
        "_pending",
        "_transport",
        "_url",
        "default_pace",
    )

    def __init__(self, default_pace: float) -> None:
        self.default_pace = default_pace
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._body: list[bytes] = []
        self._close = False
        # A paced stream in progress; later pipelined requests wait behind it.
        self._pending: asyncio.Task[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they behave like one.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reply(RESP_BAD, close=True)
        except httptools.HttpParserError:
            self._reply(RESP_BAD, close=True)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []
        self._close = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"connection" and _CLOSE_RE.search(value):
            self._close = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        Stats.requests += 1
        method = self._parser.get_method()
        path = self._url.split(b"?", 1)[0]
        close = self._close or not self._parser.should_keep_alive()
        if method == b"POST" and path == b"/v1/chat/completions":
            body = b"".join(self._body)
            if _STREAM_RE.search(body):
                Stats.streams += 1
                pace = self.default_pace
                m = _PACE_RE.search(body)
                if m:
                    pace = float(m.group(1)) / 1000.0
                if pace <= 0 and self._pending is None:
                    self._reply(SSE_WHOLE, close)
                else:
                    self._pending = asyncio.ensure_future(self._paced(pace, close, self._pending))
                return
            self._reply(RESP_CHAT, close)
            return
        if method == b"GET":
            self._reply(GET_ROUTES.get(path, RESP_NOT_FOUND), close)
        elif method == b"POST":
            self._reply(POST_ROUTES.get(path, RESP_NOT_FOUND), close)
        else:
            self._reply(RESP_NOT_FOUND, close)

    def _reply(self, data: bytes, close: bool) -> None:
        if self._pending is not None:
            # Keep order behind a paced stream.
            self._pending = asyncio.ensure_future(self._after(self._pending, data, close))
            return
        t = self._transport
        if t is None:
            return
        t.write(data)
        if close:
            t.close()

    async def _after(self, prev: asyncio.Task[None], data: bytes, close: bool) -> None:
        await prev
        t = self._transport
        if t is not None:
            t.write(data)
            if close:
                t.close()
        if self._pending is asyncio.current_task():
            self._pending = None

    async def _paced(self, pace: float, close: bool, prev: asyncio.Task[None] | None) -> None:
        if prev is not None:
            await prev
        t = self._transport
        if t is None:
            return
        t.write(SSE_HEAD + SSE_CHUNKS[0])
        for chunk in SSE_CHUNKS[1:]:
            if pace > 0:
                await asyncio.sleep(pace)
            t = self._transport
            if t is None:
                return
            t.write(chunk)
        t.write(SSE_TERMINATOR)
        if close:
            t.close()
        if self._pending is asyncio.current_task():
            self._pending = None


async def serve(host: str, port: int, pace: float, ready_file: str | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: MockProtocol(pace), host, port, backlog=4096, reuse_address=True
    )
    actual = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {actual}", flush=True)
    if ready_file:
        write_ready(ready_file, actual)
    started = time.monotonic()
    async with server:
        await stop.wait()
    elapsed = time.monotonic() - started
    print(
        f"mock engine: {Stats.requests} requests ({Stats.streams} streams) in {elapsed:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18000, help="0 = any free port")
    ap.add_argument(
        "--pace-ms",
        type=float,
        default=float(os.environ.get("MOCK_PACE_MS", "0")),
        help="default gap between stream chunks (env MOCK_PACE_MS; default 0 = one write)",
    )
    ap.add_argument("--ready-file", help="write the bound port here once listening")
    args = ap.parse_args(argv)
    run_loop(serve(args.host, args.port, args.pace_ms / 1000.0, args.ready_file))


def run_loop(coro: Coroutine[Any, Any, None]) -> None:
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()
