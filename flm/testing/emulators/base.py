"""Shared machinery of FLM's engine emulators.

An emulator is a real aiohttp server on loopback that answers like one LLM engine does, byte for
byte where it matters (paths, field names, framing, error bodies), with deterministic content so
tests can assert exact replies and token counts. It can also misbehave on demand (see `Behaviour`)
so that FLM's timeouts, cancellation and error mapping are exercised against real sockets.

Deterministic content, the same for every engine:

- the reply is ``REPLY_TEMPLATE`` filled with the text of the last user message, followed by
  ``" [images: N]"`` when the request carried N images (see `expected_reply`);
  ``Behaviour.reply_text`` replaces it verbatim;
- token counts are whitespace word counts: prompt = all message texts, completion = the reply;
- a streamed reply is the reply cut into ``Behaviour.stream_chunks`` consecutive character slices;
- ``max_tokens`` / ``num_predict`` smaller than the reply's word count keeps that many words and
  finishes with ``length``;
- embeddings are unit vectors of ``ModelSpec.embedding_dim`` floats derived from a SHA-256 of the
  input text (see `embedding_for`);
- tools: the model calls an offered function when the last user message names it (unless the
  conversation already ends with a tool's result), or when ``tool_choice`` forces one (a named
  function; ``required``: the named-in-text one, else the first), never with
  ``tool_choice: "none"``; the arguments are `sample_for` the function's parameter schema
  (see `tool_call_for`);
- structured output: with a JSON schema (OpenAI's ``response_format`` ``json_schema``, Ollama's
  ``format`` object) the reply is `sample_for` that schema, as JSON; with plain JSON mode
  (``json_object``, Ollama's ``"json"``) it is ``{"reply": <the usual reply>}``.

The OpenAI-compatible wire format (shared by vLLM, LM Studio and Ollama's ``/v1`` routes) lives
here too, in `OpenAIDialect`; each engine module subclasses it only where its server differs.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import dataclasses
import hashlib
import json
import math
import secrets
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, ClassVar, TypeVar

from aiohttp import web

JSONDict = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

EMBEDDING_DIM = 32
REPLY_TEMPLATE = "You said: {text}"
MAX_BODY_BYTES = 64 * 1024 * 1024
_HUGE_WRITE_SLICE = 64 * 1024
_LOADING_POLL_S = 0.01

T = TypeVar("T")


# --------------------------------------------------------------------------- public data types


@dataclass
class Behaviour:
    """How the emulator behaves; mutable from any thread, read once at the start of each request.

    The per-engine meaning of each field is documented in `flm.testing.emulators` and in the
    engine modules.
    """

    delay_s: float = 0.0
    """Wait this long before sending any response headers (every route)."""
    chunk_interval_s: float = 0.0
    """Wait this long between two frames of a streamed reply."""
    stream_chunks: int = 5
    """How many content frames a streamed reply has (the reply is cut into that many slices)."""
    reply_text: str | None = None
    """The assistant text; ``None`` echoes the last user message through ``REPLY_TEMPLATE``."""
    loading: bool = False
    """Answer like the engine does while its model is still loading (per engine)."""
    garbage: bool = False
    """Answer every request with 200 and a body that is not valid JSON."""
    hang_after_chunks: int | None = None
    """Stream this many content frames, then stay silent forever without closing."""
    drop_after_chunks: int | None = None
    """Stream this many content frames, then close the TCP connection mid-response."""
    huge_line_bytes: int | None = None
    """Send one NDJSON line / SSE event of exactly this many bytes before the content frames."""
    endless: bool = False
    """A streamed reply that never ends: content frames keep coming until the client leaves."""
    status_override: int | None = None
    """Answer every request with this status and the engine's own error body."""
    omit_usage: bool = False
    """Report no token usage in chat replies and streams (OpenAI-compatible wire), as some
    servers do."""


