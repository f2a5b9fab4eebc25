"""FLM's HTTP/1.1 server (``flm.http.server``) on real loopback sockets, with small ASGI apps:
framing, keep-alive, pipelining, 100-continue, HEAD, unread bodies, slow bodies, disconnects,
app failures and graceful stop."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import flm.http.server as server
from flm.http.asgi import (
    DISCONNECT_HOOK,
    HEADER_LINES,
    Message,
    Receive,
    RequestBodyTimeout,
    Scope,
    Send,
)
from flm.http.server import HttpServer, bind_socket
from flm.openai.errors import refusal


class Running:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, srv: HttpServer, thread: threading.Thread
    ) -> None:
        self.loop = loop
        self.server = srv
        self.thread = thread
        self.port = srv.port
        self.events: list[Any] = []

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def serve(
    app: Callable[[Scope, Receive, Send], Any], host: str = "127.0.0.1", **kwargs: Any
) -> Running:
    loop = asyncio.new_event_loop()
    sock = bind_socket(host, 0)
    kwargs.setdefault("refusal", refusal)  # the gateway's: the error contract's JSON
    srv = HttpServer(app, sock, **kwargs)
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(srv.start())
        started.set()
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    return Running(loop, srv, thread)


@pytest.fixture
def running() -> Iterator[Callable[..., Running]]:
    servers: list[Running] = []

    def start(app: Callable[[Scope, Receive, Send], Any], **kwargs: Any) -> Running:
        r = serve(app, **kwargs)
        servers.append(r)
        return r

    yield start
    for r in servers:
        r.stop()


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Replies with method, path, query and the whole body; ``/stream`` answers in parts."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    text = f"{scope['method']} {scope['path']} {scope['query_string'].decode()} ".encode() + body
    if scope["path"] == "/stream":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(text)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": text})


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_response(sock: socket.socket, buf: bytearray) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One response from ``sock`` (content-length or chunked), leftovers kept in ``buf``."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"connection closed mid-head: {bytes(buf)!r}"
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    buf[:] = rest
    if b"content-length" in headers:
        size = int(headers[b"content-length"])
        while len(buf) < size:
            data = sock.recv(65536)
            assert data
            buf += data
        body = bytes(buf[:size])
        del buf[:size]
        return lines[0], headers, body
    assert headers.get(b"transfer-encoding") == b"chunked", head
    body = b""
    while True:
        while b"\r\n" not in buf:
            buf += sock.recv(65536)
        line, _, _ = bytes(buf).partition(b"\r\n")
        size = int(line, 16)
        while len(buf) < len(line) + 2 + size + 2:
            buf += sock.recv(65536)
        body += bytes(buf[len(line) + 2 : len(line) + 2 + size])
        del buf[: len(line) + 2 + size + 2]
        if size == 0:
            return lines[0], headers, body


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_keep_alive_and_one_write_per_small_reply(running: Callable[..., Running]) -> None:
    r = running(echo)
    with connect(r.port) as sock:
        buf = bytearray()
        for i in range(3):
            body = f"hello {i}".encode()
            sock.sendall(
                b"POST /p%C3%A9?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            status, headers, reply = read_response(sock, buf)
            assert status == b"HTTP/1.1 200 OK"
            assert reply == f"POST /p\u00e9 x=1 hello {i}".encode()  # path decoded as UTF-8
            assert b"date" in headers and b"connection" not in headers
        # a small reply arrives as one segment: head and body together
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"GET /x  ")


def test_a_served_request_leaves_no_reference_cycle(running: Callable[..., Running]) -> None:
    """What a request made is freed when its last reference goes, without the garbage
    collector (a cycle per request made the collector run every ~70 requests)."""

    class Marker:
        pass

    refs: list[weakref.ref[Marker]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        marker = Marker()
        scope["marker"] = marker  # (lives as long as the request's scope)
        refs.append(weakref.ref(marker))
        await echo(scope, receive, send)

    r = running(app)
    gc.disable()
    try:
        with connect(r.port) as sock:
            buf = bytearray()
            for _ in range(3):
                sock.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
                assert read_response(sock, buf)[0] == b"HTTP/1.1 200 OK"
            deadline = time.monotonic() + 5
            while any(ref() is not None for ref in refs) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(refs) == 3
            assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


def test_chunked_streaming_reply(running: Callable[..., Running]) -> None:
    r = running(echo)
    with connect(r.port) as sock:
        buf = bytearray()
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
        _status, headers, body = read_response(sock, buf)
        assert headers[b"transfer-encoding"] == b"chunked"
        assert body == b"one,two,three"
        sock.sendall(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")  # still usable afterwards
        assert read_response(sock, buf)[2] == b"GET /again  "


def test_pipelined_requests_answer_in_order(running: Callable[..., Running]) -> None:
    r = running(echo)
    with connect(r.port) as sock:
        sock.sendall(b"".join(f"GET /{i} HTTP/1.1\r\nHost: a\r\n\r\n".encode() for i in range(5)))
        buf = bytearray()
        assert [read_response(sock, buf)[2] for _ in range(5)] == [
            f"GET /{i}  ".encode() for i in range(5)
        ]


def test_expect_100_continue_and_chunked_request(running: Callable[..., Running]) -> None:
    r = running(echo)
    with connect(r.port) as sock:
        sock.sendall(
            b"POST /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"abcd")
        buf = bytearray()
        assert read_response(sock, buf)[2] == b"POST /up  abcd"
        sock.sendall(
            b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nxyz\r\n2\r\n12\r\n0\r\n\r\n"
        )
        assert read_response(sock, buf)[2] == b"POST /c  xyz12"


def test_head_has_no_body(running: Callable[..., Running]) -> None:
    r = running(echo)
    with connect(r.port) as sock:
        sock.sendall(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"GET /next  "):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        first, _, second = data.partition(b"\r\n\r\n")
        assert b"content-length: 9" in first  # the length GET would have had, and no body
        assert second.startswith(b"HTTP/1.1 200")


def test_http10_and_connection_close_end_the_connection(running: Callable[..., Running]) -> None:
    r = running(echo)
    for request in (
        b"GET /a HTTP/1.0\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    ):
        with connect(r.port) as sock:
            sock.sendall(request)
            _status, headers, body = read_response(sock, bytearray())
            assert body == b"GET /a  " and headers.get(b"connection") == b"close"
            assert closed_by_peer(sock)


def test_reply_before_the_body_closes_the_connection(running: Callable[..., Running]) -> None:
    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"0")]}
        )
        await send({"type": "http.response.body", "body": b""})

    r = running(refuse)
    with connect(r.port) as sock:
        sock.sendall(
            b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 40000000\r\n\r\n" + b"x" * 65536
        )
        status, headers, _ = read_response(sock, bytearray())
        assert status.startswith(b"HTTP/1.1 413") and headers[b"connection"] == b"close"
        assert closed_by_peer(sock)


def test_slow_body_raises_in_receive(running: Callable[..., Running]) -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            while (await receive()).get("more_body"):
                pass
        except RequestBodyTimeout:
            seen.append("timeout")
            await send(
                {
                    "type": "http.response.start",
                    "status": 408,
                    "headers": [(b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})

    r = running(app, body_timeout_s=0.3)
    with connect(r.port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        started = time.monotonic()
        status, _, _ = read_response(sock, bytearray())
        assert status.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 3
    assert seen == ["timeout"]


def test_disconnect_reaches_a_waiting_receive(running: Callable[..., Running]) -> None:
    got: list[Message] = []
    done = threading.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the (empty) body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data", "more_body": True})
        got.append(await receive())  # blocks until the client goes away
        await send({"type": "http.response.body", "body": b"dropped", "more_body": True})
        done.set()

    r = running(app)
    sock = connect(r.port)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    sock.close()
    assert done.wait(5)
    assert got == [{"type": "http.disconnect"}]


def test_disconnect_hook_calls_back_without_a_waiting_task(
    running: Callable[..., Running],
) -> None:
    """The scope's DISCONNECT_HOOK: the callback runs when the client leaves (nothing waits
    on receive()), at once when registered after the client left, and never once withdrawn
    or after the request ended."""
    calls: list[str] = []
    ended = threading.Event()
    hooks: list[Callable[[Any], None]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        hook = scope[DISCONNECT_HOOK]
        hooks.append(hook)
        path = scope["path"]
        if path == "/withdrawn":
            hook(lambda: calls.append("withdrawn"))
            # (the hook names the task running the app: the one to cancel)
            assert hook(None) is asyncio.current_task()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        gone = asyncio.Event()
        hook(lambda: (calls.append(path), gone.set()))
        await gone.wait()
        hook(lambda: calls.append(path + " late"))  # the client has gone: called at once
        ended.set()

    r = running(app)
    with connect(r.port) as sock:
        sock.sendall(b"GET /withdrawn HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(sock, bytearray())[0].startswith(b"HTTP/1.1 200")
    sock = connect(r.port)
    sock.sendall(b"GET /waits HTTP/1.1\r\nHost: a\r\n\r\n")
    deadline = time.monotonic() + 5
    while len(hooks) < 2:
        assert time.monotonic() < deadline, "the request never reached the app"
        time.sleep(0.01)
    sock.close()
    assert ended.wait(5)
    assert calls == ["/waits", "/waits late"]


def test_app_errors_give_500_or_cut_the_reply(
    running: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/late":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("boom")

    r = running(app)
    with connect(r.port) as sock:
        sock.sendall(b"GET /early HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _, body = read_response(sock, bytearray())
        assert status.startswith(b"HTTP/1.1 500") and b"boom" not in body
        assert closed_by_peer(sock)
    with connect(r.port) as sock:
        sock.sendall(b"GET /late HTTP/1.1\r\nHost: a\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and b"4\r\npart\r\n" in data
        assert not data.endswith(b"0\r\n\r\n")  # cut, not completed
    assert "boom" in caplog.text


def test_bad_requests_and_header_injection(running: Callable[..., Running]) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"x-evil", b"a\r\nset-cookie: x=1"), (b"content-length", b"0")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    r = running(app)
    with connect(r.port) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400")
    with connect(r.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _ = read_response(sock, bytearray())
        assert status.startswith(b"HTTP/1.1 500") and b"set-cookie" not in headers


def test_injection_is_refused_on_the_header_by_header_way_too(
    running: Callable[..., Running],
) -> None:
    """A reply naming a framing header takes the other way through the server; a CR or LF
    inside a name or value is refused there as well."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        bad = {"/value": (b"x-evil", b"a\r\nset-cookie: x=1"), "/name": (b"x-\nevil", b"a")}
        headers = [(b"transfer-encoding", b"chunked"), bad[scope["path"]]]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    r = running(app)
    for path in (b"/value", b"/name"):
        with connect(r.port) as sock:
            sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
            status, headers, _ = read_response(sock, bytearray())
            assert status.startswith(b"HTTP/1.1 500") and b"set-cookie" not in headers


