"""vLLM's OpenAI-compatible server: ``/health``, ``/version``, ``n > 1`` supported."""

from __future__ import annotations

from flm.core.errors import EngineError
from flm.core.models import Capabilities
from flm.engines.base import Health
from flm.engines.openai_compat import OpenAICompatAdapter


class VllmAdapter(OpenAICompatAdapter):
    capabilities_default = Capabilities(multiple_choices=True, tools=True)

    async def health_check(self, timeout_s: float) -> Health:
        health = await super().health_check(timeout_s)
        version = None
        try:
            data, _ = await self._timed("/version", timeout_s)
            if isinstance(data, dict) and isinstance(data.get("version"), str):
                version = data["version"]
        except EngineError:
            pass  # older servers have no /version; /v1/models already proved the API works
        return Health(health.latency_ms, version)
