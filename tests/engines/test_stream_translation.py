"""Engine replies turned into OpenAI ones, against raw loopback servers that send exactly the
bytes each case needs (several events in one read, an error among them, llama.cpp's own error
field): tool-call numbering across Ollama lines, usage as ``stream_options`` asks, nothing lost
before an error, and the Ollama request mapping."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from flm.core.errors import EngineApiError
from flm.core.models import EngineEndpoint, EngineKind
from flm.engines.llamacpp import LlamaCppAdapter
from flm.engines.ollama import OllamaAdapter, to_ollama_request
from flm.engines.vllm import VllmAdapter
from tests.http.test_client import Server, _read_request


def _stream_server(body: bytes, content_type: bytes, seen: list[bytes]) -> Server:
    """Answers every request with ``body`` in one write (chunked, one chunk)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await _read_request(reader)) is not None:
            seen.append(req)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: "
                + content_type
                + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n" % len(body)
                + body
                + b"\r\n0\r\n\r\n"
            )
            await writer.drain()

    return Server(handler)


def _events(raw: bytes) -> list[Any]:
    out: list[Any] = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _run_stream(
    adapter_cls: Any, kind: EngineKind, body: bytes, content_type: bytes, request: dict[str, Any]
) -> tuple[list[bytes], BaseException | None, list[bytes]]:
    """What the adapter's ``chat_stream`` yielded, the error it raised, the requests seen."""
    seen: list[bytes] = []

    async def main() -> tuple[list[bytes], BaseException | None]:
        server = _stream_server(body, content_type, seen)
        got: list[bytes] = []
        error: BaseException | None = None
        async with server:
            adapter = adapter_cls(EngineEndpoint("e", kind, server.url))
            try:
                async for part in adapter.chat_stream(request, "flm://e/m"):
                    got.append(part)
            except EngineApiError as exc:
                error = exc
            await adapter.client.close()
        return got, error

    got, error = asyncio.run(main())
    return got, error, seen


def _ndjson(*items: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


_DONE_LINE = {
    "message": {"role": "assistant", "content": ""},
    "done": True,
    "done_reason": "stop",
    "prompt_eval_count": 5,
    "eval_count": 7,
}


def test_ollama_tool_calls_in_separate_lines_are_numbered_across_the_stream() -> None:
    def call(name: str, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "message": {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": name, "arguments": args}}],
            },
            "done": False,
        }

    body = _ndjson(call("weather", {"city": "Paris"}), call("clock", {"tz": "CET"}), _DONE_LINE)
    got, error, _ = _run_stream(
        OllamaAdapter,
        EngineKind.OLLAMA,
        body,
        b"application/x-ndjson",
        {"model": "m", "messages": [{"role": "user", "content": "?"}]},
    )
    assert error is None
    events = _events(b"".join(got))
    calls: dict[int, dict[str, str]] = {}  # joined by index, as OpenAI clients do
    for ev in events[:-1]:
        for tc in ev["choices"][0]["delta"].get("tool_calls") or []:
            entry = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
            entry["name"] += tc["function"]["name"]
            entry["arguments"] += tc["function"]["arguments"]
    assert calls == {
        0: {"name": "weather", "arguments": '{"city": "Paris"}'},
        1: {"name": "clock", "arguments": '{"tz": "CET"}'},
    }
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("include_usage", [True, False])
def test_ollama_usage_follows_stream_options(include_usage: bool) -> None:
    body = _ndjson({"message": {"role": "assistant", "content": "Hi"}, "done": False}, _DONE_LINE)
    request = {
        "model": "m",
        "messages": [{"role": "user", "content": "?"}],
        "stream_options": {"include_usage": include_usage},
    }
    got, error, _ = _run_stream(
        OllamaAdapter, EngineKind.OLLAMA, body, b"application/x-ndjson", request
    )
    assert error is None
    events = _events(b"".join(got))
    assert events[-1] == "[DONE]"
    usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    if include_usage:  # OpenAI's shape: null on every chunk, then one with no choices
        assert [e["usage"] for e in events[:-2]] == [None, None]
        assert events[-2]["choices"] == [] and events[-2]["usage"] == usage
        assert events[-3]["choices"][0]["finish_reason"] == "stop"
    else:  # on the last chunk, where FLM's own accounting reads it
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
        assert events[-2]["usage"] == usage and "usage" not in events[0]


def test_ollama_content_read_with_an_error_line_still_reaches_the_client() -> None:
    body = _ndjson(
        {"message": {"role": "assistant", "content": "first"}, "done": False},
        {"message": {"role": "assistant", "content": "-second-"}, "done": False},
        {"error": "model runner has unexpectedly stopped"},
    )
    got, error, _ = _run_stream(
        OllamaAdapter,
        EngineKind.OLLAMA,
        body,
        b"application/x-ndjson",
        {"model": "m", "messages": [{"role": "user", "content": "?"}]},
    )
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in _events(b"".join(got)))
    assert text == "first-second-"
    assert error is not None and "unexpectedly stopped" in str(error)


