"""The OpenAI-compatible wire format (shared by vLLM, LM Studio and Ollama's ``/v1`` routes) in
`OpenAIDialect`; each engine module subclasses it only where its server differs."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, ClassVar

from aiohttp import web

from flm.testing.emulators.replies import (
    Prompt,
    embedding_base64,
    embedding_for,
    expected_reply,
    limit_words,
    reply_for,
    split_text,
    structured_reply,
    text_of_content,
    tool_call_for,
    word_count,
)
from flm.testing.emulators.request_state import request_behaviour
from flm.testing.emulators.settings import ModelSpec
from flm.testing.emulators.wire import (
    SSE_DONE,
    JSONDict,
    dumps,
    json_response,
    new_id,
    read_json_object,
    sse,
    unix_now,
)

if TYPE_CHECKING:
    from flm.testing.emulators.server import EmulatorServer


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

    async def body_and_model(
        self, request: web.Request
    ) -> tuple[JSONDict, ModelSpec] | web.Response:
        """The request's JSON object and the model it names, or the error to answer."""
        body = await read_json_object(request)
        if body is None:
            return self.bad_json()
        resolved = self.resolve(body)
        if isinstance(resolved, web.Response):
            return resolved
        return body, resolved

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
        read = await self.body_and_model(request)
        if isinstance(read, web.Response):
            return read
        body, spec = read
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
        read = await self.body_and_model(request)
        if isinstance(read, web.Response):
            return read
        body, spec = read
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