def test_ready_made_header_lines_are_sent_as_given(running: Callable[..., Running]) -> None:
    """The server offers ``HEADER_LINES`` in the scope and sends the lines an app renders
    itself after the app's headers, on either way through the server."""
    offered: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        offered.append(scope.get(HEADER_LINES))
        headers = [(b"content-length", b"2")]
        if scope["path"] == "/framing":
            headers.append((b"connection", b"keep-alive"))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": headers,
                HEADER_LINES: b"x-one: 1\r\nx-two: 2\r\n",
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})

    r = running(app)
    with connect(r.port) as sock:
        buf = bytearray()
        for path in (b"/", b"/framing"):
            sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
            status, headers, body = read_response(sock, buf)
            assert status.startswith(b"HTTP/1.1 200") and body == b"ok"
            assert headers[b"x-one"] == b"1" and headers[b"x-two"] == b"2"
            assert b"transfer-encoding" not in headers
    assert offered == [True, True]


def test_fixed_headers_go_on_every_response_and_bad_ones_are_refused(
    running: Callable[..., Running],
) -> None:
    fixed = [(b"x-fixed", b"1"), (b"x-frame-options", b"DENY")]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/fail":
            raise RuntimeError("boom")
        await echo(scope, receive, send)

    r = running(app, headers=fixed)
    with connect(r.port) as sock:
        buf = bytearray()
        for path, reply in ((b"/", b"GET / "), (b"/stream", b"one,two,three")):
            sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
            status, headers, body = read_response(sock, buf)  # content-length, then chunked
            assert status.startswith(b"HTTP/1.1 200") and body.startswith(reply)
            assert headers[b"x-fixed"] == b"1" and headers[b"x-frame-options"] == b"DENY"
    for request in (b"GET /fail HTTP/1.1\r\nHost: a\r\n\r\n", b"NOT HTTP AT ALL\r\n\r\n"):
        with connect(r.port) as sock:  # the server's own 500 and 400 carry them too
            sock.sendall(request)
            status, headers, _ = read_response(sock, bytearray())
            assert status[9:12] in (b"500", b"400") and headers[b"x-fixed"] == b"1"
    sock = bind_socket("127.0.0.1", 0)
    try:
        for bad in ((b"x-a", b"1\r\nset-cookie: x=1"), (b"x a", b"1"), (b"", b"1")):
            with pytest.raises(ValueError):
                HttpServer(echo, sock, headers=[bad])
    finally:
        sock.close()


