"""Ollama emulator: the native ``/api/*`` API plus Ollama's OpenAI-compatible ``/v1`` routes.

Follows Ollama's API documentation: ``docs/api.md`` in github.com/ollama/ollama (``/api/chat``
and ``/api/generate`` streaming NDJSON by default with ``done``, ``done_reason``,
``total_duration``, ``load_duration``, ``prompt_eval_count``, ``prompt_eval_duration``,
``eval_count``, ``eval_duration`` in nanoseconds; base64 ``images`` in messages; empty
``messages`` loads the model (``done_reason: "load"``); ``/api/tags``, ``/api/show``,
``/api/ps``, ``/api/embed``, legacy ``/api/embeddings`` and the model-management routes), the
newer reference at docs.ollama.com (``/api/version``; ``capabilities`` in ``/api/show``;
``api/errors``: errors are ``{"error": "..."}``, 404 for a missing model, a mid-stream error is
one more NDJSON line), and ``docs.ollama.com/api/openai-compatibility`` for ``/v1``. Written
from those descriptions; no Ollama code is reused.

Engine-specific behaviour:

- Model names get ``:latest`` when they have no tag, and a request for ``name`` finds
  ``name:latest``, as in Ollama. Replies echo the model name as requested.
- ``GET /`` answers ``Ollama is running``; unknown routes get Go's ``404 page not found``.
- Admin routes (``/api/pull``, ``/api/push``, ``/api/create``, ``/api/delete``, ``/api/copy``,
  ``/api/blobs/:digest``) answer like Ollama but change nothing; they are recorded in
  ``requests`` like everything else, so tests can prove FLM never reaches them.
- ``loading``: Ollama has no "loading" status - a request for a model that is not in memory
  simply waits while the model loads. So inference requests (``/api/chat``, ``/api/generate``,
  ``/api/embed``, ``/api/embeddings`` and the ``/v1`` inference routes) are held until
  ``behaviour.loading`` is cleared, and their ``load_duration`` includes the wait; ``/api/ps``
  lists no model meanwhile; every other route answers normally.
- ``status_override``: ``{"error": "<status phrase>"}`` (the ``/v1`` routes use Ollama's
  OpenAI-style error object instead).
- Embeddings work with every model (Ollama computes them from any model); chat with an
  embedding-only model is a 400 ``"<model>" does not support chat``.
- ``n`` is ignored on ``/v1/chat/completions`` (one choice), as in Ollama.
"""

from __future__ import annotations

import binascii
import dataclasses
from base64 import b64decode
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from aiohttp import web

from flm.testing.emulators.openai_dialect import OpenAIDialect
from flm.testing.emulators.replies import (
    Prompt,
    digest_of,
    embedding_for,
    limit_words,
    reply_for,
    split_text,
    structured_reply,
    tool_call_for,
    word_count,
)
from flm.testing.emulators.request_state import request_behaviour, request_load_wait_ns
from flm.testing.emulators.server import EmulatorServer
from flm.testing.emulators.settings import ModelSpec
from flm.testing.emulators.wire import JSONDict, dumps, iso_now, json_response, read_json_object

OLLAMA_VERSION = "0.12.6"
NDJSON = "application/x-ndjson"
JSON_UTF8 = "application/json; charset=utf-8"
MODIFIED_AT = "2025-01-15T10:30:00.123456789Z"
_INFERENCE_PATHS = frozenset(
    {
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    }
)


def ollama_error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status, content_type=JSON_UTF8)


def ndjson(obj: object) -> bytes:
    return (dumps(obj) + "\n").encode()


