"""In-flight slots are shared fairly (issue 17, finding 6): one address, or one API key,
holding slow uploads cannot take every slot from everyone else."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from urllib.parse import urlsplit

from tests.security.conftest import Env


def _wait(what: str, check: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@contextmanager
def slow_uploads(env: Env, clients: list[tuple[str, str]]) -> Iterator[list[bytes]]:
    """One slow upload per (source address, key): the headers and a few body bytes, then
    nothing. Yields what each got back at once (b"" while it is still in flight)."""
    parts = urlsplit(env.gw.url)
    with ExitStack() as stack:
        socks = []
        for source, key in clients:
            sock = stack.enter_context(
                socket.create_connection(
                    (parts.hostname, parts.port), timeout=10, source_address=(source, 0)
                )
            )
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer " + key.encode() + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                b'{"model":'
            )
            socks.append(sock)
        replies = []
        for sock in socks:
            sock.settimeout(0.5)
            try:
                replies.append(sock.recv(65536))
            except TimeoutError:
                replies.append(b"")  # in flight: reading its body
        yield replies


def test_one_address_cannot_take_every_slot(env: Env) -> None:
    # (the key may hold every slot here: only the address's share is at work)
    env.policy(
        {
            "resource_protection": {
                "enabled": True,
                "max_connections": 8,
                "max_connections_per_key": 8,
            }
        }
    )
    other = env.cli("api-keys", "create", "--label", "other").data["key"]
    with slow_uploads(env, [("127.0.0.5", env.key)] * 8) as replies:
        refused = [r for r in replies if r.startswith(b"HTTP/1.1 429")]
        assert len(refused) == 6 and replies.count(b"") == 2, replies
        _wait("two requests in flight", lambda: env.rt.guard.connections == 2)
        status, _, _ = env.request("GET", "/v1/models", source="127.0.0.6", key=other)
        assert status == 200
    _wait("the slots to be given back", lambda: env.rt.guard.connections == 0)
    assert env.rt.guard.in_flight == {}


def test_one_key_cannot_take_every_slot(env: Env) -> None:
    env.policy(
        {
            "resource_protection": {
                "enabled": True,
                "max_connections": 8,
                "max_connections_per_key": 3,
            }
        }
    )
    other = env.cli("api-keys", "create", "--label", "other").data["key"]
    assert env.request("GET", "/v1/models")[0] == 200  # (verified once, then cached)
    clients = [(f"127.0.2.{i}", env.key) for i in range(1, 9)]
    with slow_uploads(env, clients) as replies:
        assert sum(r.startswith(b"HTTP/1.1 429") for r in replies) == 5, replies
        assert replies.count(b"") == 3
        status, _, _ = env.request("GET", "/v1/models", source="127.0.0.6", key=other)
        assert status == 200
    _wait("the slots to be given back", lambda: env.rt.guard.in_flight == {})
