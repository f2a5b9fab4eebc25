"""``watch_disconnect`` under a server's disconnect hook: the task the hook names is the one
cancelled when the client leaves, also when the client had left before the block began."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from flm.http.asgi import DISCONNECT_HOOK
from flm.openai.errors import HttpError
from flm.proxy.asgi import RequestState, watch_disconnect


class _Hook:
    """A server's hook: keeps the callback, names the task running the app."""

    def __init__(self, task: asyncio.Task[Any], gone: bool = False) -> None:
        self.task = task
        self.gone = gone
        self.callback: Callable[[], None] | None = None

    def __call__(self, callback: Callable[[], None] | None) -> asyncio.Task[Any]:
        self.callback = callback
        if callback is not None and self.gone:
            callback()
        return self.task

    def leave(self) -> None:
        self.gone = True
        if self.callback is not None:
            self.callback()


async def _receive() -> dict[str, Any]:
    raise AssertionError("with the hook, nothing waits on receive()")


def _scope(hook: _Hook) -> dict[str, Any]:
    return {"flm": RequestState("req-1", "127.0.0.1", 0.0), DISCONNECT_HOOK: hook}


def test_the_hooks_task_is_cancelled_when_the_client_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def main() -> tuple[int, str | None]:
        hook: _Hook | None = None
        entered = asyncio.Event()

        async def request() -> None:
            assert hook is not None
            scope = _scope(hook)
            with watch_disconnect(scope, _receive):
                entered.set()
                await asyncio.sleep(30)  # (an upstream call the client stops waiting for)

        task = asyncio.get_running_loop().create_task(request())
        hook = _Hook(task)
        # (the hook names the task: asyncio is not asked, which costs a getpid() call)
        monkeypatch.setattr(asyncio, "current_task", _no_current_task)
        await entered.wait()
        hook.leave()
        with pytest.raises(HttpError) as caught:
            await asyncio.wait_for(task, 5)
        return caught.value.status, caught.value.code

    assert asyncio.run(main()) == (499, "client_disconnected")


def test_a_client_gone_before_the_block_cancels_it_at_its_first_wait() -> None:
    async def main() -> tuple[bool, int]:
        hook: _Hook | None = None
        watch: list[watch_disconnect] = []

        async def request() -> None:
            assert hook is not None
            w = watch_disconnect(_scope(hook), _receive)
            watch.append(w)
            with w:
                await asyncio.sleep(30)

        task = asyncio.get_running_loop().create_task(request())
        hook = _Hook(task, gone=True)  # the hook calls back at once: the client has gone
        with pytest.raises(HttpError) as caught:
            await asyncio.wait_for(task, 5)
        return watch[0].gone, caught.value.status

    assert asyncio.run(main()) == (True, 499)


def _no_current_task(loop: Any = None) -> Any:
    raise AssertionError("asyncio.current_task() asked although the hook names the task")
