"""Stored Responses: previous_response_id, retrieve, delete, input_items — per key, bounded,
``store: false`` honoured, gone after the retention."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from flm.testing.emulators import expected_reply, word_count
from tests.proxy.conftest import Stack
from tests.support import FakeClock


def _client(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)


def test_conversation_state_is_per_key_and_deletable(vllm_stack: Stack, cli: Any) -> None:
    stack = vllm_stack
    model = stack.model("chat-model:1b")
    alice = _client(stack, stack.key)
    bob = _client(stack, cli("api-keys", "create", "--label", "bob").data["key"])
    first = alice.responses.create(model=model, input="my name is Ann", instructions="be brief")
    assert first.output_text == expected_reply("my name is Ann")
    second = alice.responses.create(
        model=model, input="what is my name", previous_response_id=first.id
    )
    # the engine saw the whole conversation: both user turns and the first answer (the
    # emulator counts one token per word of every message it is sent)
    assert second.usage is not None
    assert second.usage.input_tokens == (
        word_count("my name is Ann") + word_count(first.output_text) + word_count("what is my name")
    )
    assert second.previous_response_id == first.id
    got = alice.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    items = alice.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["message"]
    assert items.data[0].content[0].text == "what is my name"  # type: ignore[union-attr]
    # another key: the responses do not exist for it
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError):
        bob.responses.create(model=model, input="x", previous_response_id=first.id)
    alice.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(first.id)
    # store: false is honoured
    unstored = alice.responses.create(model=model, input="forget me", store=False)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(unstored.id)


def test_streamed_response_is_stored(vllm_stack: Stack) -> None:
    stack = vllm_stack
    client = _client(stack, stack.key)
    final = None
    for event in client.responses.create(
        model=stack.model("chat-model:1b"), input="stream me", stream=True
    ):
        if event.type == "response.completed":
            final = event.response
    assert final is not None
    got = client.responses.retrieve(final.id)
    assert got.output_text == expected_reply("stream me")
    follow = client.responses.create(
        model=stack.model("chat-model:1b"), input="again", previous_response_id=final.id
    )
    assert follow.usage is not None and follow.usage.input_tokens == (
        word_count("stream me") + word_count(got.output_text) + word_count("again")
    )


def test_gone_after_retention_and_bounded_per_key(vllm_stack: Stack) -> None:
    stack = vllm_stack
    client = _client(stack, stack.key)
    store = stack.gateway.runtime.responses
    clock = FakeClock(1000.0)
    stack.gateway.call(lambda: setattr(store, "clock", clock))
    kept = client.responses.create(model=stack.model("chat-model:1b"), input="hello")
    assert client.responses.retrieve(kept.id).id == kept.id
    clock.now += store.retention_s + 1
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    stack.gateway.call(lambda: store.configure(store.retention_s, 2))
    ids = [
        client.responses.create(model=stack.model("chat-model:1b"), input=f"n{i}").id
        for i in range(3)
    ]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])  # the oldest of this key's went first
    assert client.responses.retrieve(ids[2]).id == ids[2]
    assert len(store) == 2


def test_store_is_bounded_in_bytes_per_key() -> None:
    from flm.proxy.responses_store import ResponseStore

    store = ResponseStore(retention_s=60, max_per_key=100, clock=lambda: 0.0)
    store.max_bytes_per_key = 10_000
    for i in range(10):
        store.put("a", {"id": f"r{i}", "output": "x" * 3000}, [], [])
    store.put("b", {"id": "other", "output": "y"}, [], [])
    kept = [i for i in range(10) if store.get("a", f"r{i}") is not None]
    assert kept == [7, 8, 9]  # the newest that fit; the oldest went first
    assert store.get("b", "other") is not None  # another key's are untouched
    store.put("a", {"id": "huge", "output": "z" * 20_000}, [], [])
    assert store.get("a", "huge") is None and store.get("a", "r9") is not None
