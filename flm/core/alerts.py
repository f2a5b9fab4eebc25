"""Alert settings (policy section ``alerts``): which webhooks, which events, how often.

Pure parsing and checks; the sending lives in ``flm.proxy.alerts``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

SEVERITIES = ("info", "low", "medium", "high", "critical")
RANK = {name: i for i, name in enumerate(SEVERITIES)}

#: Events that alert at least at this severity whatever the severity they were recorded with
#: (a single honeypot hit is recorded as low, but it is exactly what an owner wants to hear).
FLOORS = {
    "ip_blocked": "high",
    "honeypot": "high",
    "engine_exposed": "high",
    "engine_down": "high",
    "egress_fail_open_triggered": "high",
    "state_backend_unavailable": "high",
    "egress_failure": "high",
    "tor_unreachable": "high",
    "certificate_renewal_failed": "high",
    "acme_renewal_failed": "high",
}

FORMATS = ("json", "slack", "discord")


@dataclass(frozen=True)
class Webhook:
    url: str
    format: str = "json"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""


@dataclass(frozen=True)
class AlertSettings:
    webhooks: tuple[Webhook, ...]
    min_severity: str = "high"
    allow_private_targets: bool = False
    #: Events from one source within this window are sent as one alert.
    coalesce_seconds: float = 2.0
    #: After an alert for a source, more events from it only count until this passes.
    dedup_seconds: float = 300.0
    max_per_minute: int = 30
    retries: int = 3
    backoff_seconds: float = 1.0
    timeout_seconds: float = 10.0

    @property
    def min_rank(self) -> int:
        return RANK[self.min_severity]

    @classmethod
    def from_policy(cls, section: Any) -> AlertSettings | None:
        """The settings of a validated policy's ``alerts`` section (None: no alerts)."""
        if not isinstance(section, dict) or section.get("enabled") is False:
            return None
        hooks = []
        for item in section.get("webhooks") or ():
            if isinstance(item, str):
                hooks.append(Webhook(item))
            else:
                hooks.append(Webhook(str(item["url"]), str(item.get("format", "json"))))
        if not hooks:
            return None
        return cls(
            webhooks=tuple(hooks),
            min_severity=str(section.get("min_severity", "high")),
            allow_private_targets=bool(section.get("allow_private_targets", False)),
            coalesce_seconds=float(section.get("coalesce_seconds", 2.0)),
            dedup_seconds=float(section.get("dedup_seconds", 300.0)),
            max_per_minute=int(section.get("max_per_minute", 30)),
            retries=int(section.get("retries", 3)),
            backoff_seconds=float(section.get("backoff_seconds", 1.0)),
            timeout_seconds=float(section.get("timeout_seconds", 10.0)),
        )


def alert_rank(event_type: str, severity: str) -> int:
    """The severity an event alerts with (its own, raised to its type's floor)."""
    return max(RANK.get(severity, 0), RANK.get(FLOORS.get(event_type, "info"), 0))


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally routable address (not loopback, private, link-local, shared, reserved...)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def webhook_problem(url: str, *, allow_private: bool) -> str | None:
    """Why ``url`` cannot be a webhook target (checked like image URLs: https to a public
    host; with ``allow_private_targets`` also http and loopback/private hosts), or None."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port
    except ValueError as exc:
        return f"malformed URL: {exc}"
    if parts.scheme not in ("https", "http") or not host:
        return "must be an https:// URL"
    if parts.username or parts.password:
        return "must not carry credentials in the URL"
    if parts.scheme == "http" and not allow_private:
        return "must be https:// (http only with allow_private_targets)"
    if allow_private:
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return "targets this machine (set allow_private_targets to allow it)"
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: its addresses are checked when it is resolved
    if not is_public(literal):
        return "is not a public address (set allow_private_targets to allow it)"
    return None


# --- where security events recorded outside requests go -----------------------------------------

#: ``(event_type, severity, client_ip, details)``: the alerters of running proxies.
Listener = Callable[[str, str, str, dict[str, Any]], None]
_listeners: list[Listener] = []


def register_listener(listener: Listener) -> None:
    if listener not in _listeners:
        _listeners.append(listener)


def unregister_listener(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def notify(
    event_type: str, severity: str, client_ip: str = "", details: dict[str, Any] | None = None
) -> None:
    """Offer an event recorded outside a request (egress, certificates, engines) to the most
    recently configured alerter of this process, if any (one alert, not one per proxy)."""
    if _listeners:
        _listeners[-1](event_type, severity, client_ip, details or {})
