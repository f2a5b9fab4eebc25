"""Fetching ``https://`` image URLs into data URIs (≤ 10 MB, PNG/JPEG/WebP only).

The gateway fetches on a client's behalf, so the fetch must not become a way into the
machine's own network (SSRF): only ``https://`` URLs, every redirect hop checked again (at most
three), and only public addresses — a literal address in the URL is checked before connecting,
a host name's addresses when it is resolved (so a name that resolves to a private address, or
is made to later, is refused too). Through a SOCKS egress the proxy resolves names, so only
literal addresses can be checked there. Failures to connect all read the same, so that error
texts do not tell closed ports from open ones.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from flm.core.errors import FlmError
from flm.openai.errors import HttpError
from flm.openai.translate import ChatPlan
from flm.proxy.runtime import ProxyRuntime

MAX_FETCHED_IMAGE = 10 * 1024 * 1024
MAX_REDIRECTS = 3
_TYPES = {"image/png", "image/jpeg", "image/webp"}
_REDIRECTS = {301, 302, 303, 307, 308}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_NOT_PUBLIC = "image URL host is not a public address"
_NO_CONNECTION = "cannot fetch image URL: no connection to its host"


class _NotPublic(OSError):
    """A name resolved to no allowed address (raised inside aiohttp's connector)."""


#: IPv6 ranges that carry an IPv4 address in their last 32 bits: NAT64 (well-known prefix)
#: and IPv4-compatible addresses (deprecated, ::/96).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
#: IPv6 ranges never fetched from: local-use NAT64 (RFC 8215) and site-local (deprecated).
_NEVER = (ipaddress.ip_network("64:ff9b:1::/48"), ipaddress.ip_network("fec0::/10"))


def _embedded(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, IPv4-compatible, 6to4, Teredo's
    client), or None."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64 or address in _COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def is_public(address: Address) -> bool:
    """A globally routable address (not loopback, private, link-local, shared, reserved...).
    An IPv6 address that carries an IPv4 one is judged by that IPv4 address too, so none of
    them reaches this machine or its network by another name."""
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in net for net in _NEVER):
            return False
        inner = _embedded(address)
        if inner is not None:
            if address.ipv4_mapped is not None:
                address = inner
            elif not is_public(inner):
                return False
            elif address in _COMPATIBLE:
                return False  # (deprecated: never a real destination)
    return address.is_global and not address.is_multicast


class _CheckedResolver(AbstractResolver):
    """Resolves with aiohttp's default resolver and keeps only allowed addresses."""

    def __init__(self, allowed: Callable[[Address], bool]) -> None:
        self._inner = aiohttp.DefaultResolver()
        self._allowed = allowed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept = [r for r in found if self._allowed(ipaddress.ip_address(r["host"]))]
        if not kept:
            raise _NotPublic(f"{host} does not resolve to a public address")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def _check_target(url: str, allowed: Callable[[Address], bool]) -> None:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise HttpError(400, "invalid_request", "image URLs (and their redirects) must be https")
    try:
        literal = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return  # a name: checked when it is resolved
    if not allowed(literal):
        raise HttpError(400, "invalid_request", _NOT_PUBLIC)


async def fetch_image(
    url: str,
    connector: aiohttp.BaseConnector | None = None,
    *,
    allowed: Callable[[Address], bool] = is_public,
    ssl_context: ssl.SSLContext | None = None,
) -> str:
    """``url`` as a data URI. ``connector``: the egress's (SOCKS) connector, if any;
    ``allowed`` and ``ssl_context`` (which addresses may be fetched from, which CAs are
    trusted) are there for embedding and tests."""
    timeout = aiohttp.ClientTimeout(total=30, connect=10)
    if connector is None:
        connector = aiohttp.TCPConnector(
            resolver=_CheckedResolver(allowed), ssl=ssl_context if ssl_context is not None else True
        )
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            for _hop in range(MAX_REDIRECTS + 1):
                _check_target(url, allowed)
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status in _REDIRECTS and "Location" in resp.headers:
                        url = urljoin(url, resp.headers["Location"])
                        continue
                    return await _read_image(resp)
            raise HttpError(
                400, "invalid_request", f"image URL redirected more than {MAX_REDIRECTS} times"
            )
    except HttpError:
        raise
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, _NotPublic):
            raise HttpError(400, "invalid_request", _NOT_PUBLIC) from None
        raise HttpError(400, "invalid_request", _NO_CONNECTION) from None
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError):
        raise HttpError(400, "invalid_request", _NO_CONNECTION) from None
    except Exception as exc:
        from flm.egress.connector import PROXY_EXCEPTIONS

        if isinstance(exc, PROXY_EXCEPTIONS):
            raise HttpError(
                400, "invalid_request", "cannot fetch image URL through the egress proxy"
            ) from None
        raise


async def _read_image(resp: aiohttp.ClientResponse) -> str:
    if resp.status != 200:
        raise HttpError(400, "invalid_request", f"image URL answered HTTP {resp.status}")
    mime = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if mime not in _TYPES:
        raise HttpError(
            422, "unsupported_modalities", f"image URL content type {mime or '?'} not accepted"
        )
    data = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        data += chunk
        if len(data) > MAX_FETCHED_IMAGE:
            raise HttpError(
                413, "payload_too_large", f"image URL body exceeds {MAX_FETCHED_IMAGE} bytes"
            )
    return f"data:{mime};base64," + base64.b64encode(bytes(data)).decode("ascii")


def _egress_connector(rt: ProxyRuntime, url: str) -> aiohttp.BaseConnector | None:
    """Image fetches leave the machine through the egress in force (SPEC §7)."""
    if not rt.egress.uses_proxy:
        return None
    from flm.egress.connector import connector_for

    try:
        return connector_for(rt.egress, url)
    except FlmError as exc:
        raise HttpError(400, "invalid_request", f"bad image URL: {exc.message}") from None


async def inline_remote_images(plan: ChatPlan, rt: ProxyRuntime) -> None:
    fetched = dict(
        zip(
            plan.image_urls,
            await asyncio.gather(
                *(fetch_image(u, _egress_connector(rt, u)) for u in plan.image_urls)
            ),
            strict=True,
        )
    )
    for message in plan.body["messages"]:
        content: Any = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                if url in fetched:
                    part["image_url"]["url"] = fetched[url]
