"""The Lua scripts of the Redis backend, against a real redis-server, with the time given."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from flm.state.config import StateBackendConfig
from flm.state.redis import BLOCKS, CHANNEL, RedisState
from tests.support import FakeClock

ADMIT_NONE = ((0, 0), (0, 0), (0, 0))


@pytest.fixture
def state(redis_server: Any) -> Iterator[tuple[RedisState, FakeClock, asyncio.AbstractEventLoop]]:
    clock = FakeClock()
    loop = asyncio.new_event_loop()
    try:
        st = loop.run_until_complete(_make(redis_server.url, clock))
        try:
            yield st, clock, loop
        finally:
            loop.run_until_complete(st.close())
    finally:
        loop.close()


async def _make(url: str, clock: FakeClock) -> RedisState:
    st = RedisState(StateBackendConfig(url), clock)
    assert await st.connect()
    return st


def _admit(
    fx: tuple[RedisState, FakeClock, asyncio.AbstractEventLoop],
    ip: str = "",
    key: str = "",
    ip_limit: tuple[int, int] = (0, 0),
    key_limit: tuple[int, int] = (0, 0),
    own: tuple[int, int] = (0, 0),
) -> list[str]:
    st, _, loop = fx
    return loop.run_until_complete(st.admit(ip, key, ip_limit, key_limit, own))


def test_bucket_gives_burst_then_refills_at_rpm(state: Any) -> None:
    _st, clock, _loop = state
    taken = [_admit(state, key="k1", key_limit=(60, 10)) for _ in range(12)]
    assert [r[2] for r in taken[:10]] == ["0"] * 10
    wait = float(taken[10][2])
    assert 0.9 < wait <= 1.0  # one token a second at 60 rpm
    clock.now += 1.0  # one token back
    assert _admit(state, key="k1", key_limit=(60, 10))[2] == "0"
    assert float(_admit(state, key="k1", key_limit=(60, 10))[2]) > 0
    clock.now += 600  # full again, never more than the burst
    results = [_admit(state, key="k1", key_limit=(60, 10))[2] for _ in range(11)]
    assert results.count("0") == 10


def test_refused_address_does_not_charge_the_key(state: Any) -> None:
    assert _admit(state, ip="10.0.0.1", ip_limit=(60, 1))[1] == "0"
    refused = _admit(state, ip="10.0.0.1", key="k", ip_limit=(60, 1), key_limit=(60, 1))
    assert float(refused[1]) > 0 and refused[2] == "0"
    # the key's one token is still there
    assert _admit(state, key="k", key_limit=(60, 1))[2] == "0"


def test_auth_failures_block_at_each_stage_and_blocks_expire(state: Any) -> None:
    st, clock, loop = state
    client = st._client
    published: list[dict[str, Any]] = []

    async def failures(n: int) -> list[tuple[int, Any]]:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(CHANNEL)
        out = [
            await st.auth_failure(
                "10.0.0.9",
                window_s=3600,
                enabled=True,
                max_failures=5,
                first_s=60,
                second_s=86400,
                permanent=20,
                exempt=False,
            )
            for _ in range(n)
        ]
        deadline = loop.time() + 0.5  # (what was published by then; nothing more comes)
        while loop.time() < deadline:
            m = await pubsub.get_message(timeout=0.1)
            if m is not None:
                published.append(json.loads(m["data"]))
        await pubsub.aclose()
        return out

    got = loop.run_until_complete(failures(5))
    assert [c for c, _ in got] == [1, 2, 3, 4, 5]
    assert all(b is None for _, b in got[:4])
    reason, until, _since = got[4][1]
    assert reason == "auth_failures" and until == clock.now + 60
    assert len(published) == 1  # one message, for the block
    message = published[0]
    assert (message["o"], message["t"], message["ip"]) == (st.origin, "block", "10.0.0.9")
    assert float(message["until"]) == clock.now + 60
    blocked = _admit(state, ip="10.0.0.9")
    assert blocked[0] == "block" and blocked[1] == "auth_failures"
    clock.now += 61  # the first stage has run out: the entry goes
    assert _admit(state, ip="10.0.0.9")[0] == "ok"
    assert loop.run_until_complete(client.hexists(BLOCKS, "10.0.0.9")) == 0
    more = loop.run_until_complete(failures(5))
    assert more[-1][0] == 10 and more[-1][1][1] == clock.now + 86400  # second stage: a day


def test_exempt_addresses_are_counted_never_blocked(state: Any) -> None:
    st, _clock, loop = state
    for _ in range(6):
        count, block = loop.run_until_complete(
            st.auth_failure(
                "127.0.0.1",
                window_s=3600,
                enabled=True,
                max_failures=5,
                first_s=60,
                second_s=86400,
                permanent=20,
                exempt=True,
            )
        )
        assert block is None
    assert count == 6


def test_scores_fade_and_block_at_the_threshold(state: Any) -> None:
    st, clock, loop = state

    def add(points: int) -> tuple[int, Any]:
        return loop.run_until_complete(
            st.add_score(
                "10.0.0.7",
                points,
                window_s=3600,
                threshold=100,
                short_s=3600,
                long_s=86400,
                exempt=False,
            )
        )

    assert add(60) == (60, None)
    clock.now += 3601  # faded
    assert add(60) == (60, None)
    total, block = add(60)
    assert total == 120 and block is not None and block[0] == "intrusion"
    assert block[1] == clock.now + 3600


def test_blocks_are_never_shortened_and_unblock_clears_counts(state: Any) -> None:
    st, clock, loop = state
    (_, until, _), changed = loop.run_until_complete(st.block("10.0.0.5", "manual", None))
    assert until is None and changed
    (_, until, _), changed = loop.run_until_complete(
        st.block("10.0.0.5", "anomaly", clock.now + 60)
    )
    assert until is None and not changed  # the permanent block stays
    assert loop.run_until_complete(st.unblock("10.0.0.5"))
    assert _admit(state, ip="10.0.0.5")[0] == "ok"
    assert loop.run_until_complete(st.blocks()) == {}


def test_a_revoked_key_stays_revoked(state: Any) -> None:
    st, _clock, loop = state
    active = {"label": "a", "hash": "$argon2id$x", "revoked_at": None}
    loop.run_until_complete(st.put_key("k1", active))
    assert _admit(state, key="k1")[4] == "0"
    revoked = {**active, "revoked_at": "2026-01-01T00:00:00Z"}
    loop.run_until_complete(st.put_key("k1", revoked))
    assert _admit(state, key="k1")[4] == "1"
    kept = loop.run_until_complete(st.put_key("k1", active))  # a stale copy comes back
    assert kept["revoked_at"] == "2026-01-01T00:00:00Z"
    assert loop.run_until_complete(st.keys())["k1"]["revoked_at"] is not None
