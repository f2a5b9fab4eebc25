"""What an engine cannot do is mapped, refused with a 422 naming the field, or passed with
``X-FLM-Warning`` — never dropped quietly."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.proxy.conftest import Stack, make_stack

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    for name in ("get_time", "get_weather")
]


@pytest.fixture
def ollama_stack(cli: Any) -> Iterator[Stack]:
    yield from make_stack(cli, "ollama", ["chat-model:1b", "nomic-embed-text:v1"])


def _post(stack: Stack, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(  # noqa: S310 - loopback only
        f"{stack.url}{path}",
        data=json.dumps(body).encode(),
        headers={**stack.auth, "Content-Type": "application/json"},
    )
    try:
        with _OPENER.open(request, timeout=20) as resp:
            return int(resp.status), dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), dict(exc.headers), json.loads(exc.read())


def test_forced_tool_choice_to_ollama_is_mapped_with_a_warning(ollama_stack: Stack) -> None:
    stack = ollama_stack
    ask = {
        "model": stack.model("chat-model:1b"),
        "tools": TOOLS,
        "messages": [{"role": "user", "content": "use get_time or get_weather"}],
    }
    status, headers, body = _post(stack, "/v1/chat/completions", ask)
    assert status == 200 and "x-flm-warning" not in {k.lower() for k in headers}
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    forced = {**ask, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    status, headers, body = _post(stack, "/v1/chat/completions", forced)
    assert status == 200, body
    # only the named function was offered, so that is the one called
    call = body["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "text"}
    warning = {k.lower(): v for k, v in headers.items()}["x-flm-warning"]
    assert "tool_choice" in warning and "get_weather" in warning
    status, headers, _ = _post(stack, "/v1/chat/completions", {**ask, "tool_choice": "required"})
    assert status == 200
    assert "tool_choice required" in {k.lower(): v for k, v in headers.items()}["x-flm-warning"]
    bad = {**ask, "tool_choice": {"type": "function", "function": {"name": "nope"}}}
    assert _post(stack, "/v1/chat/completions", bad)[0] == 400


def test_token_id_embedding_input_to_ollama_is_a_clear_422(ollama_stack: Stack) -> None:
    stack = ollama_stack
    status, _, body = _post(
        stack, "/v1/embeddings", {"model": stack.model("nomic-embed-text:v1"), "input": [[1, 2, 3]]}
    )
    assert status == 422 and body["error"]["message"].startswith("input:")
    assert ("POST", "/api/embed") not in stack.emu.requests  # refused before sending
    status, _, body = _post(
        stack, "/v1/embeddings", {"model": stack.model("nomic-embed-text:v1"), "input": ["a", "b"]}
    )
    assert status == 200 and len(body["data"]) == 2
