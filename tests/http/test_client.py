"""The engine HTTP client against raw loopback servers that send exactly the bytes each case needs:
keep-alive reuse, a stale pooled connection, bodies ended by EOF, 100 Continue, HEAD, gzip,
malformed replies, refused header injection, the connection limit and read back-pressure."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from flm.core.errors import (
    EngineApiError,
    EngineError,
    EngineNetworkError,
    EngineTimeoutError,
)
from flm.http.client import EngineClient, Timeouts
from flm.http.connection import HIGH_WATER

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request head (and its Content-Length body); ``None`` at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head + body


def _reply(body: bytes, *extra: bytes, status: bytes = b"200 OK") -> bytes:
    lines = [
        b"HTTP/1.1 " + status,
        b"Content-Type: application/json",
        b"Content-Length: " + str(len(body)).encode(),
        *extra,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Server:
    """A loopback server running ``handler(reader, writer, connection_number)``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.open_now += 1
            self.most_open = max(self.most_open, self.open_now)
            try:
                await self.handler(reader, writer, self.connections)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self.open_now -= 1
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


def _run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def _echo_server(server: Server) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await _read_request(reader)) is not None:
            server.requests.append(req)
            writer.write(_reply(json.dumps({"n": len(server.requests)}).encode()))
            await writer.drain()

    return handler


def test_keep_alive_connection_is_reused_and_request_head_is_right() -> None:
    async def main() -> None:
        server = Server(lambda r, w, n: _echo_server(server)(r, w, n))
        async with server:
            client = EngineClient(server.url + "/base", api_key="engine-secret")
            for i in range(1, 6):
                assert await client.post_json("/v1/x", {"i": i}) == {"n": i}
            await client.close()
            port = server.url.rsplit(":", 1)[1]
        assert server.connections == 1
        head = server.requests[0].decode()
        assert head.startswith("POST /base/v1/x HTTP/1.1\r\n")
        assert f"\r\nHost: 127.0.0.1:{port}\r\n" in head
        assert "\r\nAuthorization: Bearer engine-secret\r\n" in head
        assert "\r\nContent-Type: application/json\r\n" in head
        assert head.endswith('\r\n\r\n{"i":1}')

    _run(main())


def test_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        if n == 1:
            writer.write(_reply(b'{"first":true}'))
            await writer.drain()
            await _read_request(reader)  # the second request: hang up without a byte
            return
        writer.write(_reply(b'{"fresh":true}'))
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            client = EngineClient(server.url)
            assert await client.get_json("/a") == {"first": True}
            assert await client.get_json("/b") == {"fresh": True}
            await client.close()
            assert server.connections == 2

    _run(main())


def test_a_connection_that_breaks_after_answering_part_is_not_retried() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            client = EngineClient(server.url)
            with pytest.raises(EngineNetworkError, match="closed the connection"):
                await client.get_json("/a")
            await client.close()
            assert server.connections == 1

    _run(main())


def test_body_ended_by_eof_and_interim_100_response() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
        )
        for part in (b'{"a":', b'"eof"', b"}"):
            writer.write(part)
            await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            client = EngineClient(server.url)
            assert await client.get_json("/a") == {"a": "eof"}
            assert await client.get_json("/b") == {"a": "eof"}
            await client.close()
            assert server.connections == 2  # Connection: close is honoured

    _run(main())


def test_head_request_completes_without_a_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with Server(handler) as server:
            client = EngineClient(server.url)
            resp = await client.request("HEAD", "/x")
            assert resp.status == 200
            assert resp.headers["content-length"] == "1234"
            assert await resp.read() == b""
            resp.release()
            await client.close()

    _run(main())


def test_gzip_reply_is_decoded_and_headers_are_case_insensitive() -> None:
    payload = gzip.compress(b'{"zipped":[1,2,3]}')

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        writer.write(_reply(payload, b"Content-Encoding: gzip", b"X-Custom: One"))
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            client = EngineClient(server.url)
            resp = await client.request("GET", "/x")
            assert resp.headers.get("x-custom") == "One" and "X-CUSTOM" in resp.headers
            assert ("X-Custom", "One") in resp.headers.items()
            assert await resp.read_json() == {"zipped": [1, 2, 3]}
            resp.release()
            await client.close()

    _run(main())


