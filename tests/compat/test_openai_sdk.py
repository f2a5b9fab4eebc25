"""The official ``openai`` SDK against FLM, unchanged: every call a client makes."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel

from flm.testing.emulators import EMBEDDING_DIM, expected_reply, word_count
from tests.compat.conftest import ALIAS, CHAT, EMBED, Flm

KINDS = ["openai", "ollama"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}


class City(BaseModel):
    name: str
    population: int


def _client(flm: Flm) -> openai.OpenAI:
    return openai.OpenAI(base_url=flm.base_url, api_key=flm.key, max_retries=0)


def test_models_list_offers_ids_plain_names_and_aliases(flm: Flm) -> None:
    ids = {m.id for m in _client(flm).models.list()}
    assert {flm.model("openai"), flm.model("ollama"), CHAT["openai"], CHAT["ollama"], ALIAS} <= ids
    assert _client(flm).models.retrieve(ALIAS).id == ALIAS


@pytest.mark.parametrize("kind", KINDS)
def test_chat_plain_and_streamed_by_id_plain_name_and_alias(flm: Flm, kind: str) -> None:
    client = _client(flm)
    names = [flm.model(kind), CHAT[kind]] + ([ALIAS] if kind == "openai" else [])
    for name in names:
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hello there"}]
        )
        assert reply.model == name
        assert reply.choices[0].message.content == expected_reply("hello there")
        text = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model=name, stream=True, messages=[{"role": "user", "content": "stream it"}]
            )
            if chunk.choices
        )
        assert text == expected_reply("stream it")


@pytest.mark.parametrize("kind", KINDS)
def test_tools_auto_and_forced(flm: Flm, kind: str) -> None:
    client = _client(flm)
    auto = client.chat.completions.create(
        model=CHAT[kind],
        tools=[TIME, WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "what does get_weather say for Paris"}],
    )
    call = auto.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert auto.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "text"}  # type: ignore[union-attr]
    # the result goes back; the model answers in text
    follow = client.chat.completions.create(
        model=CHAT[kind],
        tools=[TIME, WEATHER],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": "what does get_weather say for Paris"},
            auto.choices[0].message,  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
    )
    assert follow.choices[0].message.content
    forced = client.chat.completions.with_raw_response.create(
        model=CHAT[kind],
        tools=[TIME, WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        messages=[{"role": "user", "content": "get_time please"}],
    )
    parsed = forced.parse()
    assert parsed.choices[0].message.tool_calls[0].function.name == "get_time"  # type: ignore[index,union-attr]
    if kind == "ollama":  # Ollama cannot force a call: FLM says how it mapped the request
        assert "tool_choice" in (forced.headers.get("x-flm-warning") or "")
    streamed = client.chat.completions.create(
        model=CHAT[kind],
        tools=[WEATHER],
        stream=True,  # type: ignore[list-item]
        messages=[{"role": "user", "content": "get_weather for Oslo"}],
    )
    name, args = "", ""
    for chunk in streamed:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                name += (delta.function and delta.function.name) or ""
                args += (delta.function and delta.function.arguments) or ""
    assert name == "get_weather" and json.loads(args) == {"city": "text"}


@pytest.mark.parametrize("kind", KINDS)
def test_structured_output(flm: Flm, kind: str) -> None:
    client = _client(flm)
    parsed = client.chat.completions.parse(
        model=CHAT[kind],
        response_format=City,
        messages=[{"role": "user", "content": "the largest city in Norway"}],
    )
    assert parsed.choices[0].message.parsed == City(name="text", population=1)
    plain_json = client.chat.completions.create(
        model=CHAT[kind],
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "as JSON"}],
    )
    assert json.loads(plain_json.choices[0].message.content or "") == {
        "reply": expected_reply("as JSON")
    }


@pytest.mark.parametrize("kind", KINDS)
def test_embeddings(flm: Flm, kind: str) -> None:
    client = _client(flm)
    out = client.embeddings.create(model=EMBED[kind], input=["one", "two"])
    assert [len(d.embedding) for d in out.data] == [EMBEDDING_DIM, EMBEDDING_DIM]
    # the SDK's default asks for base64 and decodes it: check it equals the float form
    floats = client.embeddings.create(model=EMBED[kind], input="one", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(out.data[0].embedding, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_responses_with_previous_response_id(flm: Flm, kind: str) -> None:
    client = _client(flm)
    first = client.responses.create(model=CHAT[kind], input="remember the word lantern")
    assert first.output_text == expected_reply("remember the word lantern")
    second = client.responses.create(
        model=CHAT[kind], input="which word", previous_response_id=first.id
    )
    assert second.usage is not None and second.usage.input_tokens == (
        word_count("remember the word lantern")
        + word_count(first.output_text)
        + word_count("which word")
    )
    assert client.responses.retrieve(second.id).output_text == second.output_text


@pytest.mark.parametrize("kind", KINDS)
def test_legacy_completions(flm: Flm, kind: str) -> None:
    client = _client(flm)
    done = client.completions.create(model=CHAT[kind], prompt="once upon a time", max_tokens=40)
    assert done.choices[0].text == expected_reply("once upon a time")
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model=CHAT[kind], prompt="in a land", stream=True)
        if c.choices
    )
    assert text == expected_reply("in a land")


def test_unknown_and_ambiguous_names_get_the_errors_clients_expect(flm: Flm) -> None:
    client = _client(flm)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
