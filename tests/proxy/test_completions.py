"""``/v1/completions`` (legacy text completions) through the gateway, plain and streamed."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from flm.testing.emulators import Behaviour, expected_reply
from tests.proxy.conftest import Stack, make_stack

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _post(stack: Stack, body: dict[str, Any], auth: bool = True) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **(stack.auth if auth else {})}
    request = urllib.request.Request(  # noqa: S310 - loopback only
        f"{stack.url}/v1/completions", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with _OPENER.open(request, timeout=20) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), json.loads(exc.read())


def test_completions_plain_and_streamed(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key, max_retries=0)
    model = stack.model("chat-model:1b")
    reply = client.completions.create(model=model, prompt="once upon a time", max_tokens=50)
    assert reply.object == "text_completion" and reply.model == model
    assert reply.choices[0].text == expected_reply("once upon a time")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    stack.emu.behaviour = Behaviour(stream_chunks=4)
    pieces: list[str] = []
    finish = None
    for chunk in client.completions.create(
        model=model, prompt="tell a story", stream=True, stream_options={"include_usage": True}
    ):
        assert chunk.model == model
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == expected_reply("tell a story")
    assert len([p for p in pieces if p]) >= 2 and finish == "stop"
    if stack.emu.kind == "ollama":  # through Ollama's generate API
        assert ("POST", "/api/generate") in stack.emu.requests
        assert ("POST", "/v1/completions") not in stack.emu.requests
    else:
        assert ("POST", "/v1/completions") in stack.emu.requests
    # the same security as chat: no key, no completion
    assert _post(stack, {"model": model, "prompt": "x"}, auth=False)[0] == 401


@pytest.fixture
def ollama_stack(cli: Any) -> Iterator[Stack]:
    yield from make_stack(cli, "ollama", ["chat-model:1b"])


def test_ollama_refuses_what_generate_cannot_do(ollama_stack: Stack) -> None:
    stack = ollama_stack
    model = stack.model("chat-model:1b")
    for body, field in (
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x", "echo": True}, "echo"),
    ):
        status, reply = _post(stack, {"model": model, **body})
        assert status == 422, reply
        assert reply["error"]["message"].startswith(f"{field}:")
    assert ("POST", "/api/generate") not in stack.emu.requests  # refused before sending
