"""Engines against the emulators: detection, statuses, cache, models, chat, streams, limits."""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flm.core.errors import EngineApiError, EngineError
from flm.core.models import EngineEndpoint, EngineKind
from flm.engines.kinds import make_adapter
from flm.http.client import Timeouts
from flm.testing.emulators import expected_reply, start_emulator
from tests.support import free_port

KINDS = ["ollama", "vllm", "lmstudio"]
MODEL = {"ollama": "llama3.2:1b", "vllm": "Qwen/Qwen2.5-0.5B", "lmstudio": "qwen2.5-0.5b"}


@pytest.fixture(params=KINDS)
def emulator(request: pytest.FixtureRequest) -> Iterator[Any]:
    kind = request.param
    with start_emulator(kind, models=[MODEL[kind], "nomic-embed-text"]) as emu:
        yield emu


def _register(cli: Any, emu: Any, engine_id: str = "e1") -> None:
    result = cli("engines", "add", "--kind", emu.kind, "--url", emu.url, "--id", engine_id)
    assert result.code == 0, result.out


def test_detect_models_chat_stream_embeddings(cli: Any, emulator: Any) -> None:
    _register(cli, emulator)
    detected = cli("engines", "detect", "--engine", "e1").data
    (state,) = detected["engines"]
    assert state["status"] == "RunningHealthy" and state["latency_ms"] > 0
    models = cli("models", "list", "--engine", "e1").data["models"]
    ids = {m["id"] for m in models}
    assert f"flm://e1/{MODEL[emulator.kind]}" in ids

    endpoint = EngineEndpoint("e1", EngineKind(emulator.kind), emulator.url, "registered")
    emulator.behaviour.chunk_interval_s = 0.15

    async def scenario() -> None:
        adapter = make_adapter(endpoint)
        try:
            body = {
                "model": MODEL[emulator.kind],
                "messages": [{"role": "user", "content": "count the birds"}],
            }
            reply = await adapter.chat(body)
            text = reply["choices"][0]["message"]["content"]
            assert text == expected_reply("count the birds")
            assert reply["usage"]["completion_tokens"] == len(text.split())
            assert reply["usage"]["prompt_tokens"] > 0

            arrivals: list[float] = []
            pieces: list[str] = []
            import json

            async for batch in adapter.chat_stream(body, "flm://e1/m"):
                arrivals.append(time.monotonic())
                for event in batch.split(b"\n\n"):
                    payload = event[6:].strip()
                    if not event or payload == b"[DONE]":
                        continue
                    chunk = json.loads(payload)
                    assert chunk["model"] == "flm://e1/m"
                    for choice in chunk.get("choices", []):
                        pieces.append(choice["delta"].get("content") or "")
            assert "".join(pieces) == expected_reply("count the birds")
            # chunks arrived spread over time, not all at the end
            assert arrivals[-1] - arrivals[0] >= 0.15 * 3
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            assert sum(1 for g in gaps if g > 0.1) >= 3

            emb = await adapter.embeddings(
                {"model": "nomic-embed-text", "input": ["one two", "three"]}
            )
            assert [d["index"] for d in emb["data"]] == [0, 1]
            assert len(emb["data"][0]["embedding"]) == 32
            assert emb["usage"]["prompt_tokens"] >= 3
        finally:
            await adapter.close()

    asyncio.run(scenario())


