"""``python -m flm.proxy.worker``: one sibling gateway of a ``--workers N`` proxy.

Started and supervised by :mod:`flm.proxy.supervisor` (read its docstring for the protocol on
stdin/stdout). It serves the gateway port with ``SO_REUSEPORT`` next to the supervisor, writes
its own audit and usage rows, and stops on ``{"cmd": "stop"}``, SIGTERM, or when its stdin
closes (the supervisor is gone). It runs in a session of its own, so a terminal's Ctrl-C reaches
only the supervisor, which stops it in order (and it ignores SIGINT besides).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("flm.proxy")

#: How often the request count is sent to the supervisor (when it changed).
STATS_INTERVAL_S = 0.5


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(json.dumps(message).encode() + b"\n")
    sys.stdout.buffer.flush()


async def _serve(hello: dict[str, Any]) -> int:
    from flm.core.errors import FlmError
    from flm.core.paths import Paths
    from flm.proxy.instance import reload_proxies, start_instance
    from flm.services.context import Context

    paths = hello["paths"]
    ctx = Context(Paths(Path(paths["home"]), Path(paths["config_db"]), Path(paths["security_db"])))
    try:
        instance = await start_instance(
            ctx,
            hello["config"],
            handle_id=str(hello["handle_id"]),
            sibling=True,
            ui_origins=tuple(str(o) for o in hello.get("ui_origins") or ()),
        )
    except FlmError as exc:
        _emit({"error": exc.to_dict()})
        ctx.close()
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.StreamReader(limit=1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _emit({"ready": {"pid": os.getpid(), "index": hello.get("index")}})

    async def commands() -> None:
        while True:
            line = await reader.readline()
            if not line:  # the supervisor is gone
                break
            try:
                message = json.loads(line)
            except ValueError:
                continue
            command = message.get("cmd") if isinstance(message, dict) else None
            if command == "stop":
                break
            if command == "reload":
                level = message.get("log_level")
                try:
                    await reload_proxies(ctx, [instance], level if isinstance(level, str) else None)
                    await instance.reload_certificate()
                except FlmError as exc:
                    log.warning("worker reload failed: %s", exc.message)
                _emit({"reloaded": message.get("seq")})
        stop.set()

    async def stats() -> None:
        sent = -1
        while True:
            served = instance.runtime.metrics.served
            if served != sent:
                _emit({"stats": {"served": served}})
                sent = served
            await asyncio.sleep(STATS_INTERVAL_S)

    tasks = [asyncio.ensure_future(commands()), asyncio.ensure_future(stats())]
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await instance.close()
        ctx.close()
    return 0


def _first_line() -> bytes:
    """The start message, read without a buffer: the commands after it are read by the event
    loop from the same descriptor, and a buffered read could swallow them."""
    out = bytearray()
    while not out.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def main() -> int:
    from flm.core.jsonlog import setup_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(os.environ.get("FLM_LOG_LEVEL") or "INFO")
    line = _first_line()
    try:
        hello = json.loads(line)
    except ValueError:
        sys.stderr.write("flm.proxy.worker is started by `flm proxy start --workers N`\n")
        return 2
    try:
        import uvloop

        return uvloop.run(_serve(hello))
    except ImportError:  # pragma: no cover - Windows (which has no --workers)
        return asyncio.run(_serve(hello))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
