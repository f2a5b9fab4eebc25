"""The hop floor: what one extra process between client and engine costs on this machine.

A byte relay on uvloop: every client connection gets its own upstream connection and bytes are
copied both ways as they arrive, with no HTTP parsing, no pooling logic, no allocation beyond
what the event loop does. Any proxy, in any language, pays at least this: two more socket
round trips and two more process wake-ups per request. On machines where waking an idle CPU is
slow (virtual machines whose guests halt at once when idle), this floor alone can be a large
part of the "added latency at concurrency 1" figure.

Run: ``python bench/relay.py --port 18101 --upstream 127.0.0.1:18000``
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import uvloop


class _Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream_addr = upstream
        self.upstream: _Upstream | None = None
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(
                lambda: _Upstream(self.transport),  # type: ignore[arg-type]
                *self.upstream_addr,
            )
        except OSError:
            self.transport.close()
            return
        self.upstream = up
        for data in self.pending:
            assert up.transport is not None
            up.transport.write(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        up = self.upstream
        if up is None or up.transport is None:
            self.pending.append(data)
        else:
            up.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def _serve(host: str, port: int, upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(upstream), host, port, backlog=2048)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="byte relay: the cost of one extra hop")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18101)
    ap.add_argument("--upstream", default="127.0.0.1:18000", help="host:port of the engine")
    args = ap.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    uvloop.run(_serve(args.host, args.port, (host, int(port))))


if __name__ == "__main__":
    main()
