"""Who a client is, for the protection state: the unit that rate limits, failure counts,
intrusion scores and blocks apply to."""

from __future__ import annotations

import ipaddress

from flm.core.memo import remember

_ULA = ipaddress.IPv6Network("fc00::/7")
_SUBJECTS: dict[str, str] = {}


def subject(ip: str) -> str:
    """Who the guard tracks for a client address: an IPv4 address is itself; an IPv6 address
    stands for its /64. A client given a /64 (one home, one VM) may send from any of its
    2**64 addresses, and each must not bring a fresh rate limit, failure count, score or
    block: per-address state would then limit nothing. Loopback, link-local and unique-local
    (fc00::/7) addresses stay themselves: those are hosts on this machine's own network,
    which share a /64 without being one client."""
    if ":" not in ip:
        return ip
    known = _SUBJECTS.get(ip)
    if known is not None:
        return known
    try:
        addr = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip  # (not an address: tracked as the text it is)
    if addr.ipv4_mapped is not None:
        key = str(addr.ipv4_mapped)
    elif addr.is_loopback or addr.is_link_local or addr.is_unspecified or addr in _ULA:
        key = ip
    else:
        key = str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return remember(_SUBJECTS, ip, key)
