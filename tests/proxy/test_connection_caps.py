"""No address can exhaust the gateway's connections (issue 17, finding 2): caps per address
and in total with a reserve for the owner, the open-file limit raised, the listen backlog
honoured."""

from __future__ import annotations

import asyncio
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from flm.http.server import (
    LISTEN_BACKLOG,
    ConnectionLimits,
    HttpServer,
    bind_socket,
)
from flm.testing.emulators import start_emulator
from flm.testing.gateway import start_gateway


async def _hello(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def serve(limits: ConnectionLimits) -> Iterator[int]:
    """A plain server with ``limits`` on its own loop thread; yields its port."""
    loop = asyncio.new_event_loop()
    sock = bind_socket("127.0.0.1", 0)
    server = HttpServer(_hello, sock, limits=limits)
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield server.port
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _open(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def _refusals(socks: list[socket.socket], expected: int) -> list[bool]:
    """Which of these idle connections the server answered with its 503 (and closed), once
    ``expected`` of them have been answered (or a deadline passed); the others it keeps open,
    waiting for a request."""
    deadline = time.monotonic() + 5
    while True:
        ready, _, _ = select.select(socks, [], [], 0.05)
        if len(ready) >= expected or time.monotonic() > deadline:
            break
    out = []
    for sock in socks:
        if sock in ready:
            data = sock.recv(4096)
            assert data.startswith(b"HTTP/1.1 503"), data[:200]
        out.append(sock in ready)
    return out


def _get(port: int, source: str) -> bytes:
    with _open(port, source) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        sock.settimeout(5)
        return sock.recv(4096)


def _wait_open(limits: ConnectionLimits, count: int) -> None:
    deadline = time.monotonic() + 10
    while limits.open != count:
        assert time.monotonic() < deadline, f"{limits.open} connections open, not {count}"
        time.sleep(0.01)


def test_caps_per_address_and_in_total_keep_a_reserve_for_the_owner() -> None:
    limits = ConnectionLimits(
        per_address=3, total=10, reserve=2, privileged=lambda ip: ip == "127.0.0.1"
    )
    with serve(limits) as port, ExitStack() as stack:
        first = [stack.enter_context(_open(port, "127.0.0.5")) for _ in range(4)]
        assert _refusals(first, 1) == [False, False, False, True]
        _wait_open(limits, 3)
        # other addresses fill the rest, all but the reserve
        others = [stack.enter_context(_open(port, f"127.0.0.{6 + i // 3}")) for i in range(6)]
        assert _refusals(others, 1) == [False] * 5 + [True]
        _wait_open(limits, 8)
        assert _get(port, "127.0.0.9").startswith(b"HTTP/1.1 503")
        # ... while the owner is served from the reserve, beyond any per-address cap
        assert _get(port, "127.0.0.1").startswith(b"HTTP/1.1 200")
        owner = [stack.enter_context(_open(port, "127.0.0.1")) for _ in range(3)]
        assert _refusals(owner, 1) == [False, False, True]
    assert limits.open == 0 and limits.by_address == {}


def test_the_gateway_caps_connections_per_address(cli: Any) -> None:
    with start_emulator("vllm", models=["m:1"]) as emu:
        cli("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", "eng")
        with start_gateway() as gw, ExitStack() as stack:
            # (loopback stands for outside clients here: the owner's exemption is off)
            gw.call(
                lambda: gw.runtime.apply_policy(
                    {
                        "connections": {"max_per_address": 4},
                        "ip_blocklist": {"exempt_loopback": False},
                    }
                )
            )
            idle = [stack.enter_context(_open(gw.port, "127.0.0.5")) for _ in range(6)]
            assert _refusals(idle, 2) == [False] * 4 + [True] * 2
            assert _get(gw.port, "127.0.0.5").startswith(b"HTTP/1.1 503")
            assert _get(gw.port, "127.0.0.6").startswith(b"HTTP/1.1 401")  # (no key: served)
            # with the default policy loopback is the owner: never held to the cap
            gw.call(lambda: gw.runtime.apply_policy({"connections": {"max_per_address": 4}}))
            more = [stack.enter_context(_open(gw.port, "127.0.0.5")) for _ in range(3)]
            assert _refusals(more, 1) == [False] * 3


def _backlog(port: int) -> int:
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[2])  # State Recv-Q Send-Q ...: a listener's Send-Q is its backlog


def test_the_listen_backlog_is_honoured() -> None:
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    with serve(ConnectionLimits()) as port:
        assert _backlog(port) == min(LISTEN_BACKLOG, somaxconn)


def test_the_open_file_limit_is_raised_toward_the_hard_limit() -> None:
    code = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "from flm.http.server import raise_nofile_limit, NOFILE_TARGET\n"
        "raise_nofile_limit()\n"
        "now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
        "want = NOFILE_TARGET if hard == resource.RLIM_INFINITY else min(hard, NOFILE_TARGET)\n"
        "assert now == want and now > 256, (now, hard)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("per_address", [0])
def test_no_cap_when_the_policy_says_none(per_address: int) -> None:
    limits = ConnectionLimits(per_address=per_address, total=64)
    with serve(limits) as port, ExitStack() as stack:
        conns = [stack.enter_context(_open(port, "127.0.0.5")) for _ in range(20)]
        assert _refusals(conns, 1) == [False] * 20
