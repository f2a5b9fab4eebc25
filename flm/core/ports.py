"""Choosing a free TCP port for a server FLM starts (a managed llama-server).

A port found free with ``bind(port=0)`` comes from the kernel's ephemeral range, the range it
also takes the local end of every outgoing connection from: between the choice and the server
binding it, any connection this machine opens (a health check, an engine client, a resolver)
may take it, and the server then fails to start. A port below that range is never handed out
by the kernel on its own, so :func:`free_port` takes one from there."""

from __future__ import annotations

import secrets
import socket

#: Ports handed out by this process (two asked for before either is bound differ).
_handed_out: set[int] = set()


def outside_ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> range:
    """Ports the kernel never picks by itself: below its ephemeral range (or above it, where
    the range ends low); empty where the range cannot be read (not Linux) or leaves no room."""
    try:
        with open(path) as f:
            low, high = (int(part) for part in f.read().split())
    except (OSError, ValueError):
        return range(0)
    if low >= 12_000:
        return range(max(10_000, low - 20_000), low - 2)  # (a pair P, P + 1 stays below too)
    if high <= 50_000:
        return range(high + 1, 65_000)
    return range(0)


_OUTSIDE = outside_ephemeral_range()


def free_port(host: str = "127.0.0.1", *, tries: int = 200) -> int:
    """A TCP port free on ``host`` right now, for a server to bind soon after: outside the
    ephemeral range where there is one (see the module docstring), never the same twice in one
    process; elsewhere the kernel's choice."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(tries if _OUTSIDE else 0):
        port = secrets.choice(_OUTSIDE)
        if port in _handed_out:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