class OllamaDialect(OpenAIDialect):
    """Ollama's OpenAI-compatible layer (``/v1/...``)."""

    supports_n = False
    model_optional = False
    stream_content_type = "text/event-stream"
    owned_by = "library"

    def error(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> web.Response:
        kind = "invalid_request_error" if status == 400 else "api_error"
        return json_response(
            {"error": {"message": message, "type": kind, "param": None, "code": None}},
            status=status,
        )

    def model_not_found(self, name: str) -> web.Response:
        return self.error(404, f'model "{name}" not found, try pulling it first')

    def chat_not_supported(self, spec: ModelSpec) -> web.Response:
        return self.error(400, f'"{spec.name}" does not support chat')

    def embeddings_not_supported(self, spec: ModelSpec) -> web.Response | None:
        return None

    def chunk_extras(self, spec: ModelSpec) -> JSONDict:
        return {"system_fingerprint": "fp_ollama"}


class OllamaEmulator(EmulatorServer):
    kind: ClassVar[str] = "ollama"
    default_models: ClassVar[tuple[str, ...]] = ("llama3.2:1b",)
    dialect_class: ClassVar[type[OpenAIDialect]] = OllamaDialect

    def normalise(self, spec: ModelSpec) -> ModelSpec:
        if ":" in spec.name.rpartition("/")[2]:
            return spec
        return dataclasses.replace(spec, name=f"{spec.name}:latest")

    def find_model(self, name: object) -> ModelSpec | None:
        if not isinstance(name, str) or not name:
            return None
        spec = self.models.get(name)
        if spec is None and ":" not in name.rpartition("/")[2]:
            spec = self.models.get(f"{name}:latest")
        return spec

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self.root)
        router.add_get("/api/version", self.version)
        router.add_get("/api/tags", self.tags)
        router.add_get("/api/ps", self.ps)
        router.add_post("/api/show", self.show)
        router.add_post("/api/chat", self.chat)
        router.add_post("/api/generate", self.generate)
        router.add_post("/api/embed", self.embed)
        router.add_post("/api/embeddings", self.embeddings_legacy)
        router.add_post("/api/pull", self.pull_or_push)
        router.add_post("/api/push", self.pull_or_push)
        router.add_post("/api/create", self.create)
        router.add_delete("/api/delete", self.delete)
        router.add_post("/api/copy", self.copy)
        router.add_route("HEAD", "/api/blobs/{digest}", self.blob_exists)
        router.add_post("/api/blobs/{digest}", self.blob_create)
        router.add_get("/v1/models", self.openai.list_models)
        router.add_post("/v1/chat/completions", self.openai.chat)
        router.add_post("/v1/completions", self.openai.completions)
        router.add_post("/v1/embeddings", self.openai.embeddings)

    # -- engine hooks

    def error_response(self, request: web.Request, status: int, message: str) -> web.Response:
        if request.path.startswith("/v1/"):
            return self.openai.error(status, message)
        return ollama_error(status, message)

    async def unknown_route(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            text="404 page not found", status=404, content_type="text/plain", charset="utf-8"
        )

    async def loading_gate(self, request: web.Request) -> web.StreamResponse | None:
        if request.path in _INFERENCE_PATHS:
            await self.wait_while_loading()
        return None

    # -- descriptions of models

    def details(self, spec: ModelSpec) -> JSONDict:
        families = [spec.arch, "clip"] if spec.vision else [spec.arch]
        return {
            "parent_model": "",
            "format": "gguf",
            "family": spec.arch,
            "families": families,
            "parameter_size": spec.parameter_size,
            "quantization_level": spec.quantization,
        }

    @staticmethod
    def size_of(spec: ModelSpec) -> int:
        return 400_000_000 + int(digest_of(spec.name)[:6], 16) * 100

    def tag_entry(self, spec: ModelSpec) -> JSONDict:
        return {
            "name": spec.name,
            "model": spec.name,
            "modified_at": MODIFIED_AT,
            "size": self.size_of(spec),
            "digest": digest_of(spec.name),
            "details": self.details(spec),
        }

    @staticmethod
    def capabilities(spec: ModelSpec) -> list[str]:
        if spec.embeddings:
            return ["embedding"]
        return ["completion", "vision"] if spec.vision else ["completion"]

    # -- informational routes

    async def root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ollama is running", content_type="text/plain", charset="utf-8")

    async def version(self, request: web.Request) -> web.StreamResponse:
        return json_response({"version": OLLAMA_VERSION}, content_type=JSON_UTF8)

    async def tags(self, request: web.Request) -> web.StreamResponse:
        return json_response(
            {"models": [self.tag_entry(s) for s in self.models.values()]}, content_type=JSON_UTF8
        )

    async def ps(self, request: web.Request) -> web.StreamResponse:
        running = []
        if not request_behaviour().loading:
            expires = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
            for spec in self.models.values():
                if spec.loaded:
                    entry = self.tag_entry(spec)
                    del entry["modified_at"]
                    entry.update(
                        expires_at=expires,
                        size_vram=entry["size"],
                        context_length=spec.context_length,
                    )
                    running.append(entry)
        return json_response({"models": running}, content_type=JSON_UTF8)

    async def show(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        if body is None:
            return ollama_error(400, "invalid request body")
        name = body.get("model") or body.get("name")
        if not name:
            return ollama_error(400, "model is required")
        spec = self.find_model(name)
        if spec is None:
            return ollama_error(404, f"model '{name}' not found")
        arch = spec.arch
        info: JSONDict = {
            "general.architecture": arch,
            "general.file_type": 15,
            "general.parameter_count": 1_235_814_432,
            "general.quantization_version": 2,
            f"{arch}.context_length": spec.context_length,
            f"{arch}.embedding_length": spec.embedding_dim if spec.embeddings else 2048,
            f"{arch}.block_count": 16,
        }
        reply: JSONDict = {
            "license": "",
            "modelfile": f'# Modelfile generated by "ollama show"\nFROM {spec.name}\n',
            "parameters": f"num_ctx                        {spec.context_length}",
            "template": "{{ .System }}\n{{ .Prompt }}",
            "details": self.details(spec),
            "model_info": info,
            "capabilities": self.capabilities(spec),
            "modified_at": MODIFIED_AT,
        }
        if spec.vision:
            reply["projector_info"] = {
                "clip.has_vision_encoder": True,
                "clip.vision.image_size": 336,
            }
        return json_response(reply, content_type=JSON_UTF8)

    # -- inference

    async def _resolve(self, body: JSONDict | None) -> ModelSpec | web.Response:
        if body is None:
            return ollama_error(400, "invalid request body")
        name = body.get("model")
        if not name:
            return ollama_error(400, "model is required")
        spec = self.find_model(name)
        if spec is None:
            return ollama_error(404, f'model "{name}" not found, try pulling it first')
        return spec

    @staticmethod
    def _images(value: object) -> int | web.Response:
        if value is None:
            return 0
        if not isinstance(value, list):
            return ollama_error(400, "images must be an array of base64 strings")
        for image in value:
            try:
                if not isinstance(image, str):
                    raise ValueError
                b64decode(image, validate=True)
            except (ValueError, binascii.Error):
                return ollama_error(400, "illegal base64 data in images")
        return len(value)

    @staticmethod
    def stats(prompt_tokens: int, eval_count: int) -> JSONDict:
        """Deterministic timings: 1 ms load (+ any loading wait), 1 ms per prompt token,
        10 ms per generated token."""
        load = 1_000_000 + request_load_wait_ns()
        prompt_eval = prompt_tokens * 1_000_000
        evaluation = eval_count * 10_000_000
        return {
            "total_duration": load + prompt_eval + evaluation + 500_000,
            "load_duration": load,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": prompt_eval,
            "eval_count": eval_count,
            "eval_duration": evaluation,
        }

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        resolved = await self._resolve(body)
        if isinstance(resolved, web.Response):
            return resolved
        assert body is not None
        spec, name = resolved, str(body["model"])
        if spec.embeddings:
            return ollama_error(400, f'"{name}" does not support chat')
        messages = body.get("messages")
        if messages is None:
            messages = []
        if not isinstance(messages, list):
            return ollama_error(400, "messages must be an array")
        if not messages:
            reason = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
            return json_response(
                {
                    "model": name,
                    "created_at": iso_now(),
                    "message": {"role": "assistant", "content": ""},
                    "done_reason": reason,
                    "done": True,
                },
                content_type=JSON_UTF8,
            )
        prompt = Prompt()
        for message in messages:
            if not isinstance(message, dict):
                return ollama_error(400, "each message must be an object")
            content = message.get("content")
            text = content if isinstance(content, str) else ""
            images = self._images(message.get("images"))
            if isinstance(images, web.Response):
                return images
            prompt.texts.append(text)
            prompt.images += images
            if message.get("role") == "user":
                prompt.last_user = text
        # Ollama has no tool_choice: the model calls a tool when it decides to
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        call = tool_call_for(body.get("tools"), None, prompt.last_user, last.get("role"))
        if call is not None:
            return await self._tool_call(request, body, name, call, prompt.tokens)
        fmt = body.get("format")
        if fmt == "json":
            fmt = {"type": "json_object"}
        elif isinstance(fmt, dict):
            fmt = {"type": "json_schema", "json_schema": {"schema": fmt}}
        elif fmt is not None:
            return ollama_error(400, "invalid format")
        if fmt is not None:
            structured = structured_reply(fmt, reply_for(request_behaviour(), prompt))
            return await self._answer(
                request,
                body,
                name,
                prompt,
                lambda piece: {"message": {"role": "assistant", "content": piece}},
                text=structured,
            )
        return await self._answer(
            request,
            body,
            name,
            prompt,
            lambda piece: {"message": {"role": "assistant", "content": piece}},
        )

    async def _tool_call(
        self,
        request: web.Request,
        body: JSONDict,
        name: str,
        call: tuple[str, Any],
        prompt_tokens: int,
    ) -> web.StreamResponse:
        """A tool call as Ollama sends it: arguments as an object, on a message of its own
        (streamed: one line with the call, then the final ``done`` line)."""
        function, args = call
        message = {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": function, "arguments": args}}],
        }
        stats = self.stats(prompt_tokens, word_count(dumps(args)))
        final = {"model": name, "created_at": iso_now(), "done_reason": "stop", "done": True}
        if body.get("stream", True) is False:
            await self.before_plain_reply(request)
            return json_response({**final, "message": message, **stats}, content_type=JSON_UTF8)
        line = ndjson({"model": name, "created_at": iso_now(), "message": message, "done": False})
        return await self.stream(
            request,
            content_type=NDJSON,
            preamble=b"",
            steps=1,
            frame=lambda _step: line,
            huge_frame=lambda content: ndjson(
                {
                    "model": name,
                    "created_at": iso_now(),
                    "message": {"role": "assistant", "content": content},
                    "done": False,
                }
            ),
            epilogue=lambda: ndjson(
                {**final, "message": {"role": "assistant", "content": ""}, **stats}
            ),
        )

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        resolved = await self._resolve(body)
        if isinstance(resolved, web.Response):
            return resolved
        assert body is not None
        spec, name = resolved, str(body["model"])
        if spec.embeddings:
            return ollama_error(400, f'"{name}" does not support generate')
        text = body.get("prompt") or ""
        if not isinstance(text, str):
            return ollama_error(400, "prompt must be a string")
        if not text:
            reason = "unload" if body.get("keep_alive") in (0, "0", "0s") else "load"
            return json_response(
                {
                    "model": name,
                    "created_at": iso_now(),
                    "response": "",
                    "done": True,
                    "done_reason": reason,
                },
                content_type=JSON_UTF8,
            )
        images = self._images(body.get("images"))
        if isinstance(images, web.Response):
            return images
        system = body.get("system")
        texts = [system, text] if isinstance(system, str) and system else [text]
        prompt = Prompt(texts=texts, last_user=text, images=images)
        return await self._answer(
            request,
            body,
            name,
            prompt,
            lambda piece: {"response": piece},
            final_extra={"context": [1, 2, 3]},
        )

    async def _answer(
        self,
        request: web.Request,
        body: JSONDict,
        name: str,
        prompt: Prompt,
        payload: Callable[[str], JSONDict],
        final_extra: JSONDict | None = None,
        text: str | None = None,
    ) -> web.StreamResponse:
        behaviour = request_behaviour()
        options = body.get("options")
        limit = options.get("num_predict") if isinstance(options, dict) else None
        stream = body.get("stream", True) is not False
        text = reply_for(behaviour, prompt) if text is None else text
        if behaviour.huge_line_bytes and not stream:
            text = "x" * behaviour.huge_line_bytes
        text, reason = limit_words(text, limit)
        eval_count = word_count(text)

        def final(content: str) -> JSONDict:
            return {
                "model": name,
                "created_at": iso_now(),
                **payload(content),
                "done_reason": reason,
                "done": True,
                **(final_extra or {}),
                **self.stats(prompt.tokens, eval_count),
            }

        if not stream:
            await self.before_plain_reply(request)
            return json_response(final(text), content_type=JSON_UTF8)
        pieces = split_text(text, behaviour.stream_chunks)

        def frame_for(content: str) -> bytes:
            return ndjson(
                {"model": name, "created_at": iso_now(), **payload(content), "done": False}
            )

        return await self.stream(
            request,
            content_type=NDJSON,
            preamble=b"",
            steps=len(pieces),
            frame=lambda step: frame_for(pieces[step % len(pieces)]),
            huge_frame=frame_for,
            epilogue=lambda: ndjson(final("")),
        )

    async def embed(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        resolved = await self._resolve(body)
        if isinstance(resolved, web.Response):
            return resolved
        assert body is not None
        spec, name = resolved, str(body["model"])
        raw = body.get("input")
        if raw is None:
            inputs: list[str] = []
        elif isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            inputs = list(raw)
        else:
            return ollama_error(400, "invalid input type")
        tokens = sum(word_count(x) for x in inputs)
        await self.before_plain_reply(request)
        load = 1_000_000 + request_load_wait_ns()
        return json_response(
            {
                "model": name,
                "embeddings": [embedding_for(x, spec.embedding_dim) for x in inputs],
                "total_duration": load + tokens * 1_000_000 + 500_000,
                "load_duration": load,
                "prompt_eval_count": tokens,
            },
            content_type=JSON_UTF8,
        )

    async def embeddings_legacy(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        resolved = await self._resolve(body)
        if isinstance(resolved, web.Response):
            return resolved
        assert body is not None
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            prompt = ""
        await self.before_plain_reply(request)
        vector = embedding_for(prompt, resolved.embedding_dim) if prompt else []
        return json_response({"embedding": vector}, content_type=JSON_UTF8)

    # -- model management (acknowledged, never applied)

    async def _progress(self, request: web.Request, lines: list[JSONDict]) -> web.StreamResponse:
        body = await read_json_object(request) or {}
        if body.get("stream", True) is False:
            return json_response(lines[-1], content_type=JSON_UTF8)
        return web.Response(
            body=b"".join(ndjson(line) for line in lines), headers={"Content-Type": NDJSON}
        )

    async def pull_or_push(self, request: web.Request) -> web.StreamResponse:
        first = "pulling manifest" if request.path.endswith("pull") else "retrieving manifest"
        return await self._progress(request, [{"status": first}, {"status": "success"}])

    async def create(self, request: web.Request) -> web.StreamResponse:
        return await self._progress(
            request,
            [
                {"status": "reading model metadata"},
                {"status": "writing manifest"},
                {"status": "success"},
            ],
        )

    async def delete(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request) or {}
        name = body.get("model") or body.get("name")
        if self.find_model(name) is None:
            return ollama_error(404, f"model '{name}' not found")
        return web.Response(status=200)

    async def copy(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request) or {}
        if self.find_model(body.get("source")) is None:
            return ollama_error(404, f"model '{body.get('source')}' not found")
        return web.Response(status=200)

    async def blob_exists(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=404)

    async def blob_create(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(status=201)
