"""vLLM emulator: the OpenAI-compatible server of ``vllm serve``.

Follows vLLM's own server code and docs: ``vllm/entrypoints/openai/api_server.py`` (routes
``/health``, ``/version``, ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``), ``vllm/entrypoints/openai/engine/protocol.py`` (``ModelCard`` with
``root``/``parent``/``max_model_len``/``permission``, ``ErrorResponse`` =
``{"error": {"message", "type", "param", "code"}}`` with the HTTP status as ``code``) and
``vllm/entrypoints/openai/models/serving.py`` (404 ``NotFoundError`` "The model `x` does not
exist."), plus the OpenAI chat-completions reference for SSE framing. Written from those
descriptions; no vLLM code is reused.

Engine-specific behaviour:

- ``/health`` answers 200 with an empty body; ``/version`` answers ``{"version": ...}``.
- ``n`` > 1 is honoured (choice ``i`` > 0 gets ``" [i]"`` appended to the reply).
- The ``model`` field is optional (the first served model is used), as in vLLM.
- Unknown routes get FastAPI's 404 ``{"detail": "Not Found"}``.
- ``loading``: every route answers 503 (``/health`` with an empty body, the rest with vLLM's
  error body, type ``ServiceUnavailableError``) - the "engine not ready" answer. (A real vLLM
  does not listen at all until its model is loaded; 503 is what it and llama.cpp-style servers
  answer when the engine is up but unable to serve.)
- ``status_override``: vLLM's error body with ``code`` = the status and ``type`` derived from the
  status phrase (``NotFoundError``, ``ServiceUnavailableError``...); ``/health`` included.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import ClassVar

from aiohttp import web

from flm.testing.emulators.openai_dialect import OpenAIDialect
from flm.testing.emulators.server import EmulatorServer
from flm.testing.emulators.settings import ModelSpec
from flm.testing.emulators.wire import JSONDict, json_response, new_id, unix_now

VLLM_VERSION = "0.10.1"


def vllm_error_type(status: int) -> str:
    """vLLM names error types after the status phrase: 404 -> ``NotFoundError``."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "InternalServerError"
    name = "".join(word.capitalize() for word in phrase.replace("-", " ").split())
    return name if name.endswith("Error") else name + "Error"


class VllmDialect(OpenAIDialect):
    supports_n = True
    model_optional = True
    stream_content_type = "text/event-stream; charset=utf-8"
    owned_by = "vllm"

    def error(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> web.Response:
        return json_response(
            {
                "error": {
                    "message": message,
                    "type": vllm_error_type(status),
                    "param": param,
                    "code": status,
                }
            },
            status=status,
        )

    def model_not_found(self, name: str) -> web.Response:
        return self.error(404, f"The model `{name}` does not exist.", param="model")

    def chat_not_supported(self, spec: ModelSpec) -> web.Response:
        return self.error(400, "The model does not support Chat Completions API")

    def embeddings_not_supported(self, spec: ModelSpec) -> web.Response | None:
        if spec.embeddings:
            return None
        return self.error(400, "The model does not support Embeddings API")

    def model_card(self, spec: ModelSpec) -> JSONDict:
        created = unix_now()
        return {
            "id": spec.name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": spec.name,
            "parent": None,
            "max_model_len": spec.context_length,
            "permission": [
                {
                    "id": new_id("modelperm-", 32),
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }

    def choice_extras(self) -> JSONDict:
        return {"stop_reason": None}

    def message_extras(self) -> JSONDict:
        return {"reasoning_content": None, "tool_calls": []}

    def response_extras(
        self,
        request: web.Request,
        spec: ModelSpec,
        prompt_tokens: int,
        completion_tokens: int,
        finish: str,
    ) -> JSONDict:
        return {"prompt_logprobs": None, "kv_transfer_params": None}

    def usage(self, prompt_tokens: int, completion_tokens: int) -> JSONDict:
        return {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
        }

    def embedding_extras(self) -> JSONDict:
        return {"id": new_id("embd-", 32), "created": unix_now()}


class VllmEmulator(EmulatorServer):
    kind: ClassVar[str] = "vllm"
    default_models: ClassVar[tuple[str, ...]] = ("Qwen/Qwen2.5-0.5B-Instruct",)
    dialect_class: ClassVar[type[OpenAIDialect]] = VllmDialect

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/health", self.health)
        router.add_get("/version", self.version)
        router.add_get("/v1/models", self.openai.list_models)
        router.add_post("/v1/chat/completions", self.openai.chat)
        router.add_post("/v1/completions", self.openai.completions)
        router.add_post("/v1/embeddings", self.openai.embeddings)

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.StreamResponse:
        return json_response({"version": VLLM_VERSION})

    def error_response(self, request: web.Request, status: int, message: str) -> web.Response:
        return self.openai.error(status, message)

    async def unknown_route(self, request: web.Request) -> web.StreamResponse:
        return json_response({"detail": "Not Found"}, status=404)

    async def loading_gate(self, request: web.Request) -> web.StreamResponse | None:
        if request.path == "/health":
            return web.Response(status=503)
        return self.openai.error(503, "The model is still loading; retry later.")
