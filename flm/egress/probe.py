"""Is the SOCKS5 endpoint there? A method-negotiation handshake, a few tries with backoff."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from typing import Any

from flm.egress.config import EgressConfig, SocksEndpoint

#: SOCKS5, one method offered: 0x00 "no authentication" (what Tor and most local proxies take).
_GREETING = b"\x05\x01\x00"


class _NotSocks5Error(Exception):
    pass


@dataclass(frozen=True)
class ProbeResult:
    reachable: bool
    endpoint: str | None
    attempts: int
    error: str | None = None
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "reachable": self.reachable,
            "endpoint": self.endpoint,
            "attempts": self.attempts,
            "error": self.error,
            "latency_ms": self.latency_ms,
        }


def probe(
    config: EgressConfig, tries: int = 3, *, timeout_s: float = 2.0, backoff_s: float = 0.2
) -> ProbeResult:
    """Open a TCP connection to the SOCKS endpoint and complete the SOCKS5 greeting.

    Up to ``tries`` attempts, pausing ``backoff_s``, then twice that, between them. A direct
    config is trivially reachable (``attempts=0``). Blocking: see :func:`probe_async`.
    """
    endpoint = config.endpoint
    if endpoint is None:
        return ProbeResult(True, None, 0)
    error = "not tried"
    for attempt in range(1, max(1, tries) + 1):
        started = time.perf_counter()
        try:
            _handshake(endpoint, timeout_s)
        except (OSError, _NotSocks5Error) as exc:
            error = _describe(exc)
        else:
            latency = round((time.perf_counter() - started) * 1000, 2)
            return ProbeResult(True, str(endpoint), attempt, None, latency)
        if attempt < tries:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    return ProbeResult(False, str(endpoint), max(1, tries), error)


async def probe_async(
    config: EgressConfig, tries: int = 3, *, timeout_s: float = 2.0, backoff_s: float = 0.2
) -> ProbeResult:
    """:func:`probe` without blocking the event loop."""
    return await asyncio.to_thread(probe, config, tries, timeout_s=timeout_s, backoff_s=backoff_s)


def _handshake(endpoint: SocksEndpoint, timeout_s: float) -> None:
    with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(_GREETING)
        reply = b""
        while len(reply) < 2:
            chunk = sock.recv(2 - len(reply))
            if not chunk:
                raise _NotSocks5Error("the server closed the connection during the SOCKS5 greeting")
            reply += chunk
    if reply[0] != 5:
        raise _NotSocks5Error(f"not a SOCKS5 server (answered {reply!r})")
    if reply[1] == 0xFF:
        raise _NotSocks5Error(
            "the SOCKS5 server requires authentication, which FLM does not support yet"
        )
    if reply[1] != 0:
        raise _NotSocks5Error(f"the SOCKS5 server chose an unexpected method {reply[1]:#x}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the proxy host ({exc.strerror})"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc)
