"""Engine pools over real sockets: two emulators of one model behind ``flm://pool:NAME/model``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from flm.testing.emulators import Behaviour, Emulator, start_emulator
from flm.testing.gateway import Gateway, start_gateway
from tests.support import wait_until

MODEL = "chat-model:1b"
EMBED = "nomic-embed-text:v1"
POOL_MODEL = f"flm://pool:duo/{MODEL}"
CHAT = "/v1/chat/completions"


@dataclass
class PoolStack:
    a: Emulator
    b: Emulator
    gateway: Gateway
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def chats(self, emu: Emulator) -> int:
        return sum(1 for _m, path in emu.requests if path == CHAT)

    def members(self) -> dict[str, dict[str, Any]]:
        snap = self.gateway.call(self.gateway.runtime.engines.pools.snapshot)
        return {m["engine_id"]: m for p in snap for m in p["members"]}


def _body(text: str = "hello", *, stream: bool = False) -> dict[str, Any]:
    return {"model": POOL_MODEL, "stream": stream, "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def pool_stack(cli: Any) -> Iterator[PoolStack]:
    assert cli("config", "set", "pool.backoff_initial_s", "0.1").code == 0
    assert cli("config", "set", "pool.backoff_max_s", "0.4").code == 0
    with (
        start_emulator("vllm", models=[MODEL, EMBED], behaviour=Behaviour(reply_text="alpha")) as a,
        start_emulator("vllm", models=[MODEL, EMBED], behaviour=Behaviour(reply_text="bravo")) as b,
    ):
        for emu, name in ((a, "a"), (b, "b")):
            assert cli("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", name).code == 0
        created = cli("engines", "pool", "create", "duo", "--member", "a", "b")
        assert created.code == 0, created.out
        key = cli("api-keys", "create", "--label", "t").data["key"]
        with start_gateway() as gw:
            yield PoolStack(a, b, gw, key)


def _text(raw: bytes) -> str:
    """The assistant text of a plain reply or of a streamed one (its deltas joined)."""
    if not raw.startswith(b"data: "):
        return str(json.loads(raw)["choices"][0]["message"]["content"])
    out = []
    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: {") and b'"choices"' in event:
            for choice in json.loads(event[6:])["choices"]:
                out.append((choice.get("delta") or {}).get("content") or "")
    return "".join(out)


async def _post(
    session: aiohttp.ClientSession, stack: PoolStack, body: dict[str, Any]
) -> tuple[int, bytes]:
    async with session.post(stack.gateway.url + CHAT, json=body, headers=stack.auth) as resp:
        return resp.status, await resp.read()


def _run_many(
    stack: PoolStack, count: int, concurrency: int, stream: bool = False
) -> list[tuple[int, bytes]]:
    async def main() -> list[tuple[int, bytes]]:
        limit = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> tuple[int, bytes]:
                async with limit:
                    return await _post(session, stack, _body(f"n{i}", stream=stream))

            return await asyncio.gather(*(one(i) for i in range(count)))

    return asyncio.run(main())


# --- commands -----------------------------------------------------------------------------------


def test_pool_commands(cli: Any) -> None:
    assert cli("engines", "add", "--kind", "vllm", "--url", "127.0.0.1:9", "--id", "g1").code == 0
    assert cli("engines", "add", "--kind", "vllm", "--url", "127.0.0.1:10", "--id", "g2").code == 0
    made = cli("engines", "pool", "create", "gpus", "--member", "g1", "g2", "--weight", "g2=3")
    assert made.code == 0, made.out
    assert made.data["model_id"] == "flm://pool:gpus/<model>"
    listed = cli("engines", "pool", "list").data
    assert [(p["name"], [(m["engine_id"], m["weight"]) for m in p["members"]]) for p in listed] == [
        ("gpus", [("g1", 1.0), ("g2", 3.0)])
    ]
    assert cli("engines", "pool", "create", "gpus", "--member", "g1").error["code"] == "POOL_EXISTS"
    assert cli("engines", "pool", "create", "x", "--member", "nope").code != 0
    assert cli("engines", "pool", "create", "x", "--member", "g1", "g1").code != 0
    assert cli("engines", "pool", "create", "x", "--member", "g1", "--weight", "g2=1").code != 0
    assert cli("engines", "pool", "create", "x", "--member", "g1", "--weight", "g1=0").code != 0
    assert cli("engines", "pool", "create", "Bad:Name", "--member", "g1").code != 0
    assert cli("engines", "pool", "remove", "gpus").code == 0
    assert cli("engines", "pool", "list").data == []
    assert cli("engines", "pool", "remove", "gpus").error["code"] == "NOT_FOUND"


# --- routing ------------------------------------------------------------------------------------


def test_pool_model_is_listed_and_answers(pool_stack: PoolStack) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(
                pool_stack.gateway.url + "/v1/models", headers=pool_stack.auth
            ) as resp:
                ids = [m["id"] for m in (await resp.json())["data"]]
            assert POOL_MODEL in ids
            status, raw = await _post(session, pool_stack, _body())
            assert status == 200, raw
            reply = json.loads(raw)
            assert reply["model"] == POOL_MODEL
            assert reply["choices"][0]["message"]["content"] in ("alpha", "bravo")
            missing = {**_body(), "model": "flm://pool:duo/absent:1"}
            assert (await _post(session, pool_stack, missing))[0] == 404
            nopool = {**_body(), "model": f"flm://pool:none/{MODEL}"}
            assert (await _post(session, pool_stack, nopool))[0] == 404

    asyncio.run(main())


def test_thousand_requests_spread_evenly_and_counters_return_to_zero(pool_stack: PoolStack) -> None:
    """At equal load the two members share 1,000 requests within 10% of even: with 16 in
    flight the least-busy choice decides, ties go round robin."""
    results = _run_many(pool_stack, 1000, 16)
    assert [s for s, _ in results] == [200] * 1000
    a, b = pool_stack.chats(pool_stack.a), pool_stack.chats(pool_stack.b)
    assert a + b == 1000
    assert abs(a - 500) <= 50 and abs(b - 500) <= 50, (a, b)
    assert {m: v["in_flight"] for m, v in pool_stack.members().items()} == {"a": 0, "b": 0}


def test_weights_set_the_share_at_equal_load(cli: Any) -> None:
    with start_emulator("vllm", models=[MODEL]) as a, start_emulator("vllm", models=[MODEL]) as b:
        for emu, name in ((a, "a"), (b, "b")):
            cli("engines", "add", "--kind", "vllm", "--url", emu.url, "--id", name)
        assert (
            cli("engines", "pool", "create", "duo", "--member", "a", "b", "--weight", "a=3").code
            == 0
        )
        key = cli("api-keys", "create", "--label", "t").data["key"]
        with start_gateway() as gw:
            stack = PoolStack(a, b, gw, key)
            results = _run_many(stack, 200, 1)  # one at a time: the weights alone decide
            assert [s for s, _ in results] == [200] * 200
            assert (stack.chats(a), stack.chats(b)) == (150, 50)


def test_retry_once_before_the_first_byte(pool_stack: PoolStack) -> None:
    """A member answering 5xx is taken out and the request goes to the other one: the client
    sees no error, plain or streamed; the member comes back once its probe succeeds."""
    b = pool_stack.b
    for stream in (False, True):
        before = pool_stack.chats(b)
        b.behaviour.status_override = 500
        results = _run_many(pool_stack, 10, 1, stream=stream)
        assert [s for s, _ in results] == [200] * 10
        assert {_text(raw) for _, raw in results} == {"alpha"}
        assert pool_stack.chats(b) - before == 1  # tried once, then out of rotation
        assert pool_stack.members()["b"]["state"] == "down"
        b.behaviour.status_override = None
        wait_until(
            lambda: pool_stack.members()["b"]["state"] == "up", timeout=5, what="b probed back in"
        )


def test_retry_is_once_only(pool_stack: PoolStack) -> None:
    """Both members failing: the client gets the second member's error after two attempts,
    not a third."""
    assert [s for s, _ in _run_many(pool_stack, 1, 1)] == [200]  # (model lists cached)
    before = pool_stack.chats(pool_stack.a) + pool_stack.chats(pool_stack.b)
    pool_stack.a.behaviour.status_override = 500
    pool_stack.b.behaviour.status_override = 500
    [(status, raw)] = _run_many(pool_stack, 1, 1)
    assert status == 502, raw
    assert json.loads(raw)["error"]["code"] == "engine_error"
    assert pool_stack.chats(pool_stack.a) + pool_stack.chats(pool_stack.b) - before == 2


def test_single_member_pool_passes_the_engine_error_on(pool_stack: PoolStack, cli: Any) -> None:
    """With no other member to retry on, the client gets the member's own error (not a
    made-up "no member"), plain and streamed; embeddings go through the pool too."""
    from flm.core.paths import Paths
    from flm.proxy.instance import reload_proxies
    from flm.services.context import Context

    assert cli("engines", "pool", "create", "solo", "--member", "b").code == 0
    ctx = Context(Paths.resolve())
    try:
        inst = SimpleNamespace(
            runtime=pool_stack.gateway.runtime,
            settings=pool_stack.gateway.runtime.settings,
            last_error=None,
        )
        pool_stack.gateway.call(lambda: reload_proxies(ctx, [inst]))  # type: ignore[list-item]
    finally:
        ctx.close()

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            url = pool_stack.gateway.url + "/v1/embeddings"
            emb = {"model": "flm://pool:solo/" + EMBED, "input": "hi"}
            async with session.post(url, json=emb, headers=pool_stack.auth) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["model"] == "flm://pool:solo/" + EMBED
            pool_stack.b.behaviour.status_override = 500
            for stream in (False, True):
                body = {**_body(stream=stream), "model": "flm://pool:solo/" + MODEL}
                status, raw = await _post(session, pool_stack, body)
                assert status == 502, raw
                assert json.loads(raw)["error"]["code"] == "engine_error"
                pool_stack.b.behaviour.status_override = None
                deadline = time.monotonic() + 5
                while pool_stack.members()["b"]["state"] != "up":
                    assert time.monotonic() < deadline, "b never probed back in"
                    await asyncio.sleep(0.02)
                pool_stack.b.behaviour.status_override = 500

    asyncio.run(main())


def test_never_retried_after_the_first_byte(pool_stack: PoolStack) -> None:
    """A stream whose member drops it after two chunks ends with one error event and
    ``[DONE]``; the request is not sent to the other member."""
    for emu in (pool_stack.a, pool_stack.b):
        emu.behaviour.drop_after_chunks = 2
    [(status, raw)] = _run_many(pool_stack, 1, 1, stream=True)
    assert status == 200
    events = [e for e in raw.split(b"\n\n") if e]
    assert sum(1 for e in events if e.startswith(b'data: {"error"')) == 1
    assert events[-1] == b"data: [DONE]"
    assert pool_stack.chats(pool_stack.a) + pool_stack.chats(pool_stack.b) == 1
    assert {m: v["in_flight"] for m, v in pool_stack.members().items()} == {"a": 0, "b": 0}


def test_client_disconnect_releases_the_member(pool_stack: PoolStack) -> None:
    for emu in (pool_stack.a, pool_stack.b):
        emu.behaviour.endless = True
        emu.behaviour.chunk_interval_s = 0.02

    async def main() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                pool_stack.gateway.url + CHAT, json=_body(stream=True), headers=pool_stack.auth
            ) as resp,
        ):
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
            busy = pool_stack.members()
            assert busy["a"]["in_flight"] + busy["b"]["in_flight"] == 1
        # (leaving the block closes the connection mid-stream)

    asyncio.run(main())
    wait_until(
        lambda: all(m["in_flight"] == 0 for m in pool_stack.members().values()),
        timeout=5,
        what="in-flight back to 0 after the client left",
    )


def test_member_killed_mid_run_then_back_in_rotation(pool_stack: PoolStack) -> None:
    """Streams flowing from the killed member end with an error event and ``[DONE]``; those
    on the other member and every request started after the kill succeed; the member is back
    in rotation (by the probe, not client traffic) within the back-off limit of its return."""
    for emu in (pool_stack.a, pool_stack.b):
        emu.behaviour.chunk_interval_s = 0.3
        emu.behaviour.stream_chunks = 8
    port = int(pool_stack.b.url.rsplit(":", 1)[1])

    async def main() -> tuple[list[bytes], list[tuple[int, bytes]]]:
        async with aiohttp.ClientSession() as session:
            responses = [
                await session.post(
                    pool_stack.gateway.url + CHAT,
                    json=_body(f"s{i}", stream=True),
                    headers=pool_stack.auth,
                )
                for i in range(4)
            ]
            firsts = [await r.content.readuntil(b"\n\n") for r in responses]
            assert all(r.status == 200 for r in responses)
            # plain requests that b holds without answering when it dies
            pool_stack.b.behaviour.delay_s = 30.0
            held = [
                asyncio.ensure_future(_post(session, pool_stack, _body(f"h{i}"))) for i in range(6)
            ]
            deadline = time.monotonic() + 10
            while pool_stack.chats(pool_stack.b) < 2 + 2:
                assert time.monotonic() < deadline, "plain requests never reached b"
                await asyncio.sleep(0.01)
            await asyncio.to_thread(pool_stack.b.stop)
            held_results = await asyncio.gather(*held)
            assert [st for st, _ in held_results] == [200] * 6
            assert {_text(raw) for _, raw in held_results} == {"alpha"}
            rests = [await r.read() for r in responses]
            for r in responses:
                r.release()
            for emu in (pool_stack.a,):
                emu.behaviour.chunk_interval_s = 0.0
            later = await asyncio.gather(
                *(_post(session, pool_stack, _body(f"n{i}")) for i in range(40))
            )
            return [f + rest for f, rest in zip(firsts, rests, strict=True)], later

    streams, later = asyncio.run(main())
    broken = [s for s in streams if b'data: {"error"' in s]
    whole = [s for s in streams if b'data: {"error"' not in s]
    assert len(broken) == 2 and len(whole) == 2  # (the four streams went two and two)
    for s in broken:
        events = [e for e in s.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        assert sum(1 for e in events if e.startswith(b'data: {"error"')) == 1
        assert "bravo".startswith(_text(s))  # it was b's stream, cut short
    for s in whole:
        assert s.rstrip().endswith(b"data: [DONE]") and _text(s) == "alpha"
    assert [st for st, _ in later] == [200] * 40
    assert {_text(raw) for _, raw in later} == {"alpha"}
    assert pool_stack.members()["b"]["state"] == "down"

    with start_emulator(
        "vllm", models=[MODEL], behaviour=Behaviour(reply_text="bravo"), port=port
    ) as back:
        returned = time.monotonic()
        wait_until(
            lambda: pool_stack.members()["b"]["state"] == "up",
            timeout=0.4 + 2.0,
            what="b back in rotation within the back-off limit",
        )
        assert time.monotonic() - returned <= 0.4 + 2.0
        assert back.requests.snapshot() and all(p != CHAT for _m, p in back.requests)
        results = _run_many(pool_stack, 20, 1)
        assert [s for s, _ in results] == [200] * 20
        assert sum(1 for _m, p in back.requests if p == CHAT) == 10


def test_metrics_and_status_show_members(pool_stack: PoolStack) -> None:
    from flm.cli.proxy import _status_text

    pool_stack.b.behaviour.status_override = 503
    assert [s for s, _ in _run_many(pool_stack, 2, 1)] == [200, 200]

    async def metrics() -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(pool_stack.gateway.url + "/metrics", headers=pool_stack.auth) as resp,
        ):
            return await resp.text()

    text = asyncio.run(metrics())
    assert 'flm_pool_member_in_flight{member="a",pool="duo"} 0.0' in text
    assert 'flm_pool_member_up{member="a",pool="duo"} 1.0' in text
    assert 'flm_pool_member_up{member="b",pool="duo"} 0.0' in text  # (503: out, probes fail)
    shown = _status_text(
        {
            "proxies": [
                {
                    "id": "proxy",
                    "mode": "local-http",
                    "port": 1,
                    "listen": "127.0.0.1",
                    "endpoints": [],
                    "uptime_s": 1,
                    "pid": 1,
                    "pools": pool_stack.gateway.call(
                        pool_stack.gateway.runtime.engines.pools.snapshot
                    ),
                }
            ]
        }
    )
    assert "pool duo: a up in_flight=0, b down in_flight=0" in shown


def test_pools_reach_a_running_proxy_on_reload(pool_stack: PoolStack, cli: Any) -> None:
    from flm.core.paths import Paths
    from flm.proxy.instance import reload_proxies
    from flm.services.context import Context

    assert cli("engines", "pool", "create", "solo", "--member", "a").code == 0
    gw = pool_stack.gateway
    solo = {**_body(), "model": f"flm://pool:solo/{MODEL}"}

    async def ask() -> tuple[int, bytes]:
        async with aiohttp.ClientSession() as session:
            return await _post(session, pool_stack, solo)

    assert asyncio.run(ask())[0] == 404
    ctx = Context(Paths.resolve())
    try:
        inst = SimpleNamespace(runtime=gw.runtime, settings=gw.runtime.settings, last_error=None)
        gw.call(lambda: reload_proxies(ctx, [inst]))  # type: ignore[list-item]
    finally:
        ctx.close()
    status, raw = asyncio.run(ask())
    assert status == 200 and b"alpha" in raw
