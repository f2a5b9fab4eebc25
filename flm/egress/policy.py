"""Which egress is in force once the proxy starts: fail-closed by default, fail-open on request.

The SOCKS endpoint is probed (3 tries). If it answers, the requested egress is used. If not:

- fail-closed (default): :class:`~flm.core.errors.ProxyError` — the proxy must not start and
  silently send traffic around Tor;
- fail-open (``--egress-fail-open``): direct connections, plus an ``egress_fail_open_triggered``
  event the caller writes to the audit log.

An unreachable Tor also yields a ``tor_unreachable`` event (in the error's ``details`` when
fail-closed). Events are returned, not written: this module does not know about storage.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from flm.core.errors import ProxyError
from flm.egress.config import EgressConfig
from flm.egress.probe import ProbeResult, probe, probe_async

EVENT_FAIL_OPEN = "egress_fail_open_triggered"
EVENT_TOR_UNREACHABLE = "tor_unreachable"

Prober = Callable[[EgressConfig, int], ProbeResult]
AsyncProber = Callable[[EgressConfig, int], Awaitable[ProbeResult]]


@dataclass(frozen=True)
class EgressEvent:
    """Something the caller should write to the audit log (``event_type``, ``severity``)."""

    event_type: str
    severity: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_type": self.event_type,
            "severity": self.severity,
            "message": self.message,
            "details": self.details,
        }


@dataclass(frozen=True)
class EffectiveEgress:
    """The egress in force: ``config`` is what connectors must use (direct after a fallback)."""

    requested: EgressConfig
    config: EgressConfig
    probe: ProbeResult | None = None
    events: tuple[EgressEvent, ...] = ()

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def fell_back(self) -> bool:
        return self.config.mode != self.requested.mode

    def to_dict(self) -> dict[str, Any]:
        """What ``flm proxy status`` shows as the egress."""
        return {
            "mode": self.config.mode,
            "requested_mode": self.requested.mode,
            "socks5_endpoint": self.requested.socks5_endpoint,
            "fail_open": self.requested.fail_open,
            "fell_back": self.fell_back,
            "probe": self.probe.to_dict() if self.probe else None,
        }


def decide_egress(
    config: EgressConfig, *, tries: int = 3, prober: Prober = probe
) -> EffectiveEgress:
    """Probe the endpoint (blocking) and decide; see the module docstring."""
    if not config.uses_proxy:
        return EffectiveEgress(config, config)
    return _decide(config, prober(config, tries))


async def decide_egress_async(
    config: EgressConfig, *, tries: int = 3, prober: AsyncProber = probe_async
) -> EffectiveEgress:
    """:func:`decide_egress` for code already running in an event loop."""
    if not config.uses_proxy:
        return EffectiveEgress(config, config)
    return _decide(config, await prober(config, tries))


def _decide(config: EgressConfig, result: ProbeResult) -> EffectiveEgress:
    if result.reachable:
        return EffectiveEgress(config, config, result)
    where = result.endpoint or config.socks5_endpoint
    details = {"mode": config.mode, "endpoint": where, "probe": result.to_dict()}
    events: list[EgressEvent] = []
    if config.mode == "tor":
        events.append(
            EgressEvent(
                EVENT_TOR_UNREACHABLE,
                "high",
                f"Tor's SOCKS port {where} is unreachable: {result.error}",
                details,
            )
        )
    if not config.fail_open:
        hint = (
            "start Tor (e.g. `systemctl start tor`)"
            if config.mode == "tor"
            else "start the SOCKS5 proxy"
        )
        raise ProxyError(
            f"egress {config.mode} via {where} is unreachable after {result.attempts} tries "
            f"({result.error}); not starting, because egress fails closed. Fix: {hint}, correct "
            "--socks5-endpoint, or pass --egress-fail-open to fall back to direct connections.",
            details={**details, "events": [e.to_dict() for e in events]},
        )
    events.append(
        EgressEvent(
            EVENT_FAIL_OPEN,
            "high",
            f"egress {config.mode} via {where} is unreachable ({result.error}); "
            "using direct connections because --egress-fail-open is set",
            details,
        )
    )
    direct = EgressConfig("direct", None, fail_open=True)
    return EffectiveEgress(config, direct, result, tuple(events))
