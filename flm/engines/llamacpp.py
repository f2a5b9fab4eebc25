"""llama.cpp's ``llama-server``: ``/health`` (503 while loading) and ``/props``."""

from __future__ import annotations

import time

from flm.core.errors import EngineApiError, EngineError
from flm.core.models import Capabilities, ModelInfo
from flm.engines.base import Health, require_dict
from flm.engines.openai_compat import OpenAICompatAdapter, _int_or_none


class LlamaCppAdapter(OpenAICompatAdapter):
    capabilities_default = Capabilities(tools=True)

    async def health_check(self, timeout_s: float) -> Health:
        # While the model loads, /health answers 503; detection reports that as degraded.
        started = time.perf_counter()
        data = await self.client.get_json("/health", first_byte_s=timeout_s, limit=65536)
        latency = (time.perf_counter() - started) * 1000
        status_value = require_dict(data, "GET /health", "status")["status"]
        if status_value not in ("ok", "no slot available"):
            raise EngineApiError(f"GET /health: unexpected status {status_value!r}")
        return Health(latency, degraded_reason=None if status_value == "ok" else status_value)

    async def list_models(self) -> list[ModelInfo]:
        models = await super().list_models()
        context: int | None = None
        vision = False
        try:
            props = await self.client.get_json("/props", limit=4 * 1024 * 1024)
            if isinstance(props, dict):
                settings = props.get("default_generation_settings") or {}
                context = _int_or_none(
                    settings.get("n_ctx") if isinstance(settings, dict) else None
                ) or _int_or_none(props.get("n_ctx"))
                modalities = props.get("modalities") or {}
                vision = bool(isinstance(modalities, dict) and modalities.get("vision"))
        except EngineError:
            pass  # /props is optional information
        return [
            ModelInfo(
                m.engine_id,
                m.name,
                context_length=m.context_length or context,
                vision=vision,
                details=m.details,
            )
            for m in models
        ]

    def capabilities(self) -> Capabilities:
        return self.capabilities_default
