"""The proxy's engine registry: what it remembers about models goes stale with them."""

from __future__ import annotations

import asyncio

from flm.core.models import EngineEndpoint, EngineKind, ModelInfo
from flm.engines.http import Timeouts
from flm.proxy.engines import EngineRegistry


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
