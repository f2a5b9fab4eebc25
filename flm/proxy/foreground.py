"""``flm proxy start --no-daemon``: one proxy in the foreground, Ctrl-C stops it gracefully."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

from flm.core.timeutil import now_iso
from flm.proxy.app import build_app
from flm.proxy.runtime import ProxySettings, build_runtime
from flm.proxy.server import HttpServer, bind_socket
from flm.storage.config import ProxyHandleRow, ProxyHandlesRepo


def run_foreground(ctx: Any, config: dict[str, Any]) -> None:
    sock = bind_socket(config["bind"], config["port"])
    port = int(sock.getsockname()[1])
    settings = ProxySettings(port=port, bind=config["bind"], mode=config["mode"],
                             handle_id=f"proxy-{port}",
                             max_body_bytes=int(ctx.config.value("proxy.max_body_bytes")))
    runtime = build_runtime(settings, ctx)
    repo = ProxyHandlesRepo(ctx.storage.config)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server = HttpServer(build_app(runtime), sock)
        await server.start()
        repo.add(ProxyHandleRow(settings.handle_id, os.getpid(), port, None, settings.bind,
                                settings.mode, json.dumps(config), now_iso()))
        sys.stderr.write(f"FLM proxy listening on http://{settings.bind}:{port} "
                         "(Ctrl-C to stop)\n")
        sys.stderr.flush()
        try:
            await stop.wait()
        finally:
            await server.stop()
            await runtime.close()
            repo.remove([settings.handle_id])

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(main())
