"""Outbound connections honouring the egress in force: aiohttp connectors (image downloads) and
socket openers (engine traffic, see :func:`opener_for`).

``connector_for(config, url)`` returns ``None`` when the request should use the caller's ordinary
(pooled, direct) connector: egress ``direct``, or a loopback target — local engines are never sent
through the proxy. Otherwise it returns a new SOCKS5 connector with **remote DNS** (``socks5h``):
the host name goes to the proxy unresolved, so no DNS query leaves this machine. The caller owns
the connector (pass it to one ``aiohttp.ClientSession`` and close that session). Connectors must
be created inside a running event loop.

SOCKS failures surface as one of :data:`PROXY_EXCEPTIONS` (or aiohttp's own connection errors);
the engine layer maps them to ``EngineNetworkError`` at its boundary.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import aiohttp_socks
import python_socks

from flm.egress.config import EgressConfig, is_loopback_target

#: Exceptions a SOCKS connector raises when the proxy fails or refuses a connection.
PROXY_EXCEPTIONS: tuple[type[Exception], ...] = (
    aiohttp_socks.ProxyError,
    aiohttp_socks.ProxyConnectionError,
    aiohttp_socks.ProxyTimeoutError,
    python_socks.ProxyError,
    python_socks.ProxyConnectionError,
    python_socks.ProxyTimeoutError,
)


def connector_for(
    config: EgressConfig, target_url: str, **connector_kwargs: Any
) -> aiohttp.BaseConnector | None:
    """The connector for requests to ``target_url``; ``None`` means "connect directly"."""
    if not config.uses_proxy or is_loopback_target(target_url):
        return None
    return socks_connector(config, **connector_kwargs)


def socks_connector(config: EgressConfig, **connector_kwargs: Any) -> aiohttp_socks.ProxyConnector:
    """A SOCKS5 connector with remote DNS for ``config``'s endpoint, whatever the target."""
    endpoint = config.endpoint
    if endpoint is None:
        raise ValueError("egress mode direct has no SOCKS endpoint")
    return aiohttp_socks.ProxyConnector(
        host=endpoint.host,
        port=endpoint.port,
        proxy_type=aiohttp_socks.ProxyType.SOCKS5,
        rdns=True,
        **connector_kwargs,
    )


def opener_for(
    config: EgressConfig, target_url: str
) -> Callable[[str, int], Awaitable[socket.socket]] | None:
    """For the engine client: ``None`` to connect directly (egress ``direct`` or a loopback
    target), else a function opening a socket to ``(host, port)`` through the SOCKS5 proxy with
    remote DNS (the caller bounds it in time)."""
    if not config.uses_proxy or is_loopback_target(target_url):
        return None
    endpoint = config.endpoint
    if endpoint is None:
        raise ValueError("egress mode direct has no SOCKS endpoint")
    from python_socks.async_.asyncio import Proxy

    async def open_socket(host: str, port: int) -> socket.socket:
        # Made here, inside the running loop, which the proxy object binds to.
        proxy = Proxy(python_socks.ProxyType.SOCKS5, endpoint.host, endpoint.port, rdns=True)
        return await proxy.connect(dest_host=host, dest_port=port)

    return open_socket
