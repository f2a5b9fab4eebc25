"""Helpers the tests share: free loopback ports, an injectable clock, polling with a deadline,
tools from Debian packages, and the gate for tests that change the machine's trust store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from flm.core import ports


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the caller binds it soon after): FLM's own
    :func:`flm.core.ports.free_port`, taken outside the kernel's ephemeral range so no outgoing
    connection made in between (an engine client, an ACME client, a resolver) can take it, and
    never the same port twice in one run."""
    return ports.free_port(host)


def foreground_proxy(port: int) -> subprocess.Popen[bytes]:
    """``flm proxy start --no-daemon`` on ``port``, in the current ``FLM_HOME``, its output
    discarded (the caller waits for it to answer and stops it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "flm", "proxy", "start", "--no-daemon", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


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
