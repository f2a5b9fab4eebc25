"""A sixth engine kind in one file: a server shaped like Hugging Face's Text Generation
Inference router (OpenAI-compatible chat and ``/v1/models``, plus ``/health``, ``/info`` and
the native ``/generate`` routes), with its adapter, its descriptor and a small emulator built
on :mod:`flm.testing.emulators`.

Importing this module registers the kind; nothing else in FLM names it. The descriptor's
pass-through lists the routes it forwards (``/info``, ``/generate``...): its ``/metrics`` and
anything else stay unreachable through the gateway, because the list fails closed.
"""

from __future__ import annotations

import re
from typing import ClassVar

from aiohttp import web

from flm.core.errors import EngineError
from flm.core.models import Capabilities, EngineKind
from flm.engines import kinds
from flm.engines.base import Health
from flm.engines.openai_compat import OpenAICompatAdapter
from flm.testing.emulators import EmulatorServer, JSONDict, json_response

TGI = EngineKind("tgi")
VERSION = "3.3.4"


class TgiAdapter(OpenAICompatAdapter):
    """``/v1/models`` proves the API; ``/info`` gives the version."""

    capabilities_default = Capabilities(tools=True)

    async def health_check(self, timeout_s: float) -> Health:
        health = await super().health_check(timeout_s)
        version = None
        try:
            data, _ = await self._timed("/info", timeout_s)
            if isinstance(data, dict) and isinstance(data.get("version"), str):
                version = data["version"]
        except EngineError:
            pass
        return Health(health.latency_ms, version)


DESCRIPTOR = kinds.register(
    kinds.KindDescriptor(
        name=TGI,
        label="Text Generation Inference",
        adapter=TgiAdapter,
        default_port=3000,
        host_env="TGI_HOST",
        port_env="TGI_PORT",
        binaries=("text-generation-launcher",),
        passthrough=kinds.PassThrough(re.compile(r"^/(info|health|generate|generate_stream)$")),
    )
)


class TgiEmulator(EmulatorServer):
    kind: ClassVar[str] = "tgi"
    default_models: ClassVar[tuple[str, ...]] = ("HuggingFaceTB/SmolLM2-135M-Instruct",)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/health", self.health)
        router.add_get("/info", self.info)
        router.add_get("/metrics", self.metrics)
        router.add_get("/v1/models", self.openai.list_models)
        router.add_post("/v1/chat/completions", self.openai.chat)

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    async def info(self, request: web.Request) -> web.StreamResponse:
        body: JSONDict = {
            "model_id": next(iter(self.models)),
            "version": VERSION,
            "max_input_tokens": 4095,
            "max_total_tokens": 4096,
        }
        return json_response(body)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="tgi_request_count 1\n", content_type="text/plain")

    def error_response(self, request: web.Request, status: int, message: str) -> web.Response:
        return json_response({"error": message, "error_type": "generation"}, status=status)

    async def unknown_route(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=404)
