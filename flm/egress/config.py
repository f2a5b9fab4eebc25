"""What egress the user asked for, and which targets never leave the machine."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from flm.core.errors import ProxyError

EgressMode = Literal["direct", "tor", "socks5"]
EGRESS_MODES: tuple[EgressMode, ...] = ("direct", "tor", "socks5")
#: Tor's SOCKS port on the local machine (the daemon's default ``SocksPort``).
TOR_DEFAULT_ENDPOINT = "127.0.0.1:9050"

_SCHEMES = ("socks5h://", "socks5://")
_INET_ATON_LIKE = re.compile(r"(?:0x[0-9a-f]+|[0-9]+)(?:\.(?:0x[0-9a-f]+|[0-9]+)){0,3}")


@dataclass(frozen=True)
class SocksEndpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_socks_endpoint(text: str) -> SocksEndpoint:
    """``host:port``, ``[v6]:port``, optionally prefixed by ``socks5://`` or ``socks5h://``."""
    raw = text.strip()
    lowered = raw.lower()
    for scheme in _SCHEMES:
        if lowered.startswith(scheme):
            raw = raw[len(scheme) :]
            break
    else:
        if "://" in raw:
            raise ProxyError(f"--socks5-endpoint must be host:port (a SOCKS5 proxy), got {text!r}")
    raw = raw.rstrip("/")
    if "@" in raw:
        raise ProxyError("SOCKS5 user names and passwords are not supported yet")
    try:
        parts = urlsplit(f"//{raw}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ProxyError(f"--socks5-endpoint: {text!r} is not host:port ({exc})") from exc
    if not host or port is None or port == 0 or parts.path:
        raise ProxyError(f"--socks5-endpoint: {text!r} is not host:port")
    return SocksEndpoint(host, port)


@dataclass(frozen=True)
class EgressConfig:
    """``--egress-mode``, ``--socks5-endpoint`` and ``--egress-fail-open``, validated.

    For ``tor`` the endpoint defaults to ``127.0.0.1:9050``; ``socks5`` needs one.
    """

    mode: EgressMode = "direct"
    socks5_endpoint: str | None = None
    fail_open: bool = False

    def __post_init__(self) -> None:
        if self.mode not in EGRESS_MODES:
            raise ProxyError(
                f"unknown egress mode {self.mode!r}; choose one of {', '.join(EGRESS_MODES)}"
            )
        endpoint = self.socks5_endpoint.strip() if self.socks5_endpoint else None
        if self.mode == "direct" and endpoint:
            raise ProxyError("--socks5-endpoint needs --egress-mode socks5 or tor")
        if self.mode == "socks5" and not endpoint:
            raise ProxyError("--egress-mode socks5 needs --socks5-endpoint host:port")
        if self.mode == "tor" and not endpoint:
            endpoint = TOR_DEFAULT_ENDPOINT
        if endpoint:
            endpoint = str(parse_socks_endpoint(endpoint))
        object.__setattr__(self, "socks5_endpoint", endpoint)

    @classmethod
    def from_options(
        cls, mode: str | None, socks5_endpoint: str | None = None, fail_open: bool = False
    ) -> EgressConfig:
        """Build from CLI/config strings (``None`` mode means ``direct``)."""
        value = (mode or "direct").strip().lower()
        if value not in EGRESS_MODES:
            raise ProxyError(
                f"unknown egress mode {mode!r}; choose one of {', '.join(EGRESS_MODES)}"
            )
        return cls(value, socks5_endpoint, fail_open)

    @property
    def uses_proxy(self) -> bool:
        return self.mode != "direct"

    @property
    def endpoint(self) -> SocksEndpoint | None:
        return parse_socks_endpoint(self.socks5_endpoint) if self.socks5_endpoint else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "socks5_endpoint": self.socks5_endpoint,
            "fail_open": self.fail_open,
        }


def is_loopback_target(target: str) -> bool:
    """True for targets on this machine, which always go direct (never through the proxy).

    ``target`` is a URL or a bare host. Loopback means 127.0.0.0/8, ``::1`` (also IPv4-mapped),
    the unspecified addresses (which the OS connects to locally), ``localhost`` and
    ``*.localhost`` (RFC 6761). Other names are *not* resolved here: with remote DNS the proxy
    resolves them, and resolving locally first would leak the name.
    """
    host = _host_of(target)
    if host in ("localhost",) or host.endswith(".localhost"):
        return True
    ip = _parse_ip(host)
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


def _host_of(target: str) -> str:
    text = target.strip()
    if "://" in text:
        try:
            host = urlsplit(text).hostname
        except ValueError as exc:
            raise ProxyError(f"not a valid URL: {target!r}") from exc
        if not host:
            raise ProxyError(f"URL has no host: {target!r}")
        text = host
    elif text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    return text.rstrip(".").lower()


def _parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    # Shorthand IPv4 that the C library accepts ("127.1", "0x7f.0.0.1", "2130706433").
    if _INET_ATON_LIKE.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None
