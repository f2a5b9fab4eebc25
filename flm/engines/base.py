"""The one engine interface and what every adapter shares (the kinds are described in
:mod:`flm.engines.kinds`)."""

from __future__ import annotations

import base64
import json
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from flm.core.errors import EngineApiError, EngineNotSupportedError
from flm.core.models import Capabilities, EngineEndpoint, ModelInfo
from flm.http.client import EngineClient, Timeouts


@dataclass(frozen=True)
class Health:
    """A successful health probe: the engine answered with the JSON it should."""

    latency_ms: float
    version: str | None = None
    #: The engine answered but says it is not ready (e.g. llama.cpp loading the model).
    degraded_reason: str | None = None


NotSupportedError = EngineNotSupportedError


class EngineAdapter(ABC):
    """What FLM needs from an engine. Bodies in and out are OpenAI-shaped dicts; model names
    inside are the engine's own (the proxy maps them to and from ``flm://`` ids)."""

    capabilities_default: ClassVar[Capabilities] = Capabilities()

    def __init__(
        self,
        endpoint: EngineEndpoint,
        timeouts: Timeouts | None = None,
        client: EngineClient | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.client = client or EngineClient(
            endpoint.base_url, timeouts, api_key=endpoint.api_key, name=endpoint.id
        )

    @property
    def id(self) -> str:
        return self.endpoint.id

    def capabilities(self) -> Capabilities:
        return self.capabilities_default

    async def close(self) -> None:
        await self.client.close()

    @abstractmethod
    async def health_check(self, timeout_s: float) -> Health: ...

    @abstractmethod
    async def list_models(self) -> list[ModelInfo]: ...

    @abstractmethod
    async def chat(self, body: dict[str, Any]) -> dict[str, Any]: ...

    async def chat_bytes(
        self, body: dict[str, Any], public_model: str, raw_body: bytes | None = None
    ) -> bytes:
        """The reply as compact JSON bytes with ``model`` set to ``public_model``.
        ``raw_body`` is ``body`` already serialised, when the caller has it. Engines whose
        requests and replies need no translation override this to skip a parse/serialise."""
        reply = await self.chat(body)
        reply["model"] = public_model
        return json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode()

    @abstractmethod
    def chat_stream(self, body: dict[str, Any], public_model: str) -> AsyncIterator[bytes]:
        """SSE events (``data: {chunk}\\n\\n``) with ``model`` set to ``public_model``, ending
        with ``data: [DONE]``. Engine failures raise ``EngineError`` from the iterator."""

    @abstractmethod
    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]: ...

    async def completion_bytes(
        self, body: dict[str, Any], public_model: str, raw_body: bytes | None = None
    ) -> bytes:
        """A legacy text completion (``/v1/completions``) as compact JSON bytes, ``model``
        set to ``public_model``."""
        raise NotSupportedError(f"{self.endpoint.kind} engines do not serve text completions")

    def completion_stream(self, body: dict[str, Any], public_model: str) -> AsyncIterator[bytes]:
        """Streamed text completion: ``text_completion`` SSE events, then ``[DONE]``."""
        raise NotSupportedError(f"{self.endpoint.kind} engines do not serve text completions")

    async def transcribe(self, fields: dict[str, Any]) -> dict[str, Any]:
        raise NotSupportedError(f"{self.endpoint.kind} engines do not transcribe audio")

    async def _timed(self, path: str, timeout_s: float) -> tuple[Any, float]:
        started = time.perf_counter()
        data = await self.client.get_json(path, first_byte_s=timeout_s, limit=1024 * 1024)
        return data, (time.perf_counter() - started) * 1000


def load_event(data: bytes, source: str) -> dict[str, Any]:
    """One streamed JSON object from an engine; an error object or anything malformed becomes
    ``EngineApiError`` (the proxy turns it into the mid-stream error event)."""
    try:
        item = json.loads(data)
    except ValueError as exc:
        raise EngineApiError(f"{source} sent an invalid stream event: {exc}") from exc
    if not isinstance(item, dict):
        raise EngineApiError(f"{source} sent a stream event that is not an object")
    if "error" in item:
        err = item["error"]
        message = err.get("message") if isinstance(err, dict) else err
        raise EngineApiError(f"{source} reported an error mid-stream: {message}")
    return item


def require_dict(data: Any, what: str, *fields: str) -> dict[str, Any]:
    """``data`` as a JSON object with ``fields`` present, else ``EngineApiError``."""
    if not isinstance(data, dict):
        raise EngineApiError(f"{what}: expected a JSON object, got {type(data).__name__}")
    missing = [f for f in fields if f not in data]
    if missing:
        raise EngineApiError(f"{what}: missing field(s) {', '.join(missing)}")
    return data


def floats_to_base64(vector: Sequence[float]) -> str:
    """OpenAI's ``encoding_format: base64``: little-endian float32, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def shape_embeddings(
    vectors: list[list[float]], model: str, prompt_tokens: int, encoding_format: str | None
) -> dict[str, Any]:
    as_b64 = encoding_format == "base64"
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": floats_to_base64(v) if as_b64 else v}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
