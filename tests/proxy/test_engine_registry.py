"""The proxy's engine registry: what it remembers about models goes stale with them."""

from __future__ import annotations

import asyncio
import time

import pytest

from flm.core.models import EngineEndpoint, EngineKind, ModelInfo
from flm.http.client import Timeouts
from flm.openai.errors import HttpError
from flm.proxy.engines import MISS_REFRESH_S, EngineRegistry
from flm.testing.emulators import ModelSpec, start_emulator


def test_capabilities_follow_the_model_info_they_were_worked_out_for() -> None:
    endpoint = EngineEndpoint("lms", EngineKind.LMSTUDIO, "http://127.0.0.1:9")
    registry = EngineRegistry([endpoint], Timeouts())
    try:
        seeing = ModelInfo("lms", "m", details={"type": "vlm"})
        assert registry.capabilities("lms", seeing).vision_inputs
        assert registry.capabilities("lms", seeing).vision_inputs  # remembered: same answer
        # the model list was refreshed and the same name is now a text-only model
        blind = ModelInfo("lms", "m", details={"type": "llm"})
        assert not registry.capabilities("lms", blind).vision_inputs
        assert registry.capabilities("lms", seeing).vision_inputs
        # a new endpoint set (here: another kind of engine) forgets what was worked out
        registry.replace([EngineEndpoint("lms", EngineKind.VLLM, "http://127.0.0.1:9")])
        assert not registry.capabilities("lms", seeing).vision_inputs
        assert registry.capabilities("lms", None).multiple_choices
    finally:
        asyncio.run(registry.close())


def test_unknown_models_do_not_relist_the_engine_on_every_request() -> None:
    """Naming a model the engine lacks refreshes the model list at most once a second
    (MISS_REFRESH_S), concurrent misses included; a model that appears later is found."""
    with start_emulator("ollama", models=["m:1"]) as emu:

        def listings() -> int:
            return sum(1 for _m, path in emu.requests if path == "/api/tags")

        async def run() -> None:
            endpoint = EngineEndpoint("oll", EngineKind.OLLAMA, emu.url, "registered")
            registry = EngineRegistry([endpoint], Timeouts())
            try:
                await registry.resolve("oll", "m:1")
                before, started = listings(), time.monotonic()
                for _ in range(20):
                    with pytest.raises(HttpError) as err:
                        await registry.resolve("oll", "nope:1")
                    assert err.value.status == 404
                misses = await asyncio.gather(
                    *(registry.resolve("oll", "nope:2") for _ in range(20)), return_exceptions=True
                )
                assert all(isinstance(e, HttpError) and e.status == 404 for e in misses)
                elapsed = time.monotonic() - started
                assert listings() - before <= 1 + elapsed / MISS_REFRESH_S  # not 40

                emu.models["new:1"] = ModelSpec("new:1")
                deadline = time.monotonic() + 10 * MISS_REFRESH_S
                while True:
                    try:
                        _adapter, info = await registry.resolve("oll", "new:1")
                        break
                    except HttpError:
                        assert time.monotonic() < deadline, "the new model was never found"
                        await asyncio.sleep(0.05)
                assert info.name == "new:1"
            finally:
                await registry.close()

        asyncio.run(run())
