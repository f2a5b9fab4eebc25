"""`EmulatorServer`: one engine emulator as a real aiohttp server on one event loop, with the
middleware every request passes through (recording, `Behaviour` snapshot, misbehaviour) and
the streaming and disconnect helpers the engine modules' handlers use."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, TypeVar

from aiohttp import web

from flm.testing.emulators.openai_dialect import OpenAIDialect
from flm.testing.emulators.request_state import (
    CURRENT,
    RequestState,
    hang_forever,
    request_behaviour,
)
from flm.testing.emulators.settings import Behaviour, ModelLike, ModelSpec, as_spec
from flm.testing.emulators.wire import GARBAGE_BODY, Handler, status_phrase

MAX_BODY_BYTES = 64 * 1024 * 1024
_HUGE_WRITE_SLICE = 64 * 1024
_LOADING_POLL_S = 0.01

T = TypeVar("T")


class ThreadSafeList(list[T]):
    """A list appended to by the server thread and read by tests: every access holds a lock and
    iteration walks a snapshot."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def append(self, item: T) -> None:
        with self._lock:
            super().append(item)

    def clear(self) -> None:
        with self._lock:
            super().clear()

    def snapshot(self) -> list[T]:
        with self._lock:
            return list.copy(self)

    def __iter__(self) -> Iterator[T]:
        return iter(self.snapshot())

    def __len__(self) -> int:
        with self._lock:
            return super().__len__()

    def __contains__(self, item: object) -> bool:
        with self._lock:
            return super().__contains__(item)


