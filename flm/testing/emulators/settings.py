"""The emulator's settings: which models it serves (`ModelSpec`) and how it misbehaves on demand
(`Behaviour`)."""

from __future__ import annotations

from dataclasses import dataclass

#: Length of the embedding vectors a model returns unless its spec says otherwise.
EMBEDDING_DIM = 32


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