def test_fetch_takes_whole_replies_and_falls_back_for_the_rest() -> None:
    replies = [
        _reply(b'{"plain":1}'),
        _reply(gzip.compress(b'{"zipped":2}'), b"Content-Encoding: gzip"),
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"c":\r\n2\r\n3}\r\n0\r\n\r\n',
        _reply(b'{"error":{"message":"no such model"}}', status=b"404 Not Found"),
        _reply(b'{"plain":5}'),
        _reply(b"{}", b"X-FLM-Proxy: 1"),
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (await _read_request(reader)) is not None and replies:
            writer.write(replies.pop(0))
            await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            client = EngineClient(server.url)
            assert await client.fetch("POST", "/x", b"{}") == b'{"plain":1}'
            assert await client.fetch("POST", "/x", b"{}") == b'{"zipped":2}'
            assert await client.fetch("POST", "/x", b"{}") == b'{"c":3}'
            with pytest.raises(EngineError, match="HTTP 404: no such model"):
                await client.fetch("POST", "/x", b"{}")
            assert await client.fetch("POST", "/x", b"{}") == b'{"plain":5}'
            with pytest.raises(EngineApiError, match="FLM proxy"):
                await client.fetch("POST", "/x", b"{}")
            await client.close()
        assert server.connections == 1  # one pooled connection throughout

    _run(main())


