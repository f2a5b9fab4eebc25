"""The stream's fast path (a whole read rewritten at once) against the event-by-event way."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator

import pytest

from flm.core.errors import EngineApiError
from flm.openai.sse import DONE, encode_event, iter_sse_regions, region_data, rewrite_region

NEEDLE, REPLACEMENT = b'"model":"native"', b'"model":"flm://e/native"'


def _slow(region: bytes) -> tuple[bytes, bool]:
    """Event by event, as the adapter's fallback does (compact events only here)."""
    out: list[bytes] = []
    for data in region_data(region):
        if data == b"[DONE]":
            out.append(DONE)
            return b"".join(out), True
        out.append(encode_event(data.replace(NEEDLE, REPLACEMENT, 1)))
    return b"".join(out), False


def _event(rng: random.Random) -> bytes:
    text = rng.choice(["hi", "a\nb", 'say "model":"native"', "data: {x}", "é", "}\n\n"])
    chunk = {"id": "c", "model": "native", "choices": [{"delta": {"content": text}}]}
    return encode_event(json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode())


def test_fast_path_equals_the_event_by_event_way() -> None:
    rng = random.Random(7)
    odd = [
        b": keep-alive\n\n",
        b'data: {"error":{"message":"x"}}\n\n',
        b"event: ping\ndata: {}\n\n",
        b'data: {"model":"other"}\n\n',
        b"data: [DONE]\n\n",
    ]
    fast_taken = 0
    for _ in range(3000):
        events = [_event(rng) for _ in range(rng.randint(1, 8))]
        if rng.random() < 0.3:
            events.insert(rng.randrange(len(events) + 1), rng.choice(odd))
        if rng.random() < 0.5:
            events.append(DONE)
        region = b"".join(events)
        fast = rewrite_region(region, NEEDLE, REPLACEMENT)
        if fast is None:
            continue
        fast_taken += 1
        assert fast == _slow(region), region
    assert fast_taken > 1000  # (the usual shape takes the fast path)


def test_unusual_reads_are_left_to_the_slow_path() -> None:
    plain = _event(random.Random(1))
    assert rewrite_region(plain + plain, NEEDLE, REPLACEMENT) is not None
    for region in (
        b'data: {"error":{"message":"x"}}\n\n',
        plain + b": comment\n\n",
        plain + b'data: {"model":"other"}\n\n',  # (an event that does not name the model)
        b"data: [DONE]\n\n" + plain,  # (events after the end)
        b"data: {\ndata: }\n\n",  # (multi-line data)
    ):
        assert rewrite_region(region, NEEDLE, REPLACEMENT) is None, region


def _reads(parts: list[bytes]) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    return gen()


def _collect(parts: list[bytes], max_event: int = 1 << 20) -> list[bytes]:
    async def run() -> list[bytes]:
        return [r async for r in iter_sse_regions(_reads(parts), max_event)]

    return asyncio.run(run())


def test_regions_follow_the_reads_and_keep_partial_events() -> None:
    assert _collect([b"data: a\r\n\r\ndata: b", b"c\n\ndata: d\n\n"]) == [
        b"data: a\n\n",
        b"data: bc\n\ndata: d\n\n",
    ]
    assert _collect([b"data: x"]) == [b"data: x\n\n"]  # (unterminated at the end)
    with pytest.raises(EngineApiError):
        _collect([b"data: " + b"x" * 100], max_event=50)
    with pytest.raises(EngineApiError):
        _collect([b"data: " + b"x" * 100 + b"\n\n"], max_event=50)
