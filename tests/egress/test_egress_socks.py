"""Egress through a real SOCKS5 server (Debian package ``microsocks``) on loopback.

How we know traffic really went through the proxy: the target HTTP server notes the peer address
of each request and, while that connection is open, asks psutil which process owns the socket at
that address. Through the proxy it is microsocks's outbound socket; directly it is ours. Remote DNS
shows in microsocks's log (it prints the *name* it was asked to connect to) and in a name only a
resolver could fail on (``.invalid``) being refused by the proxy, not by our own resolver.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import psutil
import pytest
from aiohttp import web

from flm.core.errors import ProxyError
from flm.egress.config import EgressConfig
from flm.egress.connector import PROXY_EXCEPTIONS, connector_for, socks_connector
from flm.egress.policy import (
    EVENT_FAIL_OPEN,
    EVENT_TOR_UNREACHABLE,
    decide_egress,
    decide_egress_async,
)
from flm.egress.probe import ProbeResult, probe

from ..tls.support import free_port
from .conftest import Socks


def _fast_probe(config: EgressConfig, tries: int) -> ProbeResult:
    return probe(config, tries, timeout_s=1.0, backoff_s=0.01)


@dataclass
class Seen:
    owner_pid: int | None
    peer: tuple[str, int]


@dataclass
class Target:
    port: int
    seen: list[Seen] = field(default_factory=list)


def _owner_of(ip: str, port: int) -> int | None:
    """The pid whose TCP socket is bound to (ip, port), among this process and its children."""
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        for conn in proc.net_connections(kind="tcp"):
            if conn.laddr and (conn.laddr.ip, conn.laddr.port) == (ip, port):
                return proc.pid
    return None


@asynccontextmanager
async def target_server() -> AsyncIterator[Target]:
    """An HTTP "remote engine" on loopback that records who connected to it."""
    target = Target(port=0)

    async def handle(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        assert peer is not None
        owner = await asyncio.to_thread(_owner_of, peer[0], peer[1])
        target.seen.append(Seen(owner, (peer[0], peer[1])))
        return web.Response(text="engine says hi")

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert runner.addresses
    target.port = runner.addresses[0][1]
    try:
        yield target
    finally:
        await runner.cleanup()


# --- probing --------------------------------------------------------------------------------------


def test_probe_reaches_the_socks_server(socks: Socks) -> None:
    result = probe(EgressConfig("socks5", socks.endpoint))
    assert result.reachable and result.attempts == 1 and result.error is None
    assert result.endpoint == socks.endpoint and result.latency_ms is not None


def test_probe_down_tries_three_times() -> None:
    started = time.monotonic()
    result = probe(EgressConfig("socks5", f"127.0.0.1:{free_port()}"), backoff_s=0.05)
    assert not result.reachable and result.attempts == 3
    assert result.error == "connection refused"
    assert time.monotonic() - started >= 0.15  # two pauses: 0.05 s, then 0.1 s


def test_probe_tells_a_non_socks_server_apart() -> None:
    async def run() -> ProbeResult:
        async with target_server() as target:
            config = EgressConfig("socks5", f"127.0.0.1:{target.port}")
            return await asyncio.to_thread(probe, config, 1)

    result = asyncio.run(run())
    assert not result.reachable and "not a SOCKS5 server" in (result.error or "")


# --- traffic -----------------------------------------------------------------------------


def test_requests_go_through_the_proxy_with_remote_dns(socks: Socks) -> None:
    config = EgressConfig("socks5", socks.endpoint)

    async def run() -> Target:
        async with target_server() as target:
            # The target is on loopback (all we may use); socks_connector has no loopback
            # exemption, so this is what a remote engine's request looks like on the wire.
            url = f"http://localhost:{target.port}/"
            connector = socks_connector(config)
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(url) as resp,
            ):
                assert resp.status == 200
                assert await resp.text() == "engine says hi"
            return target

    target = asyncio.run(run())
    assert len(target.seen) == 1
    seen = target.seen[0]
    assert seen.owner_pid == socks.process.pid, "the connection did not come from microsocks"
    # microsocks received the host *name*: DNS was resolved on the proxy side (socks5h).
    assert f"connected to localhost:{target.port}" in socks.log()


def test_remote_names_are_resolved_by_the_proxy_not_locally(socks: Socks) -> None:
    """``.invalid`` never resolves (RFC 6761): the refusal must come from the SOCKS server."""
    config = EgressConfig("socks5", socks.endpoint)

    async def run() -> BaseException:
        connector = connector_for(config, "http://engine.flm-test.invalid:8080/v1/models")
        assert connector is not None
        async with aiohttp.ClientSession(connector=connector) as session:
            with pytest.raises(Exception) as caught:
                async with session.get("http://engine.flm-test.invalid:8080/v1/models"):
                    pass
        return caught.value

    error = asyncio.run(run())
    assert isinstance(error, PROXY_EXCEPTIONS), repr(error)
    assert not isinstance(error, aiohttp.ClientConnectorDNSError)


def test_loopback_targets_always_go_direct(socks: Socks) -> None:
    config = EgressConfig("socks5", socks.endpoint)

    async def run() -> Target:
        async with target_server() as target:
            for host in ("127.0.0.1", "localhost"):
                url = f"http://{host}:{target.port}/"
                assert connector_for(config, url) is None
                async with aiohttp.ClientSession() as session, session.get(url) as resp:
                    assert resp.status == 200
            return target

    target = asyncio.run(run())
    assert [s.owner_pid for s in target.seen] == [os.getpid(), os.getpid()]


# --- deciding at start ----------------------------------------------------------------------------


def test_reachable_proxy_is_used(socks: Socks) -> None:
    effective = decide_egress(EgressConfig("tor", socks.endpoint), prober=_fast_probe)
    assert effective.mode == "tor" and not effective.fell_back and effective.events == ()
    assert effective.probe is not None and effective.probe.reachable
    assert effective.to_dict()["mode"] == "tor"


def test_down_and_fail_closed_refuses_to_start() -> None:
    config = EgressConfig("socks5", f"127.0.0.1:{free_port()}")
    with pytest.raises(ProxyError) as caught:
        decide_egress(config, prober=_fast_probe)
    message = caught.value.message
    assert "unreachable after 3 tries" in message and "--egress-fail-open" in message
    assert caught.value.details["events"] == []


def test_tor_down_and_fail_closed_reports_tor_unreachable() -> None:
    config = EgressConfig("tor", f"127.0.0.1:{free_port()}")
    with pytest.raises(ProxyError, match="start Tor") as caught:
        decide_egress(config, prober=_fast_probe)
    events = caught.value.details["events"]
    assert [e["event_type"] for e in events] == [EVENT_TOR_UNREACHABLE]


def test_down_and_fail_open_falls_back_to_direct_with_an_event() -> None:
    config = EgressConfig("socks5", f"127.0.0.1:{free_port()}", fail_open=True)
    effective = decide_egress(config, prober=_fast_probe)
    assert effective.mode == "direct" and effective.fell_back
    assert [e.event_type for e in effective.events] == [EVENT_FAIL_OPEN]
    event = effective.events[0]
    assert event.severity == "high" and event.details["endpoint"] == config.socks5_endpoint
    assert connector_for(effective.config, "https://api.example.com/v1") is None
    assert effective.to_dict()["requested_mode"] == "socks5"


def test_tor_down_and_fail_open_reports_both_events() -> None:
    async def run() -> list[str]:
        config = EgressConfig("tor", f"127.0.0.1:{free_port()}", fail_open=True)

        async def prober(c: EgressConfig, tries: int) -> ProbeResult:
            return await asyncio.to_thread(_fast_probe, c, tries)

        effective = await decide_egress_async(config, prober=prober)
        return [e.event_type for e in effective.events]

    assert asyncio.run(run()) == [EVENT_TOR_UNREACHABLE, EVENT_FAIL_OPEN]


def test_direct_needs_no_probe() -> None:
    def never(config: EgressConfig, tries: int) -> ProbeResult:
        raise AssertionError("direct egress must not probe")

    effective = decide_egress(EgressConfig(), prober=never)
    assert effective.mode == "direct" and effective.probe is None
