"""The machine's LAN addresses, read from the network interfaces (no packets are sent)."""

from __future__ import annotations

import ipaddress
import socket

import psutil


def lan_addresses() -> list[str]:
    """Unicast addresses of the interfaces that are up, minus loopback and link-local.

    These are the addresses other machines on the LAN can use to reach this one; they go into the
    ``dev-selfsigned`` certificate so ``https://192.168.1.20:8081`` validates. Sorted, IPv4 first.
    """
    try:
        addrs = psutil.net_if_addrs()
        stats = psutil.net_if_stats()
    except OSError:
        return []
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for name, entries in addrs.items():
        stat = stats.get(name)
        if stat is not None and not stat.isup:
            continue
        for entry in entries:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = _parse(entry.address)
            if ip is not None and _is_lan(ip):
                found.add(ip)
    return [str(ip) for ip in sorted(found, key=lambda ip: (ip.version, int(ip)))]


def _parse(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _is_lan(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not (ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified)
