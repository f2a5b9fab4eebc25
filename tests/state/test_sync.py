"""The key and policy mirror between two processes' databases and one real Redis: what one
process stores reaches the other, a revocation is final, and syncing again changes nothing
(no endless re-announcing between processes)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flm.core.paths import Paths
from flm.proxy.shared import SharedGuard
from flm.services.api_keys import KeyService
from flm.services.context import Context
from flm.services.policy import PolicyService
from flm.state.config import StateBackendConfig
from flm.state.redis import RedisState


@pytest.fixture
def two(tmp_path: Path, redis_server: Any) -> Iterator[tuple[Any, ...]]:
    loop = asyncio.new_event_loop()
    contexts, guards = [], []
    try:
        for name in ("a", "b"):
            home = tmp_path / name
            home.mkdir(mode=0o700)
            ctx = Context(Paths.resolve(home=home))
            contexts.append(ctx)
            backend = RedisState(StateBackendConfig(redis_server.url))
            assert loop.run_until_complete(backend.connect())
            guards.append(SharedGuard(backend, ctx, "proxy-" + name))
        yield loop, contexts, guards
    finally:
        for guard in guards:
            loop.run_until_complete(guard.close())
        for ctx in contexts:
            ctx.close()
        loop.close()


def _sync(loop: asyncio.AbstractEventLoop, guard: SharedGuard) -> tuple[bool, bool]:
    async def run() -> tuple[bool, bool]:
        return await guard._sync_keys(), await guard._sync_policy()

    return loop.run_until_complete(run())


def test_keys_and_policy_cross_and_settle(two: tuple[Any, ...]) -> None:
    loop, (ctx_a, ctx_b), (a, b) = two
    PolicyService(ctx_a.storage).set({"rate_limit": {"rpm": 60, "burst": 10}})
    row, _plain = KeyService(ctx_a.storage).create("made-on-a")
    _sync(loop, a)
    _sync(loop, b)
    got = {k.id: k for k in KeyService(ctx_b.storage).list()}
    assert got[row.id].label == "made-on-a" and got[row.id].revoked_at is None
    assert PolicyService(ctx_b.storage).show()["policy"]["rate_limit"]["rpm"] == 60
    # both revoke it (at different times): revoked everywhere, and then all is quiet
    KeyService(ctx_a.storage).revoke(row.id)
    KeyService(ctx_b.storage).revoke(row.id)
    assert _sync(loop, a)[0] is True
    _sync(loop, b)
    for _ in range(2):
        assert _sync(loop, a) == (False, False)
        assert _sync(loop, b) == (False, False)
    # a limit changed on B reaches A; A's stale copy does not undo it
    other, _ = KeyService(ctx_a.storage).create("second")
    _sync(loop, a)
    _sync(loop, b)
    KeyService(ctx_b.storage).update(other.id, rpm=5)
    assert _sync(loop, b)[0] is True
    _sync(loop, a)
    assert {k.id: k for k in KeyService(ctx_a.storage).list()}[other.id].limits.rpm == 5
    assert _sync(loop, a) == (False, False) and _sync(loop, b) == (False, False)
