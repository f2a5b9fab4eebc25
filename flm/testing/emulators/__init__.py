"""Engine emulators: real HTTP servers on loopback that speak Ollama's, vLLM's and LM Studio's
wire formats, for FLM's own tests and for users.

    from flm.testing.emulators import Behaviour, start_emulator

    with start_emulator("ollama", models=["llama3.2:1b"]) as emu:
        ...                          # talk to emu.url
        emu.behaviour.delay_s = 2    # the next request waits 2 s before its headers
        assert ("POST", "/api/pull") not in emu.requests

Each engine module says which public document it follows and how it differs. What every
`Behaviour` field does, per engine:

=================== ========================================================================
field               effect
=================== ========================================================================
delay_s             all engines, every route: sleep before the response headers
chunk_interval_s    all engines: sleep between two frames of a stream (NDJSON lines for
                    Ollama, SSE events for vLLM / LM Studio / Ollama ``/v1``)
stream_chunks       all engines: number of content frames; the reply is cut into that many
                    character slices (OpenAI-style streams add a role frame before and a
                    finish frame, optional usage frame and ``[DONE]`` after; Ollama adds the
                    final ``done: true`` line)
reply_text          all engines: the assistant text (default: ``expected_reply(...)``)
loading             Ollama, LM Studio: inference requests wait until it is cleared (their real
                    behaviour: the model loads on demand); Ollama ``/api/ps`` is empty and
                    LM Studio ``/api/v0/models`` says ``not-loaded`` meanwhile. vLLM: every
                    route answers 503 (``/health`` empty, others vLLM's error body)
garbage             all engines, every route: 200 with a body that is not valid JSON
hang_after_chunks   streams: that many content frames, then silence with the connection open;
                    non-streamed inference: never answers
drop_after_chunks   streams: that many content frames, then the TCP connection is closed (the
                    chunked body is never terminated); non-streamed inference: the connection
                    is closed without an answer
huge_line_bytes     streams: one extra content frame of exactly that many bytes (a single
                    NDJSON line / SSE event, newline only at its end) before the normal ones;
                    non-streamed chat: the reply text is that many ``x`` characters
endless             streams: content frames keep coming until the client goes away;
                    non-streamed inference: never answers
status_override     all engines, every route: that status with the engine's error body
=================== ========================================================================

``emu.disconnects`` records ``time.monotonic()`` whenever a client goes away before its
response is complete (not for connections the emulator itself drops).

Another engine is one module: subclass `EmulatorServer` (and `OpenAIDialect` where its
OpenAI-compatible routes differ) with the wire helpers exported here (`json_response`, `sse`,
`request_behaviour`, ...). The package's modules:

=================== ========================================================================
module              holds
=================== ========================================================================
settings            `ModelSpec` (the models served) and `Behaviour` (misbehaviour on demand)
replies             the deterministic content: replies, token counts, tool calls, embeddings
wire                compact JSON, JSON responses, SSE frames, timestamps, ids
openai_dialect      `OpenAIDialect`: the OpenAI-compatible routes
request_state       the current request's `Behaviour` snapshot and waits
server              `EmulatorServer`: the aiohttp server, its middleware, streaming helpers
threaded            `Emulator`: a server on its own loop in a background thread
ollama, vllm,       the engines
lmstudio
=================== ========================================================================
"""

from __future__ import annotations

from collections.abc import Iterable

from flm.testing.emulators.lmstudio import LmStudioEmulator
from flm.testing.emulators.ollama import OllamaEmulator
from flm.testing.emulators.openai_dialect import OpenAIDialect
from flm.testing.emulators.replies import (
    REPLY_TEMPLATE,
    embedding_for,
    expected_reply,
    sample_for,
    split_text,
    structured_reply,
    tool_call_for,
    word_count,
)
from flm.testing.emulators.request_state import request_behaviour
from flm.testing.emulators.server import EmulatorServer
from flm.testing.emulators.settings import EMBEDDING_DIM, Behaviour, ModelLike, ModelSpec
from flm.testing.emulators.threaded import Emulator
from flm.testing.emulators.vllm import VllmEmulator
from flm.testing.emulators.wire import SSE_DONE, Handler, JSONDict, dumps, json_response, sse

EMULATORS: dict[str, type[EmulatorServer]] = {
    "ollama": OllamaEmulator,
    "vllm": VllmEmulator,
    "lmstudio": LmStudioEmulator,
}


def create_server(
    kind: str, models: Iterable[ModelLike] | None = None, behaviour: Behaviour | None = None
) -> EmulatorServer:
    """An emulator server not yet listening (for use inside your own event loop)."""
    try:
        server_class = EMULATORS[kind]
    except KeyError:
        raise ValueError(
            f"unknown engine kind {kind!r}; expected one of {', '.join(EMULATORS)}"
        ) from None
    return server_class(models, behaviour)


def start_emulator(
    kind: str,
    models: Iterable[ModelLike] | None = None,
    behaviour: Behaviour | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
) -> Emulator:
    """Start an emulator of ``kind`` (``ollama``, ``vllm``, ``lmstudio``) in a background
    thread with its own event loop, listening on ``host`` (loopback) and ``port`` (0 = a free
    one). Stop it with ``stop()`` or use it as a context manager."""
    return Emulator(create_server(kind, models, behaviour)).start(host, port)


__all__ = [
    "EMBEDDING_DIM",
    "EMULATORS",
    "REPLY_TEMPLATE",
    "SSE_DONE",
    "Behaviour",
    "Emulator",
    "EmulatorServer",
    "Handler",
    "JSONDict",
    "LmStudioEmulator",
    "ModelLike",
    "ModelSpec",
    "OllamaEmulator",
    "OpenAIDialect",
    "VllmEmulator",
    "create_server",
    "dumps",
    "embedding_for",
    "expected_reply",
    "json_response",
    "request_behaviour",
    "sample_for",
    "split_text",
    "sse",
    "start_emulator",
    "structured_reply",
    "tool_call_for",
    "word_count",
]
