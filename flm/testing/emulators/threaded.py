"""`Emulator`: an `EmulatorServer` running on its own event loop in a background thread, for
tests and scripts that are not async themselves."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from flm.testing.emulators.server import EmulatorServer, ThreadSafeList
from flm.testing.emulators.settings import Behaviour, ModelSpec


class Emulator:
    """A running emulator: its own event loop in a background thread, bound to loopback.

    ``behaviour`` may be changed (or replaced) from the test thread at any time; each request
    reads it once when it arrives.
    """

    def __init__(self, server: EmulatorServer) -> None:
        self._server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return self._server.kind

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def behaviour(self) -> Behaviour:
        return self._server.behaviour

    @behaviour.setter
    def behaviour(self, value: Behaviour) -> None:
        self._server.behaviour = value

    @property
    def models(self) -> dict[str, ModelSpec]:
        return self._server.models

    @property
    def requests(self) -> ThreadSafeList[tuple[str, str]]:
        """Every request received, as ``(method, path)``, in arrival order."""
        return self._server.requests

    @property
    def disconnects(self) -> ThreadSafeList[float]:
        """``time.monotonic()`` of every client that went away before its response ended."""
        return self._server.disconnects

    @property
    def server(self) -> EmulatorServer:
        return self._server

    def start(self, host: str = "127.0.0.1", port: int = 0, timeout: float = 10.0) -> Emulator:
        if self._thread is not None:
            raise RuntimeError("emulator already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._server.start(host, port))
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                _close_loop(loop)
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                _close_loop(loop)

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"flm-emulator-{self.kind}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"{self.kind} emulator did not start within {timeout}s")
        if failure:
            self._thread.join(timeout)
            self._thread = None
            raise failure[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._thread = None
        if thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._server.close(), loop)
            try:
                future.result(timeout)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout)

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005
    ) -> None:
        """Poll ``predicate`` until it holds; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            time.sleep(interval)

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Emulator {self.kind} {self.url or '(not started)'}>"


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()