def test_malformed_reply_is_an_api_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        writer.write(b"NOT-HTTP garbage\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with Server(handler) as server:
            client = EngineClient(server.url)
            with pytest.raises(EngineApiError, match="malformed HTTP response"):
                await client.get_json("/a")
            await client.close()

    _run(main())


@pytest.mark.parametrize(
    "headers, path",
    [
        ({"X-Evil": "a\r\nX-Injected: 1"}, "/ok"),
        ({"X-Bad\r\nName": "v"}, "/ok"),
        ({}, "/ok HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /more"),
        ({}, "/with space"),
    ],
)
def test_header_and_target_injection_is_refused_before_sending(
    headers: dict[str, str], path: str
) -> None:
    async def main() -> None:
        server = Server(lambda r, w, n: _echo_server(server)(r, w, n))
        async with server:
            client = EngineClient(server.url)
            with pytest.raises(EngineApiError, match="refusing"):
                await client.request("GET", path, headers=headers)
            await client.close()
        assert server.requests == []

    _run(main())


def test_a_remembered_request_head_never_lets_a_bad_header_through() -> None:
    """Heads are built once per (method, path, headers) and reused: a request with the same
    path as a well-formed one but an injected header is still refused, and the next good one
    is sent with its own Content-Length."""

    async def main() -> None:
        server = Server(lambda r, w, n: _echo_server(server)(r, w, n))
        async with server:
            client = EngineClient(server.url)
            good = {"X-Trace": "1"}
            for body in (b"{}", b'{"a":1}'):
                resp = await client.request("POST", "/v1/x", data=body, headers=good)
                await resp.read()
                resp.release()
            with pytest.raises(EngineApiError, match="refusing"):
                await client.request(
                    "POST", "/v1/x", data=b"{}", headers={"X-Trace": "1\r\nX-Injected: 1"}
                )
            await client.close()
        assert len(server.requests) == 2
        first, second = (r.decode() for r in server.requests)
        assert "X-Trace: 1\r\n" in first and "Content-Length: 2\r\n" in first
        assert "Content-Length: 7\r\n" in second and second.endswith('{"a":1}')
        assert all("X-Injected" not in r.decode() for r in server.requests)

    _run(main())


def test_connection_limit_queues_requests_and_times_out_when_nothing_frees() -> None:
    async def main() -> None:
        go = asyncio.Event()

        async def handler(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
        ) -> None:
            while await _read_request(reader) is not None:
                await go.wait()
                writer.write(_reply(b"{}"))
                await writer.drain()

        async with Server(handler) as server:
            client = EngineClient(server.url, limit=1)
            first = asyncio.create_task(client.get_json("/1"))
            second = asyncio.create_task(client.get_json("/2"))
            third = asyncio.create_task(client.get_json("/3"))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while server.connections < 1:
                assert loop.time() < deadline, "the first request never reached the server"
                await asyncio.sleep(0.01)
            go.set()
            assert await asyncio.gather(first, second, third) == [{}, {}, {}]
            assert server.most_open == 1

            held = await client.request("GET", "/held")  # body not read: the slot stays taken
            with pytest.raises(EngineTimeoutError, match="stayed busy"):
                await client.request("GET", "/waits", first_byte_s=0.2)
            held.release()
            assert await client.get_json("/after") == {}
            await client.close()

    _run(main())


def test_slow_reader_pauses_the_engine_connection_and_still_gets_every_byte() -> None:
    size = 4 * 1024 * 1024
    blob = b"x" * size

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await _read_request(reader)
        writer.write(_reply(blob, status=b"200 OK"))
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            client = EngineClient(server.url)
            resp = await client.request("GET", "/big")
            conn = resp._conn
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while not conn._paused and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert conn._paused, "reading was never paused for a consumer that does not read"
            await asyncio.sleep(0.1)
            assert conn._buffered < HIGH_WATER + 1024 * 1024
            total = 0
            async for chunk in resp.iter_chunks():
                total += len(chunk)
            resp.release()
            assert total == size
            await client.close()

    _run(main())


@pytest.mark.parametrize("separately", [False, True])
def test_stray_bytes_after_a_reply_make_the_connection_unusable(separately: bool) -> None:
    async def main() -> None:
        got_first = asyncio.Event()

        async def handler(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
        ) -> None:
            await _read_request(reader)
            if n > 1:
                writer.write(_reply(b'{"n":2}'))
                await writer.drain()
                return
            stray = b"HTTP/1.1 200 OK\r\n"  # the start of a reply nobody asked for
            if separately:
                writer.write(_reply(b'{"n":1}'))
                await got_first.wait()
                writer.write(stray)
            else:
                writer.write(_reply(b'{"n":1}') + stray)
            await writer.drain()
            await reader.read()

        async with Server(handler) as server:
            client = EngineClient(server.url)
            assert await client.get_json("/a") == {"n": 1}
            got_first.set()
            if separately:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 5
                while client._idle and not client._idle[0].closed and loop.time() < deadline:
                    await asyncio.sleep(0.01)
            assert await client.get_json("/b") == {"n": 2}
            await client.close()
            assert server.connections == 2

    _run(main())


def test_refused_connection_and_first_byte_timeout_are_engine_errors() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.read()

    async def main() -> None:
        async with Server(silent) as server:
            client = EngineClient(server.url, Timeouts(first_byte_s=0.2))
            with pytest.raises(EngineTimeoutError, match="did not answer within"):
                await client.get_json("/a")
            await client.close()
            url = server.url
        client = EngineClient(url)
        with pytest.raises(EngineNetworkError, match="cannot connect"):
            await client.get_json("/a")
        await client.close()

    _run(main())


def test_idle_pooled_connections_are_closed_after_the_keep_alive_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An engine's connections are not held until its own keep-alive ends."""
    import time

    from flm.http import client as http

    monkeypatch.setattr(http, "KEEPALIVE_S", 0.3)

    async def main() -> None:
        server = Server(lambda r, w, n: _echo_server(server)(r, w, n))
        async with server:
            client = EngineClient(server.url)
            await asyncio.gather(*(client.post_json("/x", {}) for _ in range(5)))
            assert server.open_now >= 2  # (pooled, idle)
            deadline = time.monotonic() + 10
            while server.open_now:
                assert time.monotonic() < deadline, f"{server.open_now} still open"
                await asyncio.sleep(0.01)
            assert await client.post_json("/x", {}) == {"n": 6}  # the pool still works
            await client.close()

    _run(main())


def test_an_engine_that_breaks_off_mid_body_is_a_bad_reply_not_unavailable() -> None:
    from flm.openai.errors import http_status

    async def main() -> None:
        async def handler(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
        ) -> None:
            await _read_request(reader)
            writer.write(_reply(b'{"choices": [' + b" " * 90)[:-60])  # head + part of the body
            await writer.drain()
            writer.transport.abort()  # the engine process dies

        async with Server(handler) as server:
            client = EngineClient(server.url)
            with pytest.raises(EngineError) as caught:
                await client.post_json("/x", {})
            await client.close()
        assert isinstance(caught.value, EngineApiError)
        assert "mid-response" in caught.value.message
        assert http_status(caught.value) == (502, "engine_error")

    _run(main())
