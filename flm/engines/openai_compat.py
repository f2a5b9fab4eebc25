"""The client shared by the OpenAI-compatible engines (vLLM, LM Studio, llama.cpp)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from flm.core.errors import EngineApiError, EngineError, EngineNetworkError
from flm.core.memo import remember
from flm.core.models import ModelInfo
from flm.engines.base import (
    EngineAdapter,
    Health,
    load_event,
    require_dict,
    shape_embeddings,
)
from flm.openai.sse import DONE, encode_event, iter_sse_regions, region_data, rewrite_region
from flm.openai.translate import json_string


class OpenAICompatAdapter(EngineAdapter):
    """Speaks ``/v1/models``, ``/v1/chat/completions`` (JSON and SSE) and ``/v1/embeddings``.
    Subclasses override only what their engine does differently."""

    async def health_check(self, timeout_s: float) -> Health:
        data, latency = await self._timed("/v1/models", timeout_s)
        models = require_dict(data, "GET /v1/models", "data")["data"]
        if not isinstance(models, list):
            raise EngineApiError("GET /v1/models: 'data' is not a list")
        return Health(latency)

    async def _openai_models(self) -> list[dict[str, Any]]:
        data = await self.client.get_json("/v1/models", limit=8 * 1024 * 1024)
        models = require_dict(data, "GET /v1/models", "data")["data"]
        if not isinstance(models, list):
            raise EngineApiError("GET /v1/models: 'data' is not a list")
        return [m for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)]

    async def list_models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                self.id,
                m["id"],
                context_length=_int_or_none(m.get("max_model_len")),
                details={k: v for k, v in m.items() if k in ("owned_by", "created")},
            )
            for m in await self._openai_models()
        ]

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        payload = {**body, "stream": False}
        data = await self.client.post_json("/v1/chat/completions", payload)
        return require_dict(data, "chat completion", "choices")

    async def chat_bytes(
        self, body: dict[str, Any], public_model: str, raw_body: bytes | None = None
    ) -> bytes:
        return await self._reply_bytes("/v1/chat/completions", body, public_model, raw_body)

    async def completion_bytes(
        self, body: dict[str, Any], public_model: str, raw_body: bytes | None = None
    ) -> bytes:
        return await self._reply_bytes("/v1/completions", body, public_model, raw_body)

    def completion_stream(self, body: dict[str, Any], public_model: str) -> AsyncIterator[bytes]:
        return self._events("/v1/completions", body, public_model)

    async def _reply_bytes(
        self, path: str, body: dict[str, Any], public_model: str, raw_body: bytes | None
    ) -> bytes:
        if raw_body is None or body.get("stream"):
            raw_body = _compact({**body, "stream": False}).encode()
        raw = (await self.client.fetch("POST", path, raw_body, _JSON)).strip()
        needle, replacement = _model_rewrite(str(body.get("model", "")), public_model)
        at = raw.find(needle)
        if at >= 0 and raw[:1] == b"{" and raw[-1:] == b"}" and b'"choices"' in raw:
            return raw[:at] + replacement + raw[at + len(needle) :]
        try:
            reply = require_dict(json.loads(raw), f"POST {path}", "choices")
        except ValueError as exc:
            raise EngineApiError(f"engine sent invalid JSON: {exc}") from exc
        reply["model"] = public_model
        return _compact_utf8(reply).encode()

    def chat_stream(self, body: dict[str, Any], public_model: str) -> AsyncIterator[bytes]:
        return self._events("/v1/chat/completions", body, public_model)

    async def _events(
        self, path: str, body: dict[str, Any], public_model: str
    ) -> AsyncIterator[bytes]:
        """Events are forwarded as bytes: the model id is rewritten with a byte replacement
        when the engine echoes the name it was asked for (compact JSON, as vLLM, llama.cpp
        and LM Studio write it), and only parsed when it does not."""
        payload = {**body, "stream": True}
        resp = await self.client.request("POST", path, json_body=payload)
        needle, replacement = _model_rewrite(str(body.get("model", "")), public_model)
        finished = False
        try:
            async for region in iter_sse_regions(resp.iter_chunks()):
                fast = rewrite_region(region, needle, replacement)
                if fast is not None:  # (the usual read: every event rewritten at once)
                    yield fast[0]
                    if fast[1]:
                        finished = True
                        return
                    continue
                datas = region_data(region)
                if not datas:  # (comments or keep-alives only)
                    continue
                out: list[bytes] = []
                for data in datas:
                    if data == b"[DONE]":
                        finished = True
                        out.append(DONE)
                        break
                    try:
                        event = _rewrite_event(data, needle, replacement, public_model)
                    except EngineError:
                        if out:  # what came before the error in this read still goes out
                            yield b"".join(out)
                        raise
                    out.append(encode_event(event))
                yield b"".join(out)
                if finished:
                    return
            raise EngineNetworkError("engine stream ended without [DONE]")
        finally:
            resp.finish(finished)

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        wanted = body.get("encoding_format")
        payload = {k: v for k, v in body.items() if k != "encoding_format"}
        data = require_dict(
            await self.client.post_json("/v1/embeddings", payload), "embeddings", "data"
        )
        items = sorted(
            (d for d in data["data"] if isinstance(d, dict)), key=lambda d: int(d.get("index", 0))
        )
        vectors = [d.get("embedding") for d in items]
        if not all(isinstance(v, list) for v in vectors):
            raise EngineApiError("embeddings: an item has no float vector")
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)
        return shape_embeddings(
            vectors,  # type: ignore[arg-type]
            str(data.get("model") or body.get("model")),
            prompt_tokens,
            wanted,
        )


_JSON = {"Content-Type": "application/json"}
#: Compact JSON encoders, made once (``json.dumps`` with options builds one a call).
_compact = json.JSONEncoder(separators=(",", ":")).encode
_compact_utf8 = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_REWRITES: dict[tuple[str, str], tuple[bytes, bytes]] = {}


def _model_rewrite(native: str, public: str) -> tuple[bytes, bytes]:
    """``"model":"<native>"`` and its replacement ``"model":"<public>"``, remembered."""
    pair = _REWRITES.get((native, public))
    if pair is None:
        pair = remember(
            _REWRITES,
            (native, public),
            (b'"model":' + json_string(native), b'"model":' + json_string(public)),
            1024,
        )
    return pair


def _rewrite_event(data: bytes, needle: bytes, replacement: bytes, public_model: str) -> bytes:
    """One chunk event with its model id made public; errors and oddities go through JSON."""
    if (
        data[:1] == b"{"
        and data[-1:] == b"}"
        and needle in data
        and not data.startswith(b'{"error"')
    ):
        return data.replace(needle, replacement, 1)
    chunk = load_event(data, "engine")
    chunk["model"] = public_model
    return _compact(chunk).encode()


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
