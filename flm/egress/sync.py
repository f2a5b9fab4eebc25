"""SOCKS5 with remote DNS for synchronous ``requests`` sessions: the ACME client's egress.

The ACME library talks HTTP through ``requests``; :func:`mount_egress` mounts a transport adapter
on such a session whose connections are opened through the SOCKS5 proxy of an
:class:`~flm.egress.config.EgressConfig` (the host *name* goes to the proxy unresolved, like the
aiohttp connectors of :mod:`flm.egress.connector`). Loopback targets and ``direct`` egress are left
alone. Built on ``python-socks``'s synchronous client (no PySocks needed).
"""

from __future__ import annotations

import socket
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.poolmanager import PoolManager

from flm.egress.config import EgressConfig, is_loopback_target


class _SocksConnection(HTTPConnection):
    """An urllib3 connection whose TCP stream is opened by the SOCKS5 proxy."""

    def __init__(self, *args: Any, _socks_options: dict[str, str], **kwargs: Any) -> None:
        self._socks_options = _socks_options
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        from python_socks import ProxyError, ProxyTimeoutError, ProxyType
        from python_socks.sync import Proxy

        options = self._socks_options
        proxy = Proxy(ProxyType.SOCKS5, options["host"], int(options["port"]), rdns=True)
        timeout = self.timeout if isinstance(self.timeout, int | float) else None
        try:
            return proxy.connect(dest_host=self.host, dest_port=self.port, timeout=timeout)
        except ProxyTimeoutError as exc:
            raise ConnectTimeoutError(
                self, f"connection to {self.host} through the SOCKS5 proxy timed out"
            ) from exc
        except (ProxyError, OSError) as exc:
            raise NewConnectionError(
                self,
                f"cannot connect to {self.host} through the SOCKS5 proxy "
                f"{options['host']}:{options['port']}: {exc}",
            ) from exc


class _SocksHTTPSConnection(_SocksConnection, HTTPSConnection):
    pass


class _SocksHTTPPool(HTTPConnectionPool):
    ConnectionCls = _SocksConnection


class _SocksHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _SocksHTTPSConnection


class _SocksPoolManager(PoolManager):
    def __init__(self, config: EgressConfig, **kwargs: Any) -> None:
        endpoint = config.endpoint
        if endpoint is None:
            raise ValueError("egress mode direct has no SOCKS endpoint")
        super().__init__(**kwargs)
        # ``_socks_options`` is one of urllib3's pool-key fields (its own SOCKS support uses it).
        self.connection_pool_kw["_socks_options"] = {
            "host": endpoint.host,
            "port": str(endpoint.port),
        }
        self.pool_classes_by_scheme = {"http": _SocksHTTPPool, "https": _SocksHTTPSPool}


class SocksAdapter(HTTPAdapter):
    """A ``requests`` transport adapter that connects through ``config``'s SOCKS5 proxy."""

    def __init__(self, config: EgressConfig, **kwargs: Any) -> None:
        self._egress = config
        super().__init__(**kwargs)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        self.poolmanager = _SocksPoolManager(
            self._egress, num_pools=connections, maxsize=maxsize, block=block, **pool_kwargs
        )


def mount_egress(session: requests.Session, config: EgressConfig, target_url: str) -> bool:
    """Send ``session``'s requests through the SOCKS proxy unless egress is direct or
    ``target_url`` is on this machine. Returns True when an adapter was mounted."""
    if not config.uses_proxy or is_loopback_target(target_url):
        return False
    adapter = SocksAdapter(config)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.trust_env = False  # no HTTP(S)_PROXY from the environment on top of SOCKS
    return True
