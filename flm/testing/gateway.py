"""Run FLM's gateway in a background thread on a loopback port (tests and embedding)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flm.core.paths import Paths
from flm.http.server import HttpServer, bind_socket
from flm.openai.errors import refusal
from flm.proxy.app import build_app, response_headers
from flm.proxy.runtime import ProxyRuntime, ProxySettings, build_runtime


@dataclass
class Gateway:
    url: str
    port: int
    runtime: ProxyRuntime
    loop: asyncio.AbstractEventLoop
    _stop: Callable[[], None] = field(repr=False)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the gateway's loop thread and return its result."""
        done = asyncio.run_coroutine_threadsafe(_call(fn), self.loop)
        return done.result(timeout=30)

    def stop(self) -> None:
        self._stop()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _call(fn: Callable[[], Any]) -> Any:
    result = fn()
    if asyncio.iscoroutine(result):
        return await result
    return result


def start_gateway(
    paths: Paths | None = None, *, port: int = 0, bind: str = "127.0.0.1", **settings: Any
) -> Gateway:
    from flm.services.context import Context

    ctx = Context(paths or Paths.resolve())
    sock = bind_socket(bind, port)
    real_port = int(sock.getsockname()[1])
    proxy_settings = ProxySettings(port=real_port, bind=bind, **settings)
    runtime = build_runtime(proxy_settings, ctx)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stopping: dict[str, Any] = {}
    errors: list[BaseException] = []

    async def main() -> None:
        server = HttpServer(
            build_app(runtime),
            sock,
            body_timeout_s=runtime.settings.body_timeout_s,
            headers=response_headers(),
            refusal=refusal,
            limits=runtime.connection_limits,
        )
        await server.start()
        stop_event = asyncio.Event()
        stopping["event"] = stop_event
        ready.set()
        await stop_event.wait()
        await server.stop()
        await runtime.close()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # pragma: no cover - surfaced to the caller
            errors.append(exc)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="flm-gateway", daemon=True)
    thread.start()
    ready.wait(timeout=30)
    if errors:
        raise errors[0]

    def stop() -> None:
        event = stopping.get("event")
        if event is not None and thread.is_alive():
            loop.call_soon_threadsafe(event.set)
        thread.join(timeout=30)
        ctx.close()

    host = f"[{bind}]" if ":" in bind else bind
    return Gateway(f"http://{host}:{real_port}", real_port, runtime, loop, stop)
