"""Ollama's native API (``/api/*``), translated to and from the OpenAI shapes.

Streaming replies are NDJSON objects (``{"message": {...}, "done": false}`` … a final one with
``done: true``, ``done_reason`` and the token counts); they become ``chat.completion.chunk`` SSE
events with usage on the last chunk, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from flm.core.errors import EngineApiError, EngineError, EngineNetworkError
from flm.core.models import Capabilities, ModelInfo, is_cloud_model
from flm.engines.base import (
    EngineAdapter,
    Health,
    load_event,
    require_dict,
    shape_embeddings,
)
from flm.openai.sse import DONE, encode_event, iter_line_batches

_OPTION_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "max_tokens": "num_predict",
    "max_completion_tokens": "num_predict",
}
_FINISH = {"stop": "stop", "length": "length", "load": "stop", "unload": "stop"}


def _data_uri_payload(url: str) -> str:
    if not url.startswith("data:") or ";base64," not in url:
        raise EngineApiError("Ollama takes inline images only (data: URIs)")
    return url.split(";base64,", 1)[1]


def to_ollama_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id → function name, for the results that follow
    for message in messages:
        content = message.get("content")
        role = message.get("role", "user")
        # Ollama knows system, user, assistant and tool: developer instructions are system ones
        item: dict[str, Any] = {"role": "system" if role == "developer" else role}
        if isinstance(content, list):
            texts: list[str] = []
            images: list[str] = []
            for part in content:
                if not isinstance(part, dict):
                    continue
                kind = part.get("type")
                if kind in ("text", "input_text"):
                    texts.append(str(part.get("text", "")))
                elif kind in ("image_url", "input_image"):
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    images.append(_data_uri_payload(str(url)))
            item["content"] = "\n".join(texts)
            if images:
                item["images"] = images
        else:
            item["content"] = "" if content is None else str(content)
        if message.get("tool_calls"):
            calls = [c for c in message["tool_calls"] if isinstance(c, dict) and "function" in c]
            item["tool_calls"] = [
                {
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": _loads_or_raw(c["function"].get("arguments")),
                    }
                }
                for c in calls
            ]
            names.update((str(c.get("id")), str(c["function"]["name"])) for c in calls)
        if role == "tool":
            # OpenAI names the call a result answers (tool_call_id); Ollama, its function
            name = message.get("name") or names.get(str(message.get("tool_call_id")))
            if name:
                item["tool_name"] = name
        out.append(item)
    return out


def _loads_or_raw(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def to_ollama_request(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    options = _options(body)
    request: dict[str, Any] = {
        "model": body["model"],
        "messages": to_ollama_messages(list(body.get("messages") or [])),
        "stream": stream,
    }
    if options:
        request["options"] = options
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_object":
            request["format"] = "json"
        elif fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            request["format"] = schema if schema is not None else "json"
    if body.get("tools") and body.get("tool_choice") != "none":
        request["tools"] = body["tools"]
    return request


def to_ollama_generate(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    """A legacy text completion as an ``/api/generate`` request (the prompt is rendered with
    the model's template, as Ollama's own ``/v1/completions`` does). The route has checked
    that ``prompt`` is one string (or an array holding one)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    request: dict[str, Any] = {"model": body["model"], "prompt": prompt or "", "stream": stream}
    options = _options(body)
    if options:
        request["options"] = options
    if isinstance(body.get("suffix"), str):
        request["suffix"] = body["suffix"]
    return request


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name, target in _OPTION_NAMES.items():
        if body.get(name) is not None:
            options[target] = body[name]
    stop = body.get("stop")
    if stop is not None:
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return options


def _tool_calls(message: dict[str, Any], first: int = 0) -> list[dict[str, Any]] | None:
    """The OpenAI form of a message's tool calls, numbered from ``first`` (a stream numbers
    them across its lines: clients join deltas by index)."""
    calls = message.get("tool_calls")
    if not calls:
        return None
    out = []
    for i, call in enumerate(calls, first):
        fn = call.get("function", {}) if isinstance(call, dict) else {}
        args = fn.get("arguments", {})
        out.append(
            {
                "id": f"call_{secrets.token_hex(8)}",
                "index": i,
                "type": "function",
                "function": {
                    "name": fn.get("name", ""),
                    "arguments": args if isinstance(args, str) else json.dumps(args),
                },
            }
        )
    return out