@dataclass(frozen=True)
class ModelSpec:
    """One model served by an emulator."""

    name: str
    vision: bool = False
    """Accepts images (Ollama capability ``vision``, LM Studio type ``vlm``)."""
    embeddings: bool = False
    """An embedding-only model (Ollama capability ``embedding``, LM Studio type ``embeddings``)."""
    context_length: int = 4096
    loaded: bool = True
    """Shown as loaded (Ollama ``/api/ps``, LM Studio ``state``)."""
    arch: str = "llama"
    parameter_size: str = "1.2B"
    quantization: str = "Q4_K_M"
    embedding_dim: int = EMBEDDING_DIM

    @classmethod
    def from_name(cls, name: str) -> ModelSpec:
        """A spec guessed from a plain name: ``*embed*`` is an embedding model; ``*llava*``,
        ``*vision*``, ``*-vl*``, ``*vlm*`` and ``*moondream*`` are vision models."""
        low = name.lower()
        if "embed" in low:
            return cls(
                name,
                embeddings=True,
                arch="nomic-bert",
                context_length=2048,
                parameter_size="137M",
                quantization="F16",
            )
        if any(mark in low for mark in ("llava", "vision", "-vl", "vlm", "moondream")):
            return cls(name, vision=True)
        return cls(name)


ModelLike = str | ModelSpec


def as_spec(model: ModelLike) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else ModelSpec.from_name(model)


class ThreadSafeList(list[T]):
    """A list appended to by the server thread and read by tests: every access holds a lock and
    iteration walks a snapshot."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def append(self, item: T) -> None:
        with self._lock:
            super().append(item)

    def clear(self) -> None:
        with self._lock:
            super().clear()

    def snapshot(self) -> list[T]:
        with self._lock:
            return list.copy(self)

    def __iter__(self) -> Iterator[T]:
        return iter(self.snapshot())

    def __len__(self) -> int:
        with self._lock:
            return super().__len__()

    def __contains__(self, item: object) -> bool:
        with self._lock:
            return super().__contains__(item)


# --------------------------------------------------------------------------- deterministic content


@dataclass
class Prompt:
    """What the emulator needs from a request's messages."""

    texts: list[str] = field(default_factory=list)
    last_user: str = ""
    images: int = 0

    @property
    def tokens(self) -> int:
        return sum(word_count(t) for t in self.texts)


def word_count(text: str) -> int:
    return len(text.split())


def expected_reply(last_user_text: str, images: int = 0) -> str:
    """The reply an emulator gives when ``Behaviour.reply_text`` is ``None``."""
    text = REPLY_TEMPLATE.format(text=last_user_text)
    if images:
        text += f" [images: {images}]"
    return text


def reply_for(behaviour: Behaviour, prompt: Prompt) -> str:
    if behaviour.reply_text is not None:
        return behaviour.reply_text
    return expected_reply(prompt.last_user, prompt.images)


def limit_words(text: str, limit: object) -> tuple[str, str]:
    """Apply a max-token limit (in words); returns the text and the finish reason."""
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < word_count(text):
        return " ".join(text.split()[:limit]), "length"
    return text, "stop"


