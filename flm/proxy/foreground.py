"""``flm proxy start --no-daemon``: one proxy in the foreground, Ctrl-C stops it gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from typing import Any

from flm.core.errors import FlmError
from flm.core.timeutil import now_iso
from flm.proxy.instance import RELOAD_INTERVAL_S, ProxyInstance, reload_proxies, start_instance
from flm.storage.config_db import ProxyHandleRow, ProxyHandlesRepo

log = logging.getLogger("flm.proxy")


def _banner(described: dict[str, Any]) -> str:
    lines = [
        f"FLM proxy ({described['mode']}) listening on "
        f"{', '.join(described['endpoints'])} (Ctrl-C to stop)"
    ]
    if described.get("https_port"):
        lines.append(f"  port {described['port']} answers only with a redirect to HTTPS")
    cert = described.get("certificate")
    if cert:
        lines.append(
            f"  certificate {cert['fingerprint_sha256']} valid until "
            f"{cert['not_after']} ({cert['source']})"
        )
    trust = described.get("trust")
    if trust:
        lines.append(f"  trust FLM's root:   {trust['trust']}")
        lines.append(f"  remove it later:    {trust['untrust']}")
    egress = described.get("egress") or {}
    if egress.get("requested_mode", "direct") != "direct":
        lines.append(f"  egress: {egress.get('mode')} (requested {egress.get('requested_mode')})")
    lines.extend(f"  note: {note}" for note in described.get("notes") or [])
    return "\n".join(lines) + "\n"


def run_foreground(ctx: Any, config: dict[str, Any]) -> None:
    """Serve one proxy until SIGINT/SIGTERM. Like the daemon's proxies it picks up key,
    policy, blocklist and engine changes: at once on SIGHUP (which the CLI sends after such a
    change, and ``flm proxy reload``), and every ``RELOAD_INTERVAL_S`` otherwise."""
    repo = ProxyHandlesRepo(ctx.storage.config)

    async def main() -> None:
        stop = asyncio.Event()
        wanted = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        hup = getattr(signal, "SIGHUP", None)
        if hup is not None:
            loop.add_signal_handler(hup, wanted.set)
        proxy: ProxyInstance = await start_instance(ctx, config)
        settings = proxy.settings
        try:
            repo.add(
                ProxyHandleRow(
                    settings.handle_id,
                    os.getpid(),
                    settings.port,
                    settings.https_port,
                    settings.bind,
                    settings.mode,
                    json.dumps(config),
                    now_iso(),
                )
            )
        except BaseException as exc:  # all or nothing (see the daemon's start_proxy)
            with contextlib.suppress(Exception):
                await proxy.close()
            if isinstance(exc, FlmError):
                exc.message = (
                    "the proxy was not started (stopped again): its handle could "
                    f"not be recorded in config.db: {exc.message}"
                )
            raise
        sys.stderr.write(_banner(proxy.describe()))
        sys.stderr.flush()

        async def reloads() -> None:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wanted.wait(), RELOAD_INTERVAL_S)
                wanted.clear()
                try:
                    await reload_proxies(ctx, [proxy])
                except FlmError as exc:
                    log.warning("reload failed: %s", exc.message)

        reloader = asyncio.ensure_future(reloads())
        try:
            await stop.wait()
        finally:
            reloader.cancel()
            await proxy.close()
            try:
                repo.remove([settings.handle_id])
            except FlmError as exc:
                log.warning(
                    "stopped, but the handle could not be removed from config.db (%s)", exc.message
                )

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(main())