def test_framing_headers_from_the_app_are_the_servers_to_decide(
    running: Callable[..., Running],
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = {
            "/close": [
                (b"Content-Length", b"2"),
                (b"Connection", b"Close"),
                (b"Transfer-Encoding", b"gzip"),
            ],
            "/keep": [(b"connection", b"keep-alive"), (b"transfer-encoding", b"identity")],
            "/empty": [(b"", b"x"), (b"content-length", b"2")],
            # a length in any case, among other headers, frames the reply (no chunking);
            # a value that merely mentions a framing header is only a value
            "/upper": [(b"X-A", b"connection: close"), (b"CONTENT-Length", b"2"), (b"x-b", b"")],
        }[scope["path"]]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    r = running(app)
    with connect(r.port) as sock:
        buf = bytearray()
        sock.sendall(b"GET /keep HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, body = read_response(sock, buf)
        # no length given: the server frames the reply itself, and keeps the connection
        assert headers[b"transfer-encoding"] == b"chunked" and body == b"ok"
        assert b"connection" not in headers
        sock.sendall(b"GET /close HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, body = read_response(sock, buf)
        assert headers[b"content-length"] == b"2" and body == b"ok"
        assert b"transfer-encoding" not in headers and headers[b"connection"] == b"close"
        assert closed_by_peer(sock)
    with connect(r.port) as sock:
        buf = bytearray()
        for _ in range(2):  # (kept alive)
            sock.sendall(b"GET /upper HTTP/1.1\r\nHost: a\r\n\r\n")
            status, headers, body = read_response(sock, buf)
            assert headers[b"content-length"] == b"2" and body == b"ok"
            assert headers[b"x-a"] == b"connection: close" and headers[b"x-b"] == b""
            assert b"transfer-encoding" not in headers and b"connection" not in headers
    with connect(r.port) as sock:
        sock.sendall(b"GET /empty HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _, _ = read_response(sock, bytearray())
        assert status.startswith(b"HTTP/1.1 500")


def test_idle_keep_alive_connection_is_closed(
    running: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.HttpProtocol, "keepalive_timeout_s", 0.3)
    r = running(echo)
    with connect(r.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        read_response(sock, bytearray())
        started = time.monotonic()
        assert closed_by_peer(sock) and time.monotonic() - started < 3


def test_graceful_stop_lets_a_running_request_finish() -> None:
    release = threading.Event()

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]}
        )
        await send({"type": "http.response.body", "body": b"done"})

    r = serve(slow)
    busy = connect(r.port)
    idle = connect(r.port)
    busy.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    stopper = threading.Thread(target=r.stop)
    deadline = time.monotonic() + 5
    while not r.server.state.tasks:  # poll with a deadline until the request is running
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    stopper.start()
    assert closed_by_peer(idle)  # idle connections close at once
    with pytest.raises(OSError):
        connect(r.port).sendall(b"GET / HTTP/1.1\r\n\r\n")  # no new connections
    release.set()
    _status, headers, body = read_response(busy, bytearray())
    assert body == b"done" and headers.get(b"connection") == b"close"
    stopper.join(10)
    busy.close()
    idle.close()


def test_small_reply_is_one_transport_write() -> None:
    """Head and body of a small reply go to the transport together (the client wakes once);
    counted on the transport itself, so the test does not depend on socket timing."""

    class Recorder:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def is_closing(self) -> bool:
            return False

        def get_extra_info(self, name: str) -> Any:
            return ("127.0.0.1", 1)

        def close(self) -> None:
            pass

    async def run() -> list[bytes]:
        state = server._ServerState(echo, "http", 30.0)
        proto = server.HttpProtocol(state)
        transport = Recorder()
        proto.connection_made(transport)  # type: ignore[arg-type]
        proto.data_received(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        deadline = time.monotonic() + 5
        # poll until the connection's worker waits for the next request: the reply is done
        while proto.next_request is None:
            assert time.monotonic() < deadline, "the reply never finished"
            await asyncio.sleep(0.001)
        proto.connection_lost(None)
        return transport.writes

    writes = asyncio.run(run())
    assert len(writes) == 1
    assert writes[0].startswith(b"HTTP/1.1 200") and writes[0].endswith(b"GET /one  ")


# --- bytes that break the framing ------------------------------------------------------------


def _counting_echo() -> tuple[list[str], Callable[[Scope, Receive, Send], Any]]:
    calls: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append(f"{scope['method']} {scope['path']}")
        await echo(scope, receive, send)

    return calls, app


def _refusal(sock: socket.socket, buf: bytearray, status: bytes) -> dict[str, Any]:
    """The server's own refusal: the error contract's JSON, a request id, then the close."""
    import json

    line, headers, body = read_response(sock, buf)
    assert line.startswith(b"HTTP/1.1 " + status), line
    assert headers[b"x-request-id"] and headers[b"connection"] == b"close"
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["request_id"] == headers[b"x-request-id"].decode()
    assert closed_by_peer(sock)
    return error


def test_upgrade_requests_are_answered_as_plain_http_and_never_smuggle(
    running: Callable[..., Running],
) -> None:
    calls, app = _counting_echo()
    r = running(app)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    with connect(r.port) as sock:  # a body llhttp would not read: refused, never served
        sock.sendall(
            b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
            b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled
        )
        assert "upgrade" in _refusal(sock, bytearray(), b"400")["message"]
    with connect(r.port) as sock:  # no body: served, then the connection ends
        sock.sendall(
            b"GET /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n" + smuggled
        )
        buf = bytearray()
        line, headers, body = read_response(sock, buf)
        assert line.startswith(b"HTTP/1.1 200") and body.startswith(b"GET /up")
        assert headers[b"connection"] == b"close" and closed_by_peer(sock)
    assert calls == ["GET /up"]


def test_bad_bytes_after_good_requests_answer_those_first(running: Callable[..., Running]) -> None:
    calls, app = _counting_echo()
    r = running(app)
    with connect(r.port) as sock:
        sock.sendall(
            b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\n"
            b"garbage\r\n\r\n"
        )
        buf = bytearray()
        assert read_response(sock, buf)[2].startswith(b"GET /one")
        assert read_response(sock, buf)[2].startswith(b"GET /two")
        assert _refusal(sock, buf, b"400")["code"] == "invalid_request"
    assert calls == ["GET /one", "GET /two"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /te HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
        b"POST /te HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",  # noqa: E501
        b"POST /te HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"fffffffffffffffffff\r\nx\r\n",
    ],
)
def test_a_request_with_broken_framing_is_refused_and_never_dispatched(
    running: Callable[..., Running], request_bytes: bytes
) -> None:
    calls, app = _counting_echo()
    r = running(app)
    with connect(r.port) as sock:
        sock.sendall(request_bytes)
        _refusal(sock, bytearray(), b"400")
    assert calls == []


def test_broken_body_of_a_running_request_gets_the_refusal(running: Callable[..., Running]) -> None:
    seen: list[Message] = []
    first_part = threading.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(await receive())
        first_part.set()
        seen.append(await receive())  # the body breaks: the app sees the client go

    r = running(app)
    with connect(r.port) as sock:
        sock.sendall(
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        assert first_part.wait(5)
        sock.sendall(b"zz\r\n")
        _refusal(sock, bytearray(), b"400")
    assert seen == [
        {"type": "http.request", "body": b"abc", "more_body": True},
        {"type": "http.disconnect"},
    ]


def test_head_limit_holds_on_keep_alive_connections(running: Callable[..., Running]) -> None:
    """A head over the limit is refused by the server with 431 while it is read, or when its
    last part completes it (the app never sees it); either way it is measured on the second
    request of a connection too."""
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["path"])
        await echo(scope, receive, send)

    r = running(app)
    with connect(r.port) as sock:
        buf = bytearray()
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(sock, buf)[0].startswith(b"HTTP/1.1 200")
        # 50 KB, read by the server before the next 30 KB are sent: only counting both
        # reads finds the head over the 64 KiB limit.
        head = b"GET /second HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"a" * 80_000 + b"\r\n\r\n"
        sock.sendall(head[:50_000])
        [proto] = r.server.state.connections
        deadline = time.monotonic() + 5
        while proto.url != b"/second":  # the first part has been read and parsed
            assert time.monotonic() < deadline, "the server never read the first part"
            time.sleep(0.005)
        sock.sendall(head[50_000:])
        assert _refusal(sock, buf, b"431")["code"] == "headers_too_large"
    assert seen == ["/first"]


def test_head_timeout_is_the_error_contract(
    running: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.HttpProtocol, "head_timeout_s", 0.3)
    r = running(echo)
    with connect(r.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")  # never finished
        assert _refusal(sock, bytearray(), b"408")["code"] == "request_timeout"


def test_no_100_continue_for_http10_clients(running: Callable[..., Running]) -> None:
    r = running(echo)
    with connect(r.port) as sock:
        sock.sendall(
            b"POST /e HTTP/1.0\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(65536)  # nothing: an HTTP/1.0 client is never sent "100 Continue"
        sock.settimeout(10)
        sock.sendall(b"hello")
        line, _, body = read_response(sock, bytearray())
        assert line.startswith(b"HTTP/1.1 200") and body.endswith(b"hello")


def test_a_client_that_never_reads_is_cut(
    running: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.HttpProtocol, "send_timeout_s", 0.5)
    finished = threading.Event()

    async def flood(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"x" * 65536
        for _ in range(2000):  # 128 MB: far more than any socket buffer holds
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finished.set()

    r = running(flood)
    with connect(r.port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /flood HTTP/1.1\r\nHost: a\r\n\r\n")
        assert finished.wait(15), "the app was still blocked on a client that reads nothing"
        assert not r.server.state.connections  # the connection was cut


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"GET /h HTTP/1.1\r\nX-A: b\r\n\r\n", "missing Host header"),
        (b"GET /h HTTP/1.1\r\nHost: a\r\nX-A: b\r\nhost: b\r\n\r\n", "more than one Host header"),
        (b"GET /h HTTP/1.1\r\nHost: a b\r\n\r\n", "invalid Host header"),
        (b"GET /h HTTP/1.1\r\nHost: evil@a\r\n\r\n", "invalid Host header"),
        (b"GET /h HTTP/1.1\r\nHost: a/b\r\n\r\n", "invalid Host header"),
    ],
)
def test_host_must_be_one_and_valid(
    running: Callable[..., Running], head: bytes, message: str
) -> None:
    """RFC 9112 §3.2: a request that lacks Host, repeats it or carries a malformed one is
    refused before the app sees it; the request before it on the connection is answered."""
    calls, app = _counting_echo()
    r = running(app)
    with connect(r.port) as sock:
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n" + head)
        buf = bytearray()
        assert read_response(sock, buf)[2].startswith(b"GET /first")
        assert _refusal(sock, buf, b"400")["message"] == message
    assert calls == ["GET /first"]


@pytest.mark.parametrize(
    "head",
    [
        b"GET /h HTTP/1.0\r\n\r\n",  # HTTP/1.0 may omit it
        b"GET /h HTTP/1.1\r\nHost: \r\n\r\n",  # empty: allowed
        b"GET /h HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n",
        b"GET /h HTTP/1.1\r\nhOsT:  127.0.0.1:80 \r\nX-A: 1\r\nX-A: 2\r\n\r\n",
    ],
)
def test_good_hosts_pass(running: Callable[..., Running], head: bytes) -> None:
    calls, app = _counting_echo()
    r = running(app)
    with connect(r.port) as sock:
        sock.sendall(head)
        line = read_response(sock, bytearray())[0]
        assert line.startswith(b"HTTP/1.1 200"), line
    assert calls == ["GET /h"]


def test_ipv4_clients_of_a_dual_stack_socket_have_their_ipv4_address(
    running: Callable[..., Running],
) -> None:
    """On a "::" bind an IPv4 client arrives as ::ffff:a.b.c.d; it is a.b.c.d to the apps, so
    allow-lists, blocks, rate buckets and audit rows name it the way a user writes it."""
    clients: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        clients.append(scope["client"][0])
        await echo(scope, receive, send)

    try:
        r = running(app, host="::")
    except Exception as exc:  # a machine without IPv6 at all
        pytest.skip(f"no IPv6 socket here: {exc}")
    with socket.create_connection(("127.0.0.1", r.port), timeout=5) as sock:
        sock.sendall(b"GET /who HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(sock, bytearray())[0].startswith(b"HTTP/1.1 200")
    assert clients == ["127.0.0.1"]


def test_refusals_are_rendered_by_the_function_given(running: Callable[..., Running]) -> None:
    """The server knows no error format: without a ``refusal`` function its own refusals are
    plain text; with one, that function's headers and body (and the fixed headers) go out."""
    r = running(echo, refusal=server.plain_refusal)
    with connect(r.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # no Host
        line, headers, body = read_response(sock, bytearray())
    assert line.startswith(b"HTTP/1.1 400") and body == b"missing Host header\n"
    assert headers[b"content-type"].startswith(b"text/plain")

    def teapot(status: int, code: str, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
        return [
            (b"content-type", b"text/x-test"),
            (b"x-code", code.encode()),
        ], b"<" + message.encode() + b">"

    r = running(echo, refusal=teapot, headers=[(b"x-fixed", b"1")])
    with connect(r.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        line, headers, body = read_response(sock, bytearray())
    assert line.startswith(b"HTTP/1.1 400") and body == b"<missing Host header>"
    assert headers[b"x-code"] == b"invalid_request" and headers[b"x-fixed"] == b"1"
    assert headers[b"content-length"] == str(len(body)).encode()