def split_text(text: str, parts: int) -> list[str]:
    """Cut ``text`` into exactly ``parts`` consecutive slices (some empty if it is shorter)."""
    n = max(1, parts)
    size = len(text)
    return [text[i * size // n : (i + 1) * size // n] for i in range(n)]


def sample_for(schema: object) -> Any:
    """A deterministic value matching a JSON schema: an object's properties (its required ones,
    or all when none are listed), an enum's first value, ``"text"``, ``1``, ``True``, and a
    one-item array."""
    if not isinstance(schema, dict):
        return None
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" or (kind is None and isinstance(schema.get("properties"), dict)):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        assert isinstance(props, dict)
        wanted = schema.get("required") if isinstance(schema.get("required"), list) else None
        return {
            name: sample_for(sub) for name, sub in props.items() if wanted is None or name in wanted
        }
    if kind == "string":
        return "text"
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return True
    if kind == "array":
        return [sample_for(schema.get("items"))]
    return None


def tool_call_for(
    tools: object, choice: object, last_user: str, last_role: object = None
) -> tuple[str, Any] | None:
    """The function a model "decides" to call and its arguments, or ``None`` (see the module
    documentation). Once the conversation ends with a tool's result the model answers in
    text unless ``tool_choice`` forces a call."""
    functions: dict[str, Any] = {}
    for tool in tools if isinstance(tools, list) else []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            functions[fn["name"]] = fn.get("parameters")
    if not functions or choice == "none":
        return None
    if last_role == "tool" and not (isinstance(choice, dict) or choice == "required"):
        return None
    named = next((n for n in functions if n in last_user), None)
    if isinstance(choice, dict):
        fn = choice.get("function")
        forced = fn.get("name") if isinstance(fn, dict) else None
        named = forced if forced in functions else None
    elif choice == "required":
        named = named or next(iter(functions))
    if named is None:
        return None
    return named, sample_for(functions[named]) or {}


def structured_reply(fmt: object, text: str) -> str:
    """The reply under OpenAI's ``response_format`` (unchanged for ``text`` or none)."""
    if not isinstance(fmt, dict):
        return text
    if fmt.get("type") == "json_object":
        return dumps({"reply": text})
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        return dumps(sample_for(spec.get("schema") if isinstance(spec, dict) else None))
    return text


def embedding_for(text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    """A deterministic unit vector for ``text`` (values rounded to 8 decimals)."""
    raw = b""
    counter = 0
    while len(raw) < dim * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    ints = struct.unpack(f"<{dim}I", raw[: dim * 4])
    values = [n / 0xFFFFFFFF * 2.0 - 1.0 for n in ints]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 8) for v in values]


def embedding_base64(vector: Sequence[float]) -> str:
    """OpenAI's ``encoding_format: base64``: little-endian float32 values, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def digest_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def unix_now() -> int:
    return int(time.time())


def iso_now() -> str:
    """RFC 3339 UTC timestamp with sub-second digits, as Go servers print them."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def json_response(
    obj: object, status: int = 200, content_type: str = "application/json"
) -> web.Response:
    return web.Response(
        body=dumps(obj).encode(), status=status, headers={"Content-Type": content_type}
    )


def sse(obj: object) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
GARBAGE_BODY = b'{"object": "list", "data": [{"id": "oops", <<< not json'


def text_of_content(content: object) -> tuple[str, int]:
    """Text and image count of an OpenAI message ``content`` (string or list of parts)."""
    if isinstance(content, str):
        return content, 0
    texts: list[str] = []
    images = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in ("text", "input_text") and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind in ("image_url", "input_image"):
                images += 1
    return " ".join(texts), images


# --------------------------------------------------------------------------- per-request state


@dataclass
class _RequestState:
    behaviour: Behaviour
    dropped: bool = False
    load_wait_ns: int = 0


_STATE: contextvars.ContextVar[_RequestState] = contextvars.ContextVar("flm_emulator_request")


def request_behaviour() -> Behaviour:
    """The behaviour snapshot taken when the current request arrived."""
    return _STATE.get().behaviour


def request_load_wait_ns() -> int:
    """How long the current request waited for a loading model, in nanoseconds."""
    return _STATE.get().load_wait_ns


async def hang_forever() -> None:
    await asyncio.get_running_loop().create_future()


# --------------------------------------------------------------------------- OpenAI-compatible wire