def _usage(final: dict[str, Any]) -> dict[str, int]:
    prompt = int(final.get("prompt_eval_count") or 0)
    completion = int(final.get("eval_count") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class OllamaAdapter(EngineAdapter):
    capabilities_default = Capabilities(
        tools=True,
        vision_inputs=True,
        token_inputs=False,
        tool_choice=False,
        sampling_params=frozenset(
            {
                "temperature",
                "top_p",
                "max_tokens",
                "max_completion_tokens",
                "stop",
                "seed",
                "presence_penalty",
                "frequency_penalty",
            }
        ),
    )

    async def health_check(self, timeout_s: float) -> Health:
        data, latency = await self._timed("/api/version", timeout_s)
        version = require_dict(data, "GET /api/version", "version")["version"]
        if not isinstance(version, str):
            raise EngineApiError("GET /api/version: 'version' is not a string")
        return Health(latency, version)

    async def _show(self, name: str) -> dict[str, Any]:
        try:
            data = await self.client.post_json("/api/show", {"model": name}, limit=16 * 1024 * 1024)
        except EngineError:
            return {}
        return data if isinstance(data, dict) else {}

    async def list_models(self) -> list[ModelInfo]:
        data = require_dict(
            await self.client.get_json("/api/tags", limit=8 * 1024 * 1024),
            "GET /api/tags",
            "models",
        )
        entries = [
            m
            for m in data["models"]
            if isinstance(m, dict) and isinstance(m.get("name") or m.get("model"), str)
        ]
        shows = await asyncio.gather(*(self._show(m.get("name") or m["model"]) for m in entries))
        models = []
        for entry, show in zip(entries, shows, strict=True):
            name = entry.get("name") or entry["model"]
            info = show.get("model_info") or {}
            context = None
            if isinstance(info, dict):
                context = next(
                    (
                        int(v)
                        for k, v in info.items()
                        if k.endswith(".context_length") and isinstance(v, int)
                    ),
                    None,
                )
            caps = show.get("capabilities") or []
            details = (
                dict(entry.get("details") or {}) if isinstance(entry.get("details"), dict) else {}
            )
            if caps:
                details["capabilities"] = list(caps)
            models.append(
                ModelInfo(
                    self.id,
                    name,
                    context_length=context,
                    vision="vision" in caps,
                    embeddings_only="embedding" in caps and "completion" not in caps,
                    details=details,
                    cloud=is_cloud_model(name, entry, show),
                )
            )
        return models

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        data = require_dict(
            await self.client.post_json("/api/chat", to_ollama_request(body, stream=False)),
            "Ollama chat reply",
            "message",
        )
        message = data["message"] if isinstance(data["message"], dict) else {}
        reply: dict[str, Any] = {"role": "assistant", "content": message.get("content", "")}
        calls = _tool_calls(message)
        finish = _FINISH.get(str(data.get("done_reason") or "stop"), "stop")
        if calls:
            reply["tool_calls"] = calls
            finish = "tool_calls"
        return {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": reply, "finish_reason": finish}],
            "usage": _usage(data),
        }

    async def chat_stream(self, body: dict[str, Any], public_model: str) -> AsyncIterator[bytes]:
        resp = await self.client.request(
            "POST", "/api/chat", json_body=to_ollama_request(body, stream=True)
        )
        chunk_id = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        finished = False
        options = body.get("stream_options")
        # Asked for, usage comes as OpenAI sends it: "usage": null on every chunk, then one
        # more chunk with no choices and the counts. Otherwise it rides on the last chunk.
        usage_chunk = isinstance(options, dict) and options.get("include_usage") is True

        def event(
            delta: dict[str, Any] | None, finish: str | None, usage: dict[str, int] | None = None
        ) -> bytes:
            chunk: dict[str, Any] = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": public_model,
                "choices": []
                if delta is None
                else [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage is not None or usage_chunk:
                chunk["usage"] = usage
            return encode_event(json.dumps(chunk, separators=(",", ":")).encode())

        try:
            first = True
            tools_seen = 0
            async for lines in iter_line_batches(resp.iter_chunks()):
                out: list[bytes] = []
                for line in lines:
                    try:
                        item = load_event(line, "Ollama")
                    except EngineError:
                        if out:  # what came before the error in this read still goes out
                            yield b"".join(out)
                        raise
                    message = item.get("message") if isinstance(item.get("message"), dict) else {}
                    assert isinstance(message, dict)
                    delta: dict[str, Any] = {}
                    if first:
                        delta["role"] = "assistant"
                        first = False
                    if message.get("content"):
                        delta["content"] = message["content"]
                    calls = _tool_calls(message, tools_seen)
                    if calls:
                        delta["tool_calls"] = calls
                        tools_seen += len(calls)
                    if item.get("done"):
                        if delta:
                            out.append(event(delta, None))
                        finish = (
                            "tool_calls"
                            if tools_seen
                            else _FINISH.get(str(item.get("done_reason") or "stop"), "stop")
                        )
                        if usage_chunk:
                            out += [event({}, finish), event(None, None, _usage(item))]
                        else:
                            out.append(event({}, finish, _usage(item)))
                        out.append(DONE)
                        finished = True
                        yield b"".join(out)
                        return
                    if delta:
                        out.append(event(delta, None))
                if out:
                    yield b"".join(out)
            raise EngineNetworkError("Ollama stream ended before its final (done) line")
        finally:
            resp.finish(finished)

    async def completion_bytes(
        self, body: dict[str, Any], public_model: str, raw_body: bytes | None = None
    ) -> bytes:
        data = require_dict(
            await self.client.post_json("/api/generate", to_ollama_generate(body, stream=False)),
            "Ollama generate reply",
            "response",
        )
        reply = {
            "id": f"cmpl-{secrets.token_hex(12)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": public_model,
            "choices": [
                {
                    "text": str(data.get("response") or ""),
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": _FINISH.get(str(data.get("done_reason") or "stop"), "stop"),
                }
            ],
            "usage": _usage(data),
        }
        return json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode()

    async def completion_stream(
        self, body: dict[str, Any], public_model: str
    ) -> AsyncIterator[bytes]:
        """``/api/generate`` NDJSON lines (``response`` pieces, then ``done: true`` with the
        counts) as ``text_completion`` SSE events, usage as :meth:`chat_stream` places it."""
        resp = await self.client.request(
            "POST", "/api/generate", json_body=to_ollama_generate(body, stream=True)
        )
        cmpl_id = f"cmpl-{secrets.token_hex(12)}"
        created = int(time.time())
        options = body.get("stream_options")
        usage_chunk = isinstance(options, dict) and options.get("include_usage") is True
        finished = False

        def event(
            text: str | None, finish: str | None, usage: dict[str, int] | None = None
        ) -> bytes:
            chunk: dict[str, Any] = {
                "id": cmpl_id,
                "object": "text_completion",
                "created": created,
                "model": public_model,
                "choices": []
                if text is None
                else [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }
            if usage is not None or usage_chunk:
                chunk["usage"] = usage
            return encode_event(
                json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode()
            )

        try:
            async for lines in iter_line_batches(resp.iter_chunks()):
                out: list[bytes] = []
                for line in lines:
                    try:
                        item = load_event(line, "Ollama")
                    except EngineError:
                        if out:
                            yield b"".join(out)
                        raise
                    piece = item.get("response")
                    if isinstance(piece, str) and piece:
                        out.append(event(piece, None))
                    if item.get("done"):
                        finish = _FINISH.get(str(item.get("done_reason") or "stop"), "stop")
                        if usage_chunk:
                            out += [event("", finish), event(None, None, _usage(item))]
                        else:
                            out.append(event("", finish, _usage(item)))
                        out.append(DONE)
                        finished = True
                        yield b"".join(out)
                        return
                if out:
                    yield b"".join(out)
            raise EngineNetworkError("Ollama stream ended before its final (done) line")
        finally:
            resp.finish(finished)

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        data = require_dict(
            await self.client.post_json(
                "/api/embed",
                {
                    "model": body["model"],
                    "input": body.get("input"),
                    **({"dimensions": body["dimensions"]} if body.get("dimensions") else {}),
                },
            ),
            "Ollama embeddings",
            "embeddings",
        )
        vectors = data["embeddings"]
        if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
            raise EngineApiError("Ollama embeddings: 'embeddings' is not a list of vectors")
        return shape_embeddings(
            vectors,
            body["model"],
            int(data.get("prompt_eval_count") or 0),
            body.get("encoding_format"),
        )
