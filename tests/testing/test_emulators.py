"""The engine emulators speak their engine's wire format and misbehave on demand.

Real sockets on loopback; stdlib http.client as the client; no sleeps for synchronisation.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any
from urllib.parse import urlsplit

import pytest

from flm.testing.emulators import (
    Behaviour,
    Emulator,
    ModelSpec,
    embedding_for,
    expected_reply,
    start_emulator,
)

KINDS = ("ollama", "vllm", "lmstudio")
CHAT_PATH = {
    "ollama": "/api/chat",
    "vllm": "/v1/chat/completions",
    "lmstudio": "/v1/chat/completions",
}
USER = [{"role": "user", "content": "hello there"}]
REPLY = expected_reply("hello there")
PNG_1PX = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082"
    )
).decode()


# --------------------------------------------------------------------------- client helpers


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def call(url: str, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Reply:
    conn = _connection(url, timeout)
    try:
        data = (
            None
            if body is None
            else (body if isinstance(body, bytes) else json.dumps(body).encode())
        )
        conn.request(method, path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def get(url: str, path: str) -> Reply:
    return call(url, "GET", path)


def post(url: str, path: str, body: Any) -> Reply:
    return call(url, "POST", path, body)


class Stream:
    """A streamed response read frame by frame (NDJSON lines or SSE events)."""

    def __init__(self, url: str, path: str, body: Any, timeout: float = 5.0) -> None:
        self.conn = _connection(url, timeout)
        self.conn.request(
            "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        self.resp = self.conn.getresponse()
        self.sse = self.resp.headers.get("Content-Type", "").startswith("text/event-stream")

    def frame(self) -> bytes | None:
        """The next raw frame (line, or SSE event without its blank line); None at the end."""
        if not self.sse:
            line = self.resp.readline()
            return line or None
        lines: list[bytes] = []
        while True:
            line = self.resp.readline()
            if not line:
                return b"".join(lines) or None
            if line == b"\n":
                return b"".join(lines)
            lines.append(line)

    def data(self) -> Any:
        """The next frame decoded: a JSON object, the string "[DONE]", or None at the end."""
        raw = self.frame()
        if raw is None:
            return None
        if not self.sse:
            return json.loads(raw)
        payload = raw.decode().removeprefix("data: ").strip()
        return payload if payload == "[DONE]" else json.loads(payload)

    def all(self) -> list[Any]:
        out = []
        while (item := self.data()) is not None:
            out.append(item)
        return out

    def set_timeout(self, seconds: float) -> None:
        assert self.conn.sock is not None
        self.conn.sock.settimeout(seconds)

    def close(self) -> None:
        self.resp.close()
        self.conn.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def emulator() -> Iterator[Callable[..., Emulator]]:
    started: list[Emulator] = []

    def start(kind: str, *args: Any, **kwargs: Any) -> Emulator:
        emu = start_emulator(kind, *args, **kwargs)
        started.append(emu)
        return emu

    yield start
    for emu in started:
        emu.stop()


def chat_body(kind: str, stream: bool, **more: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": USER, "stream": stream, **more}
    if kind == "ollama":
        body["model"] = "llama3.2:1b"
    elif kind == "vllm":
        body["model"] = "Qwen/Qwen2.5-0.5B-Instruct"
    else:
        body["model"] = "qwen2.5-0.5b-instruct"
    return body


def content_of(kind: str, frame: Any) -> str | None:
    """The content text of one streamed chat frame, or None for non-content frames."""
    if kind == "ollama":
        return None if frame.get("done") else str(frame["message"]["content"])
    if frame == "[DONE]" or not frame.get("choices"):
        return None
    delta = frame["choices"][0]["delta"]
    if "role" in delta or frame["choices"][0]["finish_reason"] is not None:
        return None
    return str(delta["content"])


def is_end(kind: str, frame: Any) -> bool:
    return bool(frame.get("done")) if kind == "ollama" else frame == "[DONE]"


# --------------------------------------------------------------------------- Ollama


def test_ollama_informational_routes(emulator: Callable[..., Emulator]) -> None:
    emu = emulator(
        "ollama",
        models=[
            "llama3.2:1b",
            "llava:7b",
            "nomic-embed-text",
            ModelSpec("qwen2.5", context_length=32768, loaded=False),
        ],
    )
    root = get(emu.url, "/")
    assert (root.status, root.body) == (200, b"Ollama is running")
    assert isinstance(get(emu.url, "/api/version").json["version"], str)

    tags = get(emu.url, "/api/tags")
    assert tags.content_type.startswith("application/json")
    models = tags.json["models"]
    assert [m["name"] for m in models] == [
        "llama3.2:1b",
        "llava:7b",
        "nomic-embed-text:latest",
        "qwen2.5:latest",
    ]
    assert set(models[0]) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert set(models[0]["details"]) == {
        "parent_model",
        "format",
        "family",
        "families",
        "parameter_size",
        "quantization_level",
    }
    assert len(models[0]["digest"]) == 64 and isinstance(models[0]["size"], int)

    show = post(emu.url, "/api/show", {"model": "llava:7b"}).json
    assert show["capabilities"] == ["completion", "vision"]
    assert {"modelfile", "parameters", "template", "details", "model_info", "modified_at"} <= set(
        show
    )
    assert show["model_info"]["general.architecture"] == "llama"
    assert post(emu.url, "/api/show", {"model": "nomic-embed-text"}).json["capabilities"] == [
        "embedding"
    ]
    qwen = post(emu.url, "/api/show", {"model": "qwen2.5"}).json
    assert qwen["capabilities"] == ["completion"]
    assert qwen["model_info"]["llama.context_length"] == 32768
    missing = post(emu.url, "/api/show", {"model": "nope"})
    assert missing.status == 404 and set(missing.json) == {"error"}

    running = get(emu.url, "/api/ps").json["models"]
    assert [m["name"] for m in running] == ["llama3.2:1b", "llava:7b", "nomic-embed-text:latest"]
    assert {"expires_at", "size_vram", "digest", "details"} <= set(running[0])


def test_ollama_chat_streams_ndjson_by_default(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("ollama", behaviour=Behaviour(stream_chunks=4))
    with Stream(
        emu.url,
        "/api/chat",
        {"model": "llama3.2:1b", "messages": [{"role": "system", "content": "be brief"}, *USER]},
    ) as stream:
        assert stream.resp.status == 200
        assert stream.resp.headers["Content-Type"] == "application/x-ndjson"
        frames = stream.all()
    assert len(frames) == 5
    for frame in frames[:4]:
        assert set(frame) == {"model", "created_at", "message", "done"}
        assert frame["done"] is False and frame["message"]["role"] == "assistant"
    assert "".join(f["message"]["content"] for f in frames) == REPLY
    final = frames[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["prompt_eval_count"] == 4  # "be brief" + "hello there"
    assert final["eval_count"] == len(REPLY.split())
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] > 0
    assert final["created_at"].endswith("Z")


def test_ollama_chat_plain_images_and_limits(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("ollama", models=["llava"])
    reply = post(
        emu.url,
        "/api/chat",
        {
            "model": "llava",
            "stream": False,
            "messages": [{"role": "user", "content": "what is this", "images": [PNG_1PX]}],
        },
    )
    assert reply.status == 200
    body = reply.json
    assert body["model"] == "llava"  # echoed as requested (served as "llava:latest")
    assert body["message"] == {
        "role": "assistant",
        "content": expected_reply("what is this", images=1),
    }
    assert body["done"] is True and body["done_reason"] == "stop"

    bad = post(
        emu.url,
        "/api/chat",
        {
            "model": "llava:latest",
            "stream": False,
            "messages": [{"role": "user", "content": "x", "images": ["%%% not base64"]}],
        },
    )
    assert bad.status == 400 and "base64" in bad.json["error"]

    limited = post(
        emu.url,
        "/api/chat",
        {"model": "llava:latest", "stream": False, "messages": USER, "options": {"num_predict": 2}},
    ).json
    assert limited["message"]["content"] == "You said:"
    assert limited["done_reason"] == "length" and limited["eval_count"] == 2

    load = post(emu.url, "/api/chat", {"model": "llava:latest", "messages": []}).json
    assert load["done_reason"] == "load" and load["done"] is True


def test_ollama_generate_and_embeddings(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("ollama", models=["llama3.2:1b", "nomic-embed-text"])
    gen = post(
        emu.url, "/api/generate", {"model": "llama3.2:1b", "prompt": "why blue", "stream": False}
    ).json
    assert gen["response"] == expected_reply("why blue") and gen["done"] is True
    assert gen["prompt_eval_count"] == 2 and isinstance(gen["context"], list)

    embed = post(emu.url, "/api/embed", {"model": "nomic-embed-text", "input": ["a b", "c"]}).json
    assert embed["model"] == "nomic-embed-text"
    assert embed["embeddings"] == [embedding_for("a b"), embedding_for("c")]
    assert embed["prompt_eval_count"] == 3
    vector = embed["embeddings"][0]
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-6

    legacy = post(emu.url, "/api/embeddings", {"model": "nomic-embed-text", "prompt": "a b"})
    assert legacy.json == {"embedding": embedding_for("a b")}

    chat_on_embedder = post(
        emu.url, "/api/chat", {"model": "nomic-embed-text", "messages": USER, "stream": False}
    )
    assert chat_on_embedder.status == 400


def test_ollama_errors(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("ollama")
    missing = post(emu.url, "/api/chat", {"model": "ghost", "messages": USER})
    assert missing.status == 404
    assert missing.json == {"error": 'model "ghost" not found, try pulling it first'}
    no_model = post(emu.url, "/api/chat", {"messages": USER})
    assert no_model.status == 400 and no_model.json == {"error": "model is required"}
    bad_json = post(emu.url, "/api/chat", b"{nope")
    assert bad_json.status == 400 and "error" in bad_json.json
    unknown = get(emu.url, "/api/nothing-here")
    assert (unknown.status, unknown.body) == (404, b"404 page not found")


def test_ollama_admin_routes_exist_and_are_recorded(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("ollama")
    digest = "sha256:" + "0" * 64
    assert post(emu.url, "/api/pull", {"model": "x", "stream": False}).json == {"status": "success"}
    pushed = post(emu.url, "/api/push", {"model": "x"})
    assert pushed.content_type == "application/x-ndjson"
    assert json.loads(pushed.body.splitlines()[-1]) == {"status": "success"}
    assert post(emu.url, "/api/create", {"model": "y", "stream": False}).status == 200
    assert call(emu.url, "DELETE", "/api/delete", {"model": "llama3.2:1b"}).status == 200
    assert post(emu.url, "/api/copy", {"source": "llama3.2:1b", "destination": "z"}).status == 200
    assert call(emu.url, "HEAD", f"/api/blobs/{digest}").status == 404
    assert call(emu.url, "POST", f"/api/blobs/{digest}", b"blob").status == 201
    assert list(emu.requests) == [
        ("POST", "/api/pull"),
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/copy"),
        ("HEAD", f"/api/blobs/{digest}"),
        ("POST", f"/api/blobs/{digest}"),
    ]
    assert emu.models.keys() == {"llama3.2:1b"}  # nothing was applied


def test_ollama_openai_compat_routes(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("ollama")
    models = get(emu.url, "/v1/models").json
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "llama3.2:1b"
    assert models["data"][0]["owned_by"] == "library"
    with Stream(
        emu.url, "/v1/chat/completions", {"model": "llama3.2:1b", "messages": USER, "stream": True}
    ) as stream:
        frames = stream.all()
    assert frames[-1] == "[DONE]"
    assert "".join(content_of("vllm", f) or "" for f in frames) == REPLY
    missing = post(emu.url, "/v1/chat/completions", {"model": "ghost", "messages": USER})
    assert missing.status == 404
    assert missing.json["error"]["message"] == 'model "ghost" not found, try pulling it first'


def test_ollama_loading_holds_inference_until_loaded(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("ollama", behaviour=Behaviour(loading=True))
    assert get(emu.url, "/api/version").status == 200  # the server itself answers
    assert get(emu.url, "/api/ps").json == {"models": []}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            post, emu.url, "/api/chat", {"model": "llama3.2:1b", "messages": USER, "stream": False}
        )
        emu.wait_for(lambda: ("POST", "/api/chat") in emu.requests)
        with pytest.raises(FutureTimeout):
            pending.result(timeout=0.2)
        emu.behaviour.loading = False
        reply = pending.result(timeout=5)
    assert reply.status == 200 and reply.json["message"]["content"] == REPLY
    assert reply.json["load_duration"] > 100_000_000  # the wait shows up as load time


# --------------------------------------------------------------------------- vLLM


def test_vllm_health_version_models(emulator: Callable[..., Emulator]) -> None:
    emu = emulator(
        "vllm", models=[ModelSpec("meta-llama/Llama-3.1-8B-Instruct", context_length=8192)]
    )
    health = get(emu.url, "/health")
    assert (health.status, health.body) == (200, b"")
    assert isinstance(get(emu.url, "/version").json["version"], str)
    listing = get(emu.url, "/v1/models").json
    assert listing["object"] == "list"
    card = listing["data"][0]
    assert set(card) == {
        "id",
        "object",
        "created",
        "owned_by",
        "root",
        "parent",
        "max_model_len",
        "permission",
    }
    assert card["id"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert (card["object"], card["owned_by"], card["max_model_len"]) == ("model", "vllm", 8192)
    assert card["permission"][0]["object"] == "model_permission"


def test_vllm_chat_plain_with_n(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("vllm")
    body = post(emu.url, "/v1/chat/completions", chat_body("vllm", False, n=2)).json
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["message"]["content"] == REPLY
    assert body["choices"][1]["message"]["content"] == REPLY + " [1]"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 2
    assert body["usage"]["completion_tokens"] == 2 * len(REPLY.split()) + 1
    assert body["usage"]["total_tokens"] == 2 + body["usage"]["completion_tokens"]
    limited = post(emu.url, "/v1/chat/completions", chat_body("vllm", False, max_tokens=1)).json[
        "choices"
    ][0]
    assert (limited["message"]["content"], limited["finish_reason"]) == ("You", "length")
    # the model field is optional in vLLM
    assert post(emu.url, "/v1/chat/completions", {"messages": USER}).status == 200


def test_vllm_chat_stream_with_usage(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("vllm", behaviour=Behaviour(stream_chunks=3))
    with Stream(
        emu.url,
        "/v1/chat/completions",
        chat_body("vllm", True, n=2, stream_options={"include_usage": True}),
    ) as stream:
        assert stream.resp.headers["Content-Type"].startswith("text/event-stream")
        frames = stream.all()
    assert frames[-1] == "[DONE]"
    chunks = frames[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
    assert texts == {0: REPLY, 1: REPLY + " [1]"}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes.count("stop") == 2
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 2 * len(REPLY.split()) + 1


def test_vllm_completions_and_embeddings(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("vllm", models=["Qwen/Qwen2.5-0.5B-Instruct", "BAAI/bge-small-embed"])
    done = post(
        emu.url, "/v1/completions", {"model": "Qwen/Qwen2.5-0.5B-Instruct", "prompt": "once upon"}
    ).json
    assert done["object"] == "text_completion"
    assert done["choices"][0]["text"] == expected_reply("once upon")
    assert done["usage"]["prompt_tokens"] == 2

    emb = post(
        emu.url, "/v1/embeddings", {"model": "BAAI/bge-small-embed", "input": ["a", "b c"]}
    ).json
    assert emb["object"] == "list" and emb["id"].startswith("embd-")
    assert [d["index"] for d in emb["data"]] == [0, 1]
    assert emb["data"][1]["embedding"] == embedding_for("b c")
    assert emb["usage"]["prompt_tokens"] == 3
    b64 = post(
        emu.url,
        "/v1/embeddings",
        {"model": "BAAI/bge-small-embed", "input": "a", "encoding_format": "base64"},
    ).json
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(embedding_for("a"), abs=1e-6)

    refused = post(emu.url, "/v1/embeddings", {"model": "Qwen/Qwen2.5-0.5B-Instruct", "input": "a"})
    assert refused.status == 400 and refused.json["error"]["code"] == 400


def test_vllm_errors(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("vllm")
    missing = post(emu.url, "/v1/chat/completions", {"model": "ghost", "messages": USER})
    assert missing.status == 404
    assert missing.json == {
        "error": {
            "message": "The model `ghost` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    unknown = get(emu.url, "/v1/nothing")
    assert unknown.status == 404 and unknown.json == {"detail": "Not Found"}
    bad = post(emu.url, "/v1/chat/completions", b"{not json")
    assert bad.status == 400 and bad.json["error"]["type"] == "BadRequestError"


def test_vllm_loading_answers_503(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("vllm", behaviour=Behaviour(loading=True))
    health = get(emu.url, "/health")
    assert (health.status, health.body) == (503, b"")
    chat = post(emu.url, "/v1/chat/completions", chat_body("vllm", False))
    assert chat.status == 503
    assert chat.json["error"]["type"] == "ServiceUnavailableError"
    assert chat.json["error"]["code"] == 503
    emu.behaviour.loading = False
    assert get(emu.url, "/health").status == 200


# --------------------------------------------------------------------------- LM Studio


LMS_MODELS = [
    "qwen2.5-0.5b-instruct",
    "qwen/qwen2-vl-2b-instruct",
    "text-embedding-nomic-embed-text-v1.5",
    ModelSpec("mistral-7b", loaded=False, context_length=32768),
]


def test_lmstudio_model_listings(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("lmstudio", models=LMS_MODELS)
    v1 = get(emu.url, "/v1/models").json
    assert v1["object"] == "list"
    assert v1["data"][0] == {
        "id": "qwen2.5-0.5b-instruct",
        "object": "model",
        "owned_by": "organization_owner",
    }
    v0 = get(emu.url, "/api/v0/models").json["data"]
    assert [(m["type"], m["state"]) for m in v0] == [
        ("llm", "loaded"),
        ("vlm", "loaded"),
        ("embeddings", "loaded"),
        ("llm", "not-loaded"),
    ]
    assert set(v0[0]) == {
        "id",
        "object",
        "type",
        "publisher",
        "arch",
        "compatibility_type",
        "quantization",
        "state",
        "max_context_length",
    }
    assert v0[3]["max_context_length"] == 32768
    one = get(emu.url, "/api/v0/models/qwen/qwen2-vl-2b-instruct").json
    assert one["id"] == "qwen/qwen2-vl-2b-instruct" and one["publisher"] == "qwen"
    assert get(emu.url, "/api/v0/models/ghost").status == 404


def test_lmstudio_chat(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("lmstudio", models=LMS_MODELS)
    plain = post(emu.url, "/v1/chat/completions", chat_body("lmstudio", False, n=3)).json
    assert len(plain["choices"]) == 1  # n is not supported
    assert plain["choices"][0]["message"]["content"] == REPLY
    assert plain["system_fingerprint"] == "qwen2.5-0.5b-instruct" and plain["stats"] == {}
    assert plain["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    v0 = post(emu.url, "/api/v0/chat/completions", chat_body("lmstudio", False)).json
    assert v0["stats"]["stop_reason"] == "eosFound"
    assert v0["model_info"]["context_length"] == 4096 and "runtime" in v0
    vision = post(
        emu.url,
        "/v1/chat/completions",
        {
            "model": "qwen/qwen2-vl-2b-instruct",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "describe"},
                        {
                            "type": "image_url",
                            "image_url": {"url": f"data:image/png;base64,{PNG_1PX}"},
                        },
                    ],
                }
            ],
        },
    ).json
    assert vision["choices"][0]["message"]["content"] == expected_reply("describe", images=1)
    with Stream(
        emu.url,
        "/v1/chat/completions",
        chat_body("lmstudio", True, stream_options={"include_usage": True}),
    ) as stream:
        frames = stream.all()
    assert frames[-1] == "[DONE]" and frames[-2]["usage"]["total_tokens"] == 6
    assert "".join(content_of("lmstudio", f) or "" for f in frames) == REPLY


def test_lmstudio_embeddings_and_errors(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("lmstudio", models=LMS_MODELS)
    emb = post(
        emu.url,
        "/v1/embeddings",
        {"model": "text-embedding-nomic-embed-text-v1.5", "input": "some text"},
    ).json
    assert emb["data"][0]["embedding"] == embedding_for("some text")
    assert emb["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert (
        post(emu.url, "/v1/embeddings", {"model": "qwen2.5-0.5b-instruct", "input": "x"}).status
        == 400
    )
    missing = post(emu.url, "/v1/chat/completions", {"model": "ghost", "messages": USER})
    assert missing.status == 404
    error = missing.json["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "model",
        "model_not_found",
    )
    assert error["message"].startswith('Model "ghost" not found.')
    unknown = get(emu.url, "/")
    assert unknown.status == 200
    assert unknown.json == {"error": "Unexpected endpoint or method. (GET /)"}


def test_lmstudio_loading_is_just_in_time(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("lmstudio", behaviour=Behaviour(loading=True))
    assert get(emu.url, "/api/v0/models").json["data"][0]["state"] == "not-loaded"
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, emu.url, "/v1/chat/completions", chat_body("lmstudio", False))
        emu.wait_for(lambda: ("POST", "/v1/chat/completions") in emu.requests)
        with pytest.raises(FutureTimeout):
            pending.result(timeout=0.2)
        emu.behaviour.loading = False
        assert pending.result(timeout=5).status == 200
    assert get(emu.url, "/api/v0/models").json["data"][0]["state"] == "loaded"


# --------------------------------------------------------------------------- behaviours


@pytest.mark.parametrize("kind", KINDS)
def test_delay_and_runtime_changes(kind: str, emulator: Callable[..., Emulator]) -> None:
    emu = emulator(kind)
    emu.behaviour.delay_s = 0.25
    started = time.monotonic()
    reply = post(emu.url, CHAT_PATH[kind], chat_body(kind, False))
    assert reply.status == 200 and time.monotonic() - started >= 0.25
    emu.behaviour = Behaviour(reply_text="fixed answer")  # replaced for the next request
    reply = post(emu.url, CHAT_PATH[kind], chat_body(kind, False))
    text = (
        reply.json["message"]["content"]
        if kind == "ollama"
        else reply.json["choices"][0]["message"]["content"]
    )
    assert text == "fixed answer"


def test_client_giving_up_during_delay_is_a_disconnect(
    emulator: Callable[..., Emulator],
) -> None:
    emu = emulator("vllm", behaviour=Behaviour(delay_s=30))
    with pytest.raises(TimeoutError):
        call(emu.url, "POST", "/v1/chat/completions", chat_body("vllm", False), timeout=0.2)
    emu.wait_for(lambda: len(emu.disconnects) == 1)


@pytest.mark.parametrize("kind", KINDS)
def test_stream_arrives_incrementally(kind: str, emulator: Callable[..., Emulator]) -> None:
    interval = 0.1
    emu = emulator(kind, behaviour=Behaviour(chunk_interval_s=interval, stream_chunks=5))
    stamps: list[float] = []
    texts: list[str] = []
    started = time.monotonic()
    with Stream(emu.url, CHAT_PATH[kind], chat_body(kind, True)) as stream:
        while (frame := stream.data()) is not None:
            text = content_of(kind, frame)
            if text is not None:
                stamps.append(time.monotonic() - started)
                texts.append(text)
    assert "".join(texts) == REPLY and len(stamps) == 5
    assert stamps[-1] >= 4 * interval  # the emulator paced the frames...
    assert stamps[0] < 3 * interval  # ...and the first one arrived long before the last existed


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_everywhere(kind: str, emulator: Callable[..., Emulator]) -> None:
    emu = emulator(kind, behaviour=Behaviour(garbage=True))
    paths = {
        "ollama": ["/api/version", "/api/tags", "/"],
        "vllm": ["/health", "/v1/models"],
        "lmstudio": ["/v1/models", "/api/v0/models"],
    }[kind]
    replies = [get(emu.url, p) for p in paths] + [
        post(emu.url, CHAT_PATH[kind], chat_body(kind, False))
    ]
    for reply in replies:
        assert reply.status == 200
        with pytest.raises(ValueError):
            json.loads(reply.body)


@pytest.mark.parametrize(
    ("kind", "check"),
    [
        ("ollama", lambda body: body == {"error": "Service Unavailable"}),
        (
            "vllm",
            lambda body: (
                body["error"]["code"] == 503 and body["error"]["type"] == "ServiceUnavailableError"
            ),
        ),
        ("lmstudio", lambda body: body["error"]["type"] == "server_error"),
    ],
)
def test_status_override(
    kind: str, check: Callable[[Any], bool], emulator: Callable[..., Emulator]
) -> None:
    emu = emulator(kind, behaviour=Behaviour(status_override=503))
    for reply in (
        get(emu.url, "/v1/models" if kind != "ollama" else "/api/tags"),
        post(emu.url, CHAT_PATH[kind], chat_body(kind, False)),
    ):
        assert reply.status == 503 and check(reply.json)


@pytest.mark.parametrize("kind", KINDS)
def test_hang_after_chunks_then_client_leaves(kind: str, emulator: Callable[..., Emulator]) -> None:
    emu = emulator(kind, behaviour=Behaviour(hang_after_chunks=2))
    with Stream(emu.url, CHAT_PATH[kind], chat_body(kind, True)) as stream:
        contents: list[str] = []
        while len(contents) < 2:
            frame = stream.data()
            assert frame is not None
            if (text := content_of(kind, frame)) is not None:
                contents.append(text)
        stream.set_timeout(0.3)
        with pytest.raises(TimeoutError):  # nothing more comes, and the stream stays open
            stream.data()
        assert list(emu.disconnects) == []
        left = time.monotonic()
    emu.wait_for(lambda: len(emu.disconnects) == 1)
    assert emu.disconnects[0] >= left


def raw_post(url: str, path: str, body: Any, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    payload = json.dumps(body).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + payload
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """Decode a chunked body; the flag says whether its terminating chunk arrived."""
    body = b""
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            return body, False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body, True
        if len(rest) < size + 2:
            return body + rest[:size], False
        body += rest[:size]
        data = rest[size + 2 :]


@pytest.mark.parametrize("kind", KINDS)
def test_drop_after_chunks(kind: str, emulator: Callable[..., Emulator]) -> None:
    emu = emulator(kind, behaviour=Behaviour(drop_after_chunks=2))
    raw = raw_post(emu.url, CHAT_PATH[kind], chat_body(kind, True))
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
    body, complete = dechunk(chunked)
    assert not complete  # the connection ended before the chunked body did
    if kind == "ollama":
        frames = [json.loads(line) for line in body.splitlines()]
    else:
        frames = [
            json.loads(event.removeprefix(b"data: ")) for event in body.split(b"\n\n") if event
        ]
    assert len([f for f in frames if content_of(kind, f) is not None]) == 2
    assert not any(is_end(kind, f) for f in frames)
    assert list(emu.disconnects) == []  # the emulator hung up, not the client


@pytest.mark.parametrize("kind", KINDS)
def test_huge_line(kind: str, emulator: Callable[..., Emulator]) -> None:
    size = 2_000_000
    emu = emulator(kind, behaviour=Behaviour(huge_line_bytes=size))
    frames = []
    with Stream(emu.url, CHAT_PATH[kind], chat_body(kind, True)) as stream:
        while (raw := stream.frame()) is not None:
            frames.append(raw)
    huge = [f for f in frames if len(f) > 10_000]
    assert len(huge) == 1
    # an SSE event is its data line plus the blank line the reader consumed
    assert len(huge[0]) + (1 if kind != "ollama" else 0) == size
    assert huge[0].count(b"\n") == 1 and huge[0].endswith(b"\n")


@pytest.mark.parametrize("kind", KINDS)
def test_endless_stream_until_client_leaves(kind: str, emulator: Callable[..., Emulator]) -> None:
    emu = emulator(kind, behaviour=Behaviour(endless=True, stream_chunks=3))
    seen = 0
    with Stream(emu.url, CHAT_PATH[kind], chat_body(kind, True)) as stream:
        while seen < 40:
            frame = stream.data()
            assert frame is not None and not is_end(kind, frame)
            seen += content_of(kind, frame) is not None
    emu.wait_for(lambda: len(emu.disconnects) == 1)


def test_plain_request_hangs_and_stop_is_prompt(emulator: Callable[..., Emulator]) -> None:
    emu = emulator("ollama", behaviour=Behaviour(hang_after_chunks=0))
    errors: list[BaseException] = []

    def hung_call() -> None:
        try:
            post(emu.url, "/api/chat", {"model": "llama3.2:1b", "messages": USER, "stream": False})
        except (ConnectionError, http.client.HTTPException, TimeoutError) as exc:
            errors.append(exc)

    worker = threading.Thread(target=hung_call)
    worker.start()
    emu.wait_for(lambda: len(emu.requests) == 1)
    started = time.monotonic()
    emu.stop()
    assert time.monotonic() - started < 3
    worker.join(5)
    assert not worker.is_alive() and errors  # the client saw the connection go away
    assert list(emu.disconnects) == []  # stopping is not a client disconnect


def test_start_emulator_context_manager_and_unknown_kind() -> None:
    with start_emulator("vllm", models=["m"]) as emu:
        assert emu.kind == "vllm" and emu.url.startswith("http://127.0.0.1:")
        assert get(emu.url, "/v1/models").json["data"][0]["id"] == "m"
    with pytest.raises(ValueError, match="unknown engine kind"):
        start_emulator("nope")


# --------------------------------------------------------------------------- the CLI


def test_emulate_cli() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flm.testing.emulate",
            "lmstudio",
            "--port",
            "0",
            "--model",
            "alpha",
            "--embedding-model",
            "beta-embed",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )
    try:
        assert proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 20
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the emulator never printed its address"
            if selector.select(remaining):
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, proc.stderr.read() if proc.stderr else "no output"
                line += chunk
        selector.close()
        info = json.loads(line)
        assert info["kind"] == "lmstudio" and info["url"].startswith("http://127.0.0.1:")
        types = [m["type"] for m in get(info["url"], "/api/v0/models").json["data"]]
        assert types == ["llm", "embeddings"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
