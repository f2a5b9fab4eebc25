"""Smaller hardening (issue 17, finding 9): trailers and rewriting headers never reach an
engine, cookies cross in neither direction, deep JSON is a 400, and a client with a valid key
is never anomaly-auto-blocked for its rate."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from flm.testing.gateway import start_gateway
from tests.proxy.test_passthrough import Peer, _request


@pytest.fixture
def engine() -> Iterator[Peer]:
    peer = Peer(engine_like=True, reply_headers=[("Set-Cookie", "s=engine"), ("X-Kept", "yes")])
    yield peer
    peer.close()


def _raw(url: str, data: bytes) -> bytes:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def test_trailers_and_rewriting_headers_never_reach_the_engine(cli: Any, engine: Peer) -> None:
    cli("engines", "add", "--kind", "vllm", "--url", engine.url, "--id", "peer")
    key = cli("api-keys", "create", "--label", "t").data["key"]
    with start_gateway() as gw:
        status, headers, _ = _request(
            gw,
            "GET",
            "/engine/peer/echo",
            key,
            {
                "X-HTTP-Method-Override": "DELETE",
                "X-Original-URL": "/api/pull",
                "X-Rewrite-URL": "/api/pull",
                "X-Http-Method": "DELETE",
                "X-Method-Override": "DELETE",
                "Cookie": "session=client",
                "X_Forwarded_For": "1.2.3.4",
                "Auth_Token": "x",
                "X-Fine": "1",
            },
        )
        assert status == 200
        assert "set-cookie" not in dict(headers) and dict(headers)["x-kept"] == "yes"
        sent = engine.seen[-1][2]
        assert sent.get("x-fine") == "1"
        for gone in (
            "x-http-method-override",
            "x-original-url",
            "x-rewrite-url",
            "x-http-method",
            "x-method-override",
            "cookie",
            "x_forwarded_for",
            "auth_token",
        ):
            assert gone not in sent, gone
        # a chunked body's trailer fields are not merged into the request's headers
        body = b'{"a":1}'
        reply = _raw(
            gw.url,
            b"POST /engine/peer/echo HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n"
            + f"{len(body):x}".encode()
            + b"\r\n"
            + body
            + b"\r\n0\r\nX-Trailer-Evil: 1\r\nAuthorization: Bearer other\r\n\r\n",
        )
        assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
        method, path, sent = engine.seen[-1]
        assert (method, path) == ("POST", "/echo")
        assert "x-trailer-evil" not in sent and "authorization" not in sent


def test_json_nested_deeper_than_the_parser_goes_is_a_400(cli: Any) -> None:
    key = cli("api-keys", "create", "--label", "t").data["key"]
    with start_gateway() as gw:
        deep = b'{"model":"flm://e/m","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        reply = _raw(
            gw.url,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(deep)).encode() + b"\r\n\r\n" + deep,
        )
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), reply[:300]
        assert json.loads(body)["error"]["code"] == "invalid_request"


def test_pass_through_failures_read_alike_whatever_listens(cli: Any) -> None:
    """Nothing listening, something that accepts and hangs up, something that speaks no HTTP:
    the key holder reads the same answer, and learns nothing about the engine's port."""
    import threading

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = closed.getsockname()[1]
    closed.close()
    listeners = []
    for reply in (b"", b"SSH-2.0-OpenSSH_9.6\r\n"):
        server = socket.create_server(("127.0.0.1", 0))
        listeners.append(server)

        def serve(server: socket.socket = server, reply: bytes = reply) -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    conn.recv(65536)
                    if reply:
                        conn.sendall(reply)

        threading.Thread(target=serve, daemon=True).start()
    ports = [dead, *(s.getsockname()[1] for s in listeners)]
    for i, port in enumerate(ports):
        cli(
            "engines", "add", "--kind", "vllm", "--url", f"http://127.0.0.1:{port}", "--id", f"e{i}"
        )
    key = cli("api-keys", "create", "--label", "t").data["key"]
    try:
        with start_gateway() as gw:
            answers = set()
            for i in range(len(ports)):
                status, _, raw = _request(gw, "GET", f"/engine/e{i}/v1/models", key)
                error = json.loads(raw)["error"]
                answers.add((status, error["code"], error["message"].replace(f"e{i}", "E")))
            assert len(answers) == 1, answers
    finally:
        for server in listeners:
            server.close()