class EmulatorServer(ABC):
    """One engine emulator bound to one event loop; `Emulator` runs it in a thread."""

    kind: ClassVar[str]
    default_models: ClassVar[tuple[str, ...]]
    dialect_class: ClassVar[type[OpenAIDialect]] = OpenAIDialect
    """How this engine spells its OpenAI-compatible routes (available as ``self.openai``)."""

    def __init__(
        self, models: Iterable[ModelLike] | None = None, behaviour: Behaviour | None = None
    ) -> None:
        chosen = list(models) if models is not None else list(self.default_models)
        self.models: dict[str, ModelSpec] = {}
        for model in chosen:
            spec = self.normalise(as_spec(model))
            self.models[spec.name] = spec
        self.behaviour = behaviour if behaviour is not None else Behaviour()
        self.requests: ThreadSafeList[tuple[str, str]] = ThreadSafeList()
        self.disconnects: ThreadSafeList[float] = ThreadSafeList()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._active: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.openai = self.dialect_class(self)

    # -- hooks for the engine modules

    def normalise(self, spec: ModelSpec) -> ModelSpec:
        """Rewrite a configured model the way the engine names it (Ollama adds ``:latest``)."""
        return spec

    def find_model(self, name: object) -> ModelSpec | None:
        return self.models.get(name) if isinstance(name, str) else None

    @abstractmethod
    def add_routes(self, router: web.UrlDispatcher) -> None: ...

    @abstractmethod
    def error_response(self, request: web.Request, status: int, message: str) -> web.Response:
        """A generic error in the engine's own body shape (used by ``status_override``)."""

    @abstractmethod
    async def unknown_route(self, request: web.Request) -> web.StreamResponse:
        """What the engine answers for a path or method it does not serve."""

    async def loading_gate(self, request: web.Request) -> web.StreamResponse | None:
        """Called for every request while ``Behaviour.loading`` is set (at arrival): return a
        response to answer with it, or None to carry on (after waiting, if the engine waits)."""
        return None

    # -- app and lifecycle

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY_BYTES)
        self.add_routes(app.router)
        app.router.add_route("*", "/{tail:.*}", self.unknown_route)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        runner = web.AppRunner(
            self.build_app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound_port}"
        return self.url

    async def close(self) -> None:
        self._stopping = True
        pending = [task for task in self._active if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- the middleware every request passes through

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
        state = RequestState(behaviour=dataclasses.replace(self.behaviour))
        CURRENT.set(state)
        behaviour = state.behaviour
        try:
            if behaviour.delay_s > 0:
                await asyncio.sleep(behaviour.delay_s)
            if behaviour.status_override is not None:
                status = behaviour.status_override
                return self.error_response(request, status, status_phrase(status))
            if behaviour.garbage:
                return web.Response(
                    body=GARBAGE_BODY, status=200, headers={"Content-Type": "application/json"}
                )
            if behaviour.loading:
                gated = await self.loading_gate(request)
                if gated is not None:
                    return gated
            return await handler(request)
        except asyncio.CancelledError:
            self._note_disconnect(state)
            raise
        except ConnectionResetError:
            # A write hit the closed connection before aiohttp cancelled us: end the request
            # the way aiohttp ends it on a client disconnect (quietly), not as a server error.
            self._note_disconnect(state)
            raise asyncio.CancelledError from None
        finally:
            if task is not None:
                self._active.discard(task)

    def _note_disconnect(self, state: RequestState) -> None:
        if not self._stopping and not state.dropped:
            self.disconnects.append(time.monotonic())

    async def wait_while_loading(self) -> None:
        """Hold the current request until ``behaviour.loading`` is cleared (polling the live
        object, which tests may flip from another thread)."""
        started = time.monotonic_ns()
        # The flag is flipped from another thread, so an asyncio.Event cannot carry it.
        while self.behaviour.loading:  # noqa: ASYNC110
            await asyncio.sleep(_LOADING_POLL_S)
        CURRENT.get().load_wait_ns = time.monotonic_ns() - started

    # -- misbehaviour helpers used by the inference handlers

    async def drop_connection(self, request: web.Request) -> None:
        """Close the TCP connection under the current response (after flushing what was
        written); the handler then ends when aiohttp notices the connection is gone."""
        CURRENT.get().dropped = True
        transport = request.transport
        if transport is not None:
            transport.close()
        await hang_forever()

    async def before_plain_reply(self, request: web.Request) -> None:
        """Non-streamed inference: ``hang_after_chunks``/``endless`` never answer,
        ``drop_after_chunks`` closes the connection without an answer."""
        behaviour = request_behaviour()
        if behaviour.hang_after_chunks is not None or behaviour.endless:
            await hang_forever()
        if behaviour.drop_after_chunks is not None:
            await self.drop_connection(request)

    async def stream(
        self,
        request: web.Request,
        *,
        content_type: str,
        preamble: bytes,
        steps: int,
        frame: Callable[[int], bytes],
        huge_frame: Callable[[str], bytes],
        epilogue: Callable[[], bytes],
    ) -> web.StreamResponse:
        """Write a streamed reply: preamble, optional huge frame, ``steps`` content frames
        (``frame(k)``; k keeps growing when endless), then the epilogue - honouring every
        streaming misbehaviour of the request's `Behaviour`."""
        behaviour = request_behaviour()
        response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        await response.prepare(request)
        if preamble:
            await response.write(preamble)
        if behaviour.huge_line_bytes:
            overhead = len(huge_frame(""))
            data = huge_frame("x" * max(0, behaviour.huge_line_bytes - overhead))
            for start in range(0, len(data), _HUGE_WRITE_SLICE):
                await response.write(data[start : start + _HUGE_WRITE_SLICE])
        sent = 0
        while behaviour.endless or sent < steps:
            await self._interrupt(request, behaviour, sent)
            if sent and behaviour.chunk_interval_s > 0:
                await asyncio.sleep(behaviour.chunk_interval_s)
            else:
                await asyncio.sleep(0)  # stay cancellable even when frames are cheap
            await response.write(frame(sent))
            sent += 1
        await self._interrupt(request, behaviour, sent)
        if sent and behaviour.chunk_interval_s > 0:
            await asyncio.sleep(behaviour.chunk_interval_s)
        await response.write(epilogue())
        await response.write_eof()
        return response

    async def _interrupt(self, request: web.Request, behaviour: Behaviour, sent: int) -> None:
        if behaviour.hang_after_chunks is not None and sent >= behaviour.hang_after_chunks:
            await hang_forever()
        if behaviour.drop_after_chunks is not None and sent >= behaviour.drop_after_chunks:
            await self.drop_connection(request)
