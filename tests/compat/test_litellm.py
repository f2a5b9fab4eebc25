"""The litellm SDK against FLM (as an OpenAI-compatible provider): chat plain and streamed,
tools, structured output, embeddings, text completions, Responses with
previous_response_id."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from flm.testing.emulators import EMBEDDING_DIM, expected_reply, word_count
from tests.compat.conftest import ALIAS, CHAT, EMBED, Flm

KINDS = ["openai", "ollama"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(autouse=True)
def _close_cached_clients() -> Iterator[None]:
    """litellm keeps a client per endpoint in a module cache; close them after each test
    (the gateway they point at is gone) rather than leave sockets to the interpreter's exit."""
    yield
    import litellm

    cache = litellm.in_memory_llm_clients_cache
    for client in list(getattr(cache, "cache_dict", {}).values()):
        close = getattr(client, "close", None)
        if callable(close) and not asyncio.iscoroutinefunction(close):
            close()
    cache.flush_cache()


def _where(flm: Flm) -> dict[str, Any]:
    return {"api_base": flm.base_url, "api_key": flm.key, "num_retries": 0}


@pytest.mark.parametrize("kind", KINDS)
def test_completion_stream_tools_structured(flm: Flm, kind: str) -> None:
    import litellm

    model = f"openai/{CHAT[kind]}"
    reply = litellm.completion(
        model=model, messages=[{"role": "user", "content": "hi lite"}], **_where(flm)
    )
    assert reply.choices[0].message.content == expected_reply("hi lite")  # type: ignore[union-attr]
    text = "".join(
        c.choices[0].delta.content or ""
        for c in litellm.completion(  # type: ignore[union-attr]
            model=model, stream=True, messages=[{"role": "user", "content": "flow"}], **_where(flm)
        )
    )
    assert text == expected_reply("flow")
    for choice in (None, {"type": "function", "function": {"name": "get_weather"}}):
        extra = {"tool_choice": choice} if choice else {}
        called = litellm.completion(
            model=model,
            tools=[WEATHER],
            **extra,
            **_where(flm),
            messages=[{"role": "user", "content": "get_weather, Bern"}],
        )
        call = called.choices[0].message.tool_calls[0]  # type: ignore[union-attr]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "text"}
    schema = {
        "type": "json_schema",
        "json_schema": {
            "name": "city",
            "schema": {
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "required": ["name"],
            },
        },
    }
    shaped = litellm.completion(
        model=model,
        response_format=schema,
        **_where(flm),
        messages=[{"role": "user", "content": "a city"}],
    )
    assert json.loads(shaped.choices[0].message.content) == {"name": "text"}  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", KINDS)
def test_embeddings_text_completion_and_responses(flm: Flm, kind: str) -> None:
    import litellm

    vectors = litellm.embedding(model=f"openai/{EMBED[kind]}", input=["x", "y"], **_where(flm))
    assert [len(d["embedding"]) for d in vectors.data] == [EMBEDDING_DIM, EMBEDDING_DIM]
    done = litellm.text_completion(
        model=f"text-completion-openai/{CHAT[kind]}", prompt="once upon", **_where(flm)
    )
    assert done.choices[0].text == expected_reply("once upon")
    first = litellm.responses(model=f"openai/{CHAT[kind]}", input="the word is kite", **_where(flm))
    second = litellm.responses(
        model=f"openai/{CHAT[kind]}",
        input="what word",
        previous_response_id=first.id,
        **_where(flm),
    )
    assert second.usage.input_tokens == (
        word_count("the word is kite")
        + word_count(expected_reply("the word is kite"))
        + word_count("what word")
    )


def test_alias(flm: Flm) -> None:
    import litellm

    reply = litellm.completion(
        model=f"openai/{ALIAS}", **_where(flm), messages=[{"role": "user", "content": "aliased"}]
    )
    assert reply.choices[0].message.content == expected_reply("aliased")  # type: ignore[union-attr]
