"""Helpers the tests share: free loopback ports, an injectable clock, polling with a deadline,
tools from Debian packages, and the gate for tests that change the machine's trust store."""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Callable

import pytest


def _ports_outside_the_ephemeral_range() -> range:
    """Ports the kernel never hands out on its own: those below the range it picks the local
    end of outgoing connections (and ``bind(port=0)``) from. A port taken from that range could
    be taken again by any connection opened before the caller binds it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(part) for part in f.read().split())
    except (OSError, ValueError):
        return range(0)
    if low >= 12_000:
        return range(max(10_000, low - 20_000), low - 2)  # a pair P, P + 1 stays below too
    if high <= 50_000:
        return range(high + 1, 65_000)
    return range(0)


_OUTSIDE = _ports_outside_the_ephemeral_range()
_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the caller binds it soon after).

    Taken outside the kernel's ephemeral range when there is one, so no outgoing connection
    made in between (an engine client, an ACME client, a resolver) can take it; never the same
    port twice in one run, so two ports asked for before either is bound differ."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if _OUTSIDE:
        for _ in range(200):
            port = random.choice(_OUTSIDE)
            if port in _HANDED_OUT:
                continue
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class FakeClock:
    """An injectable clock (``time.time``'s shape) that moves only when told."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll ``check`` until it returns True; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def skip_or_fail(message: str) -> None:
    """Skip the test, naming what is missing; under CI=true nothing may skip: fail."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_tool(binary: str, package: str) -> str:
    """The tool's path; skip the test when it is missing (fail instead when CI=true)."""
    path = shutil.which(binary)
    if path is None:
        skip_or_fail(f"install Debian package {package} (`{binary}` not found)")
        raise AssertionError("unreachable")
    return path


#: Variables that point TLS clients at another CA bundle than the machine's trust store.
_TRUST_OVERRIDES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE")


def curl_with_system_trust(url: str, *options: str) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a curl that trusts only the machine's trust store (no
    variable points it elsewhere), never goes through a proxy and gives up after 10 s: how a
    test shows that a CA is (or is no longer) trusted by the system."""
    env = {k: v for k, v in os.environ.items() if k not in _TRUST_OVERRIDES}
    argv = ["curl", "--silent", "--show-error", "--max-time", "10", "--noproxy", "*", *options]
    return [*argv, url], env


def require_real_trust_store(what: str) -> None:
    """Tests that add a CA to the machine's trust store run on Linux as root, with
    update-ca-certificates and curl."""
    reason = None
    if not sys.platform.startswith("linux"):
        reason = f"{what} runs on Linux"
    elif os.geteuid() != 0:
        reason = f"{what} needs root"
    if reason:
        skip_or_fail(reason)
    require_tool("update-ca-certificates", "ca-certificates")
    require_tool("curl", "curl")
