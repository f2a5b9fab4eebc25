"""The Redis backend under more concurrent requests than it has connections: they wait for a
free connection; none is taken for an outage."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flm.state import redis as redis_state
from flm.state.config import StateBackendConfig
from flm.state.redis import RedisState


def test_more_concurrent_calls_than_connections_wait_instead_of_failing(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_state, "POOL_SIZE", 2)
    events: list[str] = []

    async def run() -> list[list[str]]:
        backend = RedisState(StateBackendConfig(redis_server.url))
        backend.on_event = lambda kind, details: events.append(kind)
        try:
            assert await backend.connect()
            limit = (60_000, 1_000)
            return await asyncio.gather(
                *(
                    backend.admit(f"127.0.0.{i % 200 + 1}", f"key{i}", limit, limit, limit)
                    for i in range(60)
                )
            )
        finally:
            assert backend.available, backend.last_error
            await backend.close()

    results = asyncio.run(run())
    assert len(results) == 60
    assert "state_backend_unavailable" not in events
