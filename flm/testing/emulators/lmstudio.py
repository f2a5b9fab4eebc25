"""LM Studio emulator: its OpenAI-compatible endpoints plus the ``/api/v0`` REST API.

Follows LM Studio's developer docs (github.com/lmstudio-ai/docs, ``1_developer/2_rest/
endpoints.md`` "REST API v0": ``GET /api/v0/models`` with ``type`` llm/vlm/embeddings,
``state`` loaded/not-loaded, ``max_context_length``, ``arch``, ``quantization``,
``compatibility_type``, ``publisher``; ``GET /api/v0/models/{model}``; ``POST
/api/v0/chat/completions|completions|embeddings`` with ``stats``/``model_info``/``runtime``; and
``1_developer/3_openai-compat/*``: ``/v1/models``, ``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``), and the error bodies LM Studio users report in
lmstudio-ai/lmstudio-bug-tracker issues (404 ``{"error": {"message": "Model \\"x\\" not found.
Please specify a valid model. ...", "type": "invalid_request_error", "param": "model", "code":
"model_not_found"}}``; 200 ``{"error": "Unexpected endpoint or method. (GET /)"}`` for unknown
routes). Written from those descriptions; no LM Studio code exists or is reused.

Engine-specific behaviour:

- ``n`` is ignored (always one choice); ``model`` may be omitted (first model is used).
- Chunks and replies carry ``system_fingerprint`` = the model id; ``/v1`` replies carry an empty
  ``stats`` object, ``/api/v0`` replies full ``stats``, ``model_info`` and ``runtime``.
- ``loading``: LM Studio loads models just in time, so inference requests are held until
  ``behaviour.loading`` is cleared (then answered normally); ``/api/v0/models`` reports every
  model as ``not-loaded`` meanwhile; ``/v1/models`` is unaffected.
- ``status_override``: the OpenAI-style error object (``invalid_request_error`` below 500,
  ``server_error`` from 500).
"""

from __future__ import annotations

from typing import ClassVar

from aiohttp import web

from flm.testing.emulators.openai_dialect import OpenAIDialect
from flm.testing.emulators.request_state import request_behaviour
from flm.testing.emulators.server import EmulatorServer
from flm.testing.emulators.settings import ModelSpec
from flm.testing.emulators.wire import JSONDict, json_response

LMSTUDIO_RUNTIME = {
    "name": "llama.cpp-linux-x86_64-avx2",
    "version": "1.50.2",
    "supported_formats": ["gguf"],
}
_INFERENCE_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/api/v0/chat/completions",
        "/api/v0/completions",
        "/api/v0/embeddings",
    }
)


def lmstudio_type(spec: ModelSpec) -> str:
    if spec.embeddings:
        return "embeddings"
    return "vlm" if spec.vision else "llm"


class LmStudioDialect(OpenAIDialect):
    supports_n = False
    model_optional = True
    stream_content_type = "text/event-stream"
    owned_by = "organization_owner"
    #: LM Studio's structured output takes a JSON schema; it has no plain JSON mode.
    response_formats = frozenset({"text", "json_schema"})

    def model_not_found(self, name: str) -> web.Response:
        listing = "\n".join(self.server.models)
        message = (
            f'Model "{name}" not found. Please specify a valid model.\n\nYour models:\n\n{listing}'
        )
        return self.error(404, message, param="model", code="model_not_found")

    def chat_not_supported(self, spec: ModelSpec) -> web.Response:
        return self.error(
            400,
            f'Model "{spec.name}" is an embedding model and cannot be used '
            "for chat or text completions.",
            param="model",
        )

    def embeddings_not_supported(self, spec: ModelSpec) -> web.Response | None:
        if spec.embeddings:
            return None
        return self.error(400, f'Model "{spec.name}" is not an embedding model.', param="model")

    def model_card(self, spec: ModelSpec) -> JSONDict:
        return {"id": spec.name, "object": "model", "owned_by": self.owned_by}

    def chunk_extras(self, spec: ModelSpec) -> JSONDict:
        return {"system_fingerprint": spec.name}

    def response_extras(
        self,
        request: web.Request,
        spec: ModelSpec,
        prompt_tokens: int,
        completion_tokens: int,
        finish: str,
    ) -> JSONDict:
        if not request.path.startswith("/api/v0/"):
            return {"stats": {}}
        return {
            "stats": {
                "tokens_per_second": 50.0,
                "time_to_first_token": 0.05,
                "generation_time": round(completion_tokens / 50.0, 3),
                "stop_reason": "eosFound" if finish == "stop" else "maxPredictedTokensReached",
            },
            "model_info": {
                "arch": spec.arch,
                "quant": spec.quantization,
                "format": "gguf",
                "context_length": spec.context_length,
            },
            "runtime": LMSTUDIO_RUNTIME,
        }


class LmStudioEmulator(EmulatorServer):
    kind: ClassVar[str] = "lmstudio"
    default_models: ClassVar[tuple[str, ...]] = ("qwen2.5-0.5b-instruct",)
    dialect_class: ClassVar[type[OpenAIDialect]] = LmStudioDialect

    def add_routes(self, router: web.UrlDispatcher) -> None:
        for prefix in ("/v1", "/api/v0"):
            router.add_post(f"{prefix}/chat/completions", self.openai.chat)
            router.add_post(f"{prefix}/completions", self.openai.completions)
            router.add_post(f"{prefix}/embeddings", self.openai.embeddings)
        router.add_get("/v1/models", self.openai.list_models)
        router.add_get("/api/v0/models", self.v0_models)
        router.add_get("/api/v0/models/{model_id:.+}", self.v0_model)

    def v0_entry(self, spec: ModelSpec) -> JSONDict:
        publisher, _, _ = spec.name.rpartition("/")
        loaded = spec.loaded and not request_behaviour().loading
        return {
            "id": spec.name,
            "object": "model",
            "type": lmstudio_type(spec),
            "publisher": publisher or "lmstudio-community",
            "arch": spec.arch,
            "compatibility_type": "gguf",
            "quantization": spec.quantization,
            "state": "loaded" if loaded else "not-loaded",
            "max_context_length": spec.context_length,
        }

    async def v0_models(self, request: web.Request) -> web.StreamResponse:
        return json_response(
            {"object": "list", "data": [self.v0_entry(s) for s in self.models.values()]}
        )

    async def v0_model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model_id"]
        spec = self.find_model(name)
        if spec is None:
            return self.openai.model_not_found(name)
        return json_response(self.v0_entry(spec))

    def error_response(self, request: web.Request, status: int, message: str) -> web.Response:
        return self.openai.error(status, message)

    async def unknown_route(self, request: web.Request) -> web.StreamResponse:
        return json_response(
            {"error": f"Unexpected endpoint or method. ({request.method} {request.path})"}
        )

    async def loading_gate(self, request: web.Request) -> web.StreamResponse | None:
        if request.path in _INFERENCE_PATHS:
            await self.wait_while_loading()
        return None