def _fake_binary(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    exe = folder / name
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return folder


def test_status_transitions(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with start_emulator("vllm", models=["m"]) as emu:
        _register(cli, emu, "v")
        cli("config", "set", "engine.health_latency_threshold_ms", "150")

        def status() -> dict[str, Any]:
            engines = cli("engines", "detect", "--engine", "v", "--fresh").data["engines"]
            return engines[0]  # type: ignore[no-any-return]

        assert status()["status"] == "RunningHealthy"
        emu.behaviour.delay_s = 0.3
        slow = status()
        assert slow["status"] == "RunningDegraded" and "slow" in slow["error"]
        emu.behaviour.delay_s = 0
        emu.behaviour.loading = True
        assert status()["status"] == "RunningDegraded"
        emu.behaviour.loading = False
        emu.behaviour.garbage = True
        assert status()["status"] == "ErrorApi"
        emu.behaviour.garbage = False
        url = emu.url
    # stopped: ErrorNetwork after the configured number of attempts ...
    dead = status()
    assert dead["status"] == "ErrorNetwork" and dead["base_url"] == url
    # ... and InstalledOnly when the engine's executable is found
    monkeypatch.setenv("PATH", f"{_fake_binary(tmp_path, 'vllm')}{os.pathsep}{os.environ['PATH']}")
    assert status()["status"] == "InstalledOnly"


def test_cache_avoids_network_and_fresh_bypasses(cli: Any) -> None:
    with start_emulator("ollama", models=["m"]) as emu:
        _register(cli, emu, "o")
        first = cli("engines", "detect", "--engine", "o")
        assert first.data["cached"] is False
        seen = len(emu.requests)
        second = cli("engines", "detect", "--engine", "o")
        assert second.data["cached"] is True and len(emu.requests) == seen
        assert second.data["engines"] == first.data["engines"]
        cli("engines", "detect", "--engine", "o", "--fresh")
        assert len(emu.requests) > seen


def test_detect_with_nothing_listening_is_fast(cli: Any) -> None:

    ports = [free_port() for _ in range(4)]
    for i, (kind, port) in enumerate(
        zip(["ollama", "vllm", "lmstudio", "llamacpp"], ports, strict=True)
    ):
        cli(
            "engines",
            "add",
            "--kind",
            kind,
            "--url",
            f"http://127.0.0.1:{port}",
            "--id",
            f"dead{i}",
        )
    started = time.monotonic()
    result = cli("engines", "detect", "--fresh")
    elapsed = time.monotonic() - started
    assert result.code == 0
    assert elapsed < 2.0, elapsed
    states = {e["id"]: e["status"] for e in result.data["engines"]}
    assert all(states[f"dead{i}"] in ("ErrorNetwork", "InstalledOnly") for i in range(4))


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--kind", "tgi", "--url", "http://127.0.0.1:1"], "INVALID_ARGUMENT"),
        (["--kind", "vllm", "--url", "ftp://x"], "INVALID_ARGUMENT"),
        (["--kind", "vllm", "--url", "http://exa mple:80"], "INVALID_ARGUMENT"),
        (["--kind", "vllm", "--url", "http://host:99999"], "INVALID_ARGUMENT"),
        (["--kind", "vllm", "--url", "http://h:1", "--id", "Bad Id"], "INVALID_ARGUMENT"),
    ],
)
def test_bad_engine_input(cli: Any, args: list[str], code: str) -> None:
    result = cli("engines", "add", *args)
    assert result.code == 1 and result.error["code"] == code


def test_duplicate_id_and_distinct_ids(cli: Any) -> None:
    assert (
        cli("engines", "add", "--kind", "vllm", "--url", "http://127.0.0.1:9", "--id", "gpu").code
        == 0
    )
    dup = cli("engines", "add", "--kind", "ollama", "--url", "http://127.0.0.1:8", "--id", "gpu")
    assert dup.code == 1 and dup.error["code"] == "ENGINE_ALREADY_REGISTERED"
    a = cli("engines", "add", "--kind", "ollama", "--url", "http://127.0.0.1:7").data["id"]
    b = cli("engines", "add", "--kind", "ollama", "--url", "http://127.0.0.1:6").data["id"]
    assert (a, b) == ("ollama", "ollama-2")
    assert cli("engines", "remove", "nope").error["code"] == "ENGINE_NOT_FOUND"


@pytest.mark.parametrize("kind", KINDS)
def test_huge_line_and_endless_stream_are_cut(kind: str) -> None:
    with start_emulator(kind, models=["m"]) as emu:
        endpoint = EngineEndpoint("x", EngineKind(kind), emu.url)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

        async def drain(timeouts: Timeouts | None = None) -> None:
            adapter = make_adapter(endpoint, timeouts)
            try:
                async for _ in adapter.chat_stream(body, "flm://x/m"):
                    pass
            finally:
                await adapter.close()

        emu.behaviour.huge_line_bytes = 10 * 1024 * 1024
        with pytest.raises(EngineApiError, match=r"longer than|larger than"):
            asyncio.run(drain())
        emu.behaviour.huge_line_bytes = None
        emu.behaviour.endless = True
        with pytest.raises(EngineError, match="exceeded"):
            asyncio.run(drain(Timeouts(max_stream_bytes=256 * 1024)))
        with pytest.raises(EngineError, match="exceeded"):
            asyncio.run(drain(Timeouts(max_stream_s=0.5)))


def test_flm_own_listener_is_never_taken_for_an_engine(cli: Any) -> None:
    from flm.testing.gateway import start_gateway

    with start_gateway() as gw:
        cli("engines", "add", "--kind", "llamacpp", "--url", gw.url, "--id", "looksalike")
        result = cli("engines", "detect", "--fresh").data
        assert "looksalike" in result["flm_listeners"]
        assert all(e["id"] != "looksalike" for e in result["engines"])
