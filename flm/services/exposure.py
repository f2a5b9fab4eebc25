"""Exposure self-audit: is an engine on this machine reachable from the network behind FLM?

For each engine endpoint on this machine, the socket table (psutil) says which addresses its
port listens on. A wildcard bind (``0.0.0.0``, ``::``) or a non-loopback address is reachable
from the network: ``exposed``, with the interfaces and addresses it can be reached on and the
exact fix for that kind of engine. The audit also asks each listening engine, over loopback
only, whether it answers a model listing without a key: it never sends traffic off the machine.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from flm.core.models import EngineEndpoint, EngineKind
from flm.engines import kinds

EXPOSED = "exposed"
LOOPBACK_ONLY = "loopback-only"
NOT_LISTENING = "not-listening"
REMOTE = "remote"
FLM_GATEWAY = "flm-gateway"

_WILDCARDS = ("0.0.0.0", "::")  # noqa: S104 - recognising wildcard binds, not binding


def fix_for(kind: EngineKind) -> str:
    """The kind's own fix (its descriptor's ``loopback_fix``)."""
    descriptor = kinds.find(kind)
    return (
        descriptor.loopback_fix
        if descriptor is not None
        else "restart the engine listening on 127.0.0.1 only"
    )


@dataclass(frozen=True)
class Listener:
    address: str
    port: int


@dataclass
class ExposureReport:
    engine_id: str
    kind: str
    base_url: str
    status: str
    listen: list[str] = field(default_factory=list)
    reachable_on: list[dict[str, str]] = field(default_factory=list)
    fix: str | None = None
    answers_without_key: bool | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine_id": self.engine_id,
            "kind": self.kind,
            "base_url": self.base_url,
            "status": self.status,
            "listen": self.listen,
            "reachable_on": self.reachable_on,
            "fix": self.fix,
            "answers_without_key": self.answers_without_key,
            "note": self.note,
        }


def listening_sockets() -> list[Listener]:
    """Every TCP socket in LISTEN state on this machine (addresses and ports, any owner)."""
    import psutil

    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr:
            out.append(Listener(str(conn.laddr.ip), int(conn.laddr.port)))
    return out


def interface_addresses() -> list[dict[str, str]]:
    """Non-loopback addresses of this machine's interfaces: ``{"interface", "address"}``."""
    import psutil

    out = []
    for name, addrs in psutil.net_if_addrs().items():
        for addr in addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            text = addr.address.split("%", 1)[0]
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            if not ip.is_loopback:
                out.append({"interface": name, "address": text})
    return out


def _is_local_host(host: str, local: set[str]) -> bool:
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or str(ip) in local


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _reachable(listen: Iterable[str], interfaces: list[dict[str, str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for address in listen:
        if address in _WILDCARDS:
            v6 = address == "::"
            for item in interfaces:
                # A ``::`` socket usually accepts IPv4 too (dual stack); a ``0.0.0.0`` one not v6.
                if v6 or ":" not in item["address"]:
                    out.append(item)
        elif not _is_loopback(address):
            name = next((i["interface"] for i in interfaces if i["address"] == address), "?")
            out.append({"interface": name, "address": address})
    unique = {(i["interface"], i["address"]): i for i in out}
    return list(unique.values())


def answers_without_key(
    kind: EngineKind, port: int, loopback: str = "127.0.0.1", timeout: float = 2.0
) -> tuple[bool | None, bool]:
    """Ask the engine on ``loopback:port`` for its model list with no credentials.

    Returns (answers, is_flm): answers is True if it answers 200, False if it refuses, None if
    it could not be asked; is_flm says the listener is an FLM gateway, not an engine. Only
    loopback addresses are ever contacted."""
    if not _is_loopback(loopback):
        raise ValueError("the exposure probe only talks to loopback")
    conn = http.client.HTTPConnection(loopback, port, timeout=timeout)
    try:
        descriptor = kinds.find(kind)
        path = descriptor.models_path if descriptor is not None else "/v1/models"
        conn.request("GET", path, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        resp.read(65536)
        if resp.getheader("X-FLM-Proxy"):
            return None, True
        return resp.status == 200, False
    except (OSError, http.client.HTTPException):
        return None, False
    finally:
        conn.close()


def audit(
    endpoints: Iterable[EngineEndpoint],
    *,
    listeners: Callable[[], list[Listener]] = listening_sockets,
    interfaces: Callable[[], list[dict[str, str]]] = interface_addresses,
    probe: bool = True,
    flm_ports: Iterable[int] = (),
) -> list[ExposureReport]:
    """One report per engine endpoint (remote engines are reported as such, not audited).
    ``probe=False`` reads the socket table only (no traffic to any engine); ``flm_ports`` are
    ports FLM's own gateways listen on, never reported as engines."""
    own = set(flm_ports)
    table = listeners()
    ifaces = interfaces()
    local = {i["address"] for i in ifaces}
    reports = []
    for ep in endpoints:
        parts = urlsplit(ep.base_url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        report = ExposureReport(ep.id, ep.kind.value, ep.base_url, NOT_LISTENING)
        if not _is_local_host(host, local):
            report.status = REMOTE
            report.note = "not on this machine: its own host decides who can reach it"
            reports.append(report)
            continue
        bound = sorted({lst.address for lst in table if lst.port == port})
        if port in own and bound:
            report.status = FLM_GATEWAY
            report.listen = bound
            report.note = "this port is an FLM gateway, not an engine"
            reports.append(report)
            continue
        if not bound:
            reports.append(report)
            continue
        report.listen = bound
        reach = _reachable(bound, ifaces)
        if reach or any(not _is_loopback(a) for a in bound):
            report.status = EXPOSED
            report.reachable_on = reach
            report.fix = fix_for(ep.kind)
        else:
            report.status = LOOPBACK_ONLY
        if probe and parts.scheme == "http":
            v4 = any(a in ("0.0.0.0", "127.0.0.1") or a.startswith("127.") for a in bound)  # noqa: S104
            target = "127.0.0.1" if v4 or not any(":" in a for a in bound) else "::1"
            if not any(a in _WILDCARDS or _is_loopback(a) for a in bound):
                report.note = "listens on non-loopback addresses only; not probed"
            else:
                answers, is_flm = answers_without_key(ep.kind, port, target)
                if is_flm:
                    report.status = FLM_GATEWAY
                    report.fix = None
                    report.reachable_on = []
                    report.note = "this port is an FLM gateway, not an engine"
                report.answers_without_key = answers
        reports.append(report)
    return reports


def summary(reports: Iterable[ExposureReport]) -> list[str]:
    """One warning line per exposed engine (for ``flm up`` and ``flm proxy start``)."""
    lines = []
    for r in reports:
        if r.status != EXPOSED:
            continue
        where = ", ".join(
            f"{i['address']} ({i['interface']})" for i in r.reachable_on
        ) or ", ".join(r.listen)
        keyless = " and answers without a key" if r.answers_without_key else ""
        lines.append(
            f"warning: engine {r.engine_id} ({r.kind}) is reachable from the network "
            f"behind FLM on {where}{keyless}; fix: {r.fix}"
        )
    return lines