class OpenAIDialect:
    """The OpenAI-compatible routes (``/v1/models``, ``/v1/chat/completions``,
    ``/v1/completions``, ``/v1/embeddings``) as one engine serves them.

    Defaults follow the OpenAI API reference; subclasses override only what their engine does
    differently (error body, model card, ``n`` support, extra fields).
    """

    supports_n: ClassVar[bool] = False
    model_optional: ClassVar[bool] = True
    stream_content_type: ClassVar[str] = "text/event-stream"
    owned_by: ClassVar[str] = "system"
    #: ``response_format`` types the engine accepts (others: 400).
    response_formats: ClassVar[frozenset[str]] = frozenset({"text", "json_object", "json_schema"})

    def __init__(self, server: EmulatorServer) -> None:
        self.server = server

    # -- spelling hooks

    def error(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> web.Response:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return json_response(
            {"error": {"message": message, "type": kind, "param": param, "code": code}},
            status=status,
        )

    def model_not_found(self, name: str) -> web.Response:
        return self.error(
            404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
        )

    def model_required(self) -> web.Response:
        return self.error(400, "model is required", param="model")

    def chat_not_supported(self, spec: ModelSpec) -> web.Response:
        return self.error(
            400, f"Model {spec.name!r} does not support chat completions.", param="model"
        )

    def embeddings_not_supported(self, spec: ModelSpec) -> web.Response | None:
        """None when ``spec`` may embed (the default: only embedding models may)."""
        if spec.embeddings:
            return None
        return self.error(400, f"Model {spec.name!r} does not support embeddings.", param="model")

    def model_card(self, spec: ModelSpec) -> JSONDict:
        return {
            "id": spec.name,
            "object": "model",
            "created": unix_now(),
            "owned_by": self.owned_by,
        }

    def chunk_extras(self, spec: ModelSpec) -> JSONDict:
        """Extra top-level fields of every chat/completion object and chunk."""
        return {}

    def choice_extras(self) -> JSONDict:
        """Extra fields of a finished choice."""
        return {}

    def message_extras(self) -> JSONDict:
        return {}

    def response_extras(
        self,
        request: web.Request,
        spec: ModelSpec,
        prompt_tokens: int,
        completion_tokens: int,
        finish: str,
    ) -> JSONDict:
        """Extra top-level fields of a non-streamed chat/completion reply."""
        return {}

    def embedding_extras(self) -> JSONDict:
        return {}

    def usage(self, prompt_tokens: int, completion_tokens: int) -> JSONDict:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    # -- shared request handling

    def resolve(self, body: JSONDict) -> ModelSpec | web.Response:
        name = body.get("model")
        if name is None or name == "":
            if self.model_optional and self.server.models:
                return next(iter(self.server.models.values()))
            return self.model_required()
        spec = self.server.find_model(name)
        if spec is None:
            return self.model_not_found(str(name))
        return spec

    def bad_json(self) -> web.Response:
        return self.error(400, "The request body is not a valid JSON object.")

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        cards = [self.model_card(spec) for spec in self.server.models.values()]
        return json_response({"object": "list", "data": cards})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        if body is None:
            return self.bad_json()
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self.error(400, "'messages' must be a non-empty array.", param="messages")
        resolved = self.resolve(body)
        if isinstance(resolved, web.Response):
            return resolved
        spec = resolved
        if spec.embeddings:
            return self.chat_not_supported(spec)
        n = body.get("n", 1)
        if n is None:
            n = 1
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            return self.error(400, "'n' must be a positive integer.", param="n")
        if not self.supports_n:
            n = 1
        prompt = Prompt()
        for message in messages:
            if not isinstance(message, dict):
                return self.error(400, "Each message must be an object.", param="messages")
            text, images = text_of_content(message.get("content"))
            prompt.texts.append(text)
            prompt.images += images
            if message.get("role") == "user":
                prompt.last_user = text
        behaviour = request_behaviour()
        fmt = body.get("response_format")
        if fmt is not None:
            kind = fmt.get("type") if isinstance(fmt, dict) else None
            if kind not in self.response_formats:
                return self.error(
                    400, f"response_format type {kind!r} is not supported.", param="response_format"
                )
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        call = tool_call_for(
            body.get("tools"), body.get("tool_choice"), prompt.last_user, last.get("role")
        )
        if call is not None:
            return await self._tool_call_reply(request, body, spec, call, prompt.tokens)
        base = structured_reply(fmt, reply_for(behaviour, prompt))
        if behaviour.huge_line_bytes and not body.get("stream"):
            base = "x" * behaviour.huge_line_bytes
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        choices = [limit_words(base if i == 0 else f"{base} [{i}]", limit) for i in range(n)]
        completion_tokens = sum(word_count(text) for text, _ in choices)
        if body.get("stream"):
            return await self._stream_chat(
                request, body, spec, choices, prompt.tokens, completion_tokens
            )
        await self.server.before_plain_reply(request)
        finish = choices[0][1]
        reply: JSONDict = {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": unix_now(),
            "model": spec.name,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, **self.message_extras()},
                    "logprobs": None,
                    "finish_reason": reason,
                    **self.choice_extras(),
                }
                for i, (text, reason) in enumerate(choices)
            ],
            **(
                {}
                if behaviour.omit_usage
                else {"usage": self.usage(prompt.tokens, completion_tokens)}
            ),
            **self.chunk_extras(spec),
            **self.response_extras(request, spec, prompt.tokens, completion_tokens, finish),
        }
        return json_response(reply)

    async def _tool_call_reply(
        self,
        request: web.Request,
        body: JSONDict,
        spec: ModelSpec,
        call: tuple[str, Any],
        prompt_tokens: int,
    ) -> web.StreamResponse:
        """One function call, as the assistant's whole reply (``finish_reason: tool_calls``);
        streamed as OpenAI streams it: the call's id and name first, then its arguments."""
        name, args = call
        arguments = dumps(args)
        call_id = f"call_{secrets.token_hex(12)}"
        usage = self.usage(prompt_tokens, word_count(arguments))
        reply_id, created = new_id("chatcmpl-"), unix_now()
        if not body.get("stream"):
            await self.server.before_plain_reply(request)
            message = {
                **self.message_extras(),
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": arguments},
                    }
                ],
            }
            return json_response(
                {
                    "id": reply_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": spec.name,
                    "choices": [
                        {
                            "index": 0,
                            "message": message,
                            "logprobs": None,
                            "finish_reason": "tool_calls",
                            **self.choice_extras(),
                        }
                    ],
                    "usage": usage,
                    **self.chunk_extras(spec),
                }
            )
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

        def chunk(delta: JSONDict | None, finish: str | None = None, **more: Any) -> bytes:
            return sse(
                {
                    "id": reply_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": spec.name,
                    **self.chunk_extras(spec),
                    "choices": []
                    if delta is None
                    else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    **more,
                }
            )

        frames = [
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}),
        ]

        def epilogue() -> bytes:
            out = chunk({}, "tool_calls")
            if include_usage:
                out += chunk(None, usage=usage)
            return out + SSE_DONE

        return await self.server.stream(
            request,
            content_type=self.stream_content_type,
            preamble=chunk({"role": "assistant", "content": None}),
            steps=len(frames),
            frame=lambda step: frames[step % len(frames)],
            huge_frame=lambda content: chunk({"content": content}),
            epilogue=epilogue,
        )

    async def _stream_chat(
        self,
        request: web.Request,
        body: JSONDict,
        spec: ModelSpec,
        choices: list[tuple[str, str]],
        prompt_tokens: int,
        completion_tokens: int,
    ) -> web.StreamResponse:
        behaviour = request_behaviour()
        chunk_id = new_id("chatcmpl-")
        created = unix_now()
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        pieces = [split_text(text, behaviour.stream_chunks) for text, _ in choices]
        extras = self.chunk_extras(spec)

        def chunk(entries: list[JSONDict], **more: Any) -> bytes:
            return sse(
                {
                    "id": chunk_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": spec.name,
                    **extras,
                    "choices": entries,
                    **more,
                }
            )

        def delta(index: int, content: str) -> JSONDict:
            return {
                "index": index,
                "delta": {"content": content},
                "logprobs": None,
                "finish_reason": None,
            }

        preamble = b"".join(
            chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for i in range(len(choices))
        )

        def frame(step: int) -> bytes:
            return b"".join(
                chunk([delta(i, parts[step % len(parts)])]) for i, parts in enumerate(pieces)
            )

        def epilogue() -> bytes:
            out = [
                chunk(
                    [
                        {
                            "index": i,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": reason,
                            **self.choice_extras(),
                        }
                    ]
                )
                for i, (_, reason) in enumerate(choices)
            ]
            if include_usage and not behaviour.omit_usage:
                out.append(chunk([], usage=self.usage(prompt_tokens, completion_tokens)))
            out.append(SSE_DONE)
            return b"".join(out)

        return await self.server.stream(
            request,
            content_type=self.stream_content_type,
            preamble=preamble,
            steps=len(pieces[0]),
            frame=frame,
            huge_frame=lambda content: chunk([delta(0, content)]),
            epilogue=epilogue,
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        if body is None:
            return self.bad_json()
        resolved = self.resolve(body)
        if isinstance(resolved, web.Response):
            return resolved
        spec = resolved
        if spec.embeddings:
            return self.chat_not_supported(spec)
        raw_prompt = body.get("prompt", "")
        if isinstance(raw_prompt, list):
            prompt_text = " ".join(p for p in raw_prompt if isinstance(p, str))
        elif isinstance(raw_prompt, str):
            prompt_text = raw_prompt
        else:
            return self.error(
                400, "'prompt' must be a string or an array of strings.", param="prompt"
            )
        behaviour = request_behaviour()
        text = (
            behaviour.reply_text
            if behaviour.reply_text is not None
            else expected_reply(prompt_text)
        )
        text, finish = limit_words(text, body.get("max_tokens"))
        prompt_tokens, completion_tokens = word_count(prompt_text), word_count(text)
        completion_id = new_id("cmpl-")
        created = unix_now()
        extras = self.chunk_extras(spec)
        if not body.get("stream"):
            await self.server.before_plain_reply(request)
            return json_response(
                {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": spec.name,
                    "choices": [
                        {
                            "index": 0,
                            "text": text,
                            "logprobs": None,
                            "finish_reason": finish,
                            **self.choice_extras(),
                        }
                    ],
                    "usage": self.usage(prompt_tokens, completion_tokens),
                    **extras,
                    **self.response_extras(request, spec, prompt_tokens, completion_tokens, finish),
                }
            )
        pieces = split_text(text, behaviour.stream_chunks)

        def chunk(piece: str, reason: str | None) -> bytes:
            return sse(
                {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": spec.name,
                    **extras,
                    "choices": [
                        {"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}
                    ],
                }
            )

        return await self.server.stream(
            request,
            content_type=self.stream_content_type,
            preamble=b"",
            steps=len(pieces),
            frame=lambda step: chunk(pieces[step % len(pieces)], None),
            huge_frame=lambda content: chunk(content, None),
            epilogue=lambda: chunk("", finish) + SSE_DONE,
        )

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        if body is None:
            return self.bad_json()
        resolved = self.resolve(body)
        if isinstance(resolved, web.Response):
            return resolved
        spec = resolved
        refused = self.embeddings_not_supported(spec)
        if refused is not None:
            return refused
        raw = body.get("input")
        inputs: list[str]
        if isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
            inputs = list(raw)
        elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            inputs = [" ".join(str(x) for x in raw)]
        elif isinstance(raw, list) and raw and all(isinstance(x, list) for x in raw):
            inputs = [" ".join(str(t) for t in x) for x in raw]
        else:
            return self.error(
                400, "'input' must be a string or an array of strings.", param="input"
            )
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(inputs):
            vector = embedding_for(text, spec.embedding_dim)
            data.append(
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": embedding_base64(vector) if as_base64 else vector,
                }
            )
        tokens = sum(word_count(text) for text in inputs)
        await self.server.before_plain_reply(request)
        return json_response(
            {
                **self.embedding_extras(),
                "object": "list",
                "data": data,
                "model": spec.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


# --------------------------------------------------------------------------- the server


class EmulatorServer(ABC):
    """One engine emulator bound to one event loop; `Emulator` runs it in a thread."""

    kind: ClassVar[str]
    default_models: ClassVar[tuple[str, ...]]
    dialect_class: ClassVar[type[OpenAIDialect]] = OpenAIDialect
    """How this engine spells its OpenAI-compatible routes (available as ``self.openai``)."""

    def __init__(
        self, models: Iterable[ModelLike] | None = None, behaviour: Behaviour | None = None
    ) -> None:
        chosen = list(models) if models is not None else list(self.default_models)
        self.models: dict[str, ModelSpec] = {}
        for model in chosen:
            spec = self.normalise(as_spec(model))
            self.models[spec.name] = spec
        self.behaviour = behaviour if behaviour is not None else Behaviour()
        self.requests: ThreadSafeList[tuple[str, str]] = ThreadSafeList()
        self.disconnects: ThreadSafeList[float] = ThreadSafeList()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._active: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.openai = self.dialect_class(self)

    # -- hooks for the engine modules

    def normalise(self, spec: ModelSpec) -> ModelSpec:
        """Rewrite a configured model the way the engine names it (Ollama adds ``:latest``)."""
        return spec

    def find_model(self, name: object) -> ModelSpec | None:
        return self.models.get(name) if isinstance(name, str) else None

    @abstractmethod
    def add_routes(self, router: web.UrlDispatcher) -> None: ...

    @abstractmethod
    def error_response(self, request: web.Request, status: int, message: str) -> web.Response:
        """A generic error in the engine's own body shape (used by ``status_override``)."""

    @abstractmethod
    async def unknown_route(self, request: web.Request) -> web.StreamResponse:
        """What the engine answers for a path or method it does not serve."""

    async def loading_gate(self, request: web.Request) -> web.StreamResponse | None:
        """Called for every request while ``Behaviour.loading`` is set (at arrival): return a
        response to answer with it, or None to carry on (after waiting, if the engine waits)."""
        return None

    # -- app and lifecycle

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY_BYTES)
        self.add_routes(app.router)
        app.router.add_route("*", "/{tail:.*}", self.unknown_route)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        runner = web.AppRunner(
            self.build_app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound_port}"
        return self.url

    async def close(self) -> None:
        self._stopping = True
        pending = [task for task in self._active if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- the middleware every request passes through

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
        state = _RequestState(behaviour=dataclasses.replace(self.behaviour))
        _STATE.set(state)
        behaviour = state.behaviour
        try:
            if behaviour.delay_s > 0:
                await asyncio.sleep(behaviour.delay_s)
            if behaviour.status_override is not None:
                status = behaviour.status_override
                return self.error_response(request, status, _phrase(status))
            if behaviour.garbage:
                return web.Response(
                    body=GARBAGE_BODY, status=200, headers={"Content-Type": "application/json"}
                )
            if behaviour.loading:
                gated = await self.loading_gate(request)
                if gated is not None:
                    return gated
            return await handler(request)
        except asyncio.CancelledError:
            self._note_disconnect(state)
            raise
        except ConnectionResetError:
            # A write hit the closed connection before aiohttp cancelled us: end the request
            # the way aiohttp ends it on a client disconnect (quietly), not as a server error.
            self._note_disconnect(state)
            raise asyncio.CancelledError from None
        finally:
            if task is not None:
                self._active.discard(task)

    def _note_disconnect(self, state: _RequestState) -> None:
        if not self._stopping and not state.dropped:
            self.disconnects.append(time.monotonic())

    async def wait_while_loading(self) -> None:
        """Hold the current request until ``behaviour.loading`` is cleared (polling the live
        object, which tests may flip from another thread)."""
        started = time.monotonic_ns()
        # The flag is flipped from another thread, so an asyncio.Event cannot carry it.
        while self.behaviour.loading:  # noqa: ASYNC110
            await asyncio.sleep(_LOADING_POLL_S)
        _STATE.get().load_wait_ns = time.monotonic_ns() - started

    # -- misbehaviour helpers used by the inference handlers

    async def drop_connection(self, request: web.Request) -> None:
        """Close the TCP connection under the current response (after flushing what was
        written); the handler then ends when aiohttp notices the connection is gone."""
        _STATE.get().dropped = True
        transport = request.transport
        if transport is not None:
            transport.close()
        await hang_forever()

    async def before_plain_reply(self, request: web.Request) -> None:
        """Non-streamed inference: ``hang_after_chunks``/``endless`` never answer,
        ``drop_after_chunks`` closes the connection without an answer."""
        behaviour = request_behaviour()
        if behaviour.hang_after_chunks is not None or behaviour.endless:
            await hang_forever()
        if behaviour.drop_after_chunks is not None:
            await self.drop_connection(request)

    async def stream(
        self,
        request: web.Request,
        *,
        content_type: str,
        preamble: bytes,
        steps: int,
        frame: Callable[[int], bytes],
        huge_frame: Callable[[str], bytes],
        epilogue: Callable[[], bytes],
    ) -> web.StreamResponse:
        """Write a streamed reply: preamble, optional huge frame, ``steps`` content frames
        (``frame(k)``; k keeps growing when endless), then the epilogue - honouring every
        streaming misbehaviour of the request's `Behaviour`."""
        behaviour = request_behaviour()
        response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        await response.prepare(request)
        if preamble:
            await response.write(preamble)
        if behaviour.huge_line_bytes:
            overhead = len(huge_frame(""))
            data = huge_frame("x" * max(0, behaviour.huge_line_bytes - overhead))
            for start in range(0, len(data), _HUGE_WRITE_SLICE):
                await response.write(data[start : start + _HUGE_WRITE_SLICE])
        sent = 0
        while behaviour.endless or sent < steps:
            await self._interrupt(request, behaviour, sent)
            if sent and behaviour.chunk_interval_s > 0:
                await asyncio.sleep(behaviour.chunk_interval_s)
            else:
                await asyncio.sleep(0)  # stay cancellable even when frames are cheap
            await response.write(frame(sent))
            sent += 1
        await self._interrupt(request, behaviour, sent)
        if sent and behaviour.chunk_interval_s > 0:
            await asyncio.sleep(behaviour.chunk_interval_s)
        await response.write(epilogue())
        await response.write_eof()
        return response

    async def _interrupt(self, request: web.Request, behaviour: Behaviour, sent: int) -> None:
        if behaviour.hang_after_chunks is not None and sent >= behaviour.hang_after_chunks:
            await hang_forever()
        if behaviour.drop_after_chunks is not None and sent >= behaviour.drop_after_chunks:
            await self.drop_connection(request)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"status {status}"


async def read_json_object(request: web.Request) -> JSONDict | None:
    """The request body as a JSON object, or None when it is not one."""
    try:
        raw = await request.read()
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def new_id(prefix: str, length: int = 24) -> str:
    return prefix + secrets.token_hex(length // 2)


# --------------------------------------------------------------------------- threaded wrapper


class Emulator:
    """A running emulator: its own event loop in a background thread, bound to loopback.

    ``behaviour`` may be changed (or replaced) from the test thread at any time; each request
    reads it once when it arrives.
    """

    def __init__(self, server: EmulatorServer) -> None:
        self._server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return self._server.kind

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def behaviour(self) -> Behaviour:
        return self._server.behaviour

    @behaviour.setter
    def behaviour(self, value: Behaviour) -> None:
        self._server.behaviour = value

    @property
    def models(self) -> dict[str, ModelSpec]:
        return self._server.models

    @property
    def requests(self) -> ThreadSafeList[tuple[str, str]]:
        """Every request received, as ``(method, path)``, in arrival order."""
        return self._server.requests

    @property
    def disconnects(self) -> ThreadSafeList[float]:
        """``time.monotonic()`` of every client that went away before its response ended."""
        return self._server.disconnects

    @property
    def server(self) -> EmulatorServer:
        return self._server

    def start(self, host: str = "127.0.0.1", port: int = 0, timeout: float = 10.0) -> Emulator:
        if self._thread is not None:
            raise RuntimeError("emulator already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._server.start(host, port))
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                _close_loop(loop)
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                _close_loop(loop)

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"flm-emulator-{self.kind}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"{self.kind} emulator did not start within {timeout}s")
        if failure:
            self._thread.join(timeout)
            self._thread = None
            raise failure[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._thread = None
        if thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._server.close(), loop)
            try:
                future.result(timeout)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout)

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005
    ) -> None:
        """Poll ``predicate`` until it holds; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            time.sleep(interval)

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Emulator {self.kind} {self.url or '(not started)'}>"


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()
