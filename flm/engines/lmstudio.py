"""LM Studio: OpenAI-compatible endpoints plus ``/api/v0/models`` for type, state and context."""

from __future__ import annotations

from typing import Any

from flm.core.errors import EngineError
from flm.core.models import Capabilities, ModelInfo
from flm.engines.openai_compat import OpenAICompatAdapter, _int_or_none


class LmStudioAdapter(OpenAICompatAdapter):
    capabilities_default = Capabilities(
        tools=True, vision_inputs=True, max_image_bytes=4 * 1024 * 1024
    )

    async def list_models(self) -> list[ModelInfo]:
        try:
            data = await self.client.get_json("/api/v0/models", limit=8 * 1024 * 1024)
        except EngineError:
            return await super().list_models()
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            return await super().list_models()
        models = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                continue
            kind = item.get("type")
            details: dict[str, Any] = {
                k: item[k]
                for k in ("type", "state", "arch", "quantization", "publisher")
                if k in item
            }
            models.append(
                ModelInfo(
                    self.id,
                    item["id"],
                    context_length=_int_or_none(item.get("max_context_length")),
                    vision=kind == "vlm",
                    embeddings_only=kind == "embeddings",
                    details=details,
                )
            )
        return models