def _sse(*payloads: bytes) -> bytes:
    return b"".join(b"data: " + p + b"\n\n" for p in payloads)


def _chunk(content: str) -> bytes:
    return json.dumps(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
        },
        separators=(",", ":"),
    ).encode()


def test_openai_compatible_content_read_with_an_error_event_still_reaches_the_client() -> None:
    body = _sse(
        _chunk("first"),
        _chunk("-second-"),
        b'{"error":{"message":"CUDA out of memory","type":"server_error"}}',
    )
    got, error, _ = _run_stream(
        VllmAdapter,
        EngineKind.VLLM,
        body,
        b"text/event-stream",
        {"model": "m", "messages": [{"role": "user", "content": "?"}]},
    )
    events = _events(b"".join(got))
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == "first-second-"
    assert all(e["model"] == "flm://e/m" for e in events)
    assert error is not None and "CUDA out of memory" in str(error)


@pytest.mark.parametrize("before", [b"", _sse(_chunk("partial"))])
def test_llamacpp_error_field_is_the_engines_error(before: bytes) -> None:
    """llama-server reports a failed stream as ``error: {...}`` (its own SSE field), not as
    ``data:``; its message must reach the client, not "stream ended without [DONE]"."""
    body = before + (
        b'error: {"code":400,"message":"the request exceeds the available '
        b'context size, try increasing it","type":"exceed_context_size_error"}'
        b"\n\ndata: [DONE]\n\n"
    )
    got, error, _ = _run_stream(
        LlamaCppAdapter,
        EngineKind.LLAMACPP,
        body,
        b"text/event-stream",
        {"model": "m", "messages": [{"role": "user", "content": "?"}]},
    )
    assert error is not None and "exceeds the available context size" in str(error)
    assert len(_events(b"".join(got))) == (1 if before else 0)


def test_ollama_request_mapping() -> None:
    request = to_ollama_request(
        {
            "model": "m",
            "tool_choice": "none",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": "hi"},
            ],
        },
        stream=False,
    )
    # Ollama's roles are system, user, assistant and tool; "none" means no tool may be called
    assert [m["role"] for m in request["messages"]] == ["system", "user"]
    assert "tools" not in request
    kept = to_ollama_request(
        {"model": "m", "tool_choice": "auto", "tools": [{"type": "x"}], "messages": []},
        stream=False,
    )
    assert kept["tools"] == [{"type": "x"}]
    turns = to_ollama_request(
        {
            "model": "m",
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "18C"},
            ],
        },
        stream=False,
    )
    # a result names the function it answers (Ollama's tool_name), found by the call's id
    assert turns["messages"][1] == {"role": "tool", "content": "18C", "tool_name": "weather"}
    assert turns["messages"][0]["tool_calls"] == [
        {"function": {"name": "weather", "arguments": {"city": "Paris"}}}
    ]


def test_ollama_embeddings_forward_dimensions() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (req := await _read_request(reader)) is not None:
            seen.append(req)
            body = json.dumps({"embeddings": [[0.1, 0.2]], "prompt_eval_count": 1}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            adapter = OllamaAdapter(EngineEndpoint("e", EngineKind.OLLAMA, server.url))
            reply = await adapter.embeddings({"model": "m", "input": "hi", "dimensions": 2})
            await adapter.client.close()
        assert reply["data"][0]["embedding"] == [0.1, 0.2]

    asyncio.run(main())
    sent = json.loads(seen[0].split(b"\r\n\r\n", 1)[1])
    assert sent == {"model": "m", "input": "hi", "dimensions": 2}
