"""Header size and slow-client limits on the real server."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

import flm.http.server as server
from flm.testing.gateway import Gateway, start_gateway


@pytest.fixture
def gw(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    monkeypatch.setattr(server.HttpProtocol, "head_timeout_s", 0.5)
    with start_gateway(body_timeout_s=0.5) as gateway:
        yield gateway


def _exchange(gw: Gateway, data: bytes, pieces: int = 1) -> bytes:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            try:
                sock.sendall(data[i : i + step])
            except (BrokenPipeError, ConnectionResetError):
                break
        return sock.recv(4096)


@pytest.mark.parametrize("pieces", [1, 50])
def test_oversized_head_is_refused(gw: Gateway, pieces: int) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200_000 + b"\r\n\r\n"
    assert _exchange(gw, head, pieces).startswith(b"HTTP/1.1 431")
    assert _exchange(gw, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_slow_head_is_cut(gw: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
        started = time.monotonic()
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5


def test_slow_head_after_a_kept_alive_request_is_cut(gw: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b'"status"' not in first:
            data = sock.recv(4096)
            assert data
            first += data
        assert first.startswith(b"HTTP/1.1 200")
        # the next head starts in the same piece as nothing else and never finishes
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        started = time.monotonic()
        reply = sock.recv(4096)
    # cut by the head deadline (0.5 s here), not left to the 15 s keep-alive one
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5


def test_slow_body_is_cut(gw: Gateway, cli: Any) -> None:
    key = cli("api-keys", "create", "--label", "slow").data["key"]
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
            b"\r\nAuthorization: Bearer " + key.encode() + b"\r\n\r\n{"
        )
        started = time.monotonic()
        reply = sock.recv(4096)  # the rest of the body never comes
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5
